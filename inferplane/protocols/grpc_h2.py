"""gRPC over HTTP/2 on the server's own event loop: the transport the gRPC port runs on.

Why not `grpc.aio`: measured on the example forest at concurrency 32 (docs/serving.md), grpc.aio
spent about 400 us of CPU per unary call, most of it in its own machinery (completion queues, a
poller thread and event-engine threads handing every call to the asyncio loop), and capped the
gRPC port at under half of what the HTTP/JSON port serves. Here the sockets belong to the same
uvloop as the REST front end and the engine, HTTP/2 framing and HPACK come from `h2` (the
protocol state machine used by hypercorn and httpx), and a call costs one parse, one handler and
one socket write. The servicer classes are unchanged: they get a `CallContext` with the subset of
`grpc.aio.ServicerContext` they use.

What the gRPC wire protocol needs and this module provides: length-prefixed messages (requests
compressed with gzip or deflate are accepted; answers go uncompressed), `grpc-timeout` deadlines,
status and message in trailers (trailers-only for an error before any message), flow control on
both directions, unary, server-streaming and bidirectional methods, cancellation by RST_STREAM,
and a graceful GOAWAY on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from google.protobuf.message import DecodeError, Message

log = logging.getLogger("inferplane.grpc")

# Receive window per stream and for the connection: big enough that a client sends a large
# tensor without waiting for window updates on loopback or a LAN.
_WINDOW = 16 * 1024 * 1024
_OK_HEADERS = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
]
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_PERCENT_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
# grpc-encoding -> zlib wbits for the message decompressor
_ENCODINGS = {b"gzip": 31, b"deflate": 15}


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

    __slots__ = ("_metadata", "deadline")

    def __init__(self, metadata: list[tuple[str, str | bytes]], deadline: float | None) -> None:
        self._metadata = metadata
        self.deadline = deadline  # time.monotonic()

    def invocation_metadata(self) -> list[tuple[str, str | bytes]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise AbortError(code, details)


def methods_of(servicer: Any, service: Any, messages: Any) -> dict[bytes, Method]:
    """Routes `/package.Service/Method` -> Method for a generated service descriptor; `messages`
    is the generated module holding its message classes."""
    routes = {}
    for m in service.methods:
        routes[f"/{service.full_name}/{m.name}".encode()] = Method(
            getattr(servicer, m.name),
            getattr(messages, m.input_type.name),
            m.client_streaming,
            m.server_streaming,
        )
    return routes


def parse_timeout(value: bytes) -> float:
    """A `grpc-timeout` header (e.g. b"250m") in seconds."""
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1:]]
    except (KeyError, ValueError):
        raise ValueError(f"malformed grpc-timeout {value!r}") from None


class GrpcServer:
    """Serves `routes` on host:port until `stop`."""

    def __init__(self, routes: dict[bytes, Method], max_message_bytes: int) -> None:
        self.routes = routes
        self.max_message = max_message_bytes
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=2048
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new connections and calls (GOAWAY); calls in flight get `grace` seconds."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.go_away()
        calls = [c for conn in self.connections for c in conn.calls.values() if c.task]
        tasks = [c.task for c in calls if c.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
        for conn in list(self.connections):
            conn.close()


class _Call:
    """One stream: its request bytes, the handler task, and what has been sent."""

    __slots__ = (
        "buffer", "context", "encoding", "headers_sent", "messages", "method", "stream_id", "task"
    )  # fmt: skip

    def __init__(self, stream_id: int, method: Method | None, context: CallContext) -> None:
        self.encoding = b"identity"  # of compressed request messages
        self.stream_id = stream_id
        self.method = method
        self.buffer = bytearray()
        # client-streaming methods read from this queue (None = the client finished)
        self.messages: asyncio.Queue[Message | None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.context = context


class _Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None
        self.conn = h2.connection.H2Connection(
            # Header validation and normalisation are off: h2 spends more on them than on
            # framing, our own headers are fixed, and we read only the headers we look for.
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._paused: asyncio.Future[None] | None = None
        self._flush_soon = False

    # transport callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.server.connections.add(self)
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            }
        )
        self.conn.increment_flow_control_window(_WINDOW - 65535)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        for waiter in self._window_waiters.values():
            if not waiter.done():
                waiter.cancel()
        self.calls.clear()

    def pause_writing(self) -> None:
        self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from a gRPC client: %s", exc)
            self.flush()
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_end(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self._on_window(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._on_reset(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._on_window(0)  # a new initial window may let blocked senders go on
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.close()
                return
        self.flush()

    def flush_soon(self) -> None:
        """Write at the end of this loop iteration: calls finishing together (one batch of the
        engine) leave in one write."""
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_soon = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def go_away(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection()
        self.flush()

    # incoming --------------------------------------------------------------------------------
    def _on_request(self, event: h2.events.RequestReceived) -> None:
        path = b""
        encoding = b"identity"
        deadline = None
        metadata: list[tuple[str, str | bytes]] = []
        bad = None
        for name, value in event.headers or ():
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
        sid = event.stream_id
        method = self.server.routes.get(path)
        call = _Call(sid, method, CallContext(metadata, deadline))
        call.encoding = encoding
        self.calls[sid] = call
        if bad is not None:
            self._finish(call, grpc.StatusCode.INVALID_ARGUMENT, bad)
        elif method is None:
            wanted = path.decode("ascii", "replace")
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {wanted}")
        elif method.client_streaming:
            call.messages = asyncio.Queue()
            call.task = asyncio.ensure_future(self._run(call))

    def _on_data(self, event: h2.events.DataReceived) -> None:
        if event.flow_controlled_length:
            # Give the window back at once: a unary request is bounded by the message limit, and
            # a stream's handler bounds its own concurrency.
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        call = self.calls.get(event.stream_id)
        if call is None or call.method is None or (call.task is not None and call.messages is None):
            return
        call.buffer += event.data or b""
        if call.messages is not None:
            for message in self._take_messages(call):
                call.messages.put_nowait(message)
        elif len(call.buffer) >= 5:
            self._check_length(call, int.from_bytes(call.buffer[1:5], "big"))

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

    def _on_end(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None or call.method is None:
            return
        if call.messages is not None:
            call.messages.put_nowait(None)
            return
        if call.task is not None:
            return
        messages = self._take_messages(call)
        if sid not in self.calls:
            return  # _take_messages ended the call
        if len(messages) != 1 or call.buffer:
            self._finish(
                call,
                grpc.StatusCode.INTERNAL if call.buffer else grpc.StatusCode.UNIMPLEMENTED,
                "a unary call carries exactly one complete request message",
            )
            return
        call.task = asyncio.ensure_future(self._run(call, messages[0]))

    def _on_reset(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        if call is not None and call.task is not None:
            call.task.cancel()
        waiter = self._window_waiters.pop(sid, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()

    def _on_window(self, sid: int) -> None:
        if sid == 0:
            waiters = list(self._window_waiters.items())
            self._window_waiters.clear()
        else:
            waiter = self._window_waiters.pop(sid, None)
            waiters = [(sid, waiter)] if waiter is not None else []
        for _, waiter in waiters:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # running a call --------------------------------------------------------------------------
    async def _run(self, call: _Call, request: Message | None = None) -> None:
        method = call.method
        assert method is not None
        timer = None
        if call.context.deadline is not None:
            loop = asyncio.get_running_loop()
            delay = call.context.deadline - time.monotonic()
            task = asyncio.current_task()
            assert task is not None
            timer = loop.call_later(max(delay, 0.0), task.cancel)
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
            elif call.stream_id in self.calls:
                self._finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            return
        except Exception:
            log.exception("internal error in gRPC method")
            self._finish(call, grpc.StatusCode.INTERNAL, "internal error; see the server log")
        else:
            self._finish(call, grpc.StatusCode.OK, "")
        finally:
            if timer is not None:
                timer.cancel()
            self.flush_soon()

    async def _send_message(self, call: _Call, payload: bytes) -> None:
        if call.stream_id not in self.calls:
            raise asyncio.CancelledError  # the client went away
        if not call.headers_sent:
            self.conn.send_headers(call.stream_id, _OK_HEADERS)
            call.headers_sent = True
        data = len(payload).to_bytes(5, "big") + payload  # first byte 0: not compressed
        await self._send_data(call.stream_id, data)
        self.flush_soon()

    async def _send_data(self, sid: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.flush()
                waiter = asyncio.get_running_loop().create_future()
                self._window_waiters[sid] = waiter
                await waiter
                continue
            chunk = view[:window]
            self.conn.send_data(sid, chunk.tobytes())
            view = view[window:]
            if view:
                self.flush()
                if self._paused is not None:
                    await self._paused

    def _finish(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        """Trailers with the status end the stream (headers first when nothing was sent)."""
        if self.calls.pop(call.stream_id, None) is None:
            return
        trailers = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            trailers.append((b"grpc-message", quote(details, safe=_PERCENT_SAFE).encode()))
        headers = trailers if call.headers_sent else _OK_HEADERS + trailers
        try:
            self.conn.send_headers(call.stream_id, headers, end_stream=True)
        except h2.exceptions.StreamClosedError:
            return
        except h2.exceptions.ProtocolError as exc:
            log.debug("could not end gRPC stream %d: %s", call.stream_id, exc)
        if call.task is not None and call.task is not asyncio.current_task():
            call.task.cancel()


async def _drain(call: _Call) -> AsyncIterator[Message]:
    assert call.messages is not None
    while (message := await call.messages.get()) is not None:
        yield message
