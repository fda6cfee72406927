"""The V2 REST protocol against a real server over the example models, called with httpx and with
unmodified tritonclient.http; numbers are checked against each framework called directly."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from tests.integration.servers import ECHO_TYPES, ServerProcess

ROWS = np.random.default_rng(7).standard_normal((5, 32)).astype(np.float32)


def infer_json(client: httpx.Client, path: str, inputs: list[dict[str, Any]], **extra: Any) -> Any:
    r = client.post(path, json={"inputs": inputs, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def tabular_input(rows: np.ndarray = ROWS) -> list[dict[str, Any]]:
    return [
        {
            "name": "input",
            "datatype": "FP32",
            "shape": list(rows.shape),
            "data": rows.ravel().tolist(),
        }
    ]


def outputs_by_name(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}


# --- health and metadata ---------------------------------------------------------------------


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "inferplane"
    assert {"binary_tensor_data", "model_repository", "statistics", "model_configuration"} <= set(
        meta["extensions"]
    )


def test_bodiless_answers_and_closing_connections_are_sent(server: ServerProcess) -> None:
    """The HTTP front end holds a response head until its body: answers without a body, and
    connections the client closes after the answer, must still get everything."""
    with httpx.Client(base_url=server.url, timeout=5) as plain:
        head = plain.head("/v2/health/live")
        assert head.status_code == 200 and head.content == b""
        for _ in range(3):
            r = plain.get("/v2/health/ready", headers={"connection": "close"})
            assert r.json() == {"ready": True}


def test_model_metadata_ready_and_config(client: httpx.Client) -> None:
    meta = client.get("/v2/models/tabular").json()
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    assert meta["parameters"]["version"] == "1"  # the production alias
    assert client.get("/v2/models/tabular/versions/2").json()["parameters"]["version"] == "2"
    assert client.get("/v2/models/tabular/ready").json() == {"name": "tabular", "ready": True}
    assert client.get("/v2/models/tabular/versions/2/ready").json()["ready"] is True
    config = client.get("/v2/models/tabular/config").json()
    assert config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [32]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500


# --- every runtime, numbers against the framework ------------------------------------------------


def test_onnx_versions_and_aliases(client: httpx.Client, artifacts: Path) -> None:
    import onnxruntime as ort

    for version, art in (("1", "tabular_v1.onnx"), ("2", "tabular_v2.onnx")):
        sess = ort.InferenceSession(str(artifacts / art), providers=["CPUExecutionProvider"])
        label, proba = sess.run(["label", "probabilities"], {"input": ROWS})
        doc = infer_json(client, f"/v2/models/tabular/versions/{version}/infer", tabular_input())
        assert doc["model_version"] == version
        out = outputs_by_name(doc)
        np.testing.assert_array_equal(out["label"], label)
        np.testing.assert_allclose(out["probabilities"], proba, rtol=1e-6)
    # No version: the production alias (1) although 2 is the latest; an alias name works too.
    assert infer_json(client, "/v2/models/tabular/infer", tabular_input())["model_version"] == "1"
    r = client.post("/v2/models/tabular/versions/canary/infer", json={"inputs": tabular_input()})
    assert r.json()["model_version"] == "2"


def test_sklearn(client: httpx.Client, artifacts: Path) -> None:
    import joblib

    forest = joblib.load(artifacts / "tabular_v1.joblib")
    out = outputs_by_name(infer_json(client, "/v2/models/tabular_skl/infer", tabular_input()))
    np.testing.assert_array_equal(out["predict"], forest.predict(ROWS))
    np.testing.assert_allclose(out["predict_proba"], forest.predict_proba(ROWS), rtol=1e-9)


def test_mlp(client: httpx.Client, artifacts: Path) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    (expected,) = ort.InferenceSession(str(artifacts / "mlp.onnx")).run(None, {"input": x})
    doc = infer_json(
        client, "/v2/models/mlp/infer",
        [{"name": "input", "datatype": "FP32", "shape": [3, 256], "data": x.tolist()}],
    )  # fmt: skip
    np.testing.assert_allclose(outputs_by_name(doc)["output"], expected, rtol=1e-5, atol=1e-5)


def test_xgboost(client: httpx.Client, artifacts: Path) -> None:
    import xgboost

    booster = xgboost.Booster(model_file=str(artifacts / "xgb.json"))
    expected = booster.inplace_predict(ROWS)
    out = outputs_by_name(infer_json(client, "/v2/models/xgb/infer", tabular_input()))
    np.testing.assert_allclose(out["predict"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["label"], (expected > 0.5).astype(np.int64))


def test_lightgbm(client: httpx.Client, artifacts: Path) -> None:
    import lightgbm

    booster = lightgbm.Booster(model_file=str(artifacts / "lgbm.txt"))
    expected = booster.predict(ROWS.astype(np.float64))
    out = outputs_by_name(infer_json(client, "/v2/models/lgbm/infer", tabular_input()))
    np.testing.assert_allclose(out["predict"], expected, rtol=1e-9)
    np.testing.assert_array_equal(out["label"], (expected > 0.5).astype(np.int64))


def test_torch(client: httpx.Client, artifacts: Path) -> None:
    import torch

    net = torch.jit.load(str(artifacts / "torch_mlp.pt"))
    with torch.inference_mode():
        expected = net(torch.from_numpy(ROWS)).numpy()
    out = outputs_by_name(infer_json(client, "/v2/models/torch_mlp/infer", tabular_input()))
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5, atol=1e-6)


def test_python_model_with_bytes(client: httpx.Client) -> None:
    texts = ["hello world", "inferplane serves models", ""]
    doc = infer_json(
        client, "/v2/models/text_stats/infer",
        [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts}],
    )  # fmt: skip
    out = outputs_by_name(doc)
    assert out["length"].tolist() == [len(t) for t in texts]
    assert out["words"].tolist() == [2, 3, 0]
    assert out["upper"].tolist() == [t.upper() for t in texts]
    assert {o["name"]: o["datatype"] for o in doc["outputs"]}["upper"] == "BYTES"


# --- protocol details ---------------------------------------------------------------------------


def test_request_id_echoed_or_generated_and_outputs_subset(client: httpx.Client) -> None:
    doc = infer_json(
        client, "/v2/models/tabular/infer", tabular_input(), id="req-42",
        outputs=[{"name": "label"}],
    )  # fmt: skip
    assert doc["id"] == "req-42"
    assert [o["name"] for o in doc["outputs"]] == ["label"]
    assert "parameters" not in doc["outputs"][0]  # perf_analyzer reads it as a binary output
    generated = infer_json(client, "/v2/models/tabular/infer", tabular_input())["id"]
    assert len(generated) >= 16


def test_nested_json_data(client: httpx.Client) -> None:
    nested = [{"name": "input", "datatype": "FP32", "shape": [5, 32], "data": ROWS.tolist()}]
    flat = infer_json(client, "/v2/models/tabular/infer", tabular_input())
    assert infer_json(client, "/v2/models/tabular/infer", nested)["outputs"] == flat["outputs"]


def test_binary_request_and_response_by_hand(client: httpx.Client) -> None:
    header = (
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[5,32],'
        b'"parameters":{"binary_data_size":640}}],'
        b'"outputs":[{"name":"probabilities","parameters":{"binary_data":true}},{"name":"label"}]}'
    )
    r = client.post(
        "/v2/models/tabular/versions/1/infer",
        content=header + ROWS.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    import json

    doc = json.loads(r.content[:n])
    proba_meta, label_meta = doc["outputs"]
    assert proba_meta["parameters"]["binary_data_size"] == 5 * 2 * 4
    proba = np.frombuffer(r.content[n:], dtype="<f4").reshape(5, 2)
    json_doc = infer_json(client, "/v2/models/tabular/versions/1/infer", tabular_input())
    np.testing.assert_allclose(proba, outputs_by_name(json_doc)["probabilities"], rtol=1e-6)
    assert label_meta["data"] == outputs_by_name(json_doc)["label"].tolist()


def _echo_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    arrays: dict[str, np.ndarray] = {}
    for name, dt in ECHO_TYPES.items():
        if dt == "BOOL":
            arrays[name] = np.array([True, False, True])
        elif dt == "BYTES":
            arrays[name] = np.array([b"a", "ünïcode".encode(), b""], dtype=object)
        else:
            np_type = triton_http.triton_to_np_dtype(dt)
            info = np.iinfo(np_type) if np.dtype(np_type).kind in "iu" else None
            arrays[name] = (
                np.array([info.min, 0, info.max], dtype=np_type)
                if info is not None
                else rng.standard_normal(3).astype(np_type)
            )
    return arrays


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_every_datatype(server: ServerProcess, binary: bool) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    arrays = _echo_arrays()
    inputs = []
    for name, arr in arrays.items():
        dt = ECHO_TYPES[name]
        inp = triton_http.InferInput(name, list(arr.shape), dt)
        # FP16 has no JSON form in the spec: it always travels as binary.
        inp.set_data_from_numpy(arr, binary_data=binary or dt == "FP16")
        inputs.append(inp)
    outputs = [
        triton_http.InferRequestedOutput(f"{n}_out", binary_data=binary or ECHO_TYPES[n] == "FP16")
        for n in arrays
    ]
    result = client.infer("echo", inputs, outputs=outputs, request_id="dtypes")
    assert result.get_response()["id"] == "dtypes"
    for name, arr in arrays.items():
        got = result.as_numpy(f"{name}_out")
        if ECHO_TYPES[name] == "BYTES":
            # tritonclient gives str for JSON BYTES and bytes for binary ones.
            assert [v if isinstance(v, bytes) else v.encode() for v in got.tolist()] == arr.tolist()
        else:
            np.testing.assert_array_equal(got, arr)
            assert got.dtype == arr.dtype


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(
    "model, outputs",
    [
        ("tabular", ["label", "probabilities"]),
        ("tabular_skl", ["predict", "predict_proba"]),
        ("xgb", ["predict", "label"]),
        ("lgbm", ["predict", "label"]),
        ("torch_mlp", ["probabilities"]),
    ],
)
def test_tritonclient_every_tabular_model(
    server: ServerProcess, client: httpx.Client, model: str, outputs: list[str], binary: bool
) -> None:
    triton = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(model)
    assert triton.get_model_metadata(model)["name"] == model
    assert triton.get_model_config(model)["max_batch_size"] == 32
    inp = triton_http.InferInput("input", list(ROWS.shape), "FP32")
    inp.set_data_from_numpy(ROWS, binary_data=binary)
    req_out = [triton_http.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    result = triton.infer(model, [inp], outputs=req_out)
    reference = outputs_by_name(infer_json(client, f"/v2/models/{model}/infer", tabular_input()))
    for o in outputs:
        np.testing.assert_allclose(result.as_numpy(o), reference[o], rtol=1e-6)


def test_tritonclient_text_model(server: ServerProcess) -> None:
    triton = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    inp = triton_http.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([b"abc def", b"x"], dtype=object), binary_data=True)
    result = triton.infer("text_stats", [inp])
    assert result.as_numpy("words").tolist() == [2, 1]
    assert result.as_numpy("upper").tolist() == [b"ABC DEF", b"X"]


# --- V1 ------------------------------------------------------------------------------------------


def test_v1_predict_instances_and_inputs(client: httpx.Client) -> None:
    json_doc = infer_json(client, "/v2/models/tabular/infer", tabular_input())
    reference = outputs_by_name(json_doc)
    r = client.post("/v1/models/tabular:predict", json={"instances": ROWS.tolist()})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == reference["label"].tolist()
    assert r.headers["x-inferplane-model-version"] == "1"
    r = client.post("/v1/models/tabular/versions/2:predict", json={"inputs": ROWS.tolist()})
    assert r.status_code == 200, r.text
    assert set(r.json()["outputs"]) == {"label", "probabilities"}
    r = client.post("/v1/models/mlp:predict", json={"instances": [[0.0] * 256]})
    assert len(r.json()["predictions"][0]) == 10
    assert (
        client.get("/v1/models/tabular").json()["model_version_status"][0]["state"] == "AVAILABLE"
    )


# --- extensions ---------------------------------------------------------------------------------


def test_statistics_count_inferences(client: httpx.Client) -> None:
    def stats() -> dict[str, Any]:
        return client.get("/v2/models/mlp/versions/1/stats").json()["model_stats"][0]

    before = stats()
    x = np.zeros((4, 256), np.float32)
    infer_json(client, "/v2/models/mlp/infer",
               [{"name": "input", "datatype": "FP32", "shape": [4, 256], "data": x.ravel().tolist()}])  # fmt: skip
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["execution_count"] - before["execution_count"] == 1
    assert (
        after["inference_stats"]["success"]["count"]
        == before["inference_stats"]["success"]["count"] + 1
    )
    assert any(b["batch_size"] == 4 for b in after["batch_stats"])
    all_stats = client.get("/v2/models/stats").json()["model_stats"]
    assert {s["name"] for s in all_stats} >= {"tabular", "mlp", "xgb"}


def test_repository_index_unload_load(client: httpx.Client) -> None:
    index = client.post("/v2/repository/index", json={}).json()
    assert {"name": "xgb", "version": "1", "state": "READY", "reason": ""} in index
    assert client.post("/v2/repository/models/xgb/unload").status_code == 200
    r = client.post("/v2/models/xgb/infer", json={"inputs": tabular_input()})
    assert r.status_code == 503 and "unloaded" in r.json()["error"]
    ready = client.post("/v2/repository/index", json={"ready": True}).json()
    assert "xgb" not in {row["name"] for row in ready}
    assert client.post("/v2/repository/models/xgb/load", json={}).status_code == 200
    infer_json(client, "/v2/models/xgb/infer", tabular_input())
    assert client.post("/v2/repository/models/nope/load").status_code == 400


def test_tritonclient_repository_and_stats(server: ServerProcess) -> None:
    triton = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    names = {m["name"] for m in triton.get_model_repository_index()}
    assert {"tabular", "mlp", "text_stats", "echo"} <= names
    triton.unload_model("lgbm")
    assert not triton.is_model_ready("lgbm")
    triton.load_model("lgbm")
    assert triton.is_model_ready("lgbm")
    stats = triton.get_inference_statistics("tabular", "1")
    assert stats["model_stats"][0]["name"] == "tabular"


def test_prometheus_metrics(client: httpx.Client) -> None:
    infer_json(client, "/v2/models/tabular/versions/2/infer", tabular_input())
    client.post("/v2/models/nope/infer", json={"inputs": tabular_input()})
    text = client.get("/metrics").text
    assert (
        'inferplane_requests_total{model="tabular",protocol="rest",status="200",version="2"}'
        in text
    )
    assert (
        'inferplane_requests_total{model="_unknown",protocol="rest",status="404",version=""}'
        in text
    )
    assert (
        'inferplane_request_duration_seconds_bucket{le="0.001",model="tabular",protocol="rest",version="2"}'
        in text
    )
    assert "inferplane_queue_duration_seconds_bucket" in text
    assert "inferplane_compute_duration_seconds_bucket" in text
    assert 'inferplane_model_ready{model="tabular",version="2"} 1.0' in text
    # The answers above kept the loop polling for the default 300 us window each.
    time.sleep(0.01)
    text = client.get("/metrics").text
    spun = [ln for ln in text.splitlines() if ln.startswith("inferplane_busy_poll_seconds_total")]
    assert len(spun) == 1 and float(spun[0].split()[1]) > 0, spun


def test_granian_front_end_serves_the_same_protocol(
    example_build: tuple[Path, Path], tmp_path: Path
) -> None:
    from tests.integration.servers import start_server

    server = start_server(
        example_build[0], tmp_path, "--http-server", "granian", "--model", "tabular"
    )
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            doc = infer_json(client, "/v2/models/tabular/versions/2/infer", tabular_input(), id="g")
            assert doc["id"] == "g" and doc["model_version"] == "2"
            r = client.post("/v2/models/tabular/infer", content=b"{")
            assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
            assert client.get("/v2/models/tabular/config").json()["max_batch_size"] == 32
        triton = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        inp = triton_http.InferInput("input", list(ROWS.shape), "FP32")
        inp.set_data_from_numpy(ROWS, binary_data=True)
        assert triton.infer("tabular", [inp]).as_numpy("label").shape == (5,)
    finally:
        server.stop()
