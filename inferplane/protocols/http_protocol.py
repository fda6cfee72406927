"""The REST port's HTTP/1.1 protocol: uvicorn's httptools protocol, with V2 infer answered directly.

uvicorn turns every request into an ASGI exchange: a scope, a cycle object, an event, a task, and
message dicts for receive and each send. For a 32-float inference that machinery cost more than
the model (profiled at concurrency 1: ~60 us of a ~200 us server-side request). Here a
`POST .../infer` with no request still open before it on the connection is read into a buffer by
the parser callbacks and answered by `InferHandler` on one task, with the whole response in one
socket write. Every other request (metadata, health, repository, V1, pipelined requests, `Expect:
100-continue`, upgrades) takes uvicorn's ASGI path unchanged, which still gets one write per
response: its head is held until the body's write and both go out together (a head with no body
after it goes out at the end of the same event-loop step).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inferplane.errors import InferplaneError
from inferplane.protocols.busy_poll import BusyPoll
from inferplane.protocols.v2_infer_asgi import InferHandler, body_too_large, declared_too_large

# Raw request targets only: a query string or percent-encoding takes the ASGI path, which decodes.
_INFER_TARGET = re.compile(rb"^/v2/models/([^/?%]+)(?:/versions/([^/?%]+))?/infer$")


class _CoalescingTransport:
    """Holds a response head until the body's write and sends both as one (the ASGI path)."""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/"):
            self._head = data
            self._loop.call_soon(self._release)
        else:
            self._transport.write(data)

    def _release(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _NoEvent:
    """uvicorn sets its cycle's event when the connection drops; an infer exchange has none."""

    @staticmethod
    def set() -> None:
        return None


class _InferExchange:
    """One infer request on the direct path. It stands where uvicorn keeps its request cycle
    (`protocol.cycle`), so that uvicorn's pipelining, shutdown and disconnect handling see it."""

    __slots__ = (
        "body",
        "disconnected",
        "headers",
        "keep_alive",
        "name",
        "refused",
        "response_complete",
        "size",
        "started",
        "version",
    )
    message_event = _NoEvent

    def __init__(
        self, name: str, version: str | None, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        self.name = name
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.size = 0  # body bytes received so far
        self.refused: InferplaneError | None = None
        self.started = False
        self.disconnected = False
        self.response_complete = False


class V2HttpProtocol(HttpToolsProtocol):
    """Constructed by uvicorn per connection; `infer` is bound by `v2_http_protocol`."""

    infer: InferHandler
    limit: int  # the payload limit in bytes
    busy_poll: BusyPoll

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        self._declared: bytes | None = None
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    # uvicorn builds an ASGI scope as each request begins; here only requests that take the ASGI
    # path get one (`_asgi_scope`), once their target is known.
    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._declared = None

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._declared = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _asgi_scope(self) -> None:
        headers, url, expect = self.headers, self.url, self.expect_100_continue
        super().on_message_begin()
        self.headers = self.scope["headers"] = headers
        self.url, self.expect_100_continue = url, expect

    def on_headers_complete(self) -> None:
        parser = self.parser
        cycle = self.cycle
        if (
            parser.get_method() == b"POST"
            and (cycle is None or cycle.response_complete)
            and not self.expect_100_continue
            and not parser.should_upgrade()
        ):
            match = _INFER_TARGET.match(self.url)
            if match is not None:
                self._begin_infer(match)
                return
        self._asgi_scope()
        super().on_headers_complete()

    def _begin_infer(self, match: re.Match[bytes]) -> None:
        version = match.group(2)
        keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() != "1.0"
        exchange = _InferExchange(
            match.group(1).decode("latin-1"),
            None if version is None else version.decode("latin-1"),
            self.headers,
            keep_alive,
        )
        self.cycle = exchange  # type: ignore[assignment]
        refused = declared_too_large(self._declared, self.limit)
        if refused is not None:
            # Answer now, as the ASGI path does; the body that follows is read and dropped.
            exchange.refused = refused
            self._start(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self.cycle
        if type(exchange) is not _InferExchange:
            super().on_body(body)
            return
        if exchange.started:
            return
        exchange.size += len(body)
        if exchange.size > self.limit:
            exchange.refused = body_too_large(self.limit)
            exchange.body.clear()
            self._start(exchange)
            return
        exchange.body.append(body)

    def on_message_complete(self) -> None:
        exchange = self.cycle
        if type(exchange) is not _InferExchange:
            super().on_message_complete()
        elif not exchange.started:
            self._start(exchange)

    def _start(self, exchange: _InferExchange) -> None:
        exchange.started = True
        task = self.loop.create_task(self._answer(exchange))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # uvicorn's shutdown waits for these

    async def _answer(self, exchange: _InferExchange) -> None:
        parts = exchange.body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        exchange.body = []
        status, headers, payload = await self.infer.answer(
            exchange.name,
            exchange.version,
            exchange.headers,
            body if exchange.refused is None else exchange.refused,
        )
        if self.flow.write_paused and not exchange.disconnected:
            await self.flow.drain()
        if exchange.disconnected:
            return
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n" % len(payload))
        if not exchange.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", payload)
        transport = self._raw_transport
        transport.write(b"".join(head))
        self.busy_poll.kick()
        exchange.response_complete = True
        if not exchange.keep_alive:
            transport.close()
        self.on_response_complete()


def v2_http_protocol(infer: InferHandler) -> type[V2HttpProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to the server's handler."""
    deps = infer.deps
    bound = {"infer": infer, "limit": deps.max_payload_bytes, "busy_poll": deps.busy_poll}
    return type("V2HttpProtocol", (V2HttpProtocol,), bound)
