"""V2 datatypes <-> numpy, and the tensor encodings shared by the protocols.

JSON tensors (REST), the binary tensor extension (REST) and raw contents (gRPC) all end up here, so
that every protocol decodes and validates data in exactly one way.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from inferplane.errors import BadRequest

BYTES = "BYTES"

# V2 datatype -> numpy dtype. BYTES is held as an object array of `bytes`.
DATATYPE_TO_DTYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    BYTES: np.dtype(object),
}
DTYPE_TO_DATATYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPE_TO_DTYPE.items()}
# Fixed little-endian views for the wire: the protocols are little-endian whatever the host.
_WIRE_DTYPE: dict[str, np.dtype[Any]] = {
    k: (v.newbyteorder("<") if v.kind in "iuf" else v)
    for k, v in DATATYPE_TO_DTYPE.items()
    if k != BYTES
}
# Types that have no JSON form in the spec; we still accept numbers for FP16 (harmless), not BF16.
_NO_JSON = {"BF16"}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a numpy array (str/bytes/object arrays are BYTES)."""
    known = DTYPE_TO_DATATYPE.get(array.dtype)  # native byte order, the usual case
    if known is not None:
        return known
    kind = array.dtype.kind
    if kind in "OSU":
        return BYTES
    try:
        return DTYPE_TO_DATATYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise BadRequest(f"unsupported numpy dtype {array.dtype}") from None


def dtype_of(datatype: str) -> np.dtype[Any]:
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except KeyError:
        raise BadRequest(
            f"unknown datatype '{datatype}'; expected one of {', '.join(DATATYPE_TO_DTYPE)}"
        ) from None


def element_size(datatype: str) -> int:
    """Bytes per element on the wire (0 for BYTES, which is variable)."""
    return 0 if datatype == BYTES else DATATYPE_TO_DTYPE[datatype].itemsize


# numpy sizes every dimension of an array, even one with no elements: (0, 2**61) FP64 raises
# ValueError ("array is too big"). Beyond this many elements on the other dimensions, an empty
# tensor is refused as a bad request (8-byte items stay under numpy's 2**63 bytes).
_MAX_EMPTY_SPAN = 1 << 59


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if isinstance(shape, list | tuple):
        for d in shape:  # a loop, not all(): this runs for every tensor of every request
            if type(d) is not int or d < 0:  # bool is a subclass of int, not int itself
                break
        else:
            # A tensor with elements is bounded by its data, which every decoder compares with
            # the shape; an empty one is not.
            if 0 in shape and math.prod(d for d in shape if d) > _MAX_EMPTY_SPAN:
                raise BadRequest(
                    f"input '{name}': shape {list(shape)} is too large, even with no elements"
                )
            return tuple(shape)
    raise BadRequest(f"input '{name}': shape must be a list of non-negative integers")


def _flatten_strings(name: str, data: Any) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    # Iterative walk so that deep nesting cannot hit the recursion limit.
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item.encode("utf-8"))
        elif isinstance(item, bytes):
            out.append(item)
        else:
            raise BadRequest(
                f"input '{name}': BYTES data must be strings, got {type(item).__name__}"
            )
    return out


def from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """Decode a JSON tensor (`data` flat or nested, row-major) into an array of `shape`."""
    dtype = dtype_of(datatype)
    count = math.prod(shape)
    if datatype in _NO_JSON:
        raise BadRequest(f"input '{name}': {datatype} has no JSON form; send it as binary data")
    if not isinstance(data, list):
        data = [data]
    if datatype == BYTES:
        flat = _flatten_strings(name, data)
        if len(flat) != count:
            raise BadRequest(
                f"input '{name}': shape {list(shape)} needs {count} elements, data has {len(flat)}"
            )
        arr = np.empty(count, dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    try:
        raw = np.asarray(data)
    except ValueError:
        raise BadRequest(f"input '{name}': data is a ragged nested list") from None
    kind = raw.dtype.kind
    if kind == "O" and dtype.kind in "iu":  # Python ints beyond 64 bits
        raw = _exact_integers(name, datatype, dtype, data)
        kind = raw.dtype.kind
    if kind not in "biuf":
        raise BadRequest(f"input '{name}': {datatype} data must be numbers, got {raw.dtype.name}")
    if dtype.kind == "b" and kind != "b" and raw.size:  # `[]` reads as float64: still empty
        raise BadRequest(f"input '{name}': BOOL data must be true/false")
    if dtype.kind in "iu" and kind == "f":
        raw = _exact_integers(name, datatype, dtype, data)
    elif dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise BadRequest(f"input '{name}': a value is out of range for {datatype}")
    if raw.size != count:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} needs {count} elements, data has {raw.size}"
        )
    return raw.astype(dtype, copy=False).reshape(shape)


def _exact_integers(name: str, datatype: str, dtype: np.dtype[Any], data: Any) -> np.ndarray:
    """numpy turns integers beyond int64 (UINT64's upper half) into float64; read them exactly."""
    obj = np.asarray(data, dtype=object)
    if not all(type(v) is int for v in obj.reshape(-1)):
        raise BadRequest(f"input '{name}': {datatype} data must be integers, got floating point")
    try:
        return obj.astype(dtype)
    except OverflowError:
        raise BadRequest(f"input '{name}': a value is out of range for {datatype}") from None


def to_json_data(array: np.ndarray) -> Any:
    """A flat JSON-ready form of an array (orjson serialises numeric numpy arrays natively)."""
    if array.dtype.kind in "OSU":
        return [
            v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in array.reshape(-1)
        ]
    if array.dtype == DATATYPE_TO_DTYPE["BF16"] or array.dtype == np.float16:
        return array.astype(np.float32).reshape(-1)
    return np.ascontiguousarray(array).reshape(-1)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """Decode raw little-endian bytes (binary extension / gRPC raw contents) without copying."""
    dtype_of(datatype)
    count = math.prod(shape)
    if datatype == BYTES:
        return _bytes_from_raw(name, shape, count, memoryview(raw))
    size = element_size(datatype)
    if len(raw) != count * size:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} of {datatype} needs {count * size} bytes, "
            f"got {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=_WIRE_DTYPE[datatype], count=count)
    if arr.dtype != DATATYPE_TO_DTYPE[datatype]:
        arr = arr.astype(DATATYPE_TO_DTYPE[datatype])
    return arr.reshape(shape)


def _bytes_from_raw(name: str, shape: Sequence[int], count: int, view: memoryview) -> np.ndarray:
    pos, end = 0, len(view)
    # Checked before allocating: a 4-byte body claiming shape [10**10] would otherwise have the
    # server fill an 80 GB object array before finding that element 1 is missing.
    if count * 4 > end:
        raise BadRequest(
            f"input '{name}': {count} BYTES elements need at least {count * 4} bytes "
            f"(a 4-byte length each), got {end}"
        )
    out = np.empty(count, dtype=object)
    for i in range(count):
        if pos + 4 > end:
            raise BadRequest(f"input '{name}': BYTES data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > end:
            raise BadRequest(f"input '{name}': BYTES element {i} runs past the end of the data")
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != end:
        raise BadRequest(
            f"input '{name}': {end - pos} bytes left over after {count} BYTES elements"
        )
    return out.reshape(shape)


def bytes_as_str(array: np.ndarray) -> np.ndarray:
    """BYTES (object array of bytes) as an object array of str, for frameworks that want text."""
    flat = [
        v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        for v in array.reshape(-1)
    ]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def to_raw(array: np.ndarray) -> bytes:
    """Serialise an array to the wire form (BYTES: 4-byte LE length + bytes per element)."""
    if array.dtype.kind in "OSU":
        parts: list[bytes] = []
        for v in array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    wire = array.dtype.newbyteorder("<") if array.dtype.kind in "iuf" else array.dtype
    return np.ascontiguousarray(array, dtype=wire).tobytes()


@dataclass(slots=True)
class TensorSpec:
    """One input or output of a model signature; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request-level default
    parameters: dict[str, Any] = field(default_factory=dict)
