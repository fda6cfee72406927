"""A `Predictor` that calls an inferplane (or any V2) server over HTTP: model-as-a-service.

Tensors travel with the binary data extension both ways, so a batch of rows costs one memcpy per
tensor rather than a JSON round trip. Server errors come back as the same `InferplaneError`
classes the in-process predictor raises, so streaming and batch treat both alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np
import orjson

from inferplane.errors import (
    BadRequest,
    DeadlineExceeded,
    InferplaneError,
    InternalError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
)
from inferplane.observability.tracing import traceparent_of
from inferplane.predictor import Prediction, RequestContext, Signature
from inferplane.protocols.v2_codec import HEADER_LENGTH as _HEADER_LENGTH
from inferplane.protocols.v2_codec import TENANT_HEADER as _TENANT_HEADER
from inferplane.protocols.v2_codec import TIMEOUT_HEADER as _TIMEOUT_HEADER
from inferplane.tensors import TensorSpec, datatype_of, from_json, from_raw, to_raw

HEADER_LENGTH = _HEADER_LENGTH.decode()
TIMEOUT_HEADER = _TIMEOUT_HEADER.decode()
TENANT_HEADER = _TENANT_HEADER.decode()

_BY_STATUS: dict[int, type[InferplaneError]] = {
    400: BadRequest,
    404: NotFound,
    413: PayloadTooLarge,
    429: Overloaded,
    503: Unavailable,
    504: DeadlineExceeded,
}


class RemotePredictor:
    def __init__(self, url: str, *, timeout_s: float = 30.0, max_connections: int = 64) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @staticmethod
    def _path(target: str, version: str | None) -> str:
        return f"/v2/models/{target}" + (f"/versions/{version}" if version else "")

    async def signature(self, target: str, version: str | None = None) -> Signature:
        doc = await self._get(self._path(target, version))
        config = await self._get(self._path(target, version) + "/config")
        return Signature(
            model_name=doc.get("name", target),
            # V2 metadata lists versions but not which one the server routes to; a prediction's
            # own model_version says which one answered.
            model_version=version or "",
            inputs=[TensorSpec(t["name"], t["datatype"], list(t["shape"])) for t in doc["inputs"]],
            outputs=[
                TensorSpec(t["name"], t["datatype"], list(t["shape"])) for t in doc["outputs"]
            ],
            max_batch_size=int(config.get("max_batch_size", 0)),
        )

    async def predict(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        context: RequestContext,
    ) -> Prediction:
        specs: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for name, array in inputs.items():
            blob = to_raw(array)
            specs.append(
                {
                    "name": name,
                    "datatype": datatype_of(array),
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
        doc: dict[str, Any] = {
            "id": context.request_id,
            "inputs": specs,
            "parameters": {"binary_data_output": True},
        }
        if outputs:
            doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
        header = orjson.dumps(doc)
        headers = {
            HEADER_LENGTH: str(len(header)),
            "content-type": "application/octet-stream",
            "x-request-id": context.request_id,
        }
        if context.tenant:
            headers[TENANT_HEADER] = context.tenant
        if context.span is not None:  # a traced stream event or job: the server continues it
            headers["traceparent"] = traceparent_of(context.span)
        elif context.traceparent:
            headers["traceparent"] = context.traceparent
        headers.update(context.headers)
        if context.deadline is not None:
            left_ms = (context.deadline - time.monotonic()) * 1000
            if left_ms <= 0:
                raise DeadlineExceeded("the request's deadline passed before it was sent")
            headers[TIMEOUT_HEADER] = str(max(1, int(left_ms)))
        try:
            response = await self._client.post(
                self._path(target, version) + "/infer",
                content=b"".join([header, *blobs]),
                headers=headers,
            )
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"{self.url} did not answer in time: {exc}") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach {self.url}: {exc}") from exc
        _raise_for_error(response)
        return _decode(response, target)

    async def _get(self, path: str) -> dict[str, Any]:
        try:
            response = await self._client.get(path)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach {self.url}: {exc}") from exc
        _raise_for_error(response)
        result: dict[str, Any] = response.json()
        return result


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    cls = _BY_STATUS.get(response.status_code, InternalError)
    raise cls(f"{message} (HTTP {response.status_code} from the server)")


def _decode(response: httpx.Response, target: str) -> Prediction:
    body = response.content
    length = response.headers.get(HEADER_LENGTH)
    n = int(length) if length is not None else len(body)
    doc = orjson.loads(body[:n])
    tail = memoryview(body)[n:]
    offset = 0
    results: dict[str, np.ndarray] = {}
    for out in doc.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            results[out["name"]] = from_json(
                out["name"], out["datatype"], out["shape"], out["data"]
            )
            continue
        results[out["name"]] = from_raw(
            out["name"], out["datatype"], out["shape"], tail[offset : offset + size]
        )
        offset += size
    route = response.headers.get("x-inferplane-route", "remote")
    return Prediction(
        results,
        doc.get("model_name", target),
        str(doc.get("model_version", "")),
        route,
    )
