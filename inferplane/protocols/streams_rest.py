"""`GET /inferplane/streams`: the stream workers' lag and throughput for the console, read from
their own /metrics pages or from Prometheus when the server was told where (serve
--stream-metrics URL, --prometheus URL)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.edge.access import READ
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_rest import EVERY_TARGET, gated, json_response


def build_routes(deps: ServingDeps) -> list[Route]:
    async def streams(request: Request) -> Response:
        view = deps.streams
        if view is None or not view.configured:
            return json_response({"from": None, "error": None, "workers": []})
        return json_response(await asyncio.to_thread(view.read))

    # Lag is an operator's view of the fleet, like /inferplane/models: read.
    return [Route("/inferplane/streams", gated(deps, READ, EVERY_TARGET, streams), methods=["GET"])]
