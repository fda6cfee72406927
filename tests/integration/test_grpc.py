"""The V2 gRPC front end against unmodified tritonclient, grpcio and the standard health service.

One `inferplane serve` subprocess (module scope) serves a tiny repository:
- `double`: ONNX, `input` FP32 [-1, 4] -> `output` = input * 2 + 1 (FP32), `argmax` (INT64 [-1]);
  registered with a batch dimension (max_batch_size 8) so that the config drops it from dims;
- `echo`: a python model that returns every input unchanged as `<input>_out`, one input per V2
  datatype except BF16; `echo_typed` is the same without FP16, which typed contents cannot carry;
- `slow`: a python model that sleeps `x[0]` seconds, then returns `y` = x.
The server runs in its own process, as it would in production; this process imports tritonclient
and, for the direct decoding tests, our own stubs too (they live in a private descriptor pool).
"""

from __future__ import annotations

import contextlib
import queue
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from inferplane.repository.register import register
from inferplane.repository.schema import Batching
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec
from tests.integration.servers import ServerProcess, start_server

MAX_PAYLOAD_MB = 40  # past the transport's 16 MiB receive window, so that flow control is tested

# Every datatype the echo model takes (BF16 has no numpy dtype tritonclient knows).
ECHO_TYPES = {
    "b": "BOOL",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
    "s": "BYTES",
}
TYPED_TYPES = {n: dt for n, dt in ECHO_TYPES.items() if dt != "FP16"}

ECHO_MODEL_PY = textwrap.dedent(
    """
    class Model:
        def load(self, path):
            self.path = path

        def predict(self, inputs):
            return {f"{name}_out": value for name, value in inputs.items()}
    """
)


SLOW_MODEL_PY = textwrap.dedent(
    """
    import time


    class Model:
        def predict(self, inputs):
            x = inputs["x"]
            time.sleep(float(x[0]) if x.size else 0.0)
            return {"y": x}
    """
)


def _write_double_onnx(path: Path) -> str:
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["input", "two"], ["doubled"]),
        helper.make_node("Add", ["doubled", "one"], ["output"]),
        helper.make_node("ArgMax", ["input"], ["argmax"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "double",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("argmax", TensorProto.INT64, ["N"]),
        ],
        initializer=[
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _build_repository(root: Path) -> str:
    repo_dir = root / "models"
    repo_dir.mkdir()
    repo = Repository(str(repo_dir))
    onnx_path = _write_double_onnx(root / "double.onnx")
    register(repo, "double", onnx_path, batching=Batching(enabled=False, max_batch_size=8))
    echo_dir = root / "echo"
    echo_dir.mkdir()
    (echo_dir / "model.py").write_text(ECHO_MODEL_PY)
    for name, types in (("echo", ECHO_TYPES), ("echo_typed", TYPED_TYPES)):
        register(
            repo,
            name,
            str(echo_dir),
            runtime="python",
            inputs=[TensorSpec(n, dt, [-1]) for n, dt in types.items()],
            outputs=[TensorSpec(f"{n}_out", dt, [-1]) for n, dt in types.items()],
        )
    slow_dir = root / "slow"
    slow_dir.mkdir()
    (slow_dir / "model.py").write_text(SLOW_MODEL_PY)
    register(
        repo,
        "slow",
        str(slow_dir),
        runtime="python",
        inputs=[TensorSpec("x", "FP32", [-1])],
        outputs=[TensorSpec("y", "FP32", [-1])],
    )
    return str(repo_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("grpc")
    srv = start_server(_build_repository(root), root, "--max-payload-mb", str(MAX_PAYLOAD_MB))
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        yield c
    finally:
        c.close()


# --- helpers -------------------------------------------------------------------------------------


def _double_inputs(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _echo_arrays(n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {
        "b": np.array([True, False, True][:n]),
        "s": np.array([b"alpha", b"", "\u00e9t\u00e9".encode()][:n], dtype=object),
    }
    for name, datatype in ECHO_TYPES.items():
        if name in arrays:
            continue
        dtype = np.dtype(datatype.lower().replace("fp", "float"))
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            arrays[name] = np.array([info.min, info.max, 1][:n], dtype=dtype)
        else:
            arrays[name] = rng.standard_normal(n).astype(dtype)
    return arrays


def _echo_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), ECHO_TYPES[name])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def _stub(server: ServerProcess) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.grpc_target)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


# --- health and metadata -------------------------------------------------------------------------


def test_health(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("double")
    assert client.is_model_ready("double", "1")
    assert client.is_model_ready("echo")


def test_standard_health_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            # The health service follows readiness by polling (every 0.2 s): allow it to catch up.
            deadline = time.monotonic() + 5
            while True:
                answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                assert time.monotonic() < deadline, f"{service!r}: {answer.status}"
                time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "inferplane"
    assert meta.version
    for ext in ("binary_tensor_data", "model_repository", "statistics", "model_configuration"):
        assert ext in meta.extensions
    assert client.get_server_metadata(as_json=True)["name"] == "inferplane"


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("double")
    assert meta.name == "double"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 4])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("output", "FP32", [-1, 4]),
        ("argmax", "INT64", [-1]),
    ]
    echo = client.get_model_metadata("echo", "1", as_json=True)
    assert {t["name"]: t["datatype"] for t in echo["inputs"]} == ECHO_TYPES


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("double").config
    assert config.name == "double"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnx"
    assert config.max_batch_size == 8
    # The batch dimension is implied by max_batch_size and left out of dims (perf_analyzer).
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [4])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("output", model_config_pb2.TYPE_FP32, [4]),
        ("argmax", model_config_pb2.TYPE_INT64, []),
    ]
    assert not config.HasField("dynamic_batching")  # batching declared but switched off
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    echo = client.get_model_config("echo", as_json=True)["config"]
    assert echo.get("max_batch_size", 0) == 0  # JSON leaves zero values out
    types = {t["name"]: t["data_type"] for t in echo["input"]}
    assert types["s"] == "TYPE_STRING" and types["f16"] == "TYPE_FP16"


# --- inference -----------------------------------------------------------------------------------


def test_infer_double(client: grpcclient.InferenceServerClient) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    outputs = [grpcclient.InferRequestedOutput("output"), grpcclient.InferRequestedOutput("argmax")]
    result = client.infer("double", _double_inputs(x), outputs=outputs, request_id="req-1")
    np.testing.assert_allclose(result.as_numpy("output"), x * 2 + 1, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("argmax"), np.argmax(x, axis=1))
    response = result.get_response()
    assert response.id == "req-1"
    assert response.model_name == "double"
    assert response.model_version == "1"
    assert [o.name for o in response.outputs] == ["output", "argmax"]


def test_infer_all_outputs_by_default_and_one_on_request(
    client: grpcclient.InferenceServerClient,
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    everything = client.infer("double", _double_inputs(x))
    assert {o.name for o in everything.get_response().outputs} == {"output", "argmax"}
    assert everything.get_response().id == ""  # echoed as sent, even empty
    only = client.infer(
        "double", _double_inputs(x), outputs=[grpcclient.InferRequestedOutput("argmax")]
    )
    assert [o.name for o in only.get_response().outputs] == ["argmax"]
    np.testing.assert_array_equal(only.as_numpy("argmax"), [3, 3])


def test_infer_every_datatype(client: grpcclient.InferenceServerClient) -> None:
    arrays = _echo_arrays()
    result = client.infer("echo", _echo_inputs(arrays), request_id="types")
    assert result.get_response().id == "types"
    for name, arr in arrays.items():
        got = result.as_numpy(f"{name}_out")
        assert got is not None, name
        assert got.shape == arr.shape, name
        if ECHO_TYPES[name] == "BYTES":
            assert list(got) == list(arr)
        else:
            assert got.dtype == arr.dtype, name
            np.testing.assert_array_equal(got, arr, err_msg=name)


def test_typed_contents(server: ServerProcess) -> None:
    """Clients other than tritonclient send typed `contents` instead of raw bytes."""
    request = service_pb2.ModelInferRequest(model_name="echo_typed", id="typed")
    values: dict[str, tuple[str, list[Any]]] = {
        "b": ("bool_contents", [True, False]),
        "i8": ("int_contents", [-128, 127]),
        "i16": ("int_contents", [-3, 4]),
        "i32": ("int_contents", [-(2**31), 2**31 - 1]),
        "i64": ("int64_contents", [-(2**63), 2**63 - 1]),
        "u8": ("uint_contents", [0, 255]),
        "u16": ("uint_contents", [1, 65535]),
        "u32": ("uint_contents", [0, 2**32 - 1]),
        "u64": ("uint64_contents", [0, 2**64 - 1]),
        "f32": ("fp32_contents", [1.5, -2.25]),
        "f64": ("fp64_contents", [1e300, -0.5]),
        "s": ("bytes_contents", [b"x", b"yz"]),
    }
    for name, (member, data) in values.items():
        tensor = request.inputs.add(name=name, datatype=TYPED_TYPES[name], shape=[2])
        getattr(tensor.contents, member).extend(data)
    channel, stub = _stub(server)
    with channel:
        response = stub.ModelInfer(request, timeout=10)

        # FP16 has no typed member: the protocol carries it only as raw contents.
        fp16 = service_pb2.ModelInferRequest(model_name="echo", id="fp16")
        fp16.inputs.add(name="f16", datatype="FP16", shape=[1])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(fp16, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents" in (info.value.details() or "")

        # INT8 values travel as int32: one out of range is refused, not wrapped around.
        wrapped = service_pb2.ModelInferRequest()
        wrapped.CopyFrom(request)
        wrapped.inputs[1].contents.int_contents[0] = 128
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(wrapped, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "out of range for INT8" in (info.value.details() or "")

    assert response.id == "typed"
    names = [o.name for o in response.outputs]
    by_name = dict(zip(names, response.raw_output_contents, strict=True))
    assert np.frombuffer(by_name["i8_out"], np.int8).tolist() == [-128, 127]
    assert np.frombuffer(by_name["i64_out"], "<i8").tolist() == [-(2**63), 2**63 - 1]
    assert np.frombuffer(by_name["u64_out"], "<u8").tolist() == [0, 2**64 - 1]
    assert np.frombuffer(by_name["f32_out"], "<f4").tolist() == [1.5, -2.25]
    assert np.frombuffer(by_name["f64_out"], "<f8").tolist() == [1e300, -0.5]
    assert np.frombuffer(by_name["b_out"], np.bool_).tolist() == [True, False]
    assert by_name["s_out"] == b"\x01\x00\x00\x00x\x02\x00\x00\x00yz"


def test_decode_inputs_in_process() -> None:
    """Our stubs and tritonclient's share this process (private descriptor pool)."""
    from inferplane.errors import BadRequest
    from inferplane.protocols.grpc_gen import grpc_predict_v2_pb2 as pb
    from inferplane.protocols.v2_grpc import decode_inputs

    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="a", datatype="INT16", shape=[2, 1]).contents.int_contents.extend(
        [-5, 7]
    )
    decoded = decode_inputs(request)
    assert decoded["a"].dtype == np.int16 and decoded["a"].tolist() == [[-5], [7]]

    request.inputs[0].contents.int_contents[0] = 40000  # out of range for INT16
    with pytest.raises(BadRequest, match="out of range"):
        decode_inputs(request)

    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01\x00"])
    raw.inputs.add(name="a", datatype="INT16", shape=[1])
    raw.inputs.add(name="b", datatype="INT16", shape=[1])
    with pytest.raises(BadRequest, match="one per input"):
        decode_inputs(raw)


async def test_aio_client(server: ServerProcess) -> None:
    client = aio_grpcclient.InferenceServerClient(server.grpc_target)
    try:
        assert await client.is_server_live()
        assert await client.is_model_ready("double")
        x = np.full((2, 4), 0.5, dtype=np.float32)
        inp = aio_grpcclient.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        result = await client.infer("double", [inp], request_id="aio")
        np.testing.assert_allclose(result.as_numpy("output"), x * 2 + 1)
        assert result.get_response().id == "aio"
        meta = await client.get_model_metadata("echo", as_json=True)
        assert meta["name"] == "echo"
    finally:
        await client.close()


def test_stream(client: grpcclient.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        xs = {f"s{i}": np.full((i + 1, 4), float(i), dtype=np.float32) for i in range(6)}
        for request_id, x in xs.items():
            client.async_stream_infer("double", _double_inputs(x), request_id=request_id)
        # A failing request answers with an error and leaves the stream open.
        client.async_stream_infer("no_such_model", _double_inputs(xs["s0"]), request_id="bad")
        arrays = _echo_arrays()
        client.async_stream_infer("echo", _echo_inputs(arrays), request_id="echo")
        got: dict[str, Any] = {}
        errors = []
        for _ in range(len(xs) + 2):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result
    finally:
        client.stop_stream()
    assert set(got) == {*xs, "echo"}
    for request_id, x in xs.items():
        np.testing.assert_allclose(got[request_id].as_numpy("output"), x * 2 + 1)
    np.testing.assert_array_equal(got["echo"].as_numpy("f16_out"), arrays["f16"])
    assert len(errors) == 1 and "no_such_model" in str(errors[0])


# --- statistics and repository -------------------------------------------------------------------


def test_statistics(client: grpcclient.InferenceServerClient) -> None:
    x = np.ones((5, 4), dtype=np.float32)
    before = client.get_inference_statistics("double").model_stats[0]
    client.infer("double", _double_inputs(x))
    stats = client.get_inference_statistics("double", "1").model_stats
    assert [(s.name, s.version) for s in stats] == [("double", "1")]
    after = stats[0]
    assert after.inference_count == before.inference_count + 5
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.last_inference > 0
    assert any(b.batch_size == 5 for b in after.batch_stats)
    everything = client.get_inference_statistics(as_json=True)
    assert {"double", "echo"} <= {s["name"] for s in everything["model_stats"]}
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("double", "9")
    assert _status(info.value) == "StatusCode.NOT_FOUND"


def test_repository_index(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    rows = {(m.name, m.version): m.state for m in index.models}
    assert rows[("double", "1")] == "READY"
    assert rows[("echo", "1")] == "READY"


def test_unload_load_round_trip(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    client.unload_model("double")
    try:
        assert not client.is_model_ready("double")
        rows = {m.name: m.state for m in client.get_model_repository_index().models}
        assert rows["double"] == "UNLOADED"
        channel, stub = _stub(server)
        with channel:
            ready_only = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
        assert "double" not in {m.name for m in ready_only.models}
        assert "echo" in {m.name for m in ready_only.models}
        with pytest.raises(InferenceServerException) as info:
            client.infer("double", _double_inputs(x))
        assert _status(info.value) == "StatusCode.UNAVAILABLE"
        with pytest.raises(InferenceServerException) as info:
            client.unload_model("double")  # already unloaded
        assert _status(info.value) == "StatusCode.NOT_FOUND"
    finally:
        client.load_model("double")
    assert client.is_model_ready("double")
    result = client.infer("double", _double_inputs(x))
    np.testing.assert_allclose(result.as_numpy("output"), x * 2 + 1)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("no_such_model")
    assert _status(info.value) == "StatusCode.INVALID_ARGUMENT"


# --- errors --------------------------------------------------------------------------------------


def _expect(status: str, call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert _status(info.value) == status, info.value.message()
    return info.value


def test_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    err = _expect("StatusCode.NOT_FOUND", client.infer, "no_such_model", _double_inputs(x))
    assert "no_such_model" in err.message()
    _expect("StatusCode.NOT_FOUND", client.get_model_metadata, "no_such_model")
    _expect("StatusCode.NOT_FOUND", client.get_model_config, "no_such_model")
    _expect("StatusCode.NOT_FOUND", client.is_model_ready, "no_such_model")
    _expect("StatusCode.NOT_FOUND", client.infer, "double", _double_inputs(x), model_version="7")


def test_bad_inputs(client: grpcclient.InferenceServerClient) -> None:
    wrong_type = grpcclient.InferInput("input", [1, 4], "INT32")
    wrong_type.set_data_from_numpy(np.ones((1, 4), dtype=np.int32))
    err = _expect("StatusCode.INVALID_ARGUMENT", client.infer, "double", [wrong_type])
    assert "datatype" in err.message()

    wrong_shape = _double_inputs(np.ones((1, 5), dtype=np.float32))
    err = _expect("StatusCode.INVALID_ARGUMENT", client.infer, "double", wrong_shape)
    assert "shape" in err.message()

    arrays = _echo_arrays()
    del arrays["i16"]
    err = _expect("StatusCode.INVALID_ARGUMENT", client.infer, "echo", _echo_inputs(arrays))
    assert "missing input 'i16'" in err.message()

    unknown_output = [grpcclient.InferRequestedOutput("nope")]
    x = _double_inputs(np.ones((1, 4), dtype=np.float32))
    _expect("StatusCode.INVALID_ARGUMENT", client.infer, "double", x, outputs=unknown_output)


def test_bad_raw_contents(server: ServerProcess) -> None:
    channel, stub = _stub(server)
    with channel:
        short = service_pb2.ModelInferRequest(model_name="double", raw_input_contents=[b"\0" * 15])
        short.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        both = service_pb2.ModelInferRequest(model_name="double", raw_input_contents=[b"\0" * 16])
        both.inputs.add(name="input", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
            [1, 2, 3, 4]
        )
        unknown = service_pb2.ModelInferRequest(model_name="double", raw_input_contents=[b""])
        unknown.inputs.add(name="input", datatype="FP128", shape=[0])
        for request, needle in (
            (short, "16 bytes"),
            (both, "raw_input_contents"),
            (unknown, "FP128"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert needle in (info.value.details() or "")


def test_too_large(client: grpcclient.InferenceServerClient) -> None:
    rows = MAX_PAYLOAD_MB * 1024 * 1024 // 16 + 1024  # past the limit by 16 KiB
    x = np.zeros((rows, 4), dtype=np.float32)
    _expect("StatusCode.RESOURCE_EXHAUSTED", client.infer, "double", _double_inputs(x))


def _slow_inputs(seconds: float) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.array([seconds], dtype=np.float32))
    return [inp]


def test_deadline(client: grpcclient.InferenceServerClient) -> None:
    # gRPC rounds deadlines up to the millisecond, so the model must outlast it to be caught.
    for tiny in (1e-6, 0.05):
        _expect(
            "StatusCode.DEADLINE_EXCEEDED",
            client.infer,
            "slow",
            _slow_inputs(0.3),
            client_timeout=tiny,
        )
    # The server is unharmed: the next requests, with sane deadlines, succeed.
    x = np.ones((2, 4), dtype=np.float32)
    result = client.infer("double", _double_inputs(x), client_timeout=10)
    np.testing.assert_allclose(result.as_numpy("output"), x * 2 + 1)
    slow = client.infer("slow", _slow_inputs(0.0), client_timeout=10)
    np.testing.assert_array_equal(slow.as_numpy("y"), [0.0])


def test_metrics_count_grpc(
    server: ServerProcess, client: grpcclient.InferenceServerClient
) -> None:
    client.infer("double", _double_inputs(np.ones((1, 4), dtype=np.float32)))
    with contextlib.suppress(InferenceServerException):
        client.infer("no_such_model", _double_inputs(np.ones((1, 4), dtype=np.float32)))
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("inferplane_requests_total{")]
    assert any(
        'model="double"' in ln and 'protocol="grpc"' in ln and 'status="200"' in ln for ln in lines
    ), lines
    assert any(
        'model="_unknown"' in ln and 'protocol="grpc"' in ln and 'status="404"' in ln
        for ln in lines
    ), lines


# --- the transport (protocols/grpc_h2.py): flow control, compression, cancellation --------------


def test_answers_larger_than_the_clients_window_arrive_whole(server: ServerProcess) -> None:
    # 30 MB each way: past the server's 16 MiB receive window (the client waits for its window
    # updates) and far past a client's initial 64 KiB one (the server waits while sending); two
    # calls at once on one connection share the connection's windows.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    arrays = [rng.random(7_500_000).astype(np.float32) for _ in range(2)]
    for x in arrays:
        x[0] = 0.0  # the slow model sleeps x[0] seconds, then echoes x
    c = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        with ThreadPoolExecutor(2) as pool:
            outputs = list(pool.map(lambda x: c.infer("slow", _echo(x)).as_numpy("y"), arrays))
    finally:
        c.close()
    for x, got in zip(arrays, outputs, strict=True):
        np.testing.assert_array_equal(got, x)


def _echo(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def test_compressed_requests(client: grpcclient.InferenceServerClient) -> None:
    x = np.arange(100_000, dtype=np.float32) % 7  # compresses well; x[0] = 0: no sleep
    for algorithm in ("gzip", "deflate"):
        got = client.infer("slow", _echo(x), compression_algorithm=algorithm)
        np.testing.assert_array_equal(got.as_numpy("y"), x)


@pytest.mark.parametrize(
    ("method", "body", "code", "needle"),
    [
        ("NoSuchMethod", b"", grpc.StatusCode.UNIMPLEMENTED, "NoSuchMethod"),
        ("ModelInfer", b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "malformed request"),
    ],
    ids=["unknown_method", "malformed_message"],
)
def test_calls_the_transport_refuses(
    server: ServerProcess, method: str, body: bytes, code: grpc.StatusCode, needle: str
) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(body, timeout=5)
    assert info.value.code() == code
    assert needle in (info.value.details() or "")


def test_a_cancelled_call_leaves_the_connection_serving(server: ServerProcess) -> None:
    channel, stub = _stub(server)
    with channel:
        request = service_pb2.ModelInferRequest(model_name="slow")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1])
        tensor.contents.fp32_contents.append(0.5)
        future = stub.ModelInfer.future(request, timeout=10)
        time.sleep(0.1)
        assert future.cancel()
        # the same connection goes on: another call is answered while the first is dropped
        ready = stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5)
        assert ready.ready


def test_health_watch_streams_the_status(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        first = next(iter(watch))
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
