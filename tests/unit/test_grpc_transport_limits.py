"""The gRPC transport's guards (GrpcLimits in protocols/grpc_transport.py), each attacked on a real
loopback port by a raw socket that builds the client preface and frames by hand (header blocks
with `hpack`). After every attack a well-behaved grpcio client must still be served. TLS: a grpcio
client with a client certificate, whose certificate reaches the handler as `context.peer_cert`.

The limits are small here so that each attack takes a fraction of a second; the server's sweep
runs once a second, so the timeout tests wait a few seconds.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferplane.protocols.grpc_gen import grpc_predict_v2_pb2 as pb
from inferplane.protocols.grpc_transport import GrpcLimits, GrpcServer, Method, methods_of
from tests.pki import client_cert, make_ca, server_cert

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 2, 3, 4, 6, 7, 8, 9,
)  # fmt: skip
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
NO_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0, 7, 8, 11
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CHECK = "/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING


class Frame(NamedTuple):
    kind: int
    flags: int
    sid: int
    payload: bytes

    def goaway(self) -> tuple[int, int, bytes]:
        """(last stream id, error code, debug data) of a GOAWAY."""
        p = self.payload
        return int.from_bytes(p[:4], "big") & 0x7FFF_FFFF, int.from_bytes(p[4:8], "big"), p[8:]


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big")
    return head + payload


def headers_block(path: str = CHECK) -> bytes:
    return hpack.Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
         ("content-type", "application/grpc"), ("te", "trailers")]
    )  # fmt: skip


def request(service: str = "") -> bytes:
    body = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def call(sid: int, service: str = "") -> bytes:
    """A whole unary Check call on stream `sid`."""
    return frame(HEADERS, END_HEADERS, sid, headers_block()) + frame(
        DATA, END_STREAM, sid, request(service)
    )


class Raw:
    """A hand-driven HTTP/2 client connection (blocking; run it in a thread)."""

    def __init__(self, port: int, *, rcvbuf: int | None = None, preface: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        self.frames: list[Frame] = []
        self.closed = False
        if preface:
            self.send(PREFACE + frame(SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, stop: Callable[[Frame], bool], timeout: float = 5) -> Frame | None:
        """Frames until one satisfies `stop` (returned) or the server closes (None)."""
        deadline = time.monotonic() + timeout
        while True:
            while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
                n = int.from_bytes(self.buf[:3], "big")
                sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFF_FFFF
                got = Frame(self.buf[3], self.buf[4], sid, self.buf[9 : 9 + n])
                self.buf = self.buf[9 + n :]
                self.frames.append(got)
                if stop(got):
                    return got
            if self.closed:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing matched; frames so far {self.kinds()}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.buf += chunk

    def poll(self, stop: Callable[[Frame], bool], timeout: float) -> Frame | None:
        """Like `read`, but None also when nothing matched within `timeout`."""
        try:
            return self.read(stop, timeout)
        except TimeoutError:
            return None

    def goaway(self, timeout: float = 5) -> Frame:
        got = self.read(lambda f: f.kind == GOAWAY, timeout)
        assert got is not None, f"closed without GOAWAY; frames {self.kinds()}"
        return got

    def wait_closed(self, timeout: float = 5) -> None:
        assert self.read(lambda f: False, timeout) is None

    def kinds(self) -> list[int]:
        return [f.kind for f in self.frames]

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw(port: int, **kw: Any) -> Iterator[Raw]:
    conn = Raw(port, **kw)
    try:
        yield conn
    finally:
        conn.close()


class Toy:
    """Health.Check answers SERVING, after sleeping `sleep:<s>` services."""

    async def Check(self, request: Any, context: Any) -> Any:
        if request.service.startswith("sleep:"):
            await asyncio.sleep(float(request.service.split(":")[1]))
        return health_pb2.HealthCheckResponse(status=SERVING)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield health_pb2.HealthCheckResponse(status=SERVING)


def _routes() -> dict[bytes, Method]:
    return methods_of(Toy(), health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2)


@asynccontextmanager
async def serving(limits: GrpcLimits, **start: Any) -> AsyncIterator[GrpcServer]:
    server = GrpcServer(_routes(), max_message_bytes=1 << 20, limits=limits)
    await server.start("127.0.0.1", 0, **start)
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


def _check(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


async def assert_served(server: GrpcServer) -> None:
    """A fresh, well-behaved grpcio client still gets its answer."""
    assert await asyncio.to_thread(_check, server.port) == SERVING


def in_thread(fn: Callable[[], Any]) -> Awaitable[Any]:
    return asyncio.to_thread(fn)


# --- streams ----------------------------------------------------------------------------------


async def test_streams_past_the_limit_are_refused_then_the_client_is_told_to_calm_down() -> None:
    limits = GrpcLimits(max_concurrent_streams=4, max_refused_streams_per_second=10)
    async with serving(limits) as server:

        def attack() -> tuple[Raw, Frame, Frame, Frame]:
            with raw(server.port) as conn:
                settings = conn.read(lambda f: f.kind == SETTINGS and not f.flags & ACK)
                conn.send(b"".join(call(sid, "sleep:3") for sid in (1, 3, 5, 7, 9)))
                refused = conn.read(lambda f: f.kind == RST_STREAM)
                # a client that goes on ignoring the setting
                conn.send(b"".join(frame(HEADERS, END_HEADERS, sid, headers_block())
                                   for sid in range(11, 41, 2)))  # fmt: skip
                goaway = conn.goaway()
                conn.wait_closed()
                assert settings is not None and refused is not None
                return conn, settings, refused, goaway

        conn, settings, refused, goaway = await in_thread(attack)
        advertised = {
            int.from_bytes(settings.payload[i : i + 2], "big"): int.from_bytes(
                settings.payload[i + 2 : i + 6], "big"
            )
            for i in range(0, len(settings.payload), 6)
        }
        assert advertised[3] == 4  # SETTINGS_MAX_CONCURRENT_STREAMS
        assert (refused.sid, int.from_bytes(refused.payload, "big")) == (9, REFUSED_STREAM)
        # the four streams within the limit were neither refused nor answered yet
        assert not {1, 3, 5, 7} & {f.sid for f in conn.frames if f.kind == RST_STREAM}
        assert not [f for f in conn.frames if f.kind == HEADERS]
        assert goaway.goaway()[1] == ENHANCE_YOUR_CALM
        assert server.refusals["refused_streams"] == 1
        # stream 9, then 10 more (11 if the second's window turned in between) before GOAWAY
        assert server.refusals["refused_stream"] in (11, 12)
        await assert_served(server)


async def test_rapid_reset_gets_goaway() -> None:
    """Open, reset, open, reset (CVE-2023-44487): past the rate the connection ends, and none of
    the reset calls was answered."""
    limits = GrpcLimits(max_resets_per_second=20)
    async with serving(limits) as server:

        def attack() -> Raw:
            with raw(server.port) as conn:
                reset = CANCEL.to_bytes(4, "big")
                conn.send(
                    b"".join(
                        call(sid, "sleep:5") + frame(RST_STREAM, 0, sid, reset)
                        for sid in range(1, 201, 2)
                    )
                )
                last, code, debug = conn.goaway().goaway()
                assert code == ENHANCE_YOUR_CALM and b"reset" in debug
                assert last < 199  # it stopped reading before the end of the burst
                conn.wait_closed()
                return conn

        conn = await in_thread(attack)
        assert not [f for f in conn.frames if f.kind == HEADERS]
        assert server.refusals["rapid_reset"] == 1
        await asyncio.sleep(0.05)
        assert all(not c.calls and not c.reset_running for c in server.connections)
        await assert_served(server)


async def test_reset_handlers_hold_their_stream_until_they_end() -> None:
    """A reset stream whose handler has not ended yet still counts against the stream limit
    (grpc-go's rapid reset fix): in one burst, the stream after the limit is refused."""
    limits = GrpcLimits(max_concurrent_streams=2)
    async with serving(limits) as server:

        def burst() -> Frame | None:
            with raw(server.port) as conn:
                reset = CANCEL.to_bytes(4, "big")
                conn.send(
                    call(1, "sleep:5") + frame(RST_STREAM, 0, 1, reset)
                    + call(3, "sleep:5") + frame(RST_STREAM, 0, 3, reset)
                    + call(5, "sleep:5")
                )  # fmt: skip
                return conn.read(lambda f: f.kind == RST_STREAM)

        refused = await in_thread(burst)
        assert refused is not None
        assert (refused.sid, int.from_bytes(refused.payload, "big")) == (5, REFUSED_STREAM)
        await assert_served(server)


# --- header blocks ----------------------------------------------------------------------------


async def test_continuation_flood_of_big_frames_is_cut_at_the_block_limit() -> None:
    """Endless CONTINUATION frames of 16 KiB: GOAWAY once the block passes max_header_bytes,
    before the server accepted much more (the block never grows past the limit)."""
    limits = GrpcLimits(max_header_bytes=32 * 1024, max_continuation_frames=10_000)
    async with serving(limits) as server:

        def attack() -> tuple[int, Frame | None]:
            with raw(server.port) as conn:
                chunk = b"\x00" * 16_384  # not even valid HPACK: it must never be decoded
                conn.send(frame(HEADERS, 0, 1, chunk))
                sent = 16_384
                while sent < 4 << 20:
                    conn.send(frame(CONTINUATION, 0, 1, chunk))
                    sent += 16_384
                    got = conn.poll(lambda f: f.kind == GOAWAY, timeout=0.05)
                    if got is not None or conn.closed:
                        return sent, got
                return sent, None

        sent, goaway = await in_thread(attack)
        assert goaway is not None, f"no GOAWAY after {sent} bytes"
        assert goaway.goaway()[1] == ENHANCE_YOUR_CALM
        assert b"header block" in goaway.goaway()[2]
        # the GOAWAY came back at the first frame past the limit (HEADERS + 2 CONTINUATIONs)
        assert sent == 3 * 16_384
        assert server.refusals["header_block"] == 1
        await assert_served(server)


async def test_continuation_flood_of_empty_frames_is_cut_at_the_frame_limit() -> None:
    """Empty CONTINUATION frames never grow the block; their count ends the connection."""
    async with serving(GrpcLimits(max_continuation_frames=8)) as server:

        def attack() -> Frame:
            with raw(server.port) as conn:
                block = headers_block()
                conn.send(frame(HEADERS, 0, 1, block[:3]))
                conn.send(b"".join(frame(CONTINUATION, 0, 1) for _ in range(10_000)))
                return conn.goaway()

        goaway = await in_thread(attack)
        assert goaway.goaway()[1] == ENHANCE_YOUR_CALM
        assert b"CONTINUATION" in goaway.goaway()[2]
        await assert_served(server)


async def test_a_header_block_split_in_continuations_within_limits_is_served() -> None:
    async with serving(GrpcLimits()) as server:

        def split_call() -> Frame | None:
            with raw(server.port) as conn:
                block = headers_block()
                size = -(-len(block) // 6)  # HEADERS and 5 CONTINUATIONs
                parts = [block[i : i + size] for i in range(0, len(block), size)]
                frames = frame(HEADERS, 0, 1, parts[0])
                for i, part in enumerate(parts[1:], 2):
                    frames += frame(CONTINUATION, END_HEADERS if i == len(parts) else 0, 1, part)
                conn.send(frames + frame(DATA, END_STREAM, 1, request()))
                return conn.read(lambda f: f.kind == HEADERS and bool(f.flags & END_STREAM))

        trailers = await in_thread(split_call)
        assert trailers is not None and trailers.sid == 1
        assert server.refusals["header_block"] == 0


# --- control frame floods ---------------------------------------------------------------------

FLOODS = {
    "ping": frame(PING, 0, 0, b"12345678"),
    "settings": frame(SETTINGS, 0, 0),
    "window_update": frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")),
    "priority": frame(PRIORITY, 0, 1, bytes(5)),
    "empty_data": frame(DATA, 0, 1),
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
async def test_control_frame_flood_gets_goaway(kind: str) -> None:
    async with serving(GrpcLimits(max_control_frames_per_second=100)) as server:

        def attack() -> Raw:
            with raw(server.port) as conn:
                # stream 1 stays open (no END_STREAM), so empty DATA and PRIORITY are legal
                conn.send(frame(HEADERS, END_HEADERS, 1, headers_block()))
                conn.send(FLOODS[kind] * 5000)
                _last, code, debug = conn.goaway().goaway()
                assert code == ENHANCE_YOUR_CALM and b"control frames" in debug
                conn.wait_closed()
                return conn

        conn = await in_thread(attack)
        # answers stopped at the allowance: 100 + 2 for the one stream opened
        assert len([f for f in conn.frames if f.kind in (PING, SETTINGS) and f.flags & ACK]) <= 103
        assert server.refusals["control"] == 1
        await assert_served(server)


async def test_control_answers_the_client_never_reads_are_bounded() -> None:
    """PINGs from a client that does not read: once our writes are paused, only
    max_queued_control_frames more answers are queued before the connection is dropped."""
    limits = GrpcLimits(max_control_frames_per_second=10**9, max_queued_control_frames=100)
    async with serving(limits) as server:
        assert server._server is not None
        # a small send buffer (accepted sockets inherit it) so that writes pause early
        server._server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)

        def attack() -> int:
            with raw(server.port, rcvbuf=4096) as conn:
                burst = frame(PING, 0, 0, b"12345678") * 2000
                sent = 0
                while sent < 64 << 20:
                    try:
                        conn.send(burst)
                    except (BrokenPipeError, ConnectionResetError, TimeoutError):
                        return sent
                    sent += len(burst)
                return sent

        sent = await in_thread(attack)
        assert server.refusals["unread_answers"] == 1
        assert sent < 16 << 20  # dropped after a bounded backlog, not after everything was read
        await assert_served(server)


# --- timeouts and connections -----------------------------------------------------------------


async def test_preface_timeout_closes_a_silent_connection() -> None:
    async with serving(GrpcLimits(preface_timeout=0.5)) as server:

        def probe() -> tuple[float, bool]:
            with raw(server.port, preface=False) as silent, raw(server.port) as talker:
                silent.send(PREFACE[:10])  # half a preface, then nothing
                started = time.monotonic()
                silent.wait_closed(timeout=4)
                waited = time.monotonic() - started
                try:  # the connection that sent its preface is still open
                    talker.read(lambda f: False, timeout=0.3)
                except TimeoutError:
                    return waited, True
                return waited, False

        waited, talker_open = await in_thread(probe)
        assert 0.4 < waited < 2.5
        assert talker_open
        assert server.refusals["preface_timeout"] == 1
        await assert_served(server)


async def test_idle_timeout_sends_graceful_goaway_then_closes() -> None:
    async with serving(GrpcLimits(idle_timeout=1.0)) as server:

        def idle() -> tuple[Frame, float, float, Frame | None]:
            with raw(server.port) as conn, raw(server.port) as busy:
                conn.send(call(1))
                assert conn.read(lambda f: f.kind == HEADERS and bool(f.flags & END_STREAM))
                busy.send(call(1, "sleep:30"))  # an open stream keeps its connection
                answered = time.monotonic()
                goaway = conn.goaway(timeout=5)
                went = time.monotonic() - answered
                conn.wait_closed(timeout=3)
                closed = time.monotonic() - answered
                return goaway, went, closed, busy.poll(lambda f: f.kind == GOAWAY, timeout=0.1)

        goaway, went, closed, busy_goaway = await in_thread(idle)
        assert goaway.goaway()[:2] == (1, NO_ERROR)  # graceful: stream 1 was served
        assert 1.0 < went < 4.5
        assert went < closed < went + 2.5
        assert busy_goaway is None
        assert server.refusals["idle_timeout"] == 1
        await assert_served(server)


async def test_connections_past_max_connections_get_goaway_at_once() -> None:
    async with serving(GrpcLimits(max_connections=3)) as server:

        def flood() -> Frame:
            kept = [Raw(server.port) for _ in range(3)]
            try:
                for conn in kept:
                    conn.read(lambda f: f.kind == WINDOW_UPDATE)  # all three were accepted
                with raw(server.port) as extra:
                    goaway = extra.goaway(timeout=2)
                    extra.wait_closed(timeout=2)
                return goaway
            finally:
                for conn in kept:
                    conn.close()

        goaway = await in_thread(flood)
        assert goaway.goaway()[1] == ENHANCE_YOUR_CALM
        assert server.refusals["max_connections"] == 1
        for _ in range(100):  # the three closed connections leave the server's set
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        await assert_served(server)


# --- TLS --------------------------------------------------------------------------------------


class Whoami:
    """ServerMetadata answers the common name of the caller's client certificate."""

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        subject = dict(pair for rdn in context.peer_cert["subject"] for pair in rdn)
        return pb.ServerMetadataResponse(name=subject["commonName"], version="mtls")


def _tls_context(tmp_path: Path, alpn: list[str]) -> tuple[ssl.SSLContext, Any, Any, Any]:
    ca = make_ca(tmp_path)
    server, client = server_cert(ca, tmp_path), client_cert(ca, tmp_path, "alice")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert_path, server.key_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca.cert_path)
    ctx.set_alpn_protocols(alpn)
    return ctx, ca, server, client


async def test_tls_with_client_certificate_reaches_the_handler(tmp_path: Path) -> None:
    ctx, ca, _server_cert, alice = _tls_context(tmp_path, ["h2"])
    method = Method(Whoami().ServerMetadata, pb.ServerMetadataRequest, False, False)
    server = GrpcServer({b"/inference.GRPCInferenceService/ServerMetadata": method}, 1 << 20)
    await server.start("127.0.0.1", 0, ssl=ctx)
    try:

        def whoami() -> Any:
            key, chain = alice.read()
            creds = grpc.ssl_channel_credentials(ca.cert_path.read_bytes(), key, chain)
            with grpc.secure_channel(f"127.0.0.1:{server.port}", creds) as channel:
                rpc = channel.unary_unary(
                    "/inference.GRPCInferenceService/ServerMetadata",
                    request_serializer=pb.ServerMetadataRequest.SerializeToString,
                    response_deserializer=pb.ServerMetadataResponse.FromString,
                )
                return rpc(pb.ServerMetadataRequest(), timeout=5)

        answer = await in_thread(whoami)
        assert (answer.name, answer.version) == ("alice", "mtls")
    finally:
        await server.stop(grace=0.5)


async def test_tls_client_that_negotiated_another_protocol_is_closed(tmp_path: Path) -> None:
    """A context shared with an HTTP/1.1 port offers both; a client that picked http/1.1 is
    closed, one that picked h2 gets our SETTINGS."""
    ctx, ca, _server_cert, alice = _tls_context(tmp_path, ["h2", "http/1.1"])
    async with serving(GrpcLimits(), ssl=ctx) as server:

        def handshake(alpn: str) -> tuple[str | None, bytes]:
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client.load_verify_locations(ca.cert_path)
            client.load_cert_chain(alice.cert_path, alice.key_path)
            client.set_alpn_protocols([alpn])
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            with sock, client.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(PREFACE + frame(SETTINGS, 0, 0))
                try:
                    return tls.selected_alpn_protocol(), tls.recv(9)
                except (ConnectionResetError, ssl.SSLError):
                    return tls.selected_alpn_protocol(), b""

        assert await in_thread(lambda: handshake("http/1.1")) == ("http/1.1", b"")
        chosen, head = await in_thread(lambda: handshake("h2"))
        assert chosen == "h2" and head[3] == SETTINGS


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        GrpcLimits(max_concurrent_streams=0)
    assert GrpcLimits(idle_timeout=float("inf")).idle_timeout == float("inf")


async def test_unary_call_sending_past_its_one_message_is_ended_at_once() -> None:
    """Bytes after a unary call's one message are not buffered until END_STREAM (the window is
    returned as data arrives, so nothing else would stop them)."""
    async with serving(GrpcLimits()) as server:

        def attack() -> tuple[Frame | None, Raw]:
            with raw(server.port) as conn:
                conn.send(
                    frame(HEADERS, END_HEADERS, 1, headers_block()) + frame(DATA, 0, 1, request())
                )
                conn.send(frame(DATA, 0, 1, b"\x00" * 16_384))
                trailers = conn.read(lambda f: f.kind == HEADERS and bool(f.flags & END_STREAM))
                conn.read(lambda f: f.kind == RST_STREAM)
                return trailers, conn

        trailers, conn = await in_thread(attack)
        assert trailers is not None
        fields = dict(hpack.Decoder().decode(trailers.payload))
        assert fields["grpc-status"] == "3"  # INVALID_ARGUMENT
        assert "exactly one request message" in fields["grpc-message"]
        assert next(f for f in conn.frames if f.kind == RST_STREAM).sid == 1
        await assert_served(server)
