"""The REST port's HTTP/1.1 handling on raw sockets: the direct infer path and uvicorn's ASGI path
share connections, keep-alive, pipelining, limits and closes."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from tests.integration.servers import ServerProcess

ROW = [0.5] * 32
LIMIT = 2 * 1024 * 1024  # the shared server's --max-payload-mb 2


def infer_body(request_id: str) -> bytes:
    doc = {
        "id": request_id,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": ROW}],
    }
    return json.dumps(doc).encode()


def post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = [f"POST {path} HTTP/{version}", "Host: test", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Reader:
    """Reads HTTP/1.1 responses off a socket (Content-Length bodies, as the server sends)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        size = int(headers.get("content-length", "0"))
        while len(self.buf) < size:
            self._fill()
        body, self.buf = self.buf[:size], self.buf[size:]
        return status, headers, body

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed its side (after any bytes already read)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False


def connect(server: ServerProcess) -> tuple[socket.socket, Reader]:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock, Reader(sock)


def answered(status: int, body: bytes, request_id: str) -> dict[str, Any]:
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    assert doc["id"] == request_id
    assert doc["model_name"] == "tabular"
    return doc


def test_keep_alive_serves_many_infers_on_one_connection(server: ServerProcess) -> None:
    sock, reader = connect(server)
    with sock:
        for i in range(5):
            sock.sendall(post("/v2/models/tabular/infer", infer_body(f"r{i}")))
            status, headers, body = reader.response()
            doc = answered(status, body, f"r{i}")
            assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
            assert headers["content-type"] == "application/json"
            assert headers["x-inferplane-route"]
            assert "date" in headers
            assert "connection" not in headers


def test_pipelined_requests_answer_in_order(server: ServerProcess) -> None:
    """Three requests in one write, an ASGI one between two infers: answers keep their order."""
    sock, reader = connect(server)
    with sock:
        sock.sendall(
            post("/v2/models/tabular/infer", infer_body("first"))
            + b"GET /v2/models/tabular HTTP/1.1\r\nHost: test\r\n\r\n"
            + post("/v2/models/tabular/versions/2/infer", infer_body("third"))
        )
        status, _, body = reader.response()
        answered(status, body, "first")
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["name"] == "tabular"
        status, _, body = reader.response()
        assert answered(status, body, "third")["model_version"] == "2"


@pytest.mark.parametrize(
    ("extra", "version"), [(("Connection: close",), "1.1"), ((), "1.0")], ids=["close", "http10"]
)
def test_connection_close_is_honoured(
    server: ServerProcess, extra: tuple[str, ...], version: str
) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(post("/v2/models/tabular/infer", infer_body("c"), *extra, version=version))
        status, headers, body = reader.response()
        answered(status, body, "c")
        assert headers["connection"] == "close"
        assert reader.closed()


def test_declared_oversize_body_refused_at_once_and_connection_reused(
    server: ServerProcess,
) -> None:
    sock, reader = connect(server)
    with sock:
        size = LIMIT + 1024
        sock.sendall(
            f"POST /v2/models/tabular/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        # The 413 comes before the body is sent.
        status, _, body = reader.response()
        assert status == 413
        assert (
            f"request body of {size} bytes exceeds the limit of {LIMIT} bytes"
            in json.loads(body)["error"]
        )
        sock.sendall(b" " * size)  # read and dropped by the server
        sock.sendall(post("/v2/models/tabular/infer", infer_body("after")))
        status, _, body = reader.response()
        answered(status, body, "after")


def chunked(path: str, body: bytes, piece: int) -> bytes:
    out = [f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()]
    for i in range(0, len(body), piece):
        part = body[i : i + piece]
        out.append(b"%x\r\n%s\r\n" % (len(part), part))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def test_chunked_bodies_are_read_whole_and_limited(server: ServerProcess) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(chunked("/v2/models/tabular/infer", infer_body("chunks"), 7))
        status, _, body = reader.response()
        answered(status, body, "chunks")

    sock, reader = connect(server)
    with sock:
        sock.sendall(chunked("/v2/models/tabular/infer", b" " * (LIMIT + 10), 256 * 1024))
        status, _, body = reader.response()
        assert status == 413
        assert f"exceeds the limit of {LIMIT} bytes" in json.loads(body)["error"]


def test_body_split_across_segments(server: ServerProcess) -> None:
    body = infer_body("slow")
    request = post("/v2/models/tabular/infer", body)
    sock, reader = connect(server)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head_len = len(request) - len(body)
        for part in (request[:10], request[10:head_len], body[:100], body[100:]):
            sock.sendall(part)
            time.sleep(0.05)
        status, _, answer = reader.response()
        answered(status, answer, "slow")


@pytest.mark.parametrize(
    "path",
    ["/v2/models/tabular/infer?trace=1", "/v2/models/tab%75lar/infer"],
    ids=["query-string", "percent-encoded"],
)
def test_targets_the_direct_path_leaves_to_asgi(server: ServerProcess, path: str) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(post(path, infer_body("asgi")))
        status, _, body = reader.response()
        answered(status, body, "asgi")


def test_expect_100_continue(server: ServerProcess) -> None:
    body = infer_body("expect")
    sock, reader = connect(server)
    with sock:
        sock.sendall(
            f"POST /v2/models/tabular/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        status, _, _ = reader.response()
        assert status == 100
        sock.sendall(body)
        status, _, answer = reader.response()
        answered(status, answer, "expect")


def test_client_leaving_mid_request_harms_nobody(server: ServerProcess) -> None:
    body = infer_body("gone")
    for cut in (len(body) // 2, len(body)):
        sock, _ = connect(server)
        sock.sendall(post("/v2/models/tabular/infer", body)[: -len(body) + cut or None])
        sock.close()  # half a body, or a whole request whose answer nobody reads
    sock, reader = connect(server)
    with sock:
        sock.sendall(post("/v2/models/tabular/infer", infer_body("next")))
        status, _, answer = reader.response()
        answered(status, answer, "next")


def test_malformed_http_gets_400_and_server_serves_on(server: ServerProcess) -> None:
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"POST /v2/models/tabular/infer HTTP/1.1\r\nContent-Length: x\r\n\r\n")
        status, _, _ = reader.response()
        assert status == 400
    sock, reader = connect(server)
    with sock:
        sock.sendall(post("/v2/models/tabular/infer", infer_body("ok")))
        status, _, answer = reader.response()
        answered(status, answer, "ok")
