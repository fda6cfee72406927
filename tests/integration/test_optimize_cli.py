"""`inferplane models register --optimize` for real, then `inferplane serve` over the result.

The example forest (100 trees, depth 8, 32 features, from examples/build_models.py) is registered
as a joblib pickle with --optimize; the served answers must equal the pickle's own predict_proba
within 1e-5 and come from the optimized ONNX graph.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
import yaml

from tests.integration.servers import ROOT, ServerProcess, start_server
from tests.integration.test_cli import assert_one_line_error, cli, ok
from tests.needs import need

need("skl2onnx", "'.[optimize]'")

ATOL = 1e-5
MODEL = "forest_skl"


def load_example_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_models", ROOT / "examples" / "build_models.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, np.ndarray]:
    """(joblib path, the fitted forest, a few training rows) of the example forest."""
    build = load_example_builder()
    art = tmp_path_factory.mktemp("forest")
    x, y = build.tabular_data()
    _, joblib_path = build.build_forest(str(art), x, y, depth=8, name="forest")
    return joblib_path, joblib.load(joblib_path), x[:200]


@pytest.fixture(scope="module")
def registered(
    forest: tuple[str, Any, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], str]:
    """(repository, model.yaml as a dict, CLI stdout) after register --optimize --samples."""
    joblib_path, _, rows = forest
    base = tmp_path_factory.mktemp("optimize")
    samples = base / "samples.npy"
    np.save(samples, rows.astype(np.float64))
    repo = base / "models"
    result = cli(
        "models", "register", MODEL, joblib_path, "--repository", str(repo), "--optimize",
        "--samples", str(samples), "--max-batch-size", "32", "--max-queue-delay-us", "500",
    )  # fmt: skip
    out = ok(result)
    assert "warning" not in result.stderr, result.stderr
    doc = yaml.safe_load((repo / MODEL / "1" / "model.yaml").read_text())
    return repo, doc, out


@pytest.fixture(scope="module")
def server(
    registered: tuple[Path, dict[str, Any], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(registered[0], tmp_path_factory.mktemp("logs"), grpc=False)
    yield srv
    srv.stop()


def infer(server: ServerProcess, rows: np.ndarray, version: str | None = None) -> dict[str, Any]:
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP64", "shape": list(rows.shape),
             "data": rows.ravel().tolist()}
        ]
    }  # fmt: skip
    r = httpx.post(server.url + path, json=body, timeout=30.0)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_register_records_both_artifacts_and_the_check(
    registered: tuple[Path, dict[str, Any], str],
) -> None:
    repo, doc, out = registered
    assert "served as ONNX" in out and "speed-up" in out
    assert doc["runtime"] == "sklearn" and doc["artifact"] == "forest.joblib"
    assert doc["optimized"]["enabled"] is True
    assert doc["optimized"]["outputs"] == {
        "predict": {"source": "label"},
        "predict_proba": {"source": "probabilities"},
    }
    assert set(doc["sha256"]) == {"forest.joblib", doc["optimized"]["artifact"]}
    for name in doc["sha256"]:
        assert (repo / MODEL / "1" / name).is_file()
    # the public signature is the pickle's, whatever serves it
    assert doc["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 32]}]
    assert [(o["name"], o["datatype"]) for o in doc["outputs"]] == [
        ("predict", "INT64"),
        ("predict_proba", "FP64"),
    ]
    report = doc["metadata"]["optimization"]
    assert report["converted"] is True and report["served"] == "onnx"
    assert report["samples"] == {"user": 200, "generated": 1000, "checked": 1200}
    assert report["max_abs_diff"]["predict_proba"] <= ATOL
    assert report["label_agreement"] == {"predict": 1.0}
    assert report["tolerance"] == {"atol": ATOL, "rtol": 0.0}
    assert report["converter"].startswith("skl2onnx ")
    assert {"scikit-learn", "skl2onnx", "onnx", "onnxruntime"} <= set(report["versions"])
    assert set(report["speedup"]) == {"batch_1", "batch_32"}
    # the forest costs milliseconds per call in scikit-learn and microseconds in ONNX Runtime
    assert report["speedup"]["batch_1"] > 3, report


def test_served_answers_equal_the_pickle(
    server: ServerProcess, forest: tuple[str, Any, np.ndarray]
) -> None:
    _, model, train = forest
    rng = np.random.default_rng(11)
    for rows in (train[:1].astype(np.float64), rng.standard_normal((32, 32)), train[:7] + 0.25):
        doc = infer(server, rows)
        assert doc["model_name"] == MODEL and doc["model_version"] == "1"
        got = {o["name"]: o for o in doc["outputs"]}
        assert got["predict_proba"]["datatype"] == "FP64"
        assert got["predict"]["datatype"] == "INT64"
        assert got["predict_proba"]["shape"] == [len(rows), 2]
        proba = np.asarray(got["predict_proba"]["data"]).reshape(len(rows), 2)
        np.testing.assert_allclose(proba, model.predict_proba(rows), rtol=0, atol=ATOL)
        np.testing.assert_array_equal(got["predict"]["data"], model.predict(rows))


def test_platform_shows_the_optimized_runtime(server: ServerProcess) -> None:
    meta = httpx.get(f"{server.url}/v2/models/{MODEL}", timeout=10.0).json()
    assert meta["platform"] == "sklearn_joblib+onnx", meta
    assert meta["versions"] == ["1"]


def test_unconvertible_model_is_registered_with_a_warning(tmp_path: Path) -> None:
    from sklearn.datasets import make_classification
    from sklearn.semi_supervised import LabelSpreading

    x, y = make_classification(n_samples=200, n_features=6, random_state=0)
    path = tmp_path / "spread.joblib"
    joblib.dump(LabelSpreading().fit(x, y), path)
    repo = tmp_path / "models"
    result = cli("models", "register", "spread", str(path), "-r", str(repo), "--optimize")
    ok(result)
    assert "warning: not optimized" in result.stderr and "LabelSpreading" in result.stderr
    doc = yaml.safe_load((repo / "spread" / "1" / "model.yaml").read_text())
    assert "optimized" not in doc and list(doc["sha256"]) == ["spread.joblib"]
    assert doc["metadata"]["optimization"]["converted"] is False
    assert "LabelSpreading" in doc["metadata"]["optimization"]["reason"]


def test_samples_need_optimize_and_a_right_shape(
    forest: tuple[str, Any, np.ndarray], tmp_path: Path
) -> None:
    joblib_path = forest[0]
    samples = tmp_path / "s.npy"
    np.save(samples, np.zeros((4, 5)))
    repo = str(tmp_path / "models")
    result = cli("models", "register", "f", joblib_path, "-r", repo, "--samples", str(samples))
    assert result.returncode == 2 and "--optimize" in result.stderr, result.stderr
    result = cli(
        "models", "register", "f", joblib_path, "-r", repo, "--optimize", "--samples", str(samples)
    )
    assert_one_line_error(result, "expected shape [N, 32]")
    assert not (tmp_path / "models" / "f" / "1" / "model.yaml").exists()
