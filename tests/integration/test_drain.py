"""Graceful drain (serve --drain-seconds): a real server, real HTTP and gRPC clients.

On SIGTERM the server leaves readiness at once, goes on answering for the drain, closes gRPC
with GOAWAY, flushes the audit and exits 0; SIGINT is the quick stop; --watch converges on
aliases and versions that change in the repository while it serves.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inferplane.repository.register import register as register_model
from inferplane.repository.store import Repository
from tests.integration.servers import ServerProcess, start_server

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def _repo(tmp_path: Path, make_onnx_model: Callable[..., str], versions: int = 1) -> Path:
    repo = tmp_path / "repo"
    for _ in range(versions):
        register_model(Repository(str(repo)), "m", make_onnx_model(tmp_path / "a" / "m.onnx"))
    return repo


def _infer(server: ServerProcess, client: httpx.Client) -> int:
    return client.post(f"{server.url}/v2/models/m/infer", json=BODY, timeout=5).status_code


def _exit_code(server: ServerProcess, timeout: float) -> int | None:
    try:
        return server.process.wait(timeout)
    except Exception:
        return None


def test_sigterm_leaves_readiness_at_once_serves_through_the_drain_and_exits_0(
    tmp_path: Path, make_onnx_model: Callable[..., str]
) -> None:
    audit = tmp_path / "audit.db"
    server = start_server(
        _repo(tmp_path, make_onnx_model), tmp_path, "--drain-seconds", "3",
        "--audit-sink", str(audit),
    )  # fmt: skip
    try:
        with httpx.Client() as client:
            assert _infer(server, client) == 200
            stop = threading.Event()
            answers: list[int] = []

            def load() -> None:  # a client that keeps its keep-alive connection throughout
                with httpx.Client() as own:
                    while not stop.is_set():
                        try:
                            answers.append(_infer(server, own))
                        except httpx.TransportError:
                            answers.append(-1)
                        time.sleep(0.01)

            worker = threading.Thread(target=load)
            worker.start()
            time.sleep(0.3)
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            ready = 200
            while time.monotonic() - sent < 1.0 and ready == 200:
                ready = client.get(f"{server.url}/v2/health/ready").status_code
            assert ready == 503, "readiness stays 200 after SIGTERM"
            assert time.monotonic() - sent < 1.0
            # Live and serving during the drain, on new connections too.
            time.sleep(1.0)
            with httpx.Client() as fresh:
                assert fresh.get(f"{server.url}/v2/health/live").status_code == 200
                assert _infer(server, fresh) == 200
            grpc = grpcclient.InferenceServerClient(server.grpc_target)
            assert grpc.is_server_live()
            assert not grpc.is_server_ready()
            grpc.close()
            assert server.process.poll() is None, "exited before the drain ended"
            code = _exit_code(server, 10)
            stop.set()
            worker.join(10)
        took = time.monotonic() - sent
        assert code == 0, server.log()
        assert 2.8 <= took < 8, f"drain of 3 s took {took:.1f} s"
        assert answers and answers.count(200) == len(answers) - answers.count(-1)
        # Every request answered before the port closed is in the audit (flushed on exit).
        answered = answers.count(200) + 2
        with sqlite3.connect(audit) as conn:
            (rows,) = conn.execute("SELECT count(*) FROM audit WHERE status = 200").fetchone()
        assert rows == answered
        assert "draining" in server.log()
    finally:
        server.stop()


def test_sigint_is_the_quick_stop(tmp_path: Path, make_onnx_model: Callable[..., str]) -> None:
    server = start_server(_repo(tmp_path, make_onnx_model), tmp_path, "--drain-seconds", "30")
    try:
        sent = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert _exit_code(server, 10) == 0, server.log()
        assert time.monotonic() - sent < 8
    finally:
        server.stop()


def test_a_second_sigterm_ends_the_drain(
    tmp_path: Path, make_onnx_model: Callable[..., str]
) -> None:
    server = start_server(_repo(tmp_path, make_onnx_model), tmp_path, "--drain-seconds", "30")
    try:
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None
        server.process.send_signal(signal.SIGTERM)
        assert _exit_code(server, 10) == 0, server.log()
        assert time.monotonic() - sent < 8
    finally:
        server.stop()


def _version_answering(server: ServerProcess, ref: str = "") -> str:
    path = f"/v2/models/m/versions/{ref}/infer" if ref else "/v2/models/m/infer"
    response = httpx.post(server.url + path, json=BODY, timeout=5)
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


@pytest.mark.parametrize("load", ["eager", "on-demand"])
def test_watch_moves_aliases_and_takes_new_versions(
    tmp_path: Path, make_onnx_model: Callable[..., str], load: str
) -> None:
    repo = _repo(tmp_path, make_onnx_model, versions=2)
    Repository(str(repo)).set_alias("m", "production", 1)
    server = start_server(
        repo, tmp_path, "--watch", "--watch-interval", "0.2", "--load", load, grpc=False
    )
    try:
        assert _version_answering(server) == "1"
        Repository(str(repo)).set_alias("m", "production", 2)
        deadline = time.monotonic() + 5
        while _version_answering(server) != "2":
            assert time.monotonic() < deadline, "the alias move never reached the server"
            time.sleep(0.1)
        # A version registered while serving joins (eager: loaded before the alias names it).
        register_model(Repository(str(repo)), "m", make_onnx_model(tmp_path / "b" / "m.onnx"))
        Repository(str(repo)).set_alias("m", "production", 3)
        deadline = time.monotonic() + 10
        while _version_answering(server) != "3":
            assert time.monotonic() < deadline, "version 3 never served"
            time.sleep(0.1)
        index = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
        assert {row["version"] for row in index} == {"1", "2", "3"}
        if load == "eager":
            states = {row["version"]: row["state"] for row in index}
            assert states["3"] == "READY"
        assert "aliases production 2 -> 3" in server.log()
    finally:
        server.stop()


def test_queue_depth_and_inflight_are_exported(
    tmp_path: Path, make_onnx_model: Callable[..., str]
) -> None:
    server = start_server(_repo(tmp_path, make_onnx_model), tmp_path, grpc=False)
    try:
        assert _version_answering(server) == "1"
        text = httpx.get(f"{server.url}/metrics").text
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        assert 'inferplane_queue_depth{model="m",version="1"} 0.0' in lines
        assert any(line.startswith("inferplane_inflight_requests ") for line in lines)
        assert np.isfinite(float(next(x for x in lines if "inflight" in x).split()[-1]))
    finally:
        server.stop()
