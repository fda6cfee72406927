"""Properties of the V2 codec (REST JSON and binary bodies) and the tensor helpers under it:
every datatype round-trips, and any input at all is either decoded or refused with BadRequest,
never another exception."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from inferplane.errors import BadRequest
from inferplane.protocols.v2_codec import (
    DecodedRequest,
    decode_request,
    encode_response,
    request_deadline,
    request_priority,
)
from inferplane.tensors import (
    DATATYPE_TO_DTYPE,
    RequestedOutput,
    check_shape,
    datatype_of,
    dtype_of,
    from_json,
    from_raw,
    to_json_data,
    to_raw,
)
from tests.fuzz.strategies import (
    DATATYPES,
    JSON_EXACT,
    JSON_VALUES,
    NEAR_SHAPES,
    near_v2_bodies,
    tensor_names,
    tensors,
)


def same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal in dtype, shape and bits (NaN payloads included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == object:
        assert a.tolist() == b.tolist()
    else:
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """A flat row-major list as nested lists of `shape` (in Python: numpy would turn a mix of
    int64 and uint64 values into floats)."""
    if len(shape) <= 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


# --- round trips -------------------------------------------------------------------------------


@given(tensors())
def test_raw_round_trip_every_datatype(tensor: tuple[str, np.ndarray]) -> None:
    datatype, arr = tensor
    assert datatype_of(arr) == datatype
    same(from_raw("x", datatype, arr.shape, to_raw(arr)), arr)


@given(tensors(JSON_EXACT, finite=True, text=True), st.booleans())
def test_json_round_trip(tensor: tuple[str, np.ndarray], nested: bool) -> None:
    datatype, arr = tensor
    data = to_json_data(arr)
    data = orjson.loads(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY))  # as on the wire
    if nested and arr.ndim > 1:
        data = nest(data, arr.shape)
    # FP16 travels as float32 numbers, which hold every FP16 value exactly
    same(from_json("x", datatype, arr.shape, data), arr)


@given(st.lists(st.tuples(tensor_names(), tensors(finite=True, text=True)), max_size=4), st.data())
def test_request_round_trip_json_and_binary(
    items: list[tuple[str, tuple[str, np.ndarray]]], data: st.DataObject
) -> None:
    named = {name: tensor for name, tensor in items}  # unique names
    entries, tail = [], b""
    for name, (datatype, arr) in named.items():
        binary = datatype == "BF16" or data.draw(st.booleans())
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = to_raw(arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            tail += blob
        else:
            entry["data"] = to_json_data(arr)
        entries.append(entry)
    header = orjson.dumps({"id": "r1", "inputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not named:
        try:
            decode_request(header, None)
        except BadRequest as exc:
            assert "non-empty 'inputs'" in exc.message
        return
    length = str(len(header)) if tail or data.draw(st.booleans()) else None
    request = decode_request(header + tail, length)
    assert request.id == "r1" and list(request.inputs) == list(named)
    for name, (_, arr) in named.items():
        same(request.inputs[name], arr)


@given(
    st.dictionaries(tensor_names(), tensors(finite=True, text=True), min_size=1, max_size=4),
    st.booleans(),
    st.data(),
)
def test_response_encodes_what_a_client_decodes(
    results: dict[str, tuple[str, np.ndarray]], binary_default: bool, data: st.DataObject
) -> None:
    arrays = {name: arr for name, (_, arr) in results.items()}
    wanted = [RequestedOutput(name, data.draw(st.none() | st.booleans())) for name in arrays]
    request = DecodedRequest("id-7", {}, wanted, {}, binary_default)
    body, header_length = encode_response("m", "3", request, arrays, {"k": "v"})
    header = body if header_length is None else body[:header_length]
    doc = orjson.loads(header)
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("m", "3", "id-7")
    offset = 0 if header_length is None else header_length
    for out in doc["outputs"]:
        datatype, arr = results[out["name"]]
        assert out["datatype"] == datatype and out["shape"] == list(arr.shape)
        if "parameters" in out:
            size = out["parameters"]["binary_data_size"]
            same(from_raw("o", datatype, arr.shape, body[offset : offset + size]), arr)
            offset += size
        elif datatype in ("FP16", "BF16"):
            assert (
                np.asarray(out["data"], np.float32).tolist()
                == arr.astype(np.float32).reshape(-1).tolist()
            )
        elif datatype == "BYTES":
            assert out["data"] == [v.decode() for v in arr.reshape(-1)]
        else:
            same(from_json("o", datatype, arr.shape, out["data"]), arr)
    assert offset == (len(body) if header_length is not None else 0)


# --- anything else is a BadRequest -------------------------------------------------------------


def only_bad_request(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except BadRequest as exc:
        assert exc.message  # says what is wrong
        return None


@given(st.binary(max_size=256), st.none() | st.text(max_size=6) | st.integers(-3, 300).map(str))
@example(b"[]", None)
@example(b'{"inputs": []}', "0")
def test_any_bytes_decode_or_bad_request(body: bytes, header_length: str | None) -> None:
    only_bad_request(decode_request, body, header_length)


@given(JSON_VALUES | near_v2_bodies(), st.binary(max_size=64), st.booleans())
def test_any_json_decodes_or_bad_request(doc: Any, tail: bytes, binary: bool) -> None:
    header = json.dumps(doc).encode()  # orjson refuses integers beyond 64 bits; clients do not
    if binary:
        only_bad_request(decode_request, header + tail, str(len(header)))
    else:
        request = only_bad_request(decode_request, header, None)
        if request is not None:
            for name, arr in request.inputs.items():
                assert isinstance(name, str) and isinstance(arr, np.ndarray)
                assert arr.dtype in DATATYPE_TO_DTYPE.values()


@given(
    st.sampled_from(DATATYPES) | st.text(max_size=5),
    st.lists(st.integers(0, 2**63), max_size=4),
    st.binary(max_size=64),
)
@example("BYTES", [10**10], b"\x00\x00\x00\x00")  # once made the server allocate 80 GB
@example("FP64", [0, 2**61], b"")  # numpy cannot size an empty (0, 2**61) array
@example("BYTES", [0, 2**62, 2**62], b"")
def test_raw_tensor_decodes_or_bad_request(datatype: str, shape: list[int], raw: bytes) -> None:
    checked = only_bad_request(check_shape, "x", shape)
    if checked is not None:
        arr = only_bad_request(from_raw, "x", datatype, checked, raw)
        if arr is not None:
            assert arr.shape == tuple(shape) and arr.dtype == dtype_of(datatype)


@given(st.sampled_from(DATATYPES) | st.text(max_size=5), NEAR_SHAPES, JSON_VALUES)
@example("FP32", [0, 2**62], [])
@example("INT32", [1], [[[[[[[[[[1]]]]]]]]]])
def test_json_tensor_decodes_or_bad_request(datatype: str, shape: Any, data: Any) -> None:
    checked = only_bad_request(check_shape, "x", shape)
    if checked is not None:
        arr = only_bad_request(from_json, "x", datatype, checked, data)
        if arr is not None:
            assert arr.shape == checked and arr.dtype == dtype_of(datatype)
            assert arr.size == math.prod(checked)


@given(JSON_VALUES)
def test_check_shape_accepts_only_non_negative_integer_lists(shape: Any) -> None:
    checked = only_bad_request(check_shape, "x", shape)
    if checked is not None:
        assert all(type(d) is int and d >= 0 for d in checked)


@given(
    st.dictionaries(st.sampled_from(["timeout", "priority", "x"]), JSON_VALUES, max_size=2),
    st.none() | st.binary(max_size=8) | st.sampled_from([b"nan", b"inf", b"-inf", b"1e400"]),
)
@example({}, b"nan")  # a NaN deadline once reached the scheduler's timer (500)
def test_deadline_and_priority_or_bad_request(params: dict[str, Any], header: bytes | None) -> None:
    deadline = only_bad_request(request_deadline, params, header)
    if deadline is not None:
        assert math.isfinite(deadline)
    priority = only_bad_request(request_priority, params)
    if priority is not None:
        assert isinstance(priority, int) and priority >= 0
