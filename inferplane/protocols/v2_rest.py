"""Open Inference Protocol (KServe V2) over REST, with Triton's binary, repository, statistics and
model configuration extensions. Infer itself is the bare ASGI handler in `v2_infer_asgi`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.edge.access import ADMIN, READ
from inferplane.edge.identity import Principal
from inferplane.engine.manager import LoadedVersion, ModelEntry
from inferplane.errors import BadRequest, CataloguePending, InferplaneError
from inferplane.protocols import model_views
from inferplane.protocols.deps import EXTENSIONS, ServingDeps
from inferplane.protocols.v2_codec import API_KEY_HEADER, dumps, loads
from inferplane.protocols.v2_infer_asgi import read_body_limited

log = logging.getLogger("inferplane.rest")
JSON = "application/json"


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(dumps(doc), status_code=status, media_type=JSON)


def error_response(exc: InferplaneError) -> Response:
    response = json_response({"error": exc.message}, exc.status)
    for name, value in exc.response_headers():
        response.headers[name.decode()] = value.decode("latin-1")
    return response


Handler = Callable[[Request], Awaitable[Response]]
PRINCIPAL = "inferplane.principal"  # the ASGI scope key the edge leaves its principal under
PEER_CERT = "inferplane.peer_cert"  # ... and the HTTP protocol the TLS client certificate
EVERY_TARGET = "*"  # the target of endpoints that show every model: needs a grant on "*"


async def require(
    deps: ServingDeps, request: Request, scope: str, target: str | None
) -> Principal | None:
    """The caller, once the edge let them `scope` on `target` (None when the edge is off)."""
    edge = deps.edge
    if edge is None:
        return None
    headers = request.headers
    principal = await edge.check(
        scope,
        target,
        headers.get("authorization"),
        headers.get(API_KEY_HEADER.decode()),
        request.scope.get(PEER_CERT),
    )
    request.scope[PRINCIPAL] = principal
    return principal


def gated(
    deps: ServingDeps, scope: str | None, target_param: str | None, handler: Handler
) -> Handler:
    """`handler` behind the edge: `scope` on the path parameter `target_param`; None: a
    server-level endpoint, allowed with the scope on any target; EVERY_TARGET: one that shows
    every model, allowed with the scope on all of them. Scope None stays open."""
    if deps.edge is None or scope is None:
        return guarded(handler)

    async def checked(request: Request) -> Response:
        if target_param == EVERY_TARGET:
            target: str | None = EVERY_TARGET
        else:
            target = request.path_params.get(target_param) if target_param else None
        await require(deps, request, scope, target)
        return await handler(request)

    return guarded(checked)


def visible(deps: ServingDeps, request: Request, scope: str) -> Callable[[str], bool]:
    """Which model names a listing may show the caller (all when the edge is off)."""
    principal = request.scope.get(PRINCIPAL)
    if deps.edge is None or principal is None:
        return lambda name: True
    return deps.edge.filter(principal, scope)


def guarded(handler: Handler) -> Handler:
    """Every failure becomes the V2 error body; only unexpected faults are 500 (and logged)."""

    async def wrapper(request: Request) -> Response:
        try:
            try:
                return await handler(request)
            except CataloguePending as pending:  # read that model.yaml now, then answer
                await pending.wait()
                return await handler(request)
        except InferplaneError as exc:
            return error_response(exc)
        except Exception:
            log.exception("internal error on %s %s", request.method, request.url.path)
            return json_response({"error": "internal server error (see the server log)"}, 500)

    return wrapper


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    return await read_body_limited(
        request.receive, declared.encode() if declared is not None else None, limit
    )


def version_param(request: Request) -> str | None:
    version = request.path_params.get("version")
    return str(version) if version is not None else None


def build_routes(deps: ServingDeps) -> list[Route]:
    manager, predictor, metrics = deps.manager, deps.predictor, deps.metrics

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        ok = manager.ready
        return json_response({"ready": ok}, 200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return json_response(
            {"name": deps.server_name, "version": deps.server_version, "extensions": EXTENSIONS}
        )

    async def model_ready(request: Request) -> Response:
        name = request.path_params["model"]
        ok = model_views.model_ready(predictor.router, name, version_param(request))
        return json_response({"name": name, "ready": ok}, 200 if ok else 503)

    def _lookup(request: Request) -> tuple[ModelEntry, LoadedVersion]:
        name = request.path_params["model"]
        lv, _ = predictor.router.lookup(name, version_param(request))
        return manager.entry(lv.name), lv

    async def model_metadata(request: Request) -> Response:
        entry, lv = _lookup(request)
        return json_response(model_views.model_metadata(entry, lv))

    async def model_config(request: Request) -> Response:
        _, lv = _lookup(request)
        return json_response(model_views.model_config(lv.config, lv.platform))

    async def stats(request: Request) -> Response:
        rows = model_views.statistics(
            manager, request.path_params.get("model"), version_param(request)
        )
        shown = visible(deps, request, READ)
        return json_response({"model_stats": [r for r in rows if shown(r["name"])]})

    async def repo_index(request: Request) -> Response:
        body = await read_body(request, deps.max_payload_bytes)
        ready_only = False
        if body.strip():
            doc = _json_object(body)
            ready_only = bool(doc.get("ready", False))
        shown = visible(deps, request, READ)
        rows = await model_views.list_repository(manager, ready_only)
        return json_response([r for r in rows if shown(r["name"])])

    async def repo_load(request: Request) -> Response:
        name = request.path_params["model"]
        body = await read_body(request, deps.max_payload_bytes)
        if body.strip():
            _json_object(body)
        await model_views.load_model(manager, name)
        return json_response({"name": name, "load": True})

    async def repo_unload(request: Request) -> Response:
        name = request.path_params["model"]
        await read_body(request, deps.max_payload_bytes)
        await manager.unload_model(name)
        return json_response({"name": name, "unload": True})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    m = "/v2/models/{model}"
    mv = "/v2/models/{model}/versions/{version}"
    metrics_scope = None if deps.edge is None or deps.edge.metrics_open else READ
    # path, handler, methods, scope (None: open, like Triton's health group), target parameter
    table: list[tuple[str, Handler, list[str], str | None, str | None]] = [
        ("/v2/health/live", live, ["GET"], None, None),
        ("/v2/health/ready", ready, ["GET"], None, None),
        ("/v2", server_metadata, ["GET"], READ, None),
        ("/v2/models/stats", stats, ["GET"], READ, None),
        (f"{m}/ready", model_ready, ["GET"], None, None),
        (f"{mv}/ready", model_ready, ["GET"], None, None),
        (f"{m}/config", model_config, ["GET"], READ, "model"),
        (f"{mv}/config", model_config, ["GET"], READ, "model"),
        (f"{m}/stats", stats, ["GET"], READ, "model"),
        (f"{mv}/stats", stats, ["GET"], READ, "model"),
        (m, model_metadata, ["GET"], READ, "model"),
        (mv, model_metadata, ["GET"], READ, "model"),
        ("/v2/repository/index", repo_index, ["POST"], READ, None),
        ("/v2/repository/models/{model}/load", repo_load, ["POST"], ADMIN, "model"),
        ("/v2/repository/models/{model}/unload", repo_unload, ["POST"], ADMIN, "model"),
        ("/metrics", prometheus, ["GET"], metrics_scope, EVERY_TARGET),
    ]
    return [
        Route(path, gated(deps, scope, target, h), methods=methods)
        for path, h, methods, scope, target in table
    ]


def _json_object(body: bytes) -> dict[str, Any]:
    doc = loads(body)
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object")
    return doc
