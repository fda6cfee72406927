"""The V2 REST infer exchange, the one hot path of the REST server, and its bare ASGI endpoint.

Everything else (metadata, health, repository, V1) goes through Starlette's router; infer skips the
framework's request/response objects and middleware, which cost more than decoding a small tensor.
Under uvicorn it skips ASGI too (`http_protocol.py`). Behaviour is the same as any other endpoint:
V2 error bodies, metrics, request ids.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from inferplane.edge.access import INFER
from inferplane.edge.quotas import NO_LEASE
from inferplane.engine.scheduler import batch_rows
from inferplane.errors import DeadlineExceeded, InferplaneError, PayloadTooLarge
from inferplane.observability import tracing
from inferplane.observability.metrics import UNKNOWN
from inferplane.predictor import RequestContext
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_codec import (
    API_KEY_HEADER,
    HEADER_LENGTH,
    ROUTE_PARAMETER,
    TENANT_HEADER,
    TIMEOUT_HEADER,
    decode_request,
    dumps,
    encode_response,
    request_deadline,
    request_priority,
)

log = logging.getLogger("inferplane.rest")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_JSON_TYPE = (b"content-type", b"application/json")


class InferHandler:
    """The V2 infer exchange, whatever carries it: headers and a whole body in, (status, response
    headers, body) out. Errors become V2 error bodies; every answer is counted in the metrics."""

    def __init__(self, deps: ServingDeps) -> None:
        self.deps = deps
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}

    async def answer(
        self,
        name: str,
        version: str | None,
        headers: list[tuple[bytes, bytes]],
        body: bytes | InferplaneError,
        peer_cert: dict[str, Any] | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """`body` is the request body, or the error that reading it ended with (e.g. 413);
        `peer_cert` the TLS client certificate of the connection (`getpeercert()`), if any."""
        started = time.perf_counter()
        deps = self.deps
        manager = deps.manager
        label_model, label_version, status = UNKNOWN, "", 500
        manager.inflight += 1
        lease = NO_LEASE
        span = request_id = error = None
        try:
            header_len = traceparent = timeout_ms = tenant = authorization = api_key = None
            for key, value in headers:
                if key == HEADER_LENGTH:
                    header_len = value.decode("latin-1")
                elif key == b"traceparent":
                    traceparent = value.decode("latin-1")
                elif key == TIMEOUT_HEADER:
                    timeout_ms = value
                elif key == TENANT_HEADER:
                    tenant = value.decode("latin-1")
                elif key == b"authorization":
                    authorization = value.decode("latin-1")
                elif key == API_KEY_HEADER:
                    api_key = value.decode("latin-1")
            tracer = tracing.ACTIVE
            if tracer is not None:
                span = tracer.start_request(
                    "POST /v2/models/{model}/infer",
                    traceparent,
                    {
                        "http.request.method": "POST",
                        "http.route": "/v2/models/{model}/infer",
                        "inferplane.target": name,
                    },
                )
            principal = None
            edge = deps.edge
            if edge is not None:
                # Before the body is looked at: a caller without rights learns nothing more.
                who = await edge.check(INFER, name, authorization, api_key, peer_cert)
                tenant, principal = edge.tenant(who, tenant), who.name
                lease = edge.admit(who, name)
            if isinstance(body, InferplaneError):
                raise body
            decoded = decode_request(body, header_len)
            request_id = decoded.id
            if lease is not NO_LEASE:
                lease.charge_rows(batch_rows(decoded.inputs))
            service = version is None and deps.predictor.is_service(name)
            context = RequestContext(
                request_id=decoded.id,
                tenant=tenant,
                principal=principal,
                traceparent=traceparent,
                deadline=request_deadline(decoded.parameters, timeout_ms),
                priority=request_priority(decoded.parameters),
                parameters=decoded.parameters,
                # Only a service's match rules and sticky key read headers: skip the dict otherwise.
                headers=_header_dict(headers) if service else {},
                span=span,
            )
            prediction = await deps.predictor.predict(
                name,
                decoded.inputs,
                version=version,
                outputs=[o.name for o in decoded.outputs] or None,
                context=context,
            )
            label_model, label_version = prediction.model_name, prediction.model_version
            payload, binary_len = encode_response(
                prediction.model_name,
                prediction.model_version,
                decoded,
                prediction.outputs,
                {ROUTE_PARAMETER: prediction.route} if service else None,
            )
            status = 200
            route = (b"x-inferplane-route", prediction.route.encode())
            if binary_len is None:
                return 200, [_JSON_TYPE, route], payload
            binary = (b"inference-header-content-length", str(binary_len).encode())
            return 200, [(b"content-type", b"application/octet-stream"), route, binary], payload
        except InferplaneError as exc:
            status, error = exc.status, exc.message
            if name in manager.models:
                label_model = name
            return status, [_JSON_TYPE, *exc.response_headers()], dumps({"error": exc.message})
        except Exception:
            log.exception("internal error on POST /v2/models/%s/infer", name)
            return 500, [_JSON_TYPE], dumps({"error": "internal server error (see the server log)"})
        finally:
            manager.inflight -= 1
            lease.release()
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                tracing.end_request(span, status, label_model, label_version, request_id, error)
            # Counted just after the answer is written (the caller writes it in this same step).
            asyncio.get_running_loop().call_soon(
                self._count, label_model, label_version, status, time.perf_counter() - started
            )

    def _count(self, model: str, version: str, status: int, seconds: float) -> None:
        metrics = self.deps.metrics
        key = (model, version, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = metrics.requests.labels(model, version, "rest", str(status))
            self._counters[key] = counter
        counter.inc()
        if status == 200:
            latency = self._latency.get((model, version))
            if latency is None:
                latency = metrics.request_latency.labels(model, version, "rest")
                self._latency[(model, version)] = latency
            latency.observe(seconds)


class InferEndpoint:
    """ASGI app: POST /v2/models/{m}[/versions/{v}]/infer here, anything else to `fallback`.

    The uvicorn front end answers infer requests without ASGI (`http_protocol.py`); this serves
    them under granian and whatever else calls the app as ASGI."""

    def __init__(self, deps: ServingDeps, fallback: ASGIApp) -> None:
        self.deps = deps
        self.fallback = fallback
        self.handler = InferHandler(deps)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.match(scope["path"])
            if match is not None:
                await self.infer(scope, receive, send, match.group(1), match.group(2))
                return
        await self.fallback(scope, receive, send)

    async def infer(
        self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None
    ) -> None:
        headers = scope["headers"]
        declared = next((v for k, v in headers if k == b"content-length"), None)
        body: bytes | InferplaneError
        try:
            body = await read_body_limited(receive, declared, self.deps.max_payload_bytes)
        except InferplaneError as exc:
            body = exc
        status, response_headers, payload = await self.handler.answer(
            name, version, headers, body, scope.get("inferplane.peer_cert")
        )
        await _respond(send, status, payload, response_headers)


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


def declared_too_large(declared: bytes | None, limit: int) -> PayloadTooLarge | None:
    """The 413 for a Content-Length past `limit`, before any of the body is read."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return PayloadTooLarge(
            f"request body of {declared.decode()} bytes exceeds the limit of {limit} bytes"
        )
    return None


def body_too_large(limit: int) -> PayloadTooLarge:
    """The 413 for a body that grew past `limit` as it streamed in."""
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


async def read_body_limited(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole request body, refused with 413 past `limit` (by Content-Length or as it streams)."""
    refused = declared_too_large(declared, limit)
    if refused is not None:
        raise refused
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise body_too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise DeadlineExceeded("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
