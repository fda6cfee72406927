"""Bad input gets a precise V2 error with the right status, and the server keeps serving."""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.servers import start_server

ROW = [0.5] * 32
GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": ROW}]}


def tensor(**overrides: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": ROW} | overrides]
    }


def binary(header: bytes, tail: bytes, length: str | None = None) -> dict[str, Any]:
    return {
        "content": header + tail,
        "headers": {"Inference-Header-Content-Length": length or str(len(header))},
    }


BIN_HEADER = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,32],"parameters":{"binary_data_size":128}}]}'
ROW_BYTES = np.full(32, 0.5, np.float32).tobytes()

# (case id, path, request kwargs for httpx, status, a fragment of the error message)
CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("malformed-json", "/v2/models/tabular/infer", {"content": b'{"inputs": [}'}, 400, "malformed JSON"),
    ("not-an-object", "/v2/models/tabular/infer", {"json": [1, 2]}, 400, "must be a JSON object"),
    ("no-inputs", "/v2/models/tabular/infer", {"json": {"inputs": []}}, 400, "non-empty 'inputs'"),
    ("wrong-datatype", "/v2/models/tabular/infer", {"json": tensor(datatype="FP64")}, 400,
     "has datatype FP64, the model expects FP32"),
    ("unknown-datatype", "/v2/models/tabular/infer", {"json": tensor(datatype="FLOAT")}, 400,
     "unknown datatype 'FLOAT'"),
    ("data-length-mismatch", "/v2/models/tabular/infer", {"json": tensor(data=ROW[:-1])}, 400,
     "shape [1, 32] needs 32 elements, data has 31"),
    ("wrong-rank", "/v2/models/tabular/infer", {"json": tensor(shape=[32])}, 400,
     "has shape [32], the model expects [-1, 32]"),
    ("wrong-fixed-dim", "/v2/models/tabular/infer",
     {"json": tensor(shape=[1, 31], data=ROW[:31])}, 400, "the model expects [-1, 32]"),
    ("negative-dim", "/v2/models/tabular/infer", {"json": tensor(shape=[-1, 32])}, 400,
     "non-negative integers"),
    ("strings-for-fp32", "/v2/models/tabular/infer", {"json": tensor(data=["a"] * 32)}, 400,
     "FP32 data must be numbers"),
    ("ragged-data", "/v2/models/tabular/infer",
     {"json": tensor(shape=[2, 32], data=[ROW, ROW[:5]])}, 400, "ragged"),
    ("unknown-input", "/v2/models/tabular/infer", {"json": tensor(name="X")}, 400,
     "has no input named 'X'"),
    ("missing-input", "/v2/models/echo/infer",
     {"json": {"inputs": [{"name": "b", "datatype": "BOOL", "shape": [1], "data": [True]}]}}, 400,
     "missing input"),
    ("floats-for-int", "/v2/models/echo/infer",
     {"json": {"inputs": [{"name": "i64", "datatype": "INT64", "shape": [1], "data": [1.5]}]}}, 400,
     "INT64 data must be integers"),
    ("out-of-range", "/v2/models/echo/infer",
     {"json": {"inputs": [{"name": "u8", "datatype": "UINT8", "shape": [1], "data": [300]}]}}, 400,
     "out of range for UINT8"),
    ("bf16-as-json", "/v2/models/echo/infer",
     {"json": {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1.0]}]}}, 400,
     "BF16 has no JSON form"),
    ("duplicate-input", "/v2/models/tabular/infer",
     {"json": {"inputs": GOOD["inputs"] * 2}}, 400, "appears twice"),
    ("unknown-output", "/v2/models/tabular/infer",
     {"json": GOOD | {"outputs": [{"name": "nope"}]}}, 400, "has no output named 'nope'"),
    ("binary-header-not-int", "/v2/models/tabular/infer", binary(BIN_HEADER, ROW_BYTES, "abc"), 400,
     "must be an integer"),
    ("binary-header-too-long", "/v2/models/tabular/infer", binary(BIN_HEADER, ROW_BYTES, "100000"),
     400, "outside the body"),
    ("binary-size-past-end", "/v2/models/tabular/infer", binary(BIN_HEADER, ROW_BYTES[:64]), 400,
     "runs past the end"),
    ("binary-leftover-bytes", "/v2/models/tabular/infer", binary(BIN_HEADER, ROW_BYTES + b"xx"), 400,
     "not claimed"),
    ("binary-size-vs-shape", "/v2/models/tabular/infer",
     binary(BIN_HEADER.replace(b"128", b"124"), ROW_BYTES[:124]), 400, "needs 128 bytes, got 124"),
    ("binary-input-without-data", "/v2/models/tabular/infer",
     {"json": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32]}]}}, 400,
     "neither 'data' nor binary_data_size"),
    ("unknown-model", "/v2/models/nope/infer", {"json": GOOD}, 404, "unknown model 'nope'"),
    ("unknown-version", "/v2/models/tabular/versions/9/infer", {"json": GOOD}, 404,
     "has no version 9"),
    ("unknown-alias", "/v2/models/tabular/versions/gold/infer", {"json": GOOD}, 404,
     "no version or alias 'gold'"),
    ("unknown-model-metadata", "/v2/models/nope", {}, 404, "unknown model 'nope'"),
    ("unknown-path", "/v3/nothing", {}, 404, "no path GET /v3/nothing"),
    ("wrong-method", "/v2/health/live", {"json": {}}, 405, "no method POST /v2/health/live"),
    ("too-large", "/v2/models/tabular/infer", {"content": b" " * (3 * 1024 * 1024)}, 413,
     "exceeds the limit"),
    ("v1-neither-form", "/v1/models/tabular:predict", {"json": {"rows": []}}, 400,
     "exactly one of 'instances'"),
    ("v1-unknown-model", "/v1/models/nope:predict", {"json": {"instances": [ROW]}}, 404,
     "unknown model"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "kwargs", "status", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_request_then_good_request(
    client: httpx.Client, path: str, kwargs: dict[str, Any], status: int, message: str
) -> None:
    method = client.get if not kwargs else client.post
    r = method(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert message in body["error"]
    ok = client.post("/v2/models/tabular/infer", json=GOOD)
    assert ok.status_code == 200, ok.text
    assert ok.json()["outputs"][0]["name"] == "label"


SLOW_MODEL = textwrap.dedent(
    """
    import time
    import numpy as np

    class Model:
        def load(self, path):
            time.sleep(6)

        def predict(self, inputs):
            return {"y": np.asarray(inputs["x"]) * 2}
    """
)
FAILING_MODEL = textwrap.dedent(
    """
    class Model:
        def load(self, path):
            raise RuntimeError("weights file is truncated")

        def predict(self, inputs):
            return {}
    """
)


def test_corrupt_failing_and_loading_models_leave_the_rest_serving(
    example_build: tuple[Path, Path], tmp_path: Path
) -> None:
    from inferplane.repository.register import parse_tensor_arg, register
    from inferplane.repository.store import Repository

    repo_dir = tmp_path / "models"
    shutil.copytree(example_build[0] / "tabular", repo_dir / "tabular")
    shutil.copytree(example_build[0] / "tabular", repo_dir / "tampered")
    for version in ("1", "2"):
        yaml_path = repo_dir / "tampered" / version / "model.yaml"
        yaml_path.write_text(yaml_path.read_text().replace("name: tabular", "name: tampered"))
    artifact = repo_dir / "tampered" / "1" / "tabular_v1.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    artifact.write_bytes(bytes(data))
    repo = Repository(str(repo_dir))
    sig = {"inputs": [parse_tensor_arg("x:FP32:-1")], "outputs": [parse_tensor_arg("y:FP32:-1")]}
    for name, code in (("slow", SLOW_MODEL), ("failing", FAILING_MODEL)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.py").write_text(code)
        register(repo, name, str(folder), **sig)  # type: ignore[arg-type]

    server = start_server(repo_dir, tmp_path, "--model", "slow", "--model", "tabular",
                          "--model", "tampered", "--model", "failing", wait=False)  # fmt: skip
    try:
        server.wait("/v2/health/live")
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # While `slow` loads: the server is live, not ready; a request waits for the load
            # within its deadline (504 past it), the model counts as ready (loadable).
            deadline = time.monotonic() + 20
            while client.get("/v2/models/slow/ready").status_code == 404:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            r = client.get("/v2/health/ready")
            assert r.status_code == 503 and r.json() == {"ready": False}
            r = client.post("/v2/models/slow/infer", headers={"x-inferplane-timeout-ms": "50"},
                            json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})  # fmt: skip
            assert r.status_code == 504 and "still loading" in r.json()["error"], r.text
            assert client.get("/v2/models/slow/ready").json() == {"name": "slow", "ready": True}
            r = client.post("/v2/models/slow/infer",  # no deadline: waits for the load
                            json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})  # fmt: skip
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0], r.text

            server.wait()  # ready once nothing is loading, although two models failed
            r = client.post("/v2/models/slow/infer",
                            json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})  # fmt: skip
            assert r.json()["outputs"][0]["data"] == [2.0]

            r = client.post("/v2/models/tampered/versions/1/infer", json=GOOD)
            assert r.status_code == 503
            assert "sha256" in r.json()["error"] and "tampered" in r.json()["error"]
            # Version 2 of the same model was not touched and serves.
            assert client.post("/v2/models/tampered/versions/2/infer", json=GOOD).status_code == 200
            r = client.post("/v2/models/failing/infer", json=GOOD)
            assert r.status_code == 503 and "weights file is truncated" in r.json()["error"]
            index = {(row["name"], row.get("version")): row
                     for row in client.post("/v2/repository/index").json()}  # fmt: skip
            assert index[("tampered", "1")]["state"] == "FAILED"
            assert "sha256" in index[("tampered", "1")]["reason"]
            assert index[("failing", "1")]["state"] == "FAILED"
            assert client.post("/v2/models/tabular/infer", json=GOOD).status_code == 200
    finally:
        server.stop()


def test_strict_readiness_holds_back_a_server_with_a_failed_model(tmp_path: Path) -> None:
    from inferplane.repository.register import parse_tensor_arg, register
    from inferplane.repository.store import Repository

    folder = tmp_path / "failing"
    folder.mkdir()
    (folder / "model.py").write_text(FAILING_MODEL)
    register(Repository(str(tmp_path / "models")), "failing", str(folder),
             inputs=[parse_tensor_arg("x:FP32:-1")], outputs=[parse_tensor_arg("y:FP32:-1")])  # fmt: skip
    server = start_server(tmp_path / "models", tmp_path, "--strict-readiness", wait=False)
    try:
        server.wait("/v2/health/live")
        deadline = time.monotonic() + 30
        while "failing version 1 failed to load" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert httpx.get(server.url + "/v2/health/ready").status_code == 503
    finally:
        server.stop()
