"""Hypothesis strategies shared by the fuzz tests: tensors of every V2 datatype, V2 JSON bodies
(well formed, nearly well formed, and not at all), and gRPC ModelInferRequest messages."""

from __future__ import annotations

import string
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inferplane.protocols.grpc_gen import grpc_predict_v2_pb2 as pb
from inferplane.tensors import DATATYPE_TO_DTYPE

DATATYPES = list(DATATYPE_TO_DTYPE)
NUMERIC = [d for d in DATATYPES if d not in ("BYTES", "BF16")]
# Datatypes whose values JSON carries exactly (FP16 and BF16 come back as float32 numbers).
JSON_EXACT = [d for d in DATATYPES if d not in ("BF16",)]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)

# Anything JSON can hold, nested a little.
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _elements(datatype: str, finite: bool) -> st.SearchStrategy[Any]:
    if datatype == "BOOL":
        return st.booleans()
    dtype = DATATYPE_TO_DTYPE[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    if datatype == "BF16" and finite:  # bfloat16 tops out below float32's largest values
        return st.floats(-(2.0**127), 2.0**127, width=32)
    width = {"FP16": 16, "FP32": 32, "FP64": 64, "BF16": 32}[datatype]
    return st.floats(width=width, allow_nan=not finite, allow_infinity=not finite)


@st.composite
def tensors(
    draw: st.DrawFn, datatypes: list[str] = DATATYPES, finite: bool = False, text: bool = False
) -> tuple[str, np.ndarray]:
    """(datatype, array): BYTES arrays hold `bytes` (UTF-8 text with `text=True`)."""
    datatype = draw(st.sampled_from(datatypes))
    shape = draw(SHAPES)
    if datatype == "BYTES":
        values = st.text(max_size=6).map(str.encode) if text else st.binary(max_size=6)
        flat = draw(st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return datatype, arr.reshape(shape)
    if datatype == "BF16":
        floats = draw(hnp.arrays(np.float32, shape, elements=_elements(datatype, finite)))
        return datatype, floats.astype(ml_dtypes.bfloat16)
    dtype = DATATYPE_TO_DTYPE[datatype]
    return datatype, draw(hnp.arrays(dtype, shape, elements=_elements(datatype, finite)))


def tensor_names() -> st.SearchStrategy[str]:
    return st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=8)


# --- V2 REST bodies ---------------------------------------------------------------------------

DIMS = st.integers(min_value=-2, max_value=6) | st.integers(min_value=-(2**64), max_value=2**64)
NEAR_SHAPES = st.lists(DIMS, max_size=4) | JSON_VALUES


@st.composite
def near_v2_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """V2 infer bodies that are right in most places and wrong in a few: the decoder's edges."""
    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        item: dict[str, Any] = {}
        if draw(st.booleans()):
            item["name"] = draw(tensor_names() | JSON_VALUES)
        if draw(st.booleans()):
            item["datatype"] = draw(st.sampled_from(DATATYPES) | JSON_VALUES)
        if draw(st.booleans()):
            item["shape"] = draw(NEAR_SHAPES)
        if draw(st.booleans()):
            item["data"] = draw(JSON_VALUES)
        if draw(st.booleans()):
            size = draw(st.integers(-1, 64) | JSON_VALUES)
            item["parameters"] = draw(
                st.sampled_from([{"binary_data_size": size}, size, {"other": size}])
            )
        inputs.append(item)
    doc: dict[str, Any] = {"inputs": inputs if draw(st.booleans()) else draw(JSON_VALUES)}
    if draw(st.booleans()):
        doc["id"] = draw(JSON_VALUES)
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": tensor_names() | JSON_VALUES},
                    optional={"parameters": st.just({"binary_data": True}) | JSON_VALUES},
                )
                | JSON_VALUES,
                max_size=3,
            )
            | JSON_VALUES
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "timeout": st.integers(-5, 10**7) | JSON_VALUES,
                    "priority": st.integers(-2, 5) | JSON_VALUES,
                    "binary_data_output": JSON_VALUES,
                },
            )
            | JSON_VALUES
        )
    return doc


# --- gRPC messages ----------------------------------------------------------------------------

_CONTENT_MEMBERS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}
PROTO_DIMS = st.integers(-3, 6) | st.integers(-(2**63), 2**63 - 1)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Arbitrary ModelInferRequest messages: any names, datatypes, shapes and contents."""
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["sum", "echo", "nope", ""]) | st.text(max_size=6)),
        model_version=draw(st.sampled_from(["", "1", "2", "0", "x"]) | st.text(max_size=4)),
        id=draw(st.text(max_size=6)),
    )
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["input", "s", "f32", ""]) | st.text(max_size=5)),
            datatype=draw(st.sampled_from(DATATYPES) | st.text(max_size=5)),
            shape=draw(st.lists(PROTO_DIMS, max_size=4)),
        )
        for member in draw(st.lists(st.sampled_from(sorted(_CONTENT_MEMBERS)), max_size=2)):
            values = draw(st.lists(_CONTENT_MEMBERS[member], max_size=8))
            getattr(tensor.contents, member).extend(values)
    for _ in range(draw(st.integers(0, 4))):
        request.raw_input_contents.append(draw(st.binary(max_size=48)))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(st.sampled_from(["output", "s_out"]) | st.text(max_size=5)))
    if draw(st.booleans()):
        param = request.parameters[draw(st.sampled_from(["timeout", "priority", "x"]))]
        kind = draw(st.sampled_from(["int64_param", "bool_param", "string_param"]))
        if kind == "int64_param":
            param.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "bool_param":
            param.bool_param = draw(st.booleans())
        else:
            param.string_param = draw(st.text(max_size=6))
    return request
