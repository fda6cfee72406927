"""Fuzzing the REST port of a real server: random and malformed HTTP/1.1 requests over raw sockets
(methods, paths, headers, bodies, binary-extension header lengths, chunked and broken framing)
and well-formed ones over httpx. For every request: no 5xx (a 504 only when the request set a
deadline), an answer or a close within ANSWER_WITHIN_S (never a hang), nothing alarming in the
server log, and a good infer request answered right afterwards on both ports.

Repository load/unload are left out of the paths: unloading `sum` is a legitimate answer that
would make the next good request fail."""

from __future__ import annotations

import json
import socket
import string
import time
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.front import ANSWER_WITHIN_S, GOOD_BODY, FuzzServer, exchange
from tests.fuzz.strategies import JSON_VALUES, near_v2_bodies

TEMPLATES = [
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{m}", "/v2/models/{m}/ready",
    "/v2/models/{m}/versions/{v}", "/v2/models/{m}/versions/{v}/ready", "/v2/models/{m}/config",
    "/v2/models/{m}/stats", "/v2/models/{m}/infer", "/v2/models/{m}/versions/{v}/infer",
    "/v2/models/stats", "/v2/repository/index", "/v1/models/{m}:predict", "/v1/models/{m}",
    "/v1/models/{m}/versions/{v}:predict", "/metrics", "/inferplane/services", "/", "*",
]  # fmt: skip
_SAFE = string.ascii_letters + string.digits + "-._~%:@!$&'()*+,;="  # what a path may hold raw
MODELS = st.sampled_from(["sum", "echo", "nope", "", "..", "%2e%2e", "sum%2Finfer"]) | st.text(
    _SAFE, max_size=8
)
ANY_TEXT = st.text(max_size=8)  # percent-encoded before it goes into a path
VERSIONS = st.sampled_from(["1", "2", "0", "-1", "²", "production", "..", "01"]) | st.text(
    _SAFE, max_size=4
)
HEADER_NAMES = [
    "content-type", "inference-header-content-length", "x-inferplane-timeout-ms", "x-tenant",
    "x-api-key", "authorization", "expect", "connection", "transfer-encoding", "content-encoding",
    "host", "accept", "x-request-id", "traceparent", "user-agent",
]  # fmt: skip
HEADER_VALUES = (
    st.sampled_from(
        [
            "application/json",
            "application/octet-stream",
            "100-continue",
            "close",
            "keep-alive",
            "upgrade",
            "chunked",
            "gzip",
            "identity",
            "nan",
            "inf",
            "-1",
            "0",
            "1e400",
            "Bearer x",
            "Basic Zm9vOmJhcg==",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ]
    )
    | st.integers(-5, 10**6).map(str)
    | st.text(string.ascii_letters + string.digits + string.punctuation, max_size=12)
)
KNOWN_METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT"]


def rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`rare` about one draw in ten. (`a | b` draws each half the time, and hypothesis favours
    boundary integers, so a plain `integers(0, 9) == 0` comes up far more than one in ten.)"""
    return st.integers(0, 999).flatmap(lambda i: rare if i % 10 == 3 else common)


# Mostly GET and POST, which reach the handlers; sometimes any token.
METHODS = rarely(
    st.sampled_from(["POST", "POST", "POST", "GET", "GET", *KNOWN_METHODS]),
    st.text(string.ascii_letters, min_size=1, max_size=7),
)


@st.composite
def paths(draw: st.DrawFn) -> str:
    template = draw(st.sampled_from(TEMPLATES))
    model, version = draw(MODELS), draw(VERSIONS)
    if draw(rarely(st.just(False), st.just(True))):  # anything at all, percent-encoded
        model, version = quote(draw(ANY_TEXT), safe=""), quote(draw(ANY_TEXT), safe="")
    path = template.format(m=model, v=version)
    if draw(st.booleans()):
        path += "?" + draw(st.text(string.ascii_letters + "=&%+", max_size=10))
    return path


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(body, the binary header length it is meant with, if any)."""
    kind = draw(st.sampled_from(["v2", "v2-binary", "json", "bytes", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300)), None
    if kind == "empty":
        return b"", None
    doc = draw(near_v2_bodies()) if kind.startswith("v2") else draw(JSON_VALUES)
    header = json.dumps(doc).encode()
    if kind == "v2-binary":
        tail = draw(st.binary(max_size=64))
        return header + tail, str(len(header) + draw(st.sampled_from([0, 0, 0, -1, 1, 5])))
    return header, None


def chunked(body: bytes, cuts: list[int], broken: bool) -> bytes:
    out, start = b"", 0
    for cut in [*sorted({c % (len(body) + 1) for c in cuts}), len(body)]:
        piece = body[start:cut]
        if piece:
            size = len(piece) + (3 if broken else 0)
            out += f"{size:x}\r\n".encode() + piece + b"\r\n"
        start = cut
    return out + b"0\r\n\r\n"


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(the bytes of one request, whether it sets a deadline)."""
    method, path = draw(METHODS), draw(paths())
    body, header_length = draw(bodies())
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES), HEADER_VALUES), max_size=5))
    if header_length is not None and draw(st.booleans()):
        headers.append(("inference-header-content-length", header_length))
    framing = draw(st.sampled_from(["length", "length", "chunked", "broken-chunks", "none",
                                    "short", "long", "both"]))  # fmt: skip
    payload = body
    if framing in ("length", "both", "short", "long"):
        delta = {"short": -1, "long": 3}.get(framing, 0)
        headers.append(("content-length", str(max(0, len(body) + delta))))
    if framing in ("chunked", "broken-chunks", "both"):
        headers.append(("transfer-encoding", "chunked"))
        cuts = draw(st.lists(st.integers(0, 400), max_size=3))
        payload = chunked(body, cuts, framing == "broken-chunks")
    if draw(st.booleans()):
        headers.append(("host", "127.0.0.1"))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/9"]))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = head.encode("utf-8", errors="surrogateescape") + b"\r\n" + payload
    if draw(rarely(st.just(False), st.just(True))):  # a byte-level mutation anywhere
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at + 1 :]
    sets_deadline = any(k == "x-inferplane-timeout-ms" for k, _ in headers) or b'"timeout"' in body
    return raw, sets_deadline


def acceptable(status: int | None, sets_deadline: bool) -> bool:
    if status is None:
        return True  # closed without an answer: allowed for garbage, checked below for hangs
    return 0 < status < 500 or (status == 504 and sets_deadline)


# Requests the fuzzer found that once went wrong, tried first on every run.
NAN_TIMEOUT = (
    b"POST /v2/models/sum/infer HTTP/1.1\r\nx-inferplane-timeout-ms: nan\r\n"
    b"content-length: %d\r\n\r\n" % len(GOOD_BODY) + GOOD_BODY
)  # 400 blaming the model: NaN reached the scheduler's timer
HUGE_EMPTY = (
    b'{"inputs":[{"name":"input","datatype":"FP32","shape":[0,2305843009213693952],"data":[]}]}'
)
HUGE_EMPTY_REQUEST = (
    b"POST /v2/models/sum/infer HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % len(HUGE_EMPTY)
    + HUGE_EMPTY
)  # 500: numpy could not size the empty array
BYTES_HEADER = (
    b'{"inputs":[{"name":"input","datatype":"BYTES","shape":[100000000],'
    b'"parameters":{"binary_data_size":4}}]}'
)
BYTES_BOMB = (
    b"POST /v2/models/sum/infer HTTP/1.1\r\ninference-header-content-length: %d\r\n"
    b"content-length: %d\r\n\r\n"
    % (len(BYTES_HEADER), len(BYTES_HEADER) + 4)
    + BYTES_HEADER
    + b"\0\0\0\0"
)  # the server filled an 800 MB array before refusing it


@given(raw_requests())
@example((NAN_TIMEOUT, True))
@example((HUGE_EMPTY_REQUEST, False))
@example((BYTES_BOMB, False))
def test_raw_http_requests(fuzz_server: FuzzServer, request: tuple[bytes, bool]) -> None:
    raw, sets_deadline = request
    got = exchange(fuzz_server.http_port, raw)
    assert got.status is not None or got.closed, (
        f"no answer and no close within {ANSWER_WITHIN_S}s: a hang"
    )
    assert got.status != -1, f"not an HTTP answer: {got.data[:200]!r}"
    assert acceptable(got.status, sets_deadline), got.data[:600]
    fuzz_server.assert_healthy()


@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    paths(),
    st.dictionaries(
        st.sampled_from(HEADER_NAMES[:4] + HEADER_NAMES[10:]), HEADER_VALUES, max_size=4
    ),
    bodies(),
    st.booleans(),
)
def test_httpx_requests(
    fuzz_server: FuzzServer,
    method: str,
    path: str,
    headers: dict[str, str],
    body: tuple[bytes, str | None],
    stream: bool,
) -> None:
    content, header_length = body
    if header_length is not None:
        headers = {**headers, "inference-header-content-length": header_length}
    sets_deadline = "x-inferplane-timeout-ms" in headers or b'"timeout"' in content
    send: Any = (
        iter([content[: len(content) // 2], content[len(content) // 2 :]]) if stream else content
    )
    try:
        request = httpx.Request(
            method, fuzz_server.server.url + path, headers=headers, content=send
        )
    except (httpx.InvalidURL, UnicodeEncodeError, ValueError):
        return  # httpx would not send it: the raw-socket test covers such requests
    with httpx.Client(timeout=ANSWER_WITHIN_S) as client:
        try:
            answer = client.send(request)
        except httpx.LocalProtocolError:
            return  # h11 refused to write it (e.g. a header value with edge spaces)
    assert acceptable(answer.status_code, sets_deadline), (answer.status_code, answer.text[:600])
    fuzz_server.assert_healthy()


@given(st.lists(raw_requests(), min_size=2, max_size=4))
def test_pipelined_requests_on_one_connection(
    fuzz_server: FuzzServer, requests: list[tuple[bytes, bool]]
) -> None:
    payload = b"".join(raw for raw, _ in requests)
    heads = [raw.startswith(b"HEAD ") for raw, _ in requests]
    got = exchange(fuzz_server.http_port, payload, heads)
    assert len(got.statuses) == len(requests) or got.closed, "a hang"
    sets_deadline = any(deadline for _, deadline in requests)
    assert all(acceptable(status, sets_deadline) for status in got.statuses), got.data[:600]
    fuzz_server.assert_healthy()


def test_a_unicode_digit_version_is_not_a_server_error(fuzz_server: FuzzServer) -> None:
    got = exchange(
        fuzz_server.http_port, b"GET /v2/models/sum/versions/%C2%B2/ready HTTP/1.1\r\n\r\n"
    )
    fuzz_server.new_log()  # a traceback here belongs to this test, not the next one
    assert acceptable(got.status, False), got.data[:300]


def test_pipelined_requests_then_close_leave_no_traceback(fuzz_server: FuzzServer) -> None:
    first = b"POST /v2/repository/index HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"
    second = b"POST /v2 HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", fuzz_server.http_port)) as sock:
            sock.sendall(first + second)
    time.sleep(0.5)
    log = fuzz_server.new_log()
    assert "Traceback" not in log, log[-2000:]
