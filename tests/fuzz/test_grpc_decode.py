"""Properties of the gRPC front end's tensor decoding (`v2_grpc.decode_inputs`): raw and typed
contents of every datatype round-trip, and any message, or any bytes that parse as one, decodes
or is refused with BadRequest."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from inferplane.errors import BadRequest
from inferplane.protocols.grpc_gen import grpc_predict_v2_pb2 as pb
from inferplane.protocols.v2_grpc import _CONTENTS, decode_inputs
from inferplane.tensors import dtype_of, to_raw
from tests.fuzz.strategies import infer_requests, tensor_names, tensors
from tests.fuzz.test_codec import same

TYPED = [d for d in _CONTENTS]


@given(st.dictionaries(tensor_names(), tensors(), min_size=1, max_size=4))
def test_raw_contents_round_trip(named: dict[str, tuple[str, np.ndarray]]) -> None:
    request = pb.ModelInferRequest(model_name="m")
    for name, (datatype, arr) in named.items():
        request.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        request.raw_input_contents.append(to_raw(arr))
    decoded = decode_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))
    assert list(decoded) == list(named)
    for name, (_, arr) in named.items():
        same(decoded[name], arr)


@given(st.dictionaries(tensor_names(), tensors(TYPED), min_size=1, max_size=4))
def test_typed_contents_round_trip(named: dict[str, tuple[str, np.ndarray]]) -> None:
    request = pb.ModelInferRequest(model_name="m")
    for name, (datatype, arr) in named.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        member, _ = _CONTENTS[datatype]
        getattr(tensor.contents, member).extend(arr.reshape(-1).tolist())
    decoded = decode_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))
    for name, (_, arr) in named.items():
        same(decoded[name], arr)


def decodes_or_bad_request(request: pb.ModelInferRequest) -> None:
    try:
        inputs = decode_inputs(request)
    except BadRequest as exc:
        assert exc.message
        return
    assert list(inputs) == [t.name for t in request.inputs]
    for tensor in request.inputs:
        arr = inputs[tensor.name]
        assert arr.shape == tuple(tensor.shape) and arr.dtype == dtype_of(tensor.datatype)


@given(infer_requests())
@example(
    pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(name="s", datatype="BYTES", shape=[10**10])],
        raw_input_contents=[b"\0\0\0\0"],
    )
)
@example(
    pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[0, 2**62])]
    )
)
def test_any_message_decodes_or_bad_request(request: pb.ModelInferRequest) -> None:
    decodes_or_bad_request(request)


@given(st.binary(max_size=512))
def test_any_bytes_that_parse_decode_or_bad_request(data: bytes) -> None:
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return  # the transport answers INVALID_ARGUMENT for those (tests/fuzz/test_grpc_front.py)
    decodes_or_bad_request(request)
