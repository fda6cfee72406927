"""gRPC over HTTP/2 (RFC 9113) on the server's own event loop: the transport of the gRPC port.

Why not `grpc.aio`: on the example forest at concurrency 32 (docs/serving.md) grpc.aio spent about
400 us of CPU per unary call, most of it in its own machinery (completion queues, a poller thread
and event-engine threads handing each call to the asyncio loop), and served under half of what the
HTTP/JSON port does. Why not `h2` either: a server on h2 (the state machine hypercorn and httpx
use) served 33 % more than grpc.aio, but h2 itself was a third of the event loop's time, most of it
generic bookkeeping (event objects, per-stream state machines, header validation) that a gRPC
server does not need. Here framing is done directly: frames are parsed from one buffer, request
headers are decoded by `hpack` (the library h2 uses; blocks a client repeats are decoded once),
and answers use fixed header blocks that never touch the dynamic table, so they are plain bytes.

What the gRPC wire protocol needs and this provides: length-prefixed messages (requests compressed
with gzip or deflate are accepted; answers go uncompressed), `grpc-timeout` deadlines, status in
trailers (trailers-only for an error before any message), flow control both ways, unary,
server-streaming and bidirectional methods, cancellation by RST_STREAM, PING, SETTINGS, and a
graceful GOAWAY on shutdown. TLS when `start` gets an `ssl.SSLContext` (the caller sets its
certificates, ALPN "h2" and client-certificate checks; a verified client certificate reaches every
call as `CallContext.peer_cert`). Not provided: server push and stream priorities, which gRPC does
not use.

A hostile client meets the guards well-kept HTTP/2 servers have (`GrpcLimits`; docs/serving.md,
"gRPC port limits"): a stream limit that also counts handlers of reset streams until they end
(grpc-go's answer to rapid reset, CVE-2023-44487), a bounded header block and CONTINUATION count
(CVE-2024-27316 class), rates of resets and control frames, a bound on control answers the peer
does not read, preface and idle timeouts and a connection limit. Rates are counted per connection
in windows that one sweep per server closes every second, so that a call costs a few integer
increments and no timer.

The servicer classes are plain objects: `methods_of` routes each RPC of a generated service
descriptor to the servicer's method of that name, which gets a `CallContext` with the part of
`grpc.aio.ServicerContext` they use.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from ssl import SSLContext, SSLObject
from typing import Any, NoReturn
from urllib.parse import quote

import grpc
import hpack
from google.protobuf.message import DecodeError, Message

from inferplane.protocols.busy_poll import BusyPoll

log = logging.getLogger("inferplane.grpc")

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# frame types and flags (RFC 9113 section 6)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE = 0, 1, 2, 3, 4, 5
_PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 6, 7, 8, 9
_END_STREAM = _ACK = 0x1
_END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x4, 0x8, 0x20
# settings and error codes
_S_MAX_CONCURRENT, _S_INITIAL_WINDOW, _S_MAX_FRAME, _S_MAX_HEADER_LIST = 3, 4, 5, 6
_NO_ERROR, _PROTOCOL_ERROR, _FLOW_CONTROL_ERROR = 0, 1, 3
_FRAME_SIZE_ERROR, _REFUSED_STREAM, _COMPRESSION_ERROR, _ENHANCE_YOUR_CALM = 6, 7, 9, 11

_DEFAULT_WINDOW = 65_535
_MAX_FRAME = 16_384  # what we accept (the protocol default; we do not raise it)
# Receive window per stream and for the connection: big enough that a client sends a large tensor
# without waiting for window updates on loopback or a LAN. Returned once half is consumed.
_WINDOW = 16 * 1024 * 1024
_MAX_WINDOW = 0x7FFF_FFFF
_SWEEP_INTERVAL = 1.0  # seconds: the rate windows and the resolution of the timeouts
_MAX_STATUS_MESSAGE = 4096  # keeps every trailer block inside one frame
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_PERCENT_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_ENCODINGS = {b"gzip": 31, b"deflate": 15}  # grpc-encoding -> zlib wbits


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 5.1 integer; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal never added to the dynamic table (RFC 7541 6.2.2, new name), so that
    our header blocks are constant bytes and need no encoder state."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# :status 200 is static entry 8; content-type reuses static name 31 in a literal
_OK_BLOCK = (
    b"\x88"
    + _hpack_int(31, 4)
    + _hpack_int(16, 7)
    + b"application/grpc"
    + _literal(b"grpc-accept-encoding", b"identity,deflate,gzip")
)


def _status_block(code: grpc.StatusCode, details: str) -> bytes:
    block = _literal(b"grpc-status", str(code.value[0]).encode())
    if details:
        text = quote(details[:_MAX_STATUS_MESSAGE], safe=_PERCENT_SAFE).encode()
        block += _literal(b"grpc-message", text)
    return block


_OK_TRAILERS = _status_block(grpc.StatusCode.OK, "")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


@dataclass(slots=True, frozen=True)
class GrpcLimits:
    """What one client may cost the gRPC port. A connection past a limit gets GOAWAY
    ENHANCE_YOUR_CALM and is closed (a stream past `max_concurrent_streams` only RST_STREAM
    REFUSED_STREAM, which gRPC clients retry); rates are per connection and second."""

    # advertised as SETTINGS_MAX_CONCURRENT_STREAMS; nginx's default (grpc-go and Kestrel: 100)
    max_concurrent_streams: int = 128
    # refusals a client that ignores the setting gets before GOAWAY; nginx allows
    # max(max_concurrent_streams, 100)
    max_refused_streams_per_second: int = 128
    # advertised as SETTINGS_MAX_HEADER_LIST_SIZE and also the cap on the compressed block (a
    # literal never encodes larger than the 32 bytes per entry the decoded size counts)
    max_header_bytes: int = 64 * 1024
    # per header block; nghttp2's default (64 KiB needs 4 frames of 16 KiB)
    max_continuation_frames: int = 8
    # streams the client resets before we answered; netty and grpc-java allow 200 per 30 s, but
    # here reset handlers also hold their place under max_concurrent_streams until they end, so
    # this only bounds the churn
    max_resets_per_second: int = 200
    # PING, SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM, empty DATA, unknown frames beyond an
    # allowance of 2 per stream opened and per DATA frame sent (grpcio sends 2 WINDOW_UPDATEs per
    # unary answer; Envoy scales its WINDOW_UPDATE limit the same way)
    max_control_frames_per_second: int = 1000
    # our answers (PING/SETTINGS ACK, REFUSED_STREAM) queued while the peer does not read;
    # Envoy's max_outbound_control_frames and nghttp2's max_outbound_ack
    max_queued_control_frames: int = 1000
    preface_timeout: float = 10.0  # seconds to the client preface (and to the TLS handshake)
    idle_timeout: float = 300.0  # seconds without a stream, then GOAWAY NO_ERROR; inf: never
    max_connections: int = 4096  # per server; past it GOAWAY at once

    def __post_init__(self) -> None:
        for field in fields(self):
            if not getattr(self, field.name) > 0:
                value = getattr(self, field.name)
                raise ValueError(f"GrpcLimits.{field.name} must be positive, got {value}")


@dataclass(slots=True, frozen=True)
class Method:
    """One RPC: its handler (a servicer's bound method) and how messages flow."""

    handler: Callable[..., Any]
    request_type: type[Message]
    client_streaming: bool
    server_streaming: bool


class AbortError(Exception):
    """Ends the call with this status (raised by `CallContext.abort`, and by the transport for a
    request it cannot read)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class CallContext:
    """What a servicer may ask of its call (the part of grpc.aio.ServicerContext in use)."""

    __slots__ = ("_metadata", "deadline", "peer_cert")

    def __init__(
        self,
        metadata: list[tuple[str, str | bytes]],
        deadline: float | None,
        peer_cert: dict[str, Any] | None = None,
    ) -> None:
        self._metadata = metadata
        self.deadline = deadline  # time.monotonic()
        # the connection's verified TLS client certificate as SSLObject.getpeercert() gives it
        self.peer_cert = peer_cert

    def invocation_metadata(self) -> list[tuple[str, str | bytes]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise AbortError(code, details)


def methods_of(servicer: Any, service: Any, messages: Any) -> dict[bytes, Method]:
    """Routes `/package.Service/Method` -> Method for a generated service descriptor; `messages`
    is the generated module holding its message classes."""
    return {
        f"/{service.full_name}/{m.name}".encode(): Method(
            getattr(servicer, m.name),
            getattr(messages, m.input_type.name),
            m.client_streaming,
            m.server_streaming,
        )
        for m in service.methods
    }


def parse_timeout(value: bytes) -> float:
    """A `grpc-timeout` header (e.g. b"250m") in seconds."""
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]
    except (KeyError, ValueError):
        raise ValueError(f"malformed grpc-timeout {value!r}") from None


class GrpcServer:
    """Serves `routes` on host:port until `stop`."""

    def __init__(
        self,
        routes: dict[bytes, Method],
        max_message_bytes: int,
        busy_poll: BusyPoll | None = None,
        limits: GrpcLimits | None = None,
    ) -> None:
        self.routes = routes
        self.max_message = max_message_bytes
        self.busy_poll = busy_poll or BusyPoll(0)
        self.limits = limits or GrpcLimits()
        self.connections: set[_Connection] = set()
        # connections refused or closed by a guard, and streams refused, by reason
        self.refusals: Counter[str] = Counter()
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, ssl: SSLContext | None = None) -> None:
        """Listen on host:port, speaking TLS when `ssl` is given (the caller configures it:
        certificates, ALPN "h2", client-certificate verification)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            reuse_address=True,
            backlog=2048,
            ssl=ssl,
            ssl_handshake_timeout=self.limits.preface_timeout if ssl is not None else None,
        )
        self._sweeper = loop.call_later(_SWEEP_INTERVAL, self._sweep)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Once a second: close the rate windows and enforce the timeouts of every connection
        (one timer per server, none per call)."""
        now = time.monotonic()
        try:
            for conn in list(self.connections):
                conn.tick(now)
        finally:
            if not self.stopping:
                loop = asyncio.get_running_loop()
                self._sweeper = loop.call_later(_SWEEP_INTERVAL, self._sweep)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new connections and calls (GOAWAY); calls in flight get `grace` seconds."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.go_away()
        tasks = [c.task for conn in self.connections for c in conn.calls.values() if c.task]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)
        for conn in list(self.connections):
            conn.flush()
            conn.close()


class _Call:
    """One stream: its request bytes, the handler task, its send window."""

    __slots__ = (
        "buffer", "connection", "context", "encoding", "headers_sent", "messages", "method",
        "pending_credit", "remote_closed", "stream_id", "task", "unacked", "window",
    )  # fmt: skip

    def __init__(
        self,
        connection: _Connection,
        stream_id: int,
        method: Method | None,
        window: int,
        context: CallContext,
        encoding: bytes,
    ) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.method = method
        self.buffer = bytearray()
        self.encoding = encoding  # of compressed request messages
        self.context = context
        # client-streaming methods read (message, bytes it took on the wire) from this queue;
        # None = the client finished
        self.messages: asyncio.Queue[tuple[Message, int] | None] | None = None
        self.pending_credit = 0
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.remote_closed = False
        self.window = window  # what we may still send on this stream
        self.unacked = 0  # received bytes not yet given back with WINDOW_UPDATE


class _ConnectionError(Exception):
    """Ends the connection with GOAWAY `code`; `guard` names the limit it broke (a key of
    `GrpcServer.refusals`), None for a protocol error."""

    def __init__(self, code: int, reason: str, guard: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.guard = guard


class _Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.limits = limits = server.limits
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None
        self.peer_cert: dict[str, Any] | None = None
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.preface_seen = False
        self.last_stream_id = 0
        self.going_away = False
        self.decoder = hpack.Decoder(max_header_list_size=limits.max_header_bytes)
        self.header_cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.headers_pending: tuple[int, int, bytearray] | None = None  # (stream, flags, block)
        self.continuations = 0  # CONTINUATION frames of the pending header block
        self.peer_window = _DEFAULT_WINDOW  # the peer's initial stream window
        self.peer_max_frame = _MAX_FRAME
        self.send_window = _DEFAULT_WINDOW  # connection-level, what we may still send
        self.unacked = 0  # connection-level received bytes not yet given back
        self.window_waiters: list[asyncio.Future[None]] = []
        self.paused: asyncio.Future[None] | None = None
        self.flush_scheduled = False
        # guards: counts in the current one-second window (zeroed by `tick`) ...
        self.streams_opened = 0
        self.data_frames_sent = 0
        self.resets = 0
        self.refused = 0
        self.control = 0
        self.control_allowed = limits.max_control_frames_per_second
        # ... and state
        self.reset_running = 0  # handlers of streams the client reset that have not ended yet
        self.queued_answers = 0  # control answers queued since writing paused
        self.refusal_logged = False
        self.opened_at = time.monotonic()
        self.idle_since = self.opened_at
        self.idle_mark = 0  # last_stream_id when the connection was last seen busy
        self.idle_goaway = False

    # transport callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        server = self.server
        tls: SSLObject | None = transport.get_extra_info("ssl_object")
        if tls is not None:
            alpn = tls.selected_alpn_protocol()
            if alpn is not None and alpn != "h2":
                log.debug("closing a gRPC connection that negotiated ALPN %r, not h2", alpn)
                transport.close()
                return
            # asyncio finished the handshake before this callback: read the certificate once
            self.peer_cert = tls.getpeercert() or None
        settings = b"".join(
            k.to_bytes(2, "big") + v.to_bytes(4, "big")
            for k, v in (
                (_S_MAX_CONCURRENT, self.limits.max_concurrent_streams),
                (_S_INITIAL_WINDOW, _WINDOW),
                (_S_MAX_HEADER_LIST, self.limits.max_header_bytes),
            )
        )
        self.outbox += _frame(_SETTINGS, 0, 0, settings)
        if len(server.connections) >= self.limits.max_connections:
            server.refusals["max_connections"] += 1
            log.debug("refusing a gRPC connection: %d open", len(server.connections))
            self._write_goaway(_ENHANCE_YOUR_CALM, "too many connections")
            self.close()
            return
        server.connections.add(self)
        self.outbox += _frame(_WINDOW_UPDATE, 0, 0, (_WINDOW - _DEFAULT_WINDOW).to_bytes(4, "big"))
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        self.calls.clear()
        self._wake_senders()

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.paused = None
        self.queued_answers = 0

    def data_received(self, data: bytes) -> None:
        inbox = self.inbox
        inbox += data
        try:
            if not self.preface_seen:
                if len(inbox) < len(_PREFACE):
                    return
                if inbox[: len(_PREFACE)] != _PREFACE:
                    raise _ConnectionError(_PROTOCOL_ERROR, "not an HTTP/2 client preface")
                del inbox[: len(_PREFACE)]
                self.preface_seen = True
            start = 0
            end = len(inbox)
            while end - start >= 9:
                length = int.from_bytes(inbox[start : start + 3], "big")
                if length > _MAX_FRAME:
                    raise _ConnectionError(_FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - start < 9 + length:
                    break
                kind, flags = inbox[start + 3], inbox[start + 4]
                sid = int.from_bytes(inbox[start + 5 : start + 9], "big") & 0x7FFF_FFFF
                payload = bytes(inbox[start + 9 : start + 9 + length])
                start += 9 + length
                self._on_frame(kind, flags, sid, payload)
            del inbox[:start]
        except _ConnectionError as exc:
            self._fail(exc)
            return
        self.flush()

    def _fail(self, exc: _ConnectionError) -> None:
        """GOAWAY with the error, then close (at once if the peer is not reading)."""
        if exc.guard is None:
            log.debug("closing a gRPC connection: %s", exc)
        else:
            self.server.refusals[exc.guard] += 1
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.info("closing the gRPC connection of %s: %s", peer, exc)
        self.inbox.clear()
        self._write_goaway(exc.code, str(exc))
        if self.paused is not None and self.transport is not None:
            self.transport.abort()  # what we queued would never leave
        else:
            self.close()

    def _write_goaway(self, code: int, reason: str) -> None:
        debug = reason.encode("ascii", "replace")[:256]
        payload = self.last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big") + debug
        self.outbox += _frame(_GOAWAY, 0, 0, payload)
        self.flush()

    def tick(self, now: float) -> None:
        """The server's sweep, once a second: new rate windows, and the timeouts."""
        if self.transport is None or self.transport.is_closing():
            return
        self.streams_opened = self.data_frames_sent = self.resets = self.refused = 0
        self.control = 0
        self.control_allowed = self.limits.max_control_frames_per_second
        if not self.preface_seen:
            if now - self.opened_at > self.limits.preface_timeout:
                self.server.refusals["preface_timeout"] += 1
                log.debug("closing a gRPC connection: no client preface in time")
                self.close()
            return
        busy = self.calls or self.reset_running
        if self.idle_goaway:
            if not busy:
                self.close()  # a second after our GOAWAY (streams opened since were refused)
        elif busy or self.last_stream_id != self.idle_mark:
            self.idle_mark = self.last_stream_id
            self.idle_since = now
        elif now - self.idle_since > self.limits.idle_timeout:
            self.server.refusals["idle_timeout"] += 1
            log.debug("closing an idle gRPC connection")
            self.go_away()
            self.idle_goaway = True

    def flush_soon(self) -> None:
        """Write at the end of this loop iteration: calls finishing together (one batch of the
        engine) leave in one write."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.outbox and self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes(self.outbox))
            self.server.busy_poll.kick()
        self.outbox.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def go_away(self) -> None:
        if not self.going_away:
            self.going_away = True
            self._write_goaway(_NO_ERROR, "")

    # frames ----------------------------------------------------------------------------------
    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.headers_pending is not None and kind != _CONTINUATION:
            raise _ConnectionError(_PROTOCOL_ERROR, "header block interrupted")
        if kind == _DATA:
            if not payload and not flags & _END_STREAM:
                self._count_control()  # moves nothing: an empty-frames flood
            self._on_data(flags, sid, payload)
        elif kind == _HEADERS:
            self._on_headers(flags, sid, payload)
        elif kind == _CONTINUATION:
            self._on_continuation(flags, sid, payload)
        else:
            # every other frame is control: counted against the second's allowance
            self.control += 1
            if self.control > self.control_allowed:
                self._check_control_flood()
            if kind == _WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif kind == _SETTINGS:
                if not flags & _ACK:
                    self._on_settings(payload)
            elif kind == _PING:
                if not flags & _ACK:
                    self.outbox += _frame(_PING, _ACK, 0, payload)
                    if self.paused is not None:
                        self._count_queued_answer()
            elif kind == _RST_STREAM:
                self._on_reset(sid)
            elif kind == _GOAWAY:
                self.going_away = True  # the client opens no new streams; the open ones finish
            elif kind == _PUSH_PROMISE:
                raise _ConnectionError(_PROTOCOL_ERROR, "a client may not push")
            # PRIORITY and unknown frame types are ignored, as the protocol asks

    def _count_control(self) -> None:
        self.control += 1
        if self.control > self.control_allowed:
            self._check_control_flood()

    def _check_control_flood(self) -> None:
        """Past the flat allowance: add what the second's real work explains, else this is a
        flood. Per DATA frame of ours a gRPC client may send a connection and a stream
        WINDOW_UPDATE and a bandwidth-probe PING (gRPC's BDP estimator: perf_analyzer's streaming
        mode at 2,000+ answers/s went past a 2x allowance); per stream it opened, a reset."""
        allowed = self.limits.max_control_frames_per_second + 3 * (
            self.streams_opened + self.data_frames_sent
        )
        if self.control > allowed:
            raise _ConnectionError(
                _ENHANCE_YOUR_CALM, f"more than {allowed} control frames in a second", "control"
            )
        self.control_allowed = allowed

    def _count_queued_answer(self) -> None:
        """Writing is paused: the peer sends but does not read what we answer."""
        self.queued_answers += 1
        if self.queued_answers > self.limits.max_queued_control_frames:
            raise _ConnectionError(
                _ENHANCE_YOUR_CALM,
                f"more than {self.limits.max_queued_control_frames} control answers unread",
                "unread_answers",
            )

    def _on_reset(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        if call is None:
            if sid == 0 or sid > self.last_stream_id:
                raise _ConnectionError(_PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return  # a stream we already ended
        task = call.task
        if task is not None and not task.done():
            task.cancel()
            # it holds its place under max_concurrent_streams until it has ended (grpc-go's
            # answer to rapid reset: never more handlers running than streams allowed)
            self.reset_running += 1
            task.add_done_callback(self._reset_ended)
        self.resets += 1
        if self.resets > self.limits.max_resets_per_second:
            raise _ConnectionError(
                _ENHANCE_YOUR_CALM,
                f"more than {self.limits.max_resets_per_second} streams reset in a second",
                "rapid_reset",
            )

    def _reset_ended(self, _task: asyncio.Task[None]) -> None:
        self.reset_running -= 1

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self.headers_pending is None or self.headers_pending[0] != sid:
            raise _ConnectionError(_PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        _, pending_flags, block = self.headers_pending
        block += payload
        self.continuations += 1
        # before decoding, and before the block can grow further (CONTINUATION flood)
        if len(block) > self.limits.max_header_bytes:
            raise _ConnectionError(
                _ENHANCE_YOUR_CALM,
                f"header block past {self.limits.max_header_bytes} bytes",
                "header_block",
            )
        if self.continuations > self.limits.max_continuation_frames:
            raise _ConnectionError(
                _ENHANCE_YOUR_CALM,
                f"more than {self.limits.max_continuation_frames} CONTINUATION frames",
                "header_block",
            )
        if flags & _END_HEADERS:
            self.headers_pending = None
            self._on_header_block(pending_flags, sid, bytes(block))

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & _PADDED:
            return payload
        pad = payload[0] if payload else 0
        if pad >= len(payload):
            raise _ConnectionError(_PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - pad]

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(_PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(flags, payload)
        if flags & _PRIORITY_FLAG:
            block = block[5:]
        if len(block) > self.limits.max_header_bytes:
            raise _ConnectionError(
                _ENHANCE_YOUR_CALM,
                f"header block past {self.limits.max_header_bytes} bytes",
                "header_block",
            )
        if flags & _END_HEADERS:
            self._on_header_block(flags, sid, block)
        else:
            self.headers_pending = (sid, flags, bytearray(block))
            self.continuations = 0

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Decoded headers; a block seen before is reused while the dynamic table is unchanged
        (clients repeat the same indexed block on every call)."""
        cached = self.header_cache.get(block)
        if cached is not None:
            return cached
        table = self.decoder.header_table
        before = (len(table.dynamic_entries), table.dynamic_entries[0] if table.dynamic_entries
                  else None, table.maxsize)  # fmt: skip
        try:
            headers = [(bytes(n), bytes(v)) for n, v in self.decoder.decode(block, raw=True)]
        except hpack.HPACKError as exc:
            raise _ConnectionError(_COMPRESSION_ERROR, f"bad header block: {exc}") from None
        after = (len(table.dynamic_entries), table.dynamic_entries[0] if table.dynamic_entries
                 else None, table.maxsize)  # fmt: skip
        if after[0] != before[0] or after[1] is not before[1] or after[2] != before[2]:
            self.header_cache.clear()  # the table changed: cached blocks may mean other things
        else:
            if len(self.header_cache) >= 64:
                self.header_cache.clear()
            self.header_cache[block] = headers
        return headers

    def _on_header_block(self, flags: int, sid: int, block: bytes) -> None:
        headers = self._decode(block)  # always: the decoder's table must follow the client's
        call = self.calls.get(sid)
        if call is not None or sid <= self.last_stream_id:
            # trailers from the client (gRPC sends none) or a finished stream: only END_STREAM
            if call is not None and flags & _END_STREAM:
                self._on_end(call)
            return
        if sid % 2 == 0:
            raise _ConnectionError(_PROTOCOL_ERROR, "a client stream id must be odd")
        self.last_stream_id = sid
        if self.going_away:
            self.outbox += _frame(_RST_STREAM, 0, sid, _REFUSED_STREAM.to_bytes(4, "big"))
            return
        if len(self.calls) + self.reset_running >= self.limits.max_concurrent_streams:
            self._refuse(sid)
            return
        self.streams_opened += 1
        path = b""
        bad = None
        deadline = None
        encoding = b"identity"
        metadata: list[tuple[str, str | bytes]] = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":path":
                    path = value
            elif name == b"grpc-timeout":
                try:
                    deadline = time.monotonic() + parse_timeout(value)
                except ValueError as exc:
                    bad = str(exc)
            elif name == b"grpc-encoding":
                encoding = value
            elif name == b"content-type":
                if not value.startswith(b"application/grpc"):
                    bad = f"content-type {value.decode(errors='replace')} is not application/grpc"
            elif name not in (b"te", b"grpc-accept-encoding"):
                key = name.decode("ascii", "replace")
                metadata.append((key, value if key.endswith("-bin") else value.decode("latin-1")))
        context = CallContext(metadata, deadline, self.peer_cert)
        call = _Call(self, sid, self.server.routes.get(path), self.peer_window, context, encoding)
        self.calls[sid] = call
        if bad is not None:
            self._finish(call, grpc.StatusCode.INVALID_ARGUMENT, bad)
        elif call.method is None:
            wanted = path.decode("ascii", "replace")
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {wanted}")
        elif call.method.client_streaming:
            call.messages = asyncio.Queue()
            call.task = asyncio.ensure_future(self._run(call))
        if flags & _END_STREAM and sid in self.calls:
            self._on_end(call)

    def _refuse(self, sid: int) -> None:
        """A stream past max_concurrent_streams: REFUSED_STREAM (the client may retry it)."""
        self.outbox += _frame(_RST_STREAM, 0, sid, _REFUSED_STREAM.to_bytes(4, "big"))
        self.server.refusals["refused_stream"] += 1
        if not self.refusal_logged:
            self.refusal_logged = True
            log.debug(
                "a gRPC client opened more than %d streams", self.limits.max_concurrent_streams
            )
        if self.paused is not None:
            self._count_queued_answer()
        self.refused += 1
        if self.refused > self.limits.max_refused_streams_per_second:
            raise _ConnectionError(
                _ENHANCE_YOUR_CALM,
                f"more than {self.limits.max_refused_streams_per_second} streams refused in a "
                f"second (SETTINGS_MAX_CONCURRENT_STREAMS is {self.limits.max_concurrent_streams})",
                "refused_streams",
            )

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(_PROTOCOL_ERROR, "DATA on stream 0")
        # Flow control counts the whole payload, padding included; give windows back at half.
        self.unacked += len(payload)
        if self.unacked >= _WINDOW // 2:
            self.outbox += _frame(_WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4, "big"))
            self.unacked = 0
        call = self.calls.get(sid)
        if call is None:
            if sid > self.last_stream_id:
                raise _ConnectionError(_PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we already ended: the client had not seen it yet
        call.buffer += self._unpad(flags, payload)
        if call.messages is not None:
            # A stream's window comes back as its handler takes messages (see _drain), so that a
            # client streaming faster than the model serves is slowed by flow control.
            call.pending_credit += len(payload)
            for message in self._take_messages(call):
                call.messages.put_nowait((message, call.pending_credit))
                call.pending_credit = 0
        else:
            self.credit(call, len(payload))
            buffered = len(call.buffer)
            if buffered >= 5:
                length = int.from_bytes(call.buffer[1:5], "big")
                # the window came back already: bytes past the one message would pile up
                if self._check_length(call, length) and buffered > 5 + length:
                    self._finish(
                        call,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "a unary call carries exactly one request message, this one more",
                    )
        if flags & _END_STREAM and sid in self.calls:
            self._on_end(call)

    def credit(self, call: _Call, nbytes: int) -> None:
        """Received bytes of `call` are consumed: return them to its window at half."""
        call.unacked += nbytes
        if call.unacked >= _WINDOW // 2 and call.stream_id in self.calls:
            self.outbox += _frame(
                _WINDOW_UPDATE, 0, call.stream_id, call.unacked.to_bytes(4, "big")
            )
            call.unacked = 0
            self.flush_soon()

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == _S_INITIAL_WINDOW:
                if value > 0x7FFF_FFFF:
                    raise _ConnectionError(_FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_window
                self.peer_window = value
                for call in self.calls.values():
                    call.window += delta
            elif key == _S_MAX_FRAME:
                if not _MAX_FRAME <= value <= 0xFF_FFFF:
                    raise _ConnectionError(_PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_max_frame = value
        self.outbox += _frame(_SETTINGS, _ACK, 0)
        if self.paused is not None:
            self._count_queued_answer()
        self._wake_senders()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(_FRAME_SIZE_ERROR, "WINDOW_UPDATE length is not 4")
        increment = int.from_bytes(payload, "big") & 0x7FFF_FFFF
        if sid == 0:
            self.send_window += increment
            if self.send_window > _MAX_WINDOW:
                raise _ConnectionError(_FLOW_CONTROL_ERROR, "connection window past 2^31-1")
        elif (call := self.calls.get(sid)) is not None:
            call.window += increment
        self._wake_senders()

    def _wake_senders(self) -> None:
        waiters, self.window_waiters = self.window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # request messages ------------------------------------------------------------------------
    def _check_length(self, call: _Call, length: int) -> bool:
        if length <= self.server.max_message:
            return True
        self._finish(
            call,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"received message larger than max ({length} vs. {self.server.max_message})",
        )
        return False

    def _take_messages(self, call: _Call) -> list[Message]:
        """Complete messages off the front of the call's buffer (none if it ended the call)."""
        assert call.method is not None
        out = []
        buf = call.buffer
        while len(buf) >= 5:
            length = int.from_bytes(buf[1:5], "big")
            if not self._check_length(call, length):
                return []
            if len(buf) < 5 + length:
                break
            body = bytes(buf[5 : 5 + length])
            message = call.method.request_type()
            try:
                if buf[0]:
                    body = self._decompress(call, body)
                message.ParseFromString(body)
            except AbortError as exc:
                self._finish(call, exc.code, exc.details)
                return []
            except DecodeError as exc:
                self._finish(call, grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
                return []
            out.append(message)
            del buf[: 5 + length]
        return out

    def _decompress(self, call: _Call, body: bytes) -> bytes:
        wbits = _ENCODINGS.get(call.encoding)
        if wbits is None:
            name = call.encoding.decode("ascii", "replace")
            raise AbortError(grpc.StatusCode.UNIMPLEMENTED, f"message compression '{name}' is not "
                             "supported (gzip, deflate)")  # fmt: skip
        inflater = zlib.decompressobj(wbits)
        try:
            # bounded: a small compressed message must not expand past the message limit
            out = inflater.decompress(body, self.server.max_message + 1)
        except zlib.error as exc:
            raise AbortError(
                grpc.StatusCode.INVALID_ARGUMENT, f"bad compressed message: {exc}"
            ) from None
        if len(out) > self.server.max_message:
            raise AbortError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"received message larger than max (decompressed past {self.server.max_message})",
            )
        return out

    def _on_end(self, call: _Call) -> None:
        call.remote_closed = True
        if call.method is None:
            return
        if call.messages is not None:
            call.messages.put_nowait(None)
            return
        if call.task is not None:
            return
        messages = self._take_messages(call)
        if call.stream_id not in self.calls:
            return  # _take_messages ended the call
        if len(messages) != 1 or call.buffer:
            got = "an incomplete message" if call.buffer else f"{len(messages)} messages"
            self._finish(
                call,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a unary call carries exactly one request message, this one {got}",
            )
            return
        call.task = asyncio.ensure_future(self._run(call, messages[0]))

    # running a call --------------------------------------------------------------------------
    async def _run(self, call: _Call, request: Message | None = None) -> None:
        method = call.method
        assert method is not None
        timer = None
        if call.context.deadline is not None:
            task = asyncio.current_task()
            assert task is not None
            delay = max(call.context.deadline - time.monotonic(), 0.0)
            timer = asyncio.get_running_loop().call_later(delay, task.cancel)
        try:
            arg: Any = request if request is not None else _drain(call)
            if method.server_streaming:
                async for reply in method.handler(arg, call.context):
                    await self._send_message(call, reply.SerializeToString())
            else:
                reply = await method.handler(arg, call.context)
                await self._send_message(call, reply.SerializeToString())
        except AbortError as exc:
            self._finish(call, exc.code, exc.details)
        except asyncio.CancelledError:
            # not a reset by the client (that removed the call): shutdown or our deadline timer
            if self.server.stopping:
                self._finish(call, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            else:
                self._finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except Exception:
            log.exception("internal error in a gRPC method")
            self._finish(call, grpc.StatusCode.INTERNAL, "internal error; see the server log")
        else:
            self._finish(call, grpc.StatusCode.OK, "")
        finally:
            if timer is not None:
                timer.cancel()
            self.flush_soon()

    async def _send_message(self, call: _Call, payload: bytes) -> None:
        sid = call.stream_id
        if sid not in self.calls:
            raise asyncio.CancelledError  # the client reset the stream
        if not call.headers_sent:
            self.outbox += _frame(_HEADERS, _END_HEADERS, sid, _OK_BLOCK)
            call.headers_sent = True
        data = memoryview(len(payload).to_bytes(5, "big") + payload)  # byte 0: not compressed
        while data:
            room = min(self.send_window, call.window, self.peer_max_frame)
            if room <= 0:
                self.flush()
                waiter = asyncio.get_running_loop().create_future()
                self.window_waiters.append(waiter)
                await waiter
                if sid not in self.calls:
                    raise asyncio.CancelledError
                continue
            chunk = data[:room]
            self.outbox += _frame(_DATA, 0, sid, bytes(chunk))
            self.data_frames_sent += 1
            self.send_window -= len(chunk)
            call.window -= len(chunk)
            data = data[len(chunk) :]
            if data and len(self.outbox) >= 1 << 20:
                self.flush()
                if self.paused is not None:
                    await self.paused
        self.flush_soon()

    def _finish(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        """Trailers with the status end the stream (headers first when nothing was sent)."""
        if self.calls.pop(call.stream_id, None) is None:
            return
        sid = call.stream_id
        block = _OK_TRAILERS if code is grpc.StatusCode.OK else _status_block(code, details)
        if not call.headers_sent:
            block = _OK_BLOCK + block
        self.outbox += _frame(_HEADERS, _END_HEADERS | _END_STREAM, sid, block)
        if not call.remote_closed:
            # the client is still sending: tell it to stop (as gRPC servers do)
            self.outbox += _frame(_RST_STREAM, 0, sid, _NO_ERROR.to_bytes(4, "big"))
        if call.task is not None and call.task is not asyncio.current_task():
            call.task.cancel()
        self.flush_soon()


async def _drain(call: _Call) -> AsyncIterator[Message]:
    assert call.messages is not None
    while (item := await call.messages.get()) is not None:
        message, nbytes = item
        call.connection.credit(call, nbytes)
        yield message
