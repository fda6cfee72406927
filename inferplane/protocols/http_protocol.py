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

Listener limits (`HttpLimits`) live here too, since uvicorn has a keep-alive timeout but no read
timeouts and no connection caps. Each connection keeps its phase and when that phase began in two
attributes; one sweep per server (`Connections`) compares them with the clock a few times a second,
so a request pays for no timer: a head that is not complete within the header timeout of the
connection opening or of the previous response (slowloris; after a response, the keep-alive
timeout if that is longer, since the head may begin as late as keep-alive allows), or a body not complete within the body
timeout after its head, gets a 408 and a close; idle keep-alive connections close after the
keep-alive timeout (uvicorn's own per-response timer is not armed) and, past the idle cap, the
oldest one closes; past the connection cap a new connection gets a 503, after the oldest idle one
has been closed to make room if there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from inferplane.errors import InferplaneError
from inferplane.protocols.busy_poll import BusyPoll
from inferplane.protocols.v2_codec import dumps
from inferplane.protocols.v2_infer_asgi import InferHandler, body_too_large, declared_too_large

log = logging.getLogger("inferplane.http")

# Raw request targets only: a query string or percent-encoding takes the ASGI path, which decodes.
_INFER_TARGET = re.compile(rb"^/v2/models/([^/?%]+)(?:/versions/([^/?%]+))?/infer$")


# The ASGI scope key under which requests on the ASGI path find the connection's client
# certificate (`getpeercert()` form; None on plain TCP or when the client sent none).
PEER_CERT_SCOPE_KEY = "inferplane.peer_cert"

_now = time.monotonic

# A connection's phase, as the parser callbacks and answers move it along.
_OPEN = 0  # accepted, nothing of a first request yet: the header timeout runs from the accept
_IDLE = 1  # answered, waiting for the next request: the keep-alive timeout runs
_HEAD_FIRST = 2  # a first request's head is arriving (header timeout from the accept)
_HEAD = 3  # a later request's head: header timeout (or keep-alive, if longer) from the last answer
_BODY = 4  # the head is in, the body is arriving: the body timeout runs from the head
_DONE = 5  # the request is read and being answered: no timeout (the deadline is the app's)
_GONE = 6  # closed or refused by the limits; nothing more is done with it

_LINGER_S = 0.5  # a refused connection is read (and dropped) this long before it is closed


@dataclass(frozen=True)
class HttpLimits:
    """Limits of the REST port against slow, idle or too many clients (docs/security.md)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_s: float = 5.0
    max_connections: int = 4096
    max_idle_connections: int = 1024

    @property
    def sweep_interval_s(self) -> float:
        """How often the sweep looks: a quarter of the shortest timeout, within 50-500 ms."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.keepalive_s)
        return min(0.5, max(0.05, shortest / 4))


class Connections:
    """One server's connections: the open ones (counted against the cap), the idle ones in the
    order they went idle, the refused ones being closed, and the sweep over them all."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.max_idle = limits.max_idle_connections
        self.open: set[V2HttpProtocol] = set()
        self.idle: OrderedDict[V2HttpProtocol, float] = OrderedDict()
        self.refused: dict[V2HttpProtocol, float] = {}
        self._task: asyncio.Task[None] | None = None
        # Counted, and logged as one line at most every LOG_EVERY_S: a flood must not flood logs.
        self.refusals = 0
        self.timeouts = 0
        self._logged = (0, 0)
        self._logged_at = 0.0

    LOG_EVERY_S = 10.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def close(self, conn: V2HttpProtocol) -> None:
        conn._phase = _GONE
        self.open.discard(conn)
        self.idle.pop(conn, None)
        conn.transport.close()

    def close_oldest_idle(self) -> bool:
        if not self.idle:
            return False
        oldest, _ = self.idle.popitem(last=False)
        self.close(oldest)
        return True

    def forget(self, conn: V2HttpProtocol) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)
        self.refused.pop(conn, None)

    async def _sweep_forever(self) -> None:
        interval = self.limits.sweep_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep(_now())
            except Exception:  # one bad connection must not end the limits for all
                log.exception("connection sweep failed")

    def _log_counts(self, now: float) -> None:
        counts = (self.refusals, self.timeouts)
        if counts == self._logged or now - self._logged_at < self.LOG_EVERY_S:
            return
        refused, timed_out = (a - b for a, b in zip(counts, self._logged, strict=True))
        self._logged, self._logged_at = counts, now
        log.warning(
            "REST port: %d connections refused (--max-connections %d), %d closed for a slow head "
            "or body (408) since the last report",
            refused,
            self.limits.max_connections,
            timed_out,
        )

    def sweep(self, now: float) -> None:
        self._log_counts(now)
        limits = self.limits
        idle = self.idle
        keepalive = limits.keepalive_s
        # Oldest first, so the expired ones are a prefix.
        while idle:
            conn, since = next(iter(idle.items()))
            if now - since < keepalive:
                break
            self.close(conn)
        for conn, since in list(self.refused.items()):
            if now - since >= _LINGER_S:
                del self.refused[conn]
                conn.transport.close()
        header = limits.header_timeout_s
        later_head = max(header, keepalive)  # a head may begin as late as keep-alive allows
        body = limits.body_timeout_s
        for conn in list(self.open):
            phase = conn._phase
            if phase <= _IDLE or phase >= _DONE:
                if phase == _OPEN and now - conn._since > header:
                    self.close(conn)  # nothing of a request to answer: a plain close
                continue
            if conn.flow.read_paused:
                continue  # the server is not reading (pipelining, back-pressure): not the client
            waited = now - conn._since
            if phase == _BODY:
                if waited > body:
                    conn.timed_out(f"the request body did not arrive within {body:g} s of its head")
            elif waited > (header if phase == _HEAD_FIRST else later_head):
                cycle = conn.cycle
                if cycle is None or cycle.response_complete:  # else an earlier answer is owed
                    conn.timed_out(f"the request head did not arrive within {header:g} s")


class _Discard:
    """Stands in for the parser of a refused connection: what the client sends is dropped."""

    @staticmethod
    def feed_data(data: bytes) -> None:
        return None


class _CoalescingTransport:
    """Holds a response head until the body's write and sends both as one (the ASGI path)."""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            # The client went away (e.g. after pipelining requests): asyncio's transports drop
            # such writes, uvloop's raise, and uvicorn still answers the queued requests.
            self._head = None
            return
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
    """Constructed by uvicorn per connection; `infer`, `limit`, `busy_poll` and `registry` are
    bound by `v2_http_protocol`.

    `peer_cert` is the connection's TLS client certificate in `getpeercert()` form, None on plain
    TCP or when the client sent none."""

    infer: InferHandler
    limit: int  # the payload limit in bytes
    busy_poll: BusyPoll
    registry: Connections

    peer_cert: dict[str, Any] | None
    _phase: int
    _since: float  # when the current phase's clock started (time.monotonic)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw_transport = transport
        self._declared: bytes | None = None
        # On a TLS port uvicorn calls this once the handshake is done, so the certificate is known.
        self.peer_cert = transport.get_extra_info("peercert") or None
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        registry = self.registry
        registry.start()
        self._since = _now()
        if len(registry.open) >= registry.limits.max_connections and not (
            registry.close_oldest_idle()
        ):
            self._refuse()
            return
        self._phase = _OPEN
        registry.open.add(self)

    def _refuse(self) -> None:
        self._phase = _GONE
        limit = self.registry.limits.max_connections
        self.registry.refusals += 1
        self._write_error(
            503,
            f"the server has too many open connections (limit {limit}); retry later",
            (b"retry-after: 1\r\n",),
        )
        # Closing now could reset the connection under a request the client is still sending,
        # and the reset can destroy the 503 before it is read: read and drop for a moment first.
        self.parser = _Discard()  # type: ignore[assignment]
        self.registry.refused[self] = self._since

    def _write_error(self, status: int, message: str, extra: tuple[bytes, ...] = ()) -> None:
        body = dumps({"error": message})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        head += (
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            *extra,
            b"\r\n",
            body,
        )
        self._raw_transport.write(b"".join(head))

    def timed_out(self, message: str) -> None:
        """The sweep found this connection's head or body too slow: 408 if nothing else is being
        answered on it, then close."""
        cycle = self.cycle
        if (
            self._phase != _BODY
            or (type(cycle) is _InferExchange and not cycle.started)
            or (type(cycle) is RequestResponseCycle and not cycle.response_started)
        ):
            self._write_error(408, message)
        self.registry.timeouts += 1
        self.registry.close(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.forget(self)
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        # The connection belongs to the WebSocket protocol from here on: no HTTP timeouts.
        self.registry.forget(self)
        self._phase = _GONE
        super().handle_websocket_upgrade()

    def _go_idle(self) -> None:
        now = _now()
        self._phase = _IDLE
        self._since = now
        registry = self.registry
        idle = registry.idle
        idle[self] = now
        if len(idle) > registry.max_idle:
            registry.close_oldest_idle()

    def on_response_complete(self) -> None:
        # uvicorn's, less the keep-alive timer it arms per response: the sweep does that job.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._phase == _DONE:
            self._go_idle()
            return
        # A next request's head or body is on its way: its clock starts now.
        self._since = _now()

    # uvicorn builds an ASGI scope as each request begins; here only requests that take the ASGI
    # path get one (`_asgi_scope`), once their target is known.
    def on_message_begin(self) -> None:
        phase = self._phase
        if phase == _IDLE:
            self.registry.idle.pop(self, None)
            self._phase = _HEAD
        else:
            self._phase = _HEAD_FIRST if phase == _OPEN else _HEAD
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
        self.scope[PEER_CERT_SCOPE_KEY] = self.peer_cert  # type: ignore[literal-required]
        self.url, self.expect_100_continue = url, expect

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._since = _now()
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
        self._phase = _DONE
        if type(exchange) is not _InferExchange:
            super().on_message_complete()
        elif not exchange.started:
            self._start(exchange)
            return
        if exchange is not None and exchange.response_complete:  # answered before its body was in
            self._go_idle()

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
            peer_cert=self.peer_cert,
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


def v2_http_protocol(infer: InferHandler, limits: HttpLimits | None = None) -> type[V2HttpProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to the server's handler and
    to one `Connections` (its `registry`), whose sweep starts with the first connection."""
    deps = infer.deps
    bound = {
        "infer": infer,
        "limit": deps.max_payload_bytes,
        "busy_poll": deps.busy_poll,
        "registry": Connections(limits or HttpLimits()),
    }
    return type("V2HttpProtocol", (V2HttpProtocol,), bound)
