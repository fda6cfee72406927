"""`GET /inferplane/rollouts[/{service}]`: where each rollout stands (docs/rollouts.md), read
from the repository's `rollouts/` folder, so every replica answers the same whichever process
runs the controller."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.edge.access import READ
from inferplane.errors import BadRequest, NotFound
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_rest import EVERY_TARGET, gated, json_response


def build_routes(deps: ServingDeps) -> list[Route]:
    def read(service: str | None) -> list[dict[str, Any]]:
        from inferplane.control.rollout.command import steps_of, summary
        from inferplane.control.rollout.state import StateStore

        declared = steps_of(deps.predictor.services.policy)
        store = StateStore(deps.manager.repository.url)
        names = [service] if service else store.services()
        found = []
        for name in names:
            try:
                state = store.load(name)
            except BadRequest as exc:  # one unreadable state must not hide the others
                found.append({"service": name, "status": "unreadable", "reason": exc.message})
                continue
            if state is None:
                continue
            found.append(summary(state, declared.get(name)))
        return found

    async def list_rollouts(request: Request) -> Response:
        return json_response({"rollouts": await asyncio.to_thread(read, None)})

    async def one_rollout(request: Request) -> Response:
        service = request.path_params["service"]
        found = await asyncio.to_thread(read, service)
        if not found:
            raise NotFound(f"service '{service}' has no rollout")
        return json_response(found[0])

    # Weights and verdicts are an operator's view of the traffic, like /inferplane/models: read.
    return [
        Route(
            "/inferplane/rollouts", gated(deps, READ, EVERY_TARGET, list_rollouts), methods=["GET"]
        ),
        Route(
            "/inferplane/rollouts/{service}",
            gated(deps, READ, "service", one_rollout),
            methods=["GET"],
        ),
    ]
