"""The V2 REST infer endpoint as a bare ASGI handler: the one hot path of the REST server.

Everything else (metadata, health, repository, V1) goes through Starlette's router; infer skips the
framework's request/response objects and middleware, which cost more than decoding a small tensor.
Behaviour is the same as any other endpoint: V2 error bodies, metrics, request ids.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from inferplane.errors import DeadlineExceeded, InferplaneError, PayloadTooLarge
from inferplane.observability.metrics import UNKNOWN
from inferplane.predictor import RequestContext
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_codec import (
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
_JSON_HEADERS = [(b"content-type", b"application/json")]


class InferEndpoint:
    """ASGI app: POST /v2/models/{m}[/versions/{v}]/infer here, anything else to `fallback`."""

    def __init__(self, deps: ServingDeps, fallback: ASGIApp) -> None:
        self.deps = deps
        self.fallback = fallback
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}

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
        started = time.perf_counter()
        deps = self.deps
        manager = deps.manager
        label_model, label_version, status = UNKNOWN, "", 500
        manager.inflight += 1
        try:
            header_len = traceparent = timeout_ms = declared = tenant = None
            for key, value in scope["headers"]:
                if key == b"content-length":
                    declared = value
                elif key == HEADER_LENGTH:
                    header_len = value.decode("latin-1")
                elif key == b"traceparent":
                    traceparent = value.decode("latin-1")
                elif key == TIMEOUT_HEADER:
                    timeout_ms = value
                elif key == TENANT_HEADER:
                    tenant = value.decode("latin-1")
            body = await read_body_limited(receive, declared, deps.max_payload_bytes)
            decoded = decode_request(body, header_len)
            service = version is None and deps.predictor.is_service(name)
            context = RequestContext(
                request_id=decoded.id,
                tenant=tenant,
                traceparent=traceparent,
                deadline=request_deadline(decoded.parameters, timeout_ms),
                priority=request_priority(decoded.parameters),
                parameters=decoded.parameters,
                # Only a service's match rules and sticky key read headers: skip the dict otherwise.
                headers=_header_dict(scope) if service else {},
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
            headers = [
                (b"content-type", b"application/json"),
                (b"x-inferplane-route", prediction.route.encode()),
            ]
            if binary_len is not None:
                headers[0] = (b"content-type", b"application/octet-stream")
                headers.append((b"inference-header-content-length", str(binary_len).encode()))
            status = 200
            await _respond(send, 200, payload, headers)
        except InferplaneError as exc:
            status = exc.status
            if name in manager.models:
                label_model = name
            await _respond(send, status, dumps({"error": exc.message}), _JSON_HEADERS)
        except Exception:
            log.exception("internal error on POST %s", scope["path"])
            await _respond(
                send, 500, dumps({"error": "internal server error (see the server log)"}),
                _JSON_HEADERS,
            )  # fmt: skip
        finally:
            manager.inflight -= 1
            self._count(label_model, label_version, status, time.perf_counter() - started)

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


def _header_dict(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body_limited(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole request body, refused with 413 past `limit` (by Content-Length or as it streams)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared.decode()} bytes exceeds the limit of {limit} bytes"
        )
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
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
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
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
