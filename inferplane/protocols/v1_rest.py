"""V1 / TF-Serving style REST: `POST /v1/models/<name>[/versions/<v>]:predict` for older clients.

Row format `{"instances": [...]}` answers `{"predictions": [...]}`; columnar `{"inputs": ...}`
answers `{"outputs": ...}`. Datatypes come from the model signature.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.edge.access import INFER, READ
from inferplane.edge.quotas import NO_LEASE
from inferplane.engine.manager import State
from inferplane.engine.scheduler import batch_rows
from inferplane.errors import BadRequest, InferplaneError, NotFound
from inferplane.observability import tracing
from inferplane.predictor import RequestContext
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_codec import TENANT_HEADER, loads
from inferplane.protocols.v2_rest import gated, guarded, json_response, read_body, require
from inferplane.repository.schema import ModelConfig
from inferplane.tensors import BYTES, bytes_as_str, dtype_of


def _to_array(config: ModelConfig, name: str, value: Any) -> np.ndarray:
    spec = next(t for t in config.inputs if t.name == name)
    if spec.datatype == BYTES:
        flat = np.asarray(value, dtype=object)
        return np.vectorize(lambda v: str(v).encode("utf-8"), otypes=[object])(flat)
    try:
        return np.asarray(value, dtype=dtype_of(spec.datatype))
    except (ValueError, TypeError) as exc:
        raise BadRequest(
            f"input '{name}': cannot read the values as {spec.datatype}: {exc}"
        ) from None


def _plain(arr: np.ndarray) -> Any:
    return (bytes_as_str(arr) if arr.dtype.kind == "O" else arr).tolist()


def _decode(config: ModelConfig, doc: Any) -> tuple[dict[str, np.ndarray], bool]:
    """(inputs, row_format)."""
    if not isinstance(doc, dict) or ("instances" in doc) == ("inputs" in doc):
        raise BadRequest("the body needs exactly one of 'instances' (rows) or 'inputs' (columns)")
    names = [t.name for t in config.inputs]
    if "instances" in doc:
        rows = doc["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequest("'instances' must be a non-empty list")
        if all(isinstance(r, dict) for r in rows):
            columns = {n: [r.get(n) for r in rows] for n in names}
            if any(v is None for col in columns.values() for v in col):
                raise BadRequest(f"every instance needs the inputs {', '.join(names)}")
            return {n: _to_array(config, n, c) for n, c in columns.items()}, True
        if len(names) != 1:
            raise BadRequest(f"the model has inputs {', '.join(names)}: send instances as objects")
        return {names[0]: _to_array(config, names[0], rows)}, True
    cols = doc["inputs"]
    if isinstance(cols, dict):
        return {n: _to_array(config, n, v) for n, v in cols.items() if n in names} | (
            {k: np.asarray(v) for k, v in cols.items() if k not in names}
        ), False
    if len(names) != 1:
        raise BadRequest(f"the model has inputs {', '.join(names)}: send 'inputs' as an object")
    return {names[0]: _to_array(config, names[0], cols)}, False


def build_routes(deps: ServingDeps) -> list[Route]:
    predictor = deps.predictor

    async def predict(request: Request) -> Response:
        target: str = request.path_params["target"]
        if not target.endswith(":predict"):
            raise NotFound(
                f"unknown V1 path; use /v1/models/<name>:predict, not {request.url.path}"
            )
        name = target.removesuffix(":predict")
        version = request.path_params.get("version")
        if "/versions/" in name:
            name, version = name.split("/versions/", 1)
        tenant = request.headers.get(TENANT_HEADER.decode())
        traceparent = request.headers.get("traceparent")
        tracer = tracing.ACTIVE
        span = None
        if tracer is not None:
            span = tracer.start_request(
                "POST /v1/models/{model}:predict",
                traceparent,
                {
                    "http.request.method": "POST",
                    "http.route": "/v1/models/{model}:predict",
                    "inferplane.target": name,
                },
            )
        status, error = 500, None
        try:
            response = await _predict(request, name, version, tenant, traceparent, span)
            status = 200
            return response
        except InferplaneError as exc:
            status, error = exc.status, exc.message
            raise
        finally:
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                tracing.end_request(span, status, "", "", None, error)

    async def _predict(
        request: Request,
        name: str,
        version: str | None,
        tenant: str | None,
        traceparent: str | None,
        span: Any,
    ) -> Response:
        principal = await require(deps, request, INFER, name)
        lease = NO_LEASE
        try:
            if principal is not None and deps.edge is not None:
                tenant = deps.edge.tenant(principal, tenant)
                lease = deps.edge.admit(principal, name)
            lv, _ = predictor.router.resolve(name, version)
            body = await read_body(request, deps.max_payload_bytes)
            inputs, rows = _decode(lv.config, loads(body))
            lease.charge_rows(batch_rows(inputs))
            # No version asked: a service routes it (the version resolved above only gave the
            # signature to decode against).
            prediction = await predictor.predict(
                name,
                inputs,
                version=version,
                context=RequestContext(
                    tenant=tenant,
                    principal=principal.name if principal is not None else None,
                    headers=dict(request.headers),
                    traceparent=traceparent,
                    span=span,
                ),
            )
        finally:
            lease.release()
        columns = {k: _plain(v) for k, v in prediction.outputs.items()}
        if len(columns) == 1:
            values: Any = next(iter(columns.values()))
        elif rows:
            n = len(next(iter(columns.values())))
            values = [{k: c[i] for k, c in columns.items()} for i in range(n)]
        else:
            values = columns
        response = json_response({"predictions" if rows else "outputs": values})
        response.headers["x-inferplane-model-version"] = prediction.model_version
        return response

    async def status(request: Request) -> Response:
        name = request.path_params["name"]
        entry = deps.manager.entry(name)
        return json_response(
            {
                "model_version_status": [
                    {
                        "version": str(v),
                        "state": "AVAILABLE" if lv.state is State.READY else lv.state.value,
                        "status": {"error_code": "OK", "error_message": lv.reason},
                    }
                    for v, lv in sorted(entry.versions.items())
                ]
            }
        )

    return [
        Route("/v1/models/{target:path}", guarded(predict), methods=["POST"]),  # checks inside
        Route("/v1/models/{name}", gated(deps, READ, "name", status), methods=["GET"]),
    ]
