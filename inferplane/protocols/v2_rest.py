"""Open Inference Protocol (KServe V2) over REST, with Triton's binary, repository, statistics and
model configuration extensions. Infer itself is the bare ASGI handler in `v2_infer_asgi`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.engine.manager import LoadedVersion, ModelEntry
from inferplane.errors import BadRequest, InferplaneError
from inferplane.protocols import model_views
from inferplane.protocols.deps import EXTENSIONS, ServingDeps
from inferplane.protocols.v2_codec import (
    dumps,
    loads,
)
from inferplane.protocols.v2_infer_asgi import read_body_limited

log = logging.getLogger("inferplane.rest")
JSON = "application/json"


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(dumps(doc), status_code=status, media_type=JSON)


def error_response(exc: InferplaneError) -> Response:
    return json_response({"error": exc.message}, exc.status)


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Every failure becomes the V2 error body; only unexpected faults are 500 (and logged)."""

    async def wrapper(request: Request) -> Response:
        try:
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
        return json_response({"model_stats": rows})

    async def repo_index(request: Request) -> Response:
        body = await read_body(request, deps.max_payload_bytes)
        ready_only = False
        if body.strip():
            doc = _json_object(body)
            ready_only = bool(doc.get("ready", False))
        return json_response(await model_views.list_repository(manager, ready_only))

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
    table: list[tuple[str, Handler, list[str]]] = [
        ("/v2/health/live", live, ["GET"]),
        ("/v2/health/ready", ready, ["GET"]),
        ("/v2", server_metadata, ["GET"]),
        ("/v2/models/stats", stats, ["GET"]),
        (f"{m}/ready", model_ready, ["GET"]),
        (f"{mv}/ready", model_ready, ["GET"]),
        (f"{m}/config", model_config, ["GET"]),
        (f"{mv}/config", model_config, ["GET"]),
        (f"{m}/stats", stats, ["GET"]),
        (f"{mv}/stats", stats, ["GET"]),
        (m, model_metadata, ["GET"]),
        (mv, model_metadata, ["GET"]),
        ("/v2/repository/index", repo_index, ["POST"]),
        ("/v2/repository/models/{model}/load", repo_load, ["POST"]),
        ("/v2/repository/models/{model}/unload", repo_unload, ["POST"]),
        ("/metrics", prometheus, ["GET"]),
    ]
    return [Route(path, guarded(h), methods=methods) for path, h, methods in table]


def _json_object(body: bytes) -> dict[str, Any]:
    doc = loads(body)
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object")
    return doc
