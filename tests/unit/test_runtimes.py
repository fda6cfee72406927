"""Each framework runtime against the framework called directly, on tiny models built here."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import joblib
import lightgbm as lgb
import ml_dtypes
import numpy as np
import pytest
import torch
import xgboost as xgb
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from inferplane.errors import InternalError, RepositoryError
from inferplane.repository.register import register
from inferplane.repository.schema import ModelConfig
from inferplane.repository.store import Repository
from inferplane.runtimes import get_runtime, guess_runtime
from inferplane.runtimes.base import Runtime
from inferplane.runtimes.onnx import providers_for
from inferplane.runtimes.python import PythonRuntime
from inferplane.runtimes.torch import TorchRuntime, torch_device
from inferplane.tensors import TensorSpec

SEED = 0


def spec(text: str) -> TensorSpec:
    name, datatype, dims = text.split(":")
    return TensorSpec(name, datatype, [int(d) for d in dims.split(",")] if dims else [])


def specs(*texts: str) -> list[TensorSpec]:
    return [spec(t) for t in texts]


def as_dicts(items: list[TensorSpec] | None) -> list[dict[str, Any]] | None:
    return None if items is None else [s.as_dict() for s in items]


def serve(tmp_path: Path, name: str, artifact: Path, **kwargs: Any) -> tuple[ModelConfig, Runtime]:
    """Register `artifact` in a fresh repository and load it as the engine would."""
    repo = Repository(str(tmp_path / "repo"))
    config = register(repo, name, str(artifact), **kwargs)
    runtime = get_runtime(config.runtime)(config, repo.fetch(config))
    runtime.load()
    return config, runtime


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_classification(
        n_samples=120, n_features=5, n_informative=3, n_classes=3, random_state=SEED
    )
    return x, y


# sklearn ------------------------------------------------------------------------------------


def test_sklearn_classifier_matches_estimator(tmp_path: Path, data: Any) -> None:
    x, y = data
    model = RandomForestClassifier(n_estimators=5, random_state=SEED).fit(x, y)
    path = tmp_path / "rf.joblib"
    joblib.dump(model, path)

    assert guess_runtime(str(path)) == "sklearn"
    sig = get_runtime("sklearn").infer_signature(str(path))
    assert as_dicts(sig.inputs) == as_dicts(specs("input:FP64:-1,5"))
    assert as_dicts(sig.outputs) == as_dicts(specs("predict:INT64:-1", "predict_proba:FP64:-1,3"))

    config, runtime = serve(tmp_path, "rf", path)
    assert config.runtime == "sklearn"
    out = runtime.predict({"input": x})
    assert out["predict"].dtype == np.int64
    np.testing.assert_array_equal(out["predict"], model.predict(x))
    np.testing.assert_allclose(out["predict_proba"], model.predict_proba(x))
    assert list(runtime.predict({"input": x}, ["predict_proba"])) == ["predict_proba"]


def test_sklearn_method_outputs_split_inputs_and_declared_dtypes(tmp_path: Path, data: Any) -> None:
    x, y = data
    model = make_pipeline(StandardScaler(), LogisticRegression(random_state=SEED)).fit(x, y)
    path = tmp_path / "lr.pkl"
    joblib.dump(model, path)

    _, runtime = serve(
        tmp_path,
        "lr",
        path,
        inputs=specs("a:FP32:-1,2", "b:FP64:-1,3"),
        outputs=specs("decision_function:FP32:-1,3", "predict:INT32:-1"),
    )
    out = runtime.predict({"a": x[:, :2].astype(np.float32), "b": x[:, 2:]})
    assert out["decision_function"].dtype == np.float32
    assert out["predict"].dtype == np.int32
    x32 = np.column_stack([x[:, :2].astype(np.float32), x[:, 2:]])
    np.testing.assert_allclose(out["decision_function"], model.decision_function(x32), rtol=1e-6)
    np.testing.assert_array_equal(out["predict"], model.predict(x32))


def test_sklearn_string_labels_are_bytes(tmp_path: Path, data: Any) -> None:
    x, y = data
    model = LogisticRegression(random_state=SEED).fit(x, np.array(["a", "b", "c"])[y])
    path = tmp_path / "str.joblib"
    joblib.dump(model, path)
    sig = get_runtime("sklearn").infer_signature(str(path))
    assert sig.outputs is not None and sig.outputs[0].datatype == "BYTES"

    _, runtime = serve(tmp_path, "str", path)
    out = runtime.predict({"input": x[:4]})["predict"]
    assert out.dtype == object
    assert list(out) == [s.encode() for s in model.predict(x[:4])]


def test_sklearn_regressor_signature(tmp_path: Path) -> None:
    x, y = make_regression(n_samples=30, n_features=4, random_state=SEED)
    path = tmp_path / "reg.joblib"
    joblib.dump(LinearRegression().fit(x, y), path)
    sig = get_runtime("sklearn").infer_signature(str(path))
    assert as_dicts(sig.inputs) == as_dicts(specs("input:FP64:-1,4"))
    assert as_dicts(sig.outputs) == as_dicts(specs("predict:FP64:-1"))


@pytest.mark.parametrize("output", ["predict_proba", "transform", "fit", "_validate_data"])
def test_sklearn_rejects_outputs_that_are_not_methods(
    tmp_path: Path, data: Any, output: str
) -> None:
    x, y = data
    path = tmp_path / "reg.joblib"
    joblib.dump(LinearRegression().fit(x, y), path)
    repo = Repository(str(tmp_path / "repo"))
    config = register(repo, "reg", str(path), outputs=specs(f"{output}:FP64:-1"))
    runtime = get_runtime("sklearn")(config, repo.fetch(config))
    with pytest.raises(RepositoryError, match=f"output '{output}' must name a method"):
        runtime.load()


# xgboost ------------------------------------------------------------------------------------


def test_xgboost_binary_classifier(tmp_path: Path, data: Any) -> None:
    x, y = data
    yb = (y == 1).astype(int)
    clf = xgb.XGBClassifier(n_estimators=5, max_depth=3, random_state=SEED).fit(x, yb)
    path = tmp_path / "m.json"
    clf.save_model(path)

    assert guess_runtime(str(path)) == "xgboost"
    sig = get_runtime("xgboost").infer_signature(str(path))
    assert as_dicts(sig.inputs) == as_dicts(specs("input:FP32:-1,5"))
    assert as_dicts(sig.outputs) == as_dicts(specs("predict:FP32:-1", "label:INT64:-1"))

    _, runtime = serve(tmp_path, "xgb", path)
    x32 = x.astype(np.float32)
    out = runtime.predict({"input": x32})
    np.testing.assert_allclose(out["predict"], clf.predict_proba(x32)[:, 1], rtol=1e-6)
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], clf.predict(x32))


def test_xgboost_multiclass_and_regressor(tmp_path: Path, data: Any) -> None:
    x, y = data
    clf = xgb.XGBClassifier(n_estimators=5, max_depth=3, random_state=SEED).fit(x, y)
    path = tmp_path / "multi.ubj"
    clf.save_model(path)
    sig = get_runtime("xgboost").infer_signature(str(path))
    assert as_dicts(sig.outputs) == as_dicts(specs("predict:FP32:-1,3", "label:INT64:-1"))
    _, runtime = serve(tmp_path, "xgbm", path)
    x32 = x.astype(np.float32)
    out = runtime.predict({"input": x32})
    np.testing.assert_allclose(out["predict"], clf.predict_proba(x32), rtol=1e-6)
    np.testing.assert_array_equal(out["label"], clf.predict(x32))

    reg = xgb.XGBRegressor(n_estimators=5, random_state=SEED).fit(x, y.astype(float))
    rpath = tmp_path / "reg.json"
    reg.save_model(rpath)
    sig = get_runtime("xgboost").infer_signature(str(rpath))
    assert as_dicts(sig.outputs) == as_dicts(specs("predict:FP32:-1"))
    _, rruntime = serve(tmp_path, "xgbr", rpath)
    np.testing.assert_allclose(rruntime.predict({"input": x32})["predict"], reg.predict(x32))


def test_xgboost_sniff_needs_a_learner(tmp_path: Path) -> None:
    other = tmp_path / "config.json"
    other.write_text('{"not": "a model"}')
    assert not get_runtime("xgboost").sniff(str(other))


# lightgbm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_lightgbm_classifier(tmp_path: Path, data: Any, binary: bool) -> None:
    x, y = data
    y = (y == 1).astype(int) if binary else y
    clf = lgb.LGBMClassifier(n_estimators=5, random_state=SEED, verbose=-1).fit(x, y)
    path = tmp_path / "m.txt"
    clf.booster_.save_model(path)

    assert guess_runtime(str(path)) == "lightgbm"
    sig = get_runtime("lightgbm").infer_signature(str(path))
    shape = "-1" if binary else "-1,3"
    assert as_dicts(sig.inputs) == as_dicts(specs("input:FP64:-1,5"))
    assert as_dicts(sig.outputs) == as_dicts(specs(f"predict:FP64:{shape}", "label:INT64:-1"))

    _, runtime = serve(tmp_path, "lgb", path)
    out = runtime.predict({"input": x.astype(np.float32)})  # any float input is accepted
    proba = np.asarray(clf.predict_proba(x.astype(np.float32)))
    np.testing.assert_allclose(out["predict"], proba[:, 1] if binary else proba)
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], clf.predict(x))


def test_lightgbm_regressor_has_no_label(tmp_path: Path, data: Any) -> None:
    x, y = data
    reg = lgb.LGBMRegressor(n_estimators=5, random_state=SEED, verbose=-1).fit(x, y)
    path = tmp_path / "r.lgb"
    reg.booster_.save_model(path)
    sig = get_runtime("lightgbm").infer_signature(str(path))
    assert as_dicts(sig.outputs) == as_dicts(specs("predict:FP64:-1"))
    _, runtime = serve(tmp_path, "lgbr", path)
    np.testing.assert_allclose(runtime.predict({"input": x})["predict"], reg.predict(x))

    repo = Repository(str(tmp_path / "repo2"))
    config = register(repo, "lgbr", str(path), outputs=specs("label:INT64:-1"))
    with pytest.raises(RepositoryError, match="declares output label"):
        get_runtime("lightgbm")(config, repo.fetch(config)).load()


# torch --------------------------------------------------------------------------------------


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.linear(x) + bias
        return logits.softmax(-1), logits.argmax(-1)


class Keyed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.linear(x)
        return {"scores": logits, "best": logits.argmax(-1)}


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "x": rng.standard_normal((6, 4), dtype=np.float32),
        "bias": rng.standard_normal((6, 3), dtype=np.float32),
    }


def test_torchscript_tuple_outputs(tmp_path: Path) -> None:
    torch.manual_seed(SEED)
    model = TwoHeads().eval()
    path = tmp_path / "m.pt"
    torch.jit.script(model).save(str(path))

    assert guess_runtime(str(path)) == "torch"
    assert get_runtime("torch").infer_signature(str(path)).inputs is None
    _, runtime = serve(
        tmp_path,
        "ts",
        path,
        inputs=specs("x:FP32:-1,4", "bias:FP32:-1,3"),
        outputs=specs("probs:FP32:-1,3", "label:INT64:-1"),
    )
    feed = _inputs()
    # Request bodies arrive as read-only buffers; the runtime must cope.
    feed["x"].flags.writeable = False
    out = runtime.predict(feed)
    with torch.no_grad():
        probs, label = model(torch.from_numpy(_inputs()["x"]), torch.from_numpy(feed["bias"]))
    np.testing.assert_allclose(out["probs"], probs.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(out["label"], label.numpy())
    assert list(runtime.predict(feed, ["label"])) == ["label"]


def test_torch_export_signature_and_outputs(tmp_path: Path) -> None:
    torch.manual_seed(SEED)
    model = TwoHeads().eval()
    feed = _inputs()
    args = (torch.from_numpy(feed["x"]), torch.from_numpy(feed["bias"]))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch}))
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))

    assert guess_runtime(str(path)) == "torch"
    sig = get_runtime("torch").infer_signature(str(path))
    assert as_dicts(sig.inputs) == as_dicts(specs("x:FP32:-1,4", "bias:FP32:-1,3"))
    assert sig.outputs is not None
    assert [(s.datatype, s.shape) for s in sig.outputs] == [("FP32", [-1, 3]), ("INT64", [-1])]

    _, runtime = serve(tmp_path, "ep", path)
    assert isinstance(runtime, TorchRuntime) and runtime.model_platform == "pytorch_export"
    out = runtime.predict(feed)
    with torch.no_grad():
        probs, label = model(*args)
    names = [s.name for s in sig.outputs]
    np.testing.assert_allclose(out[names[0]], probs.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(out[names[1]], label.numpy())


def test_torch_export_dict_outputs_by_key(tmp_path: Path) -> None:
    torch.manual_seed(SEED)
    model = Keyed().eval()
    x = torch.from_numpy(_inputs()["x"])
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    path = tmp_path / "keyed.pt2"
    torch.export.save(program, str(path))
    sig = get_runtime("torch").infer_signature(str(path))
    assert as_dicts(sig.outputs) == as_dicts(specs("scores:FP32:-1,3", "best:INT64:-1"))

    # Declared in another order than the dict: matched by key, not position.
    _, runtime = serve(tmp_path, "keyed", path, outputs=specs("best:INT64:-1", "scores:FP32:-1,3"))
    out = runtime.predict({"x": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    np.testing.assert_allclose(out["scores"], expected["scores"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(out["best"], expected["best"].numpy())


def test_torch_device_selection_without_gpu() -> None:
    assert torch_device("cpu", cuda_available=False) == "cpu"
    assert torch_device("cuda:1", cuda_available=True) == "cuda:1"
    with pytest.raises(RepositoryError, match=r"torch sees no CUDA GPU.*set device: cpu"):
        torch_device("cuda", cuda_available=False)


def test_torch_rejects_a_plain_pickle(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, str(path))
    repo = Repository(str(tmp_path / "repo"))
    config = register(
        repo, "pickle", str(path), inputs=specs("x:FP32:-1,2"), outputs=specs("y:FP32:-1")
    )
    with pytest.raises(RepositoryError, match="not a TorchScript file"):
        get_runtime("torch")(config, repo.fetch(config)).load()


# python -------------------------------------------------------------------------------------

MODEL_PY = """
import numpy as np
from helpers import SCALE

class Model:
    def load(self, path, options):
        self.offset = float(open(path + "/offset.txt").read()) + options.get("extra", 0)

    def predict(self, inputs):
        x = inputs["x"]
        return {"y": x * SCALE + self.offset, "names": ["n%d" % i for i in range(len(x))]}
"""


def _python_model(folder: Path, scale: int, model_py: str = MODEL_PY) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(textwrap.dedent(model_py))
    (folder / "helpers.py").write_text(f"SCALE = {scale}\n")
    (folder / "offset.txt").write_text("0.5")
    return folder


def test_python_model_folder(tmp_path: Path) -> None:
    folder = _python_model(tmp_path / "src" / "pymodel", scale=2)
    assert guess_runtime(str(folder)) == "python"
    kwargs: dict[str, Any] = {
        "inputs": specs("x:FP64:-1"),
        "outputs": specs("y:FP32:-1", "names:BYTES:-1"),
        "options": {"extra": 1},
    }
    _, runtime = serve(tmp_path, "py", folder, **kwargs)
    out = runtime.predict({"x": np.array([1.0, 2.0])})
    assert out["y"].dtype == np.float32
    np.testing.assert_array_equal(out["y"], [3.5, 5.5])
    assert list(out["names"]) == [b"n0", b"n1"]

    # Version 2 ships another helpers.py under the same module name; it must not get v1's.
    folder2 = _python_model(tmp_path / "src2" / "pymodel", scale=10)
    _, runtime2 = serve(tmp_path, "py", folder2, **kwargs)
    np.testing.assert_array_equal(runtime2.predict({"x": np.array([1.0])})["y"], [11.5])
    np.testing.assert_array_equal(runtime.predict({"x": np.array([1.0])})["y"], [3.5])
    runtime.unload()
    runtime2.unload()
    assert not [m for m in sys.modules if m.startswith("inferplane_user_py_")]
    assert "helpers" not in sys.modules


def test_python_single_file_without_options(tmp_path: Path) -> None:
    path = tmp_path / "double.py"
    path.write_text(
        textwrap.dedent(
            """
            import os
            class Model:
                def load(self, path):
                    self.seen = sorted(os.listdir(path))
                def predict(self, inputs):
                    return {"y": inputs["x"] * 2}
            """
        )
    )
    assert get_runtime("python").sniff(str(path))
    _, runtime = serve(
        tmp_path, "double", path, inputs=specs("x:INT64:-1"), outputs=specs("y:INT64:-1")
    )
    np.testing.assert_array_equal(runtime.predict({"x": np.array([1, 2])})["y"], [2, 4])
    assert isinstance(runtime, PythonRuntime) and "double.py" in runtime.model.seen


@pytest.mark.parametrize(
    ("code", "error", "message"),
    [
        # A broken file is refused at load (a repository problem) ...
        ("class Other:\n    pass\n", RepositoryError, "defines no class Model"),
        ("raise ValueError('boom')\n", RepositoryError, "importing .* failed: ValueError: boom"),
        # ... a predict that breaks the output contract is the model's fault, not the caller's.
        (
            "class Model:\n    def predict(self, inputs):\n        return [1]\n",
            InternalError,
            "returned list, expected a dict",
        ),
        (
            "class Model:\n    def predict(self, inputs):\n        return {'z': inputs['x']}\n",
            InternalError,
            "returned no y",
        ),
    ],
)
def test_python_errors(tmp_path: Path, code: str, error: type[Exception], message: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(code)
    repo = Repository(str(tmp_path / "repo"))
    config = register(repo, "bad", str(path), inputs=specs("x:FP64:-1"), outputs=specs("y:FP64:-1"))
    runtime = get_runtime("python")(config, repo.fetch(config))
    with pytest.raises(error, match=message):
        runtime.load()
        runtime.predict({"x": np.zeros(2)})
    runtime.unload()
    assert not any(m.startswith("inferplane_user_bad_") for m in sys.modules)


# devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("artifact", "message"),
    [
        ("m.joblib", "scikit-learn runs on the CPU only"),
        ("m.txt", "LightGBM predicts on the CPU only"),
        pytest.param(
            "m.json",
            "XGBoost found no usable CUDA GPU",
            marks=pytest.mark.skipif(bool(shutil.which("nvidia-smi")), reason="a GPU is present"),
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:.*GPU:UserWarning")  # XGBoost's own fallback warning
def test_cuda_refused_where_it_cannot_run(
    tmp_path: Path, data: Any, artifact: str, message: str
) -> None:
    x, y = data
    path = tmp_path / artifact
    if artifact.endswith(".joblib"):
        joblib.dump(LogisticRegression().fit(x, y), path)
    elif artifact.endswith(".txt"):
        lgb.LGBMClassifier(n_estimators=2, verbose=-1).fit(x, y).booster_.save_model(path)
    else:
        xgb.XGBClassifier(n_estimators=2).fit(x, y).save_model(path)
    repo = Repository(str(tmp_path / "repo"))
    config = register(repo, "gpu", str(path), device="cuda")
    with pytest.raises(RepositoryError, match=message):
        get_runtime(config.runtime)(config, repo.fetch(config)).load()


# onnx ---------------------------------------------------------------------------------------


def test_onnx_cuda_provider_selection_without_gpu() -> None:
    assert providers_for("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(RepositoryError, match="CUDAExecutionProvider"):
        providers_for("cuda", ["CPUExecutionProvider"])
    assert providers_for("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]


def test_every_runtime_sniffs_only_its_own(tmp_path: Path) -> None:
    names = ["a.joblib", "a.ubj", "a.lgb", "a.pt2", "a.py", "a.onnx"]
    expected = ["sklearn", "xgboost", "lightgbm", "torch", "python", "onnx"]
    for name, runtime in zip(names, expected, strict=True):
        path = tmp_path / name
        path.write_bytes(b"")
        assert guess_runtime(str(path)) == runtime
    plain = tmp_path / "notes.txt"
    plain.write_text("hello\n")
    assert guess_runtime(str(plain)) is None
    assert not get_runtime("python").sniff(os.fspath(tmp_path))


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_torch_bf16_and_strided_inputs(tmp_path: Path) -> None:
    path = tmp_path / "double.torchscript"
    torch.jit.script(Double()).save(str(path))
    _, runtime = serve(
        tmp_path, "double", path, inputs=specs("x:BF16:-1,2"), outputs=specs("y:BF16:-1,2")
    )
    x = np.arange(8, dtype=np.float32).reshape(4, 2).astype(ml_dtypes.bfloat16)[::-2]
    out = runtime.predict({"x": x})["y"]
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), x.astype(np.float32) * 2)
