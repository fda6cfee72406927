"""V2 inference request/response bodies: JSON tensors and the binary tensor data extension."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from inferplane.errors import BadRequest
from inferplane.tensors import (
    RequestedOutput,
    check_shape,
    datatype_of,
    from_json,
    from_raw,
    to_json_data,
    to_raw,
)

HEADER_LENGTH = b"inference-header-content-length"  # binary tensor extension
TIMEOUT_HEADER = b"x-inferplane-timeout-ms"  # REST; gRPC uses its own deadlines
TENANT_HEADER = b"x-tenant"  # who is calling, for services' tenant rules and the audit trail
API_KEY_HEADER = b"x-api-key"  # an API key where a client cannot set Authorization
ROUTE_PARAMETER = "inferplane_route"  # response parameter naming a service's route decision
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
_NO_TAIL = memoryview(b"")


@dataclass(slots=True)
class DecodedRequest:
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # request-level `binary_data_output`


def _loads(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return params


def decode_request(body: bytes, header_length: str | None) -> DecodedRequest:
    """Parse a V2 infer body; with `header_length` the tail after the JSON holds binary tensors."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        if n < 0 or n > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes"
            )
        if n == len(body):  # all JSON (perf_analyzer sends the header length even then)
            doc, tail = _loads(body), _NO_TAIL
        else:
            view = memoryview(body)
            doc, tail = _loads(view[:n]), view[n:]
    else:
        doc, tail = _loads(body), _NO_TAIL
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise BadRequest(f"inputs[{i}] must be an object")
        name, datatype = item.get("name"), item.get("datatype")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"inputs[{i}] needs a 'name'")
        if not isinstance(datatype, str):
            raise BadRequest(f"input '{name}' needs a 'datatype'")
        if name in inputs:
            raise BadRequest(f"input '{name}' appears twice")
        shape = check_shape(name, item.get("shape"))
        size = _params(item, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(tail):
                raise BadRequest(
                    f"input '{name}': binary_data_size {size} runs past the end of the binary "
                    f"data ({len(tail) - offset} bytes left)"
                )
            inputs[name] = from_raw(name, datatype, shape, tail[offset : offset + size])
            offset += size
        else:
            if "data" not in item:
                raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
            inputs[name] = from_json(name, datatype, shape, item["data"])
    if offset != len(tail):
        raise BadRequest(
            f"{len(tail) - offset} bytes of binary data are not claimed by any input's "
            "binary_data_size"
        )
    params = _params(doc, "request")
    outputs: list[RequestedOutput] = []
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        for j, out in enumerate(raw_outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadRequest(f"outputs[{j}] needs a 'name'")
            oparams = _params(out, f"output '{out['name']}'")
            binary = oparams.get("binary_data")
            outputs.append(
                RequestedOutput(out["name"], None if binary is None else bool(binary), oparams)
            )
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        request_id = str(request_id)
    return DecodedRequest(
        id=request_id or str(uuid.uuid4()),
        inputs=inputs,
        outputs=outputs,
        parameters=params,
        binary_output=bool(params.get("binary_data_output", False)),
    )


def encode_response(
    model_name: str,
    model_version: str,
    request: DecodedRequest,
    results: dict[str, np.ndarray],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when no output is binary)."""
    wanted = request.outputs or [RequestedOutput(n) for n in results]
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in wanted:
        arr = results[out.name]
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": datatype_of(arr),
            "shape": list(arr.shape),
        }
        binary = request.binary_output if out.binary is None else out.binary
        if binary:
            blob = to_raw(arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # No `parameters` member on JSON outputs: perf_analyzer takes its presence as binary.
            entry["data"] = to_json_data(arr)
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "id": request.id,
    }
    if parameters:
        doc["parameters"] = parameters
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=_JSON_OPTS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=_JSON_OPTS)


def loads(raw: bytes) -> Any:
    return _loads(raw)


def request_deadline(params: dict[str, Any], header_ms: bytes | None) -> float | None:
    """A time.monotonic() deadline from V2 `parameters.timeout` (µs) or the timeout header (ms)."""
    seconds: float | None = None
    timeout = params.get("timeout")
    if timeout is not None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise BadRequest("parameters.timeout must be a positive number of microseconds")
        seconds = timeout / 1e6
    if header_ms is not None:
        try:
            ms = float(header_ms)
        except ValueError:
            raise BadRequest(
                f"{TIMEOUT_HEADER.decode()} must be a number of milliseconds"
            ) from None
        # float() also reads "nan" and "inf": a NaN deadline made the scheduler's timer raise
        # (uvloop cannot convert NaN), answered as the model rejecting the input.
        if not 0 < ms < math.inf:
            raise BadRequest(f"{TIMEOUT_HEADER.decode()} must be a positive, finite number")
        seconds = ms / 1e3 if seconds is None else min(seconds, ms / 1e3)
    return None if seconds is None else time.monotonic() + seconds


def request_priority(params: dict[str, Any]) -> int:
    priority = params.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise BadRequest("parameters.priority must be a non-negative integer (1 = highest)")
    return priority
