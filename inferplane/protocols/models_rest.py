"""`GET /inferplane/models[/{model}]`: where each version stands in memory (state, footprint,
pinned, idle time, loads) against the server's memory budget, for a person, `inferplane models
list|show --server` or a dashboard to read. The V2 repository index stays Triton's shape."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.edge.access import READ
from inferplane.errors import NotFound
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_rest import gated, json_response, visible


def build_routes(deps: ServingDeps) -> list[Route]:
    manager = deps.manager

    async def residency(request: Request) -> Response:
        report = manager.residency_report()
        shown = visible(deps, request, READ)
        wanted = request.path_params.get("model")
        rows = [
            r
            for r in report["versions"]
            if shown(r["name"]) and (wanted is None or r["name"] == wanted)
        ]
        if wanted is not None and not rows:
            raise NotFound(f"unknown model '{wanted}'")
        return json_response({**report, "versions": rows})

    return [
        Route("/inferplane/models", gated(deps, READ, None, residency), methods=["GET"]),
        Route("/inferplane/models/{model}", gated(deps, READ, "model", residency), methods=["GET"]),
    ]
