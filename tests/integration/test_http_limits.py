"""The REST port's listener limits on a real server, on raw sockets: slow heads and bodies get a 408
and a close while others are served, idle keep-alive connections close after their timeout and
past the idle cap (oldest first), and past the connection cap a new connection gets a 503."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_onnx_model
from tests.integration.servers import ServerProcess, start_server
from tests.integration.test_http_protocol import Reader, post

HEADER_S, BODY_S, KEEPALIVE_S = 1.0, 1.0, 1.5
SWEEP_S = 0.25  # the server sweeps every quarter of its shortest timeout
SLACK_S = 1.0  # scheduling on a loaded machine
BODY = json.dumps(
    {"id": "x", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]}
).encode()
INFER = "/v2/models/sum/infer"


def sum_repository(base: Path) -> Path:
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    repo = base / "models"
    register(Repository(str(repo)), "sum", write_onnx_model(base / "sum.onnx"))
    return repo


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("timeouts")
    server = start_server(
        sum_repository(base), base, "--http-header-timeout", str(HEADER_S),
        "--http-body-timeout", str(BODY_S), "--http-keepalive", str(KEEPALIVE_S), grpc=False,
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def caps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("caps")
    server = start_server(
        sum_repository(base), base, "--max-connections", "3", "--max-idle-connections", "2",
        "--http-keepalive", "60", grpc=False,
    )  # fmt: skip
    yield server
    server.stop()


def connect(server: ServerProcess) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, Reader(sock)


def infer_ok(sock: socket.socket, reader: Reader) -> None:
    sock.sendall(post(INFER, BODY))
    status, _, body = reader.response()
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [4.0]


def served(server: ServerProcess) -> None:
    """A new connection gets an answer (and is closed again)."""
    sock, reader = connect(server)
    with sock:
        infer_ok(sock, reader)


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def closed_within(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closes `sock` without sending anything; fails past `timeout`."""
    started = time.monotonic()
    assert readable(sock, timeout), f"still open after {timeout} s"
    assert sock.recv(1) == b"", "the server sent data instead of closing"
    return time.monotonic() - started


def assert_408(reader: Reader, *words: str) -> None:
    status, headers, body = reader.response()
    assert status == 408, body
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    message = json.loads(body)["error"]
    assert all(w in message for w in words), message
    assert reader.closed(timeout=2)


# --- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("after_response", [False, True], ids=["first-request", "keep-alive"])
def test_slowloris_head_gets_408_while_others_are_served(
    timeouts: ServerProcess, after_response: bool
) -> None:
    sock, reader = connect(timeouts)
    with sock:
        if after_response:
            infer_ok(sock, reader)  # then the next head is trickled on the same connection
        # A head that never ends: one byte of a header line every 100 ms.
        head = post(INFER, BODY)[: -len(BODY) - 4] + b"\r\nX-Slow: " + b"a" * 200
        started = time.monotonic()
        for i, byte in enumerate(head):
            try:
                sock.send(bytes([byte]))
            except OSError:
                break  # reset after the close: the answer is already here
            if i == 20:
                served(timeouts)  # the slow client holds nobody else up
            if readable(sock, 0.1):
                break
        took = time.monotonic() - started
        window = max(HEADER_S, KEEPALIVE_S) if after_response else HEADER_S
        assert window - 0.1 <= took <= window + SWEEP_S + SLACK_S, took
        assert_408(reader, "head", f"{HEADER_S:g} s")
    served(timeouts)


@pytest.mark.parametrize("path", [INFER, INFER + "?trace=1"], ids=["direct", "asgi"])
def test_slow_body_gets_408(timeouts: ServerProcess, path: str) -> None:
    sock, reader = connect(timeouts)
    with sock:
        request = post(path, BODY)
        sock.sendall(request[: len(request) - len(BODY) // 2])  # the head and half the body
        started = time.monotonic()
        assert readable(sock, BODY_S + SWEEP_S + SLACK_S + 2)
        took = time.monotonic() - started
        assert BODY_S - 0.1 <= took <= BODY_S + SWEEP_S + SLACK_S, took
        assert_408(reader, "body", f"{BODY_S:g} s")
    served(timeouts)


def test_keep_alive_timeout_closes_an_idle_connection(timeouts: ServerProcess) -> None:
    sock, reader = connect(timeouts)
    with sock:
        infer_ok(sock, reader)
        took = closed_within(sock, KEEPALIVE_S + SWEEP_S + SLACK_S + 2)
        assert KEEPALIVE_S - 0.1 <= took <= KEEPALIVE_S + SWEEP_S + SLACK_S, took


def test_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    timeouts: ServerProcess,
) -> None:
    sock, _ = connect(timeouts)
    with sock:
        took = closed_within(sock, HEADER_S + SWEEP_S + SLACK_S + 2)
        assert HEADER_S - 0.1 <= took <= HEADER_S + SWEEP_S + SLACK_S, took


def test_a_busy_connection_is_not_timed_out(timeouts: ServerProcess) -> None:
    """Requests that keep coming, each well within the limits, for longer than any timeout."""
    sock, reader = connect(timeouts)
    with sock:
        deadline = time.monotonic() + max(HEADER_S, BODY_S, KEEPALIVE_S) + 1.0
        while time.monotonic() < deadline:
            infer_ok(sock, reader)
            time.sleep(0.3)


# --- connection caps (--max-connections 3 --max-idle-connections 2) ---------------------------


def settle() -> None:
    time.sleep(0.3)  # for the server to see the closes of the previous test's sockets


def test_past_max_connections_a_new_connection_gets_503(caps: ServerProcess) -> None:
    settle()
    held = [connect(caps)[0] for _ in range(3)]  # open, nothing sent: not idle, not closable
    try:
        time.sleep(0.2)
        sock, reader = connect(caps)
        with sock:
            sock.sendall(post(INFER, BODY))
            status, headers, body = reader.response()
            assert status == 503, body
            assert headers["connection"] == "close"
            assert headers["retry-after"] == "1"
            assert "too many open connections (limit 3)" in json.loads(body)["error"]
            assert reader.closed(timeout=3)
        held.pop().close()
        time.sleep(0.2)
        served(caps)  # room again
    finally:
        for s in held:
            s.close()


def test_at_max_connections_the_oldest_idle_one_makes_room(caps: ServerProcess) -> None:
    settle()
    idle, idle_reader = connect(caps)
    busy = [connect(caps)[0] for _ in range(2)]
    try:
        infer_ok(idle, idle_reader)  # idle from now on
        time.sleep(0.1)
        served(caps)  # the fourth connection is served ...
        assert closed_within(idle, 2) < 2  # ... because the idle one was closed for it
    finally:
        idle.close()
        for s in busy:
            s.close()


def test_past_max_idle_connections_the_oldest_idle_one_closes(caps: ServerProcess) -> None:
    settle()
    conns = [connect(caps) for _ in range(3)]
    try:
        for sock, reader in conns:
            infer_ok(sock, reader)
            time.sleep(0.05)  # so that they go idle in this order
        first = conns[0][0]
        assert closed_within(first, 2) < 2  # the third idle one pushed out the first
        for sock, reader in conns[1:]:
            infer_ok(sock, reader)  # the two kept ones still serve
    finally:
        for sock, _ in conns:
            sock.close()
