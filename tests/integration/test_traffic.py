"""Services on a real server: splits, A/B, sticky keys, shadow, fallback, breaker, cache, audit.

The repository holds the example `tabular` model (versions 1 and 2) and python models that
misbehave on purpose, each with tabular's signature: `slow` (200 ms), `failing` (always raises),
and `flaky_a`/`flaky_b` (raise while their flag file exists, so a test can break and mend them).
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec
from tests.integration.servers import ServerProcess, start_server

MISBEHAVING = textwrap.dedent(
    """
    import os, time
    import numpy as np

    MODE, FLAG = {mode!r}, {flag!r}


    class Model:
        calls = 0

        def predict(self, inputs):
            n = inputs["input"].shape[0]
            if MODE == "alternating" and inputs["input"].any():
                self.calls += 1
                if self.calls % 2:
                    raise RuntimeError("failing every other call on purpose")
            if MODE == "slow":
                time.sleep(0.2)
            warm_up = not inputs["input"].any()  # the server warms models up on zeros
            if not warm_up and (MODE == "failing" or (MODE == "flaky" and os.path.exists(FLAG))):
                raise RuntimeError("failing on purpose")
            return {{"label": np.zeros(n, dtype=np.int64),
                     "probabilities": np.full((n, 2), 0.5, dtype=np.float32)}}
    """
)

POLICY = """
services:
  split:
    routes:
      - {model: tabular, version: production, weight: 90}
      - {model: tabular, version: canary, weight: 10}
    match:
      - {name: b, header: x-arm, values: [b], route: {model: tabular, version: 2}}
    sticky: {header: x-user}
  shadowed:
    routes: [{model: tabular, version: 1, weight: 100}]
    shadow: {model: slow, percent: 100, max_inflight: 4}
  shadow_fails:
    routes: [{model: tabular, version: 1, weight: 100}]
    shadow: {model: failing}
  diverging:
    routes: [{model: tabular, version: 1, weight: 100}]
    shadow: {model: tabular, version: 2}
  fails_over:
    routes: [{model: failing, weight: 100}]
    fallback: {model: tabular, version: 1}
    breaker: {consecutive_failures: 3, error_rate: null, cooldown_s: 60}
  mends:
    routes: [{model: flaky_a, weight: 100}]
    fallback: {service: backup}
    breaker: {consecutive_failures: 2, error_rate: null, cooldown_s: 0.5}
  backup:
    routes: [{model: tabular, version: 1, weight: 100}]
  cached:
    routes: [{model: flaky_b, weight: 100}]
    cache: {size: 100, ttl_s: 60}
    breaker: null
  retried:
    routes: [{model: alternating, weight: 100}]
    retries: {attempts: 1, backoff_ms: 1}
    breaker: null
  hurried:
    routes: [{model: slow, weight: 100, timeout_ms: 50}]
    fallback: {model: tabular, version: 1}
    breaker: null
"""


@pytest.fixture(scope="module")
def traffic_repo(
    example_build: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    base = tmp_path_factory.mktemp("traffic")
    repo = base / "models"
    repo.mkdir()
    shutil.copytree(example_build[0] / "tabular", repo / "tabular")
    store = Repository(str(repo))
    for name, mode in [("slow", "slow"), ("failing", "failing"), ("flaky_a", "flaky"),
                       ("flaky_b", "flaky"), ("alternating", "alternating")]:  # fmt: skip
        folder = base / name
        folder.mkdir()
        (folder / "model.py").write_text(MISBEHAVING.format(mode=mode, flag=str(_flag(repo, name))))
        register(
            store, name, str(folder),
            inputs=[TensorSpec("input", "FP32", [-1, 32])],
            outputs=[TensorSpec("label", "INT64", [-1]), TensorSpec("probabilities", "FP32", [-1, 2])],
        )  # fmt: skip
    return repo


@pytest.fixture(scope="module")
def policy_file(traffic_repo: Path) -> Path:
    path = traffic_repo.parent / "services.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture(scope="module")
def traffic_server(
    traffic_repo: Path, policy_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(
        traffic_repo, tmp_path_factory.mktemp("traffic-logs"), "--services", str(policy_file),
        "--watch",
    )  # fmt: skip
    wait_for_services(srv, "split")
    yield srv
    srv.stop()


def wait_for_services(srv: ServerProcess, name: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = httpx.get(srv.url + "/inferplane/services").json()
        if name in doc["services"]:
            return doc
        time.sleep(0.1)
    raise TimeoutError(f"service {name} never appeared:\n{srv.log()}")


ROW = np.random.default_rng(3).random((1, 32), dtype=np.float32)


def body(row: np.ndarray = ROW, request_id: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(row.shape),
                    "data": row.reshape(-1).tolist()}]
    }  # fmt: skip
    if request_id:
        doc["id"] = request_id
    return doc


def infer(client: httpx.Client, service: str, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", {})
    return client.post(f"/v2/models/{service}/infer", json=body(**kw), headers=headers)


def metric(srv: ServerProcess, prefix: str) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def test_split_over_http_names_the_route_in_header_and_parameters(
    traffic_server: ServerProcess,
) -> None:
    with httpx.Client(base_url=traffic_server.url) as client:
        seen = Counter()
        for _ in range(1000):
            r = infer(client, "split")
            assert r.status_code == 200, r.text
            doc = r.json()
            route = r.headers["x-inferplane-route"]
            assert doc["parameters"]["inferplane_route"] == route
            seen[(route, doc["model_version"])] += 1
        assert set(seen) == {("primary", "1"), ("canary", "2")}
        assert abs(seen[("canary", "2")] / 10 - 10) <= 4, seen
        # The A/B rule wins over the weights, every time.
        for _ in range(20):
            r = infer(client, "split", headers={"x-arm": "b"})
            assert (r.headers["x-inferplane-route"], r.json()["model_version"]) == ("ab:b", "2")
        # A version asked by number bypasses the policy; a service takes no version.
        r = client.post("/v2/models/tabular/versions/2/infer", json=body())
        assert r.headers["x-inferplane-route"] == "direct" and "parameters" not in r.json()
        r = client.post("/v2/models/split/versions/2/infer", json=body())
        assert r.status_code == 404 and "is a service" in r.json()["error"]
        # Metadata of a service is its first route's model, so V2 clients can discover it.
        meta = client.get("/v2/models/split").json()
        assert meta["name"] == "tabular" and meta["inputs"][0]["name"] == "input"


def test_sticky_users_never_switch_arms(traffic_server: ServerProcess) -> None:
    with httpx.Client(base_url=traffic_server.url) as client:
        for user in range(60):
            versions = {
                infer(client, "split", headers={"x-user": f"user-{user}"}).json()["model_version"]
                for _ in range(4)
            }
            assert len(versions) == 1, f"user-{user} saw versions {versions}"


def test_slow_or_failing_shadow_changes_nothing_for_the_caller(
    traffic_server: ServerProcess,
) -> None:
    def p99(service: str) -> tuple[float, set[int]]:
        times, statuses = [], set()
        with httpx.Client(base_url=traffic_server.url) as client:
            infer(client, service)
            for _ in range(200):
                t0 = time.perf_counter()
                r = infer(client, service)
                times.append(time.perf_counter() - t0)
                statuses.add(r.status_code)
                assert r.json()["model_version"] == "1"
        return statistics.quantiles(times, n=100)[98], statuses

    base, base_status = p99("backup")  # tabular:1 with no shadow
    slow, slow_status = p99("shadowed")  # + a shadow that sleeps 200 ms per call
    failing, failing_status = p99("shadow_fails")  # + a shadow that raises
    assert base_status == slow_status == failing_status == {200}
    # Had the caller waited for the shadow, p99 would be >= 200 ms.
    assert slow < max(3 * base, base + 0.02), (base, slow)
    assert failing < max(3 * base, base + 0.02), (base, failing)
    srv = traffic_server
    assert metric(srv, 'inferplane_shadow_requests_total{model="failing",outcome="error"') >= 100
    assert metric(srv, 'inferplane_shadow_requests_total{model="slow",outcome="skipped"') > 0


def test_shadow_divergence_metrics(traffic_server: ServerProcess) -> None:
    rng = np.random.default_rng(5)
    with httpx.Client(base_url=traffic_server.url) as client:
        for _ in range(100):
            assert (
                infer(client, "diverging", row=rng.random((4, 32), dtype=np.float32)).json()[
                    "model_version"
                ]
                == "1"
            )
    time.sleep(0.5)
    srv = traffic_server
    labels = 'service="diverging",version="2"'
    rows = metric(
        srv, f'inferplane_shadow_compared_rows_total{{model="tabular",output="label",{labels}'
    )
    assert rows == 400
    differ = metric(
        srv, f'inferplane_shadow_disagreeing_rows_total{{model="tabular",output="label",{labels}'
    )
    assert 0 <= differ < rows
    count = metric(
        srv,
        f'inferplane_shadow_abs_difference_count{{model="tabular",output="probabilities",{labels}',
    )
    total = metric(
        srv,
        f'inferplane_shadow_abs_difference_sum{{model="tabular",output="probabilities",{labels}',
    )
    assert count == 100 and total > 0  # versions 1 and 2 are different forests


def test_failing_version_falls_back_and_its_breaker_opens(traffic_server: ServerProcess) -> None:
    def failures() -> int:
        stats = httpx.get(traffic_server.url + "/v2/models/failing/stats").json()
        return int(stats["model_stats"][0]["inference_stats"]["fail"]["count"])

    before = failures()  # the shadow tests call this model too
    with httpx.Client(base_url=traffic_server.url) as client:
        for _ in range(10):
            r = infer(client, "fails_over")
            assert r.status_code == 200, r.text
            assert r.headers["x-inferplane-route"] == "fallback"
            assert (r.json()["model_name"], r.json()["model_version"]) == ("tabular", "1")
        doc = client.get("/inferplane/services").json()["services"]["fails_over"]
        assert doc["routes"][0]["breaker"] == "open"
    assert metric(traffic_server, 'inferplane_circuit_breaker_state{model="failing"') == 1
    # Once open, the failing version is not even called: its failures stop at the threshold.
    assert failures() - before == 3


def test_breaker_half_opens_after_cooldown_and_recovers(traffic_server: ServerProcess) -> None:
    srv = traffic_server
    flaky = _flag_of(srv, "flaky_a")
    with httpx.Client(base_url=srv.url) as client:
        assert infer(client, "mends").headers["x-inferplane-route"] == "primary"
        flaky.touch()
        routes = [infer(client, "mends").headers["x-inferplane-route"] for _ in range(5)]
        assert routes == ["fallback"] * 5
        doc = client.get("/inferplane/services").json()["services"]["mends"]
        assert doc["routes"][0]["breaker"] == "open"
        flaky.unlink()
        time.sleep(0.6)  # cooldown 0.5 s: the next call is the probe
        r = infer(client, "mends")
        assert r.headers["x-inferplane-route"] == "primary" and r.json()["model_name"] == "flaky_a"
        doc = client.get("/inferplane/services").json()["services"]["mends"]
        assert doc["routes"][0]["breaker"] == "closed"


def test_cached_answer_for_the_same_input_when_the_version_fails(
    traffic_server: ServerProcess,
) -> None:
    flaky = _flag_of(traffic_server, "flaky_b")
    other = np.full((1, 32), 0.25, dtype=np.float32)
    with httpx.Client(base_url=traffic_server.url) as client:
        first = infer(client, "cached")
        assert first.headers["x-inferplane-route"] == "primary"
        flaky.touch()
        try:
            again = infer(client, "cached")
            assert again.status_code == 200
            assert again.headers["x-inferplane-route"] == "cache"
            assert again.json()["outputs"] == first.json()["outputs"]
            unseen = infer(client, "cached", row=other)
            assert unseen.status_code == 500 and "failing on purpose" in unseen.json()["error"]
        finally:
            flaky.unlink()


def test_retry_turns_a_transient_failure_into_an_answer(traffic_server: ServerProcess) -> None:
    with httpx.Client(base_url=traffic_server.url) as client:
        for _ in range(10):
            r = infer(client, "retried")
            assert r.status_code == 200, r.text
            assert r.headers["x-inferplane-route"] == "primary"
        stats = client.get("/v2/models/alternating/stats").json()["model_stats"][0]
        assert stats["inference_stats"]["fail"]["count"] == 10  # every first try failed
        assert stats["inference_stats"]["success"]["count"] == 10
        # Without retries the same model fails every other call.
        r = client.post("/v2/models/alternating/infer", json=body())
        assert r.status_code == 500 and "every other call" in r.json()["error"]


def test_route_timeout_falls_back_without_hanging(traffic_server: ServerProcess) -> None:
    with httpx.Client(base_url=traffic_server.url) as client:
        for _ in range(3):
            t0 = time.perf_counter()
            r = infer(client, "hurried")
            elapsed = time.perf_counter() - t0
            assert r.status_code == 200 and r.headers["x-inferplane-route"] == "fallback"
            assert elapsed < 0.5, elapsed


def test_grpc_service_call_names_the_route(traffic_server: ServerProcess) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(traffic_server.grpc_target)
    tensor = grpcclient.InferInput("input", [1, 32], "FP32")
    tensor.set_data_from_numpy(ROW)
    result = client.infer("split", [tensor], headers={"x-arm": "b"})
    response = result.get_response()
    assert response.model_version == "2"
    assert response.parameters["inferplane_route"].string_param == "ab:b"


def test_bad_policy_on_reload_keeps_the_previous_one(
    traffic_server: ServerProcess, policy_file: Path
) -> None:
    good = policy_file.read_text()
    try:
        policy_file.write_text(good.replace("weight: 90}", "weight: 95}"))
        time.sleep(2.5)
        assert "route weights add up to 105, not 100" in traffic_server.log()
        with httpx.Client(base_url=traffic_server.url) as client:
            assert infer(client, "split").status_code == 200
            doc = client.get("/inferplane/services").json()["services"]["split"]
            assert [r["weight"] for r in doc["routes"]] == [90, 10]
            policy_file.write_text(good.replace("weight: 90}", "weight: 80}").replace(
                "weight: 10}", "weight: 20}"))  # fmt: skip
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                doc = client.get("/inferplane/services").json()["services"]["split"]
                if doc["routes"][0]["weight"] == 80:
                    break
                time.sleep(0.2)
            assert [r["weight"] for r in doc["routes"]] == [80, 20]
    finally:
        policy_file.write_text(good)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: {s: {routes: [{model: tabular, weight: 50}]}}", "add up to 50"),
        (
            "services:\n  a: {routes: [{model: tabular, weight: 100}], fallback: {service: b}}\n"
            "  b: {routes: [{model: tabular, weight: 100}], fallback: {service: a}}\n",
            "fallback cycle: a -> b -> a",
        ),
    ],
)
def test_serve_refuses_a_bad_policy_file_at_start(
    traffic_repo: Path, tmp_path: Path, text: str, message: str
) -> None:
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "inferplane", "serve", "--repository", str(traffic_repo),
         "--services", str(path), "--http-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_version_in_policy_is_refused_and_logged(
    traffic_repo: Path, tmp_path: Path
) -> None:
    path = tmp_path / "services.yaml"
    path.write_text("services: {s: {routes: [{model: tabular, version: 7, weight: 100}]}}")
    srv = start_server(traffic_repo, tmp_path, "--services", str(path), "--model", "tabular")
    try:
        deadline = time.monotonic() + 10
        while "no version or alias '7'" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "service 's' route 0: model 'tabular' has no version or alias '7'" in srv.log()
        r = httpx.post(srv.url + "/v2/models/s/infer", json=body())
        assert r.status_code == 404
    finally:
        srv.stop()


def test_every_request_of_a_load_has_one_audit_record(traffic_repo: Path, tmp_path: Path) -> None:
    policy = tmp_path / "services.yaml"
    policy.write_text(POLICY.split("  shadowed:")[0])  # just the split service
    srv = start_server(traffic_repo, tmp_path, "--services", str(policy), "--model", "tabular")
    answers: dict[str, str] = {}
    lock = threading.Lock()
    try:
        wait_for_services(srv, "split")

        def worker() -> None:
            with httpx.Client(base_url=srv.url) as client:
                for _ in range(100):
                    rid = str(uuid.uuid4())
                    r = infer(client, "split", request_id=rid, headers={"x-tenant": "acme"})
                    assert r.status_code == 200
                    with lock:
                        answers[rid] = r.json()["model_version"]

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(base_url=srv.url) as client:
            assert (
                client.post("/v2/models/nope/infer", json=body(request_id="bad-1")).status_code
                == 404
            )
    finally:
        srv.stop()  # graceful: the audit log flushes before exit
    with sqlite3.connect(srv.audit_db) as db:
        rows = db.execute(
            "SELECT request_id, version, service, tenant, status FROM audit"
        ).fetchall()
    recorded = {r[0]: r for r in rows}
    assert len(rows) == len(recorded) == 801, "one record per request, none lost or doubled"
    for rid, version in answers.items():
        assert recorded[rid][1:] == (version, "split", "acme", 200)
    assert recorded["bad-1"][4] == 404


def _flag(repo: Path, model: str) -> Path:
    """While this file exists, the flaky model of that name fails."""
    return repo.parent / f"{model}.broken"


def _flag_of(srv: ServerProcess, model: str) -> Path:
    args = list(srv.process.args)  # type: ignore[arg-type]
    return _flag(Path(args[args.index("--repository") + 1]), model)


async def test_10000_predictions_split_90_10_within_one_and_a_half_points(
    traffic_repo: Path, tmp_path: Path
) -> None:
    """Through the in-process predictor that streaming and batch use: real models, real engine."""
    from inferplane.context import RequestContext
    from inferplane.predictor import open_predictor

    policy = tmp_path / "services.yaml"
    policy.write_text(POLICY.split("  shadowed:")[0])
    async with open_predictor(
        repository=str(traffic_repo), models=["tabular"], services=str(policy)
    ) as predictor:
        seen = Counter()
        for _ in range(10_000):
            p = await predictor.predict("split", {"input": ROW}, context=RequestContext())
            seen[(p.route, p.model_version)] += 1
    assert set(seen) == {("primary", "1"), ("canary", "2")}
    assert abs(seen[("canary", "2")] / 100 - 10) <= 1.5, seen
