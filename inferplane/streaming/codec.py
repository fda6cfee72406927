"""Events <-> tensors: JSON events mapped onto the model signature, predictions back to JSON.

An event is either a JSON object whose fields hold the inputs (by the input's name, `features` for
a one-input model, or an explicit `--map input=field[,field...]`), or a full V2 inference request
(`{"inputs": [{"name", "datatype", "shape", "data"}]}`). Decoding errors are `BadRequest`: the event
is at fault, and it goes to the dead-letter queue with the message.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from inferplane.errors import BadRequest
from inferplane.observability.tracing import TRACEPARENT, parse_traceparent, traceparent_of
from inferplane.predictor import Signature
from inferplane.streaming.connector import Event, Record
from inferplane.tensors import BYTES, TensorSpec, dtype_of, from_json

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_random = random.Random()


@dataclass(slots=True)
class Decoded:
    event: Event
    event_id: str
    inputs: dict[str, np.ndarray]  # every tensor has the row axis first
    rows: int
    event_time_ms: int
    v2: bool  # a full V2 request: its outputs keep their row axis
    span: Any = None  # the event's consumer span when it is traced (observability/tracing.py)

    @property
    def shape_key(self) -> tuple[tuple[int, ...], ...]:
        """Events stack into one call only when every input has the same per-row shape."""
        return tuple(a.shape[1:] for a in self.inputs.values())


def parse_mapping(items: Sequence[str]) -> dict[str, list[str]]:
    """`input=f1,f2,f3` -> {"input": ["f1", "f2", "f3"]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, fields = item.partition("=")
        names = [f.strip() for f in fields.split(",") if f.strip()]
        if not sep or not name.strip() or not names:
            raise BadRequest(f"--map '{item}': expected INPUT=FIELD or INPUT=FIELD1,FIELD2,...")
        out[name.strip()] = names
    return out


def event_time_ms(value: Any) -> int:
    """Epoch seconds or milliseconds (numbers), or an ISO 8601 string, as epoch milliseconds."""
    if isinstance(value, bool):
        raise BadRequest(f"event time {value!r} is neither a number nor an ISO 8601 string")
    if isinstance(value, int | float):
        # Below 1e11 it can only be seconds (1e11 ms is 1973; 1e11 s is the year 5138).
        return int(value * 1000) if abs(value) < 1e11 else int(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"event time '{value}' is not ISO 8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1000)
    raise BadRequest(f"event time {value!r} is neither a number nor an ISO 8601 string")


def child_traceparent(parent: str | None) -> str:
    """A W3C traceparent for the scoring span: the caller's trace when it sent one, else a new one."""
    # Trace ids need to be unique, not secret: the fast generator, never all zeros.
    span = f"{_random.getrandbits(64) | 1:016x}"
    caller = parse_traceparent(parent)
    if caller is not None:
        return f"00-{caller.trace_id:032x}-{span}-{'01' if caller.sampled else '00'}"
    return f"00-{_random.getrandbits(128) | 1:032x}-{span}-01"


class Decoder:
    def __init__(
        self,
        signature: Signature,
        mapping: Mapping[str, list[str]] | None = None,
        *,
        id_field: str = "id",
        time_field: str | None = None,
    ) -> None:
        self.signature = signature
        self.specs = {s.name: s for s in signature.inputs}
        self.mapping = dict(mapping or {})
        unknown = [n for n in self.mapping if n not in self.specs]
        if unknown:
            raise BadRequest(
                f"--map names input '{unknown[0]}', but model '{signature.model_name}' has inputs "
                f"{', '.join(self.specs)}"
            )
        self.id_field = id_field
        self.time_field = time_field
        # Models with a batch axis take rows stacked from many events; others one event per call.
        self.batched = all(s.shape[:1] == [-1] for s in signature.inputs)

    def decode(self, event: Event) -> Decoded:
        try:
            doc = orjson.loads(event.payload)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"event is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadRequest(f"event must be a JSON object, got {type(doc).__name__}")
        raw_id = doc.get(self.id_field)
        event_id = event.message_id if raw_id is None else str(raw_id)
        if self.time_field and doc.get(self.time_field) is not None:
            when = event_time_ms(doc[self.time_field])
        elif event.timestamp_ms is not None:
            when = event.timestamp_ms
        else:
            when = int(time.time() * 1000)
        if isinstance(doc.get("inputs"), list) and not self.mapping:
            inputs, rows = self._v2(doc["inputs"])
            return Decoded(event, event_id, inputs, rows, when, True)
        inputs = {name: self._field_input(spec, doc) for name, spec in self.specs.items()}
        rows = next(iter(inputs.values())).shape[0] if inputs else 0
        return Decoded(event, event_id, inputs, rows, when, False)

    def _field_input(self, spec: TensorSpec, doc: dict[str, Any]) -> np.ndarray:
        fields = self.mapping.get(spec.name)
        if fields is None:
            if spec.name in doc:
                fields = [spec.name]
            elif len(self.specs) == 1 and "features" in doc:
                fields = ["features"]
            else:
                hint = "'features' or " if len(self.specs) == 1 else ""
                raise BadRequest(
                    f"event has no field for input '{spec.name}' (expected {hint}'{spec.name}', "
                    "or map fields with --map)"
                )
        if len(fields) == 1:
            if fields[0] not in doc:
                raise BadRequest(f"event has no field '{fields[0]}' (mapped to '{spec.name}')")
            value = doc[fields[0]]
        else:
            missing = [f for f in fields if f not in doc]
            if missing:
                raise BadRequest(f"event has no field '{missing[0]}' (mapped to '{spec.name}')")
            value = [doc[f] for f in fields]
        return self._row(spec, value)

    def _row(self, spec: TensorSpec, value: Any) -> np.ndarray:
        """One event's value as one row (the batch axis added), shaped by the signature."""
        row_shape = spec.shape[1:] if self.batched else spec.shape
        if spec.datatype == BYTES and isinstance(value, str | bytes):
            value = [value]
        count, known = 1, True
        for dim in row_shape:
            if dim < 0:
                known = False
            else:
                count *= dim
        if known:
            shape = [1, *row_shape] if self.batched else list(row_shape)
        else:
            # A variable per-row dimension: the event's own data says how long it is.
            data = np.asarray(value, dtype=object if spec.datatype == BYTES else None)
            if data.ndim != len(row_shape):
                raise BadRequest(
                    f"input '{spec.name}' needs {len(row_shape)} dimensions per event "
                    f"(shape {spec.shape}), got {data.ndim}"
                )
            shape = [1, *data.shape] if self.batched else list(data.shape)
        if known and not isinstance(value, list) and count == 1:
            value = [value]
        if isinstance(value, list) and known:
            size = len(value) if not value or not isinstance(value[0], list) else _flat_len(value)
            if size != count:
                raise BadRequest(
                    f"input '{spec.name}' needs {count} values per event (shape {spec.shape}), "
                    f"got {size}"
                )
        return from_json(spec.name, spec.datatype, shape, value)

    def _v2(self, tensors: list[Any]) -> tuple[dict[str, np.ndarray], int]:
        inputs: dict[str, np.ndarray] = {}
        for tensor in tensors:
            if not isinstance(tensor, dict):
                raise BadRequest("each entry of 'inputs' must be an object")
            name = tensor.get("name")
            spec = self.specs.get(name) if isinstance(name, str) else None
            if spec is None or not isinstance(name, str):
                raise BadRequest(
                    f"V2 request names input {name!r}; model '{self.signature.model_name}' has "
                    f"inputs {', '.join(self.specs)}"
                )
            datatype, shape = tensor.get("datatype"), tensor.get("shape")
            if datatype != spec.datatype:
                raise BadRequest(
                    f"input '{name}' has datatype {datatype}, the model expects {spec.datatype}"
                )
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise BadRequest(f"input '{name}': 'shape' must be a list of sizes, got {shape!r}")
            dtype_of(datatype)
            inputs[name] = from_json(name, datatype, shape, tensor.get("data"))
        missing = [n for n in self.specs if n not in inputs]
        if missing:
            raise BadRequest(f"V2 request lacks input '{missing[0]}'")
        if not self.batched:
            return inputs, 1
        rows = {a.shape[0] if a.ndim else 0 for a in inputs.values()}
        if len(rows) != 1 or 0 in rows:
            raise BadRequest("V2 request inputs must share a non-zero first (batch) dimension")
        return inputs, rows.pop()


def best_effort_id(event: Event, id_field: str) -> str | None:
    """The event's id for a dead-letter record, when the payload is JSON enough to hold one."""
    try:
        doc = orjson.loads(event.payload)
    except orjson.JSONDecodeError:
        return None
    value = doc.get(id_field) if isinstance(doc, dict) else None
    return None if value is None else str(value)


def _flat_len(value: list[Any]) -> int:
    total = 0
    for v in value:
        total += _flat_len(v) if isinstance(v, list) else 1
    return total


def _json_value(array: np.ndarray) -> Any:
    if array.dtype.kind in "OSU":
        flat = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.flat
        ]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    if array.dtype.kind == "f" and array.dtype.itemsize == 2:
        array = array.astype(np.float32)
    if array.ndim == 0:
        return array.item()
    return np.ascontiguousarray(array)


def _key_text(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "replace")


def output_record(
    decoded: Decoded,
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    route: str,
    scored_at_ms: int,
) -> Record:
    """The output event for one input event; `outputs` are its own rows of the batch's results."""
    event = decoded.event
    # One-row field events answer per event (probabilities [p0, p1], label 1); V2 requests keep
    # the shapes they asked with.
    single = not decoded.v2 and decoded.rows == 1
    values = {n: _json_value(a[0, ...] if single and a.ndim else a) for n, a in outputs.items()}
    traceparent = (
        child_traceparent(event.headers.get(TRACEPARENT))
        if decoded.span is None
        else traceparent_of(decoded.span)  # the consumer span: downstream continues the trace
    )
    doc = {
        "id": decoded.event_id,
        "key": _key_text(event.key),
        "output_id": event.output_id,
        "outputs": values,
        "model_name": model_name,
        "model_version": model_version,
        "route": route,
        "event_time": decoded.event_time_ms,
        "scored_at": scored_at_ms,
        "traceparent": traceparent,
    }
    headers = {**event.headers, TRACEPARENT: traceparent, "output_id": event.output_id}
    return Record(orjson.dumps(doc, option=_DUMPS_OPTIONS), event.key, headers)


def dead_letter_record(
    event: Event,
    *,
    source: str,
    reason: str,
    error: str,
    attempts: int,
    event_id: str | None = None,
) -> Record:
    """What the dead-letter queue keeps: why, the original bytes, and where they came from."""
    try:
        payload, encoding = event.payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(event.payload).decode(), "base64"
    doc = {
        "id": event_id,
        "key": _key_text(event.key),
        "output_id": event.output_id,
        "reason": reason,
        "error": error,
        "attempts": attempts,
        "source": source,
        "position": event.position,
        "headers": event.headers,
        "payload": payload,
        "payload_encoding": encoding,
        "failed_at": int(time.time() * 1000),
    }
    headers = {**event.headers, "output_id": event.output_id}
    return Record(orjson.dumps(doc), event.key, headers)
