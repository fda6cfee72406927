"""Fuzzing the gRPC port of a real server: random and malformed messages through grpcio (every
method of the V2 service but repository load/unload, the health service, unary and streaming,
compressed or not, with odd metadata), and raw HTTP/2 connections that send any frames at all.
For every example: no INTERNAL / UNKNOWN / DATA_LOSS status, an answer within the call's deadline
(a client-side DEADLINE_EXCEEDED is a hang), nothing alarming in the server log, and good requests
answered on both ports afterwards (for raw HTTP/2 also while the fuzzed connection stays open).

Load and unload are left out: unloading `sum` is a legitimate answer that the next good request
would take for a failure."""

from __future__ import annotations

import contextlib
import socket
import string
import time
from typing import Any

import grpc
import hpack
from grpc_health.v1 import health_pb2
from hypothesis import example, given
from hypothesis import strategies as st

from inferplane.protocols.grpc_gen import grpc_predict_v2_pb2 as pb
from tests.fuzz.front import SERVICE, FuzzServer
from tests.fuzz.strategies import infer_requests

BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
CALL_TIMEOUT_S = 10.0
NAMES = st.sampled_from(["sum", "echo", "nope", "", "..", "../sum", "sum/1"]) | st.text(max_size=6)
VERSIONS = st.sampled_from(["", "1", "2", "0", "²", "production", "-1"]) | st.text(max_size=4)

# method -> strategy for its request message (as bytes)
UNARY: dict[str, st.SearchStrategy[bytes]] = {
    "ServerLive": st.just(b""),
    "ServerReady": st.just(b""),
    "ServerMetadata": st.just(b""),
    "ModelReady": st.builds(
        lambda n, v: pb.ModelReadyRequest(name=n, version=v).SerializeToString(), NAMES, VERSIONS
    ),
    "ModelMetadata": st.builds(
        lambda n, v: pb.ModelMetadataRequest(name=n, version=v).SerializeToString(),
        NAMES,
        VERSIONS,
    ),
    "ModelConfig": st.builds(
        lambda n, v: pb.ModelConfigRequest(name=n, version=v).SerializeToString(), NAMES, VERSIONS
    ),
    "ModelStatistics": st.builds(
        lambda n, v: pb.ModelStatisticsRequest(name=n, version=v).SerializeToString(),
        NAMES,
        VERSIONS,
    ),
    "RepositoryIndex": st.builds(
        lambda r: pb.RepositoryIndexRequest(ready=r).SerializeToString(), st.booleans()
    ),
    "ModelInfer": infer_requests().map(lambda r: r.SerializeToString()),
}
METADATA = st.lists(
    st.tuples(
        st.sampled_from(["x-tenant", "x-api-key", "authorization", "traceparent", "x-other"])
        | st.text(string.ascii_lowercase + "-", min_size=1, max_size=6),
        st.text(string.ascii_letters + string.digits + " -_=;,", max_size=12),
    ),
    max_size=3,
)


# A BYTES input claiming 10**10 elements in 4 bytes (the server once allocated for all of them).
_BOMB = pb.ModelInferRequest(model_name="sum")
_BOMB.inputs.add(name="input", datatype="BYTES", shape=[10**10])
_BOMB.raw_input_contents.append(b"\0\0\0\0")
BYTES_BOMB = _BOMB.SerializeToString()


def check_status(error: grpc.RpcError) -> None:
    code, details = error.code(), error.details() or ""
    assert code not in BAD_CODES, (code, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # the server's own 504 names the model; grpcio's client-side timeout says only this
        assert details != "Deadline Exceeded", "no answer within the call's deadline: a hang"


def call(server: FuzzServer, method: str, payload: bytes, metadata: list[Any], gzip: bool) -> None:
    path = ("/grpc.health.v1.Health/" if method == "Check" else SERVICE) + method
    stub = server.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        stub(
            payload,
            timeout=CALL_TIMEOUT_S,
            metadata=metadata,
            compression=grpc.Compression.Gzip if gzip else None,
        )
    except grpc.RpcError as error:
        check_status(error)
    except ValueError:
        pass  # grpcio refused the metadata before sending


@given(
    st.sampled_from(sorted(UNARY)).flatmap(lambda m: st.tuples(st.just(m), UNARY[m])),
    METADATA,
    st.booleans(),
)
def test_unary_messages(
    fuzz_server: FuzzServer, method_payload: tuple[str, bytes], metadata: list[Any], gzip: bool
) -> None:
    method, payload = method_payload
    call(fuzz_server, method, payload, metadata, gzip)
    fuzz_server.assert_healthy()


@given(
    st.sampled_from([*sorted(UNARY), "Check", "NoSuchMethod"]),
    st.binary(max_size=300),
    st.booleans(),
)
@example("ModelInfer", BYTES_BOMB, False)
def test_arbitrary_bytes_for_every_method(
    fuzz_server: FuzzServer, method: str, payload: bytes, gzip: bool
) -> None:
    call(fuzz_server, method, payload, [], gzip)
    fuzz_server.assert_healthy()


@given(st.builds(lambda s: health_pb2.HealthCheckRequest(service=s).SerializeToString(), NAMES))
def test_health_check(fuzz_server: FuzzServer, payload: bytes) -> None:
    call(fuzz_server, "Check", payload, [], False)
    fuzz_server.assert_healthy()


@given(st.lists(UNARY["ModelInfer"] | st.binary(max_size=64), max_size=5))
def test_stream_infer(fuzz_server: FuzzServer, messages: list[bytes]) -> None:
    stub = fuzz_server.channel.stream_stream(
        SERVICE + "ModelStreamInfer", request_serializer=None, response_deserializer=None
    )
    try:
        answers = list(stub(iter(messages), timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as error:
        check_status(error)
    else:
        # one answer per message: a result, or an error_message for that one
        assert len(answers) == len(messages)
        for raw in answers:
            answer = pb.ModelStreamInferResponse.FromString(raw)
            assert "internal server error" not in answer.error_message
    fuzz_server.assert_healthy()


# --- raw HTTP/2 ------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOOD_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", SERVICE + "ModelInfer"),
    (":authority", "127.0.0.1"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind & 0xFF, flags & 0xFF])
        + (stream & 0x7FFF_FFFF).to_bytes(4, "big")
        + payload
    )


@st.composite
def header_blocks(draw: st.DrawFn) -> list[tuple[str, str]]:
    headers = list(GOOD_HEADERS)
    if draw(st.booleans()):
        headers = draw(st.permutations(headers))
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["drop", "add", "change"]))
        if edit == "drop" and headers:
            headers.pop(draw(st.integers(0, len(headers) - 1)))
        elif edit == "add":
            headers.append(
                (
                    draw(st.sampled_from([":path", ":method", "grpc-timeout", "grpc-encoding",
                                          "content-length", "x-tenant", "connection", "Upper"])),
                    draw(st.sampled_from(["1S", "0m", "99999999H", "gzip", "br", "-1", "x" * 50])
                         | st.text(max_size=8)),
                )
            )  # fmt: skip
        elif headers:
            at = draw(st.integers(0, len(headers) - 1))
            headers[at] = (headers[at][0], draw(st.text(max_size=12)))
    return headers


@st.composite
def grpc_messages(draw: st.DrawFn) -> bytes:
    body = draw(UNARY["ModelInfer"] | st.binary(max_size=64))
    flag = draw(st.sampled_from([0, 0, 1, 2, 255]))
    length = draw(st.sampled_from([len(body)] * 3 + [0, len(body) + 1, 2**32 - 1]))
    return bytes([flag]) + length.to_bytes(4, "big") + body


@st.composite
def frames(draw: st.DrawFn, encoder: hpack.Encoder) -> bytes:
    stream = draw(st.sampled_from([1, 1, 3, 5, 0, 2, 2**31 - 1]))
    kind = draw(st.sampled_from(["headers", "data", "settings", "window", "control", "any"]))
    if kind == "headers":
        block = encoder.encode(draw(header_blocks()))
        flags = draw(st.sampled_from([0x4, 0x4, 0x5, 0x0, 0x1, 0x28]))
        return frame(1, flags, stream, block)
    if kind == "data":
        return frame(0, draw(st.sampled_from([0, 1, 1, 8])), stream, draw(grpc_messages()))
    if kind == "settings":
        params = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2**32 - 1)), max_size=3))
        payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in params)
        return frame(4, draw(st.sampled_from([0, 0, 1])), 0, payload)
    if kind == "window":
        increment = draw(st.sampled_from([0, 1, 65535, 2**31 - 1]))
        return frame(8, 0, draw(st.sampled_from([0, stream])), increment.to_bytes(4, "big"))
    if kind == "control":
        which = draw(st.sampled_from([2, 3, 6, 7, 9]))  # PRIORITY RST PING GOAWAY CONTINUATION
        size = {2: 5, 3: 4, 6: 8, 7: 8, 9: 0}[which]
        payload = draw(st.binary(min_size=size, max_size=size + 2))
        return frame(which, draw(st.integers(0, 255)), draw(st.sampled_from([0, stream])), payload)
    return frame(
        draw(st.integers(0, 255)),
        draw(st.integers(0, 255)),
        stream,
        draw(st.binary(max_size=40)),
    )


@st.composite
def connections(draw: st.DrawFn) -> bytes:
    encoder = hpack.Encoder()
    out = draw(st.sampled_from([PREFACE] * 4 + [PREFACE[:-1] + b"X", b"GET / HTTP/1.1\r\n\r\n"]))
    if draw(st.booleans()):
        out += frame(4, 0, 0, b"")  # the client's SETTINGS
    for _ in range(draw(st.integers(0, 6))):
        out += draw(frames(encoder))
    return out


@given(connections())
def test_raw_http2_frames(fuzz_server: FuzzServer, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", fuzz_server.grpc_port), timeout=5) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed on us: allowed
            sock.sendall(payload)
        sock.settimeout(0.2)
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    break
            except (TimeoutError, ConnectionResetError):
                break
        # The fuzzed connection is still open (or half-dead): others must be served meanwhile.
        with grpc.insecure_channel(fuzz_server.server.grpc_target) as other:
            fuzz_server.assert_grpc_serving(other)
    fuzz_server.assert_healthy()
