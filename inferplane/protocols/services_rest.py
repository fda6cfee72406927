"""`GET /inferplane/services`: the traffic policy in force and the state behind it, for a person
or a rollout controller to read (weights, which version each route resolves to now, breakers)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.edge.access import ADMIN
from inferplane.errors import InferplaneError
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_rest import EVERY_TARGET, gated, json_response
from inferplane.routing.policy import Target


def build_routes(deps: ServingDeps) -> list[Route]:
    predictor = deps.predictor
    services = predictor.services

    def resolved(target: Target) -> dict[str, Any]:
        doc: dict[str, Any] = target.model_dump(exclude_none=True)
        try:
            lv, _ = predictor.router.lookup(target.model, target.version)
        except InferplaneError as exc:
            doc["error"] = exc.message
            return doc
        doc["resolved_version"] = lv.version
        doc["state"] = lv.state.value
        doc["breaker"] = services.breaker_state(lv.name, lv.version).name.lower()
        return doc

    async def list_services(request: Request) -> Response:
        out: dict[str, Any] = {}
        for name, compiled in services.compiled.items():
            spec = compiled.spec
            doc = spec.model_dump(exclude_none=True, exclude={"routes", "match", "shadow"})
            doc["routes"] = [
                {"route": decision, **resolved(route)}
                for decision, route in zip(compiled.names, spec.routes, strict=True)
            ]
            doc["match"] = [
                {"route": f"ab:{m.name}", **m.model_dump(exclude={"route", "name"}, exclude_none=True),
                 "target": resolved(m.route)}
                for m in spec.match
            ]  # fmt: skip
            if spec.shadow is not None:
                doc["shadow"] = resolved(spec.shadow)
            out[name] = doc
        source = deps.policy.url if deps.policy is not None else None
        return json_response({"source": source, "services": out})

    # The policy in force is an operator's view (weights, breakers): admin, like changing it.
    return [
        Route(
            "/inferplane/services", gated(deps, ADMIN, EVERY_TARGET, list_services), methods=["GET"]
        )
    ]
