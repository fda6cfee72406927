"""`models register --optimize`: conversion, the equivalence check, the record, and the adapter."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import yaml

from inferplane.errors import RepositoryError
from inferplane.repository import optimize as opt
from inferplane.repository.optimize import OptimizeOptions
from inferplane.repository.register import register
from inferplane.repository.schema import ModelConfig
from inferplane.repository.store import Repository, verify
from inferplane.runtimes import create_runtime, get_runtime
from inferplane.runtimes.optimized import OptimizedRuntime
from inferplane.tensors import TensorSpec
from tests.needs import need

need("skl2onnx", "'.[optimize]'")
need("onnxmltools", "'.[optimize]'")

ATOL = 1e-5
N_FEATURES = 8
FAST = {"timing_s": 0.02}  # the timing is recorded, not asserted: keep it short here


def data(n: int = 1500, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n,
        n_features=N_FEATURES,
        n_informative=5,
        n_classes=classes,
        n_clusters_per_class=1,
        random_state=seed,
    )
    return x.astype(np.float32), y


def fresh_rows(n: int = 400, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.5, (n, N_FEATURES))


Registered = tuple[ModelConfig, str]  # (config, local folder of the version)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(str(tmp_path / "models"))


@pytest.fixture
def registered(repo: Repository, tmp_path: Path) -> Callable[..., Registered]:
    def _register(artifact: str, **kwargs: Any) -> Registered:
        options = OptimizeOptions(**{**FAST, **kwargs.pop("options", {})})
        config = register(repo, "m", artifact, optimize=options, **kwargs)
        reread = repo.read_config("m", config.version)
        assert reread == config  # what was written is what is read back
        local = repo.fetch(reread)
        verify(reread, local)  # every stored file matches its sha256
        return reread, local

    return _register


def serve(config: ModelConfig, local: str) -> Any:
    runtime = create_runtime(config, local)
    runtime.load()
    return runtime


def assert_optimized(config: ModelConfig, local: str) -> OptimizedRuntime:
    """The conversion passed its check. Which artifact is served is a timing verdict (the ONNX
    graph must measure faster), which a loaded machine can flip for models near 1x: not asserted
    here (benchmarks measure speed); only that the verdict follows the recorded speed-ups. The
    converted graph is served and checked either way."""
    report = config.metadata["optimization"]
    assert report["converted"] is True, report
    assert config.optimized is not None
    faster = math.prod(report["speedup"].values()) >= 1.0
    assert report["served"] == ("onnx" if faster else "original"), report
    assert config.optimized.enabled is faster
    if not faster:
        assert report["reason"].startswith("the ONNX graph is not faster"), report
        config = config.model_copy(
            update={"optimized": config.optimized.model_copy(update={"enabled": True})}
        )
    assert set(config.sha256) == {config.artifact, config.optimized.artifact}
    for key in ("tolerance", "samples", "converter", "versions", "rows_per_s", "speedup"):
        assert key in report, key
    assert report["tolerance"] == {"atol": ATOL, "rtol": 0.0}
    assert report["samples"]["generated"] == opt.GENERATED_SAMPLES
    assert report["samples"]["checked"] >= opt.GENERATED_SAMPLES
    assert set(report["speedup"]) == {"batch_1", "batch_32"}
    assert all(v > 0 for v in report["speedup"].values())
    for out in config.outputs:  # every declared output was compared
        figures = (
            report["max_abs_diff"] if out.datatype.startswith("FP") else report["label_agreement"]
        )
        assert out.name in figures
    assert all(v <= ATOL for v in report.get("max_abs_diff", {}).values())
    assert all(v == 1.0 for v in report.get("label_agreement", {}).values())
    runtime = serve(config, local)
    assert isinstance(runtime, OptimizedRuntime)
    assert runtime.releases_gil
    assert runtime.model_platform.endswith("+onnx")
    assert runtime.memory_bytes() == os.path.getsize(os.path.join(local, config.optimized.artifact))
    return runtime


def assert_declared(config: ModelConfig, outputs: dict[str, np.ndarray], rows: int) -> None:
    from inferplane.tensors import dtype_of

    assert set(outputs) == {o.name for o in config.outputs}
    for o in config.outputs:
        value = outputs[o.name]
        assert value.dtype == np.dtype(dtype_of(o.datatype)), (o.name, value.dtype)
        assert len(value.shape) == len(o.shape), (o.name, value.shape)
        assert value.shape[0] == rows


# --- scikit-learn -----------------------------------------------------------------------------


def sklearn_artifact(tmp_path: Path, model: Any) -> str:
    path = str(tmp_path / "model.joblib")
    joblib.dump(model, path)
    return path


@pytest.mark.parametrize("kind", ["forest", "gbdt", "logreg_pipeline"])
def test_sklearn_classifiers(
    kind: str, tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = 3 if kind == "logreg_pipeline" else 2
    x, y = data(classes=classes)
    model = {
        "forest": lambda: RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0),
        "gbdt": lambda: GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0),
        "logreg_pipeline": lambda: make_pipeline(StandardScaler(), LogisticRegression()),
    }[kind]().fit(x, y)
    config, local = registered(sklearn_artifact(tmp_path, model))
    assert [o.name for o in config.outputs] == ["predict", "predict_proba"]
    runtime = assert_optimized(config, local)
    rows = fresh_rows()
    got = runtime.predict({"input": rows})
    assert_declared(config, got, len(rows))
    np.testing.assert_array_equal(got["predict"], model.predict(rows))
    np.testing.assert_allclose(got["predict_proba"], model.predict_proba(rows), rtol=0, atol=ATOL)
    # a subset of the outputs, as the engine may ask
    assert set(runtime.predict({"input": rows[:3]}, ["predict_proba"])) == {"predict_proba"}


def test_sklearn_regressor(tmp_path: Path, registered: Callable[..., Registered]) -> None:
    from sklearn.ensemble import RandomForestRegressor

    x, _ = data()
    target = np.sin(x[:, 0]) + 0.5 * x[:, 1]  # unit scale: float32 sums stay within 1e-5
    model = RandomForestRegressor(n_estimators=20, max_depth=6, random_state=0).fit(x, target)
    config, local = registered(sklearn_artifact(tmp_path, model))
    runtime = assert_optimized(config, local)
    rows = fresh_rows()
    got = runtime.predict({"input": rows})
    assert_declared(config, got, len(rows))
    assert got["predict"].shape == (len(rows),)  # ONNX's [N, 1] presented as the declared [N]
    np.testing.assert_allclose(got["predict"], model.predict(rows), rtol=0, atol=ATOL)


def test_user_samples_are_checked_too(
    tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    from sklearn.ensemble import RandomForestClassifier

    x, y = data()
    model = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(x, y)
    samples = tmp_path / "samples.npy"
    np.save(samples, x[:123].astype(np.float64))
    config, _ = registered(sklearn_artifact(tmp_path, model), options={"samples": str(samples)})
    assert config.metadata["optimization"]["samples"] == {
        "user": 123,
        "generated": opt.GENERATED_SAMPLES,
        "checked": 123 + opt.GENERATED_SAMPLES,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [(np.zeros((5, 3)), "expected shape [N, 8]"), (np.zeros(8), "expected shape [N, 8]")],
)
def test_bad_samples_are_refused(
    content: np.ndarray, message: str, tmp_path: Path, repo: Repository
) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = data()
    path = sklearn_artifact(tmp_path, LogisticRegression().fit(x, y))
    samples = tmp_path / "bad.npy"
    np.save(samples, content)
    with pytest.raises(RepositoryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        register(repo, "m", path, optimize=OptimizeOptions(samples=str(samples)))
    assert repo.list_versions("m") == []  # nothing half-registered


def test_unconvertible_estimator_is_served_as_is(
    tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    from sklearn.semi_supervised import LabelSpreading

    x, y = data(n=300)
    model = LabelSpreading().fit(x, y)
    config, local = registered(sklearn_artifact(tmp_path, model))
    report = config.metadata["optimization"]
    assert report["converted"] is False
    assert report["served"] == "original"
    assert "LabelSpreading" in report["reason"]
    assert config.optimized is None
    assert set(config.sha256) == {config.artifact}
    runtime = serve(config, local)
    assert type(runtime) is get_runtime("sklearn")
    rows = fresh_rows(20)
    np.testing.assert_array_equal(runtime.predict({"input": rows})["predict"], model.predict(rows))


def test_mismatch_is_served_as_is(
    tmp_path: Path, registered: Callable[..., Registered], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A converted graph that answers differently is refused, with the figures in the reason."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = data()
    model = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(x, y)
    other = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=1).fit(x, y)
    real = opt._convert_sklearn

    def wrong(original: Any, *args: Any) -> Any:
        original.model, saved = other, original.model
        try:
            return real(original, *args)
        finally:
            original.model = saved

    monkeypatch.setattr(opt, "_convert_sklearn", wrong)
    config, local = registered(sklearn_artifact(tmp_path, model))
    report = config.metadata["optimization"]
    assert report["converted"] is False
    assert "predict_proba" in report["reason"] and "differ" in report["reason"]
    assert [a["precision"] for a in report["attempts"]] == ["float32", "float64"]
    assert config.optimized is None and set(config.sha256) == {config.artifact}
    assert type(serve(config, local)) is get_runtime("sklearn")


def test_tolerance_is_applied(tmp_path: Path, registered: Callable[..., Registered]) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = data()
    model = LogisticRegression().fit(x, y)
    config, _ = registered(sklearn_artifact(tmp_path, model), options={"atol": 0.0})
    report = config.metadata["optimization"]
    assert report["tolerance"]["atol"] == 0.0
    if report["converted"]:  # float64 may reproduce sklearn exactly; then it says so
        assert report["max_abs_diff"]["predict_proba"] == 0.0
    else:
        assert "differ by more than atol 0" in report["reason"]


def test_slower_graph_is_kept_but_not_served(
    tmp_path: Path, registered: Callable[..., Registered], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = data()
    model = LogisticRegression().fit(x, y)
    speeds = iter([1000.0, 2000.0, 10.0, 20.0])  # original b1, b32, then ONNX b1, b32
    monkeypatch.setattr(opt, "_rows_per_s", lambda *a: next(speeds))
    config, local = registered(sklearn_artifact(tmp_path, model))
    report = config.metadata["optimization"]
    assert report["converted"] is True and report["served"] == "original"
    assert report["speedup"] == {"batch_1": 0.01, "batch_32": 0.01}
    assert "not faster" in report["reason"]
    assert config.optimized is not None and config.optimized.enabled is False
    assert set(config.sha256) == {config.artifact, config.optimized.artifact}
    assert type(serve(config, local)) is get_runtime("sklearn")


# --- XGBoost and LightGBM ---------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 3])
def test_xgboost_classifier(
    classes: int, tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    xgb = need("xgboost", "'.[xgboost]'")
    x, y = data(classes=classes)
    model = xgb.XGBClassifier(n_estimators=30, max_depth=4, random_state=0, n_jobs=1).fit(x, y)
    path = str(tmp_path / "model.json")
    model.save_model(path)
    config, local = registered(path)
    assert [o.name for o in config.outputs] == ["predict", "label"]
    runtime = assert_optimized(config, local)
    rows = fresh_rows().astype(np.float32)
    got = runtime.predict({"input": rows})
    assert_declared(config, got, len(rows))
    booster = xgb.Booster(model_file=path)
    expected = booster.inplace_predict(rows)
    np.testing.assert_allclose(got["predict"], expected, rtol=0, atol=ATOL)
    labels = expected.argmax(axis=1) if classes > 2 else (expected > 0.5).astype(np.int64)
    np.testing.assert_array_equal(got["label"], labels)


def test_xgboost_regressor(tmp_path: Path, registered: Callable[..., Registered]) -> None:
    xgb = need("xgboost", "'.[xgboost]'")
    x, _ = data()
    target = np.sin(x[:, 0]) + 0.5 * x[:, 1]
    model = xgb.XGBRegressor(n_estimators=20, max_depth=4, random_state=0, n_jobs=1)
    path = str(tmp_path / "model.ubj")
    model.fit(x, target).save_model(path)
    config, local = registered(path)
    runtime = assert_optimized(config, local)
    rows = fresh_rows().astype(np.float32)
    got = runtime.predict({"input": rows})
    assert_declared(config, got, len(rows))
    expected = xgb.Booster(model_file=path).inplace_predict(rows)
    np.testing.assert_allclose(got["predict"], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("classes", [2, 3])
def test_lightgbm_classifier(
    classes: int, tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    lgb = need("lightgbm", "'.[lightgbm]'")
    x, y = data(classes=classes)
    model = lgb.LGBMClassifier(n_estimators=30, num_leaves=15, random_state=0, verbose=-1)
    path = str(tmp_path / "model.txt")
    model.fit(x, y).booster_.save_model(path)
    config, local = registered(path)  # the default signature: FP64 input, like LightGBM's own
    assert config.inputs[0].datatype == "FP64"
    runtime = assert_optimized(config, local)
    rows = fresh_rows()
    got = runtime.predict({"input": rows})
    assert_declared(config, got, len(rows))
    expected = lgb.Booster(model_file=path).predict(rows)
    np.testing.assert_allclose(got["predict"], expected, rtol=0, atol=ATOL)
    labels = expected.argmax(axis=1) if classes > 2 else (expected > 0.5).astype(np.int64)
    np.testing.assert_array_equal(got["label"], labels)


def test_lightgbm_thresholds_round_down_to_float32() -> None:
    """After rounding, LightGBM itself answers the same on float32 rows, and thresholds are f32."""
    lgb = need("lightgbm", "'.[lightgbm]'")
    x, y = data()
    booster = lgb.LGBMClassifier(n_estimators=20, random_state=0, verbose=-1).fit(x, y).booster_
    rounded = lgb.Booster(model_str=opt._round_lightgbm_thresholds(booster.model_to_string()))
    thresholds: dict[int, list[float]] = {}
    opt._lightgbm_thresholds(rounded, thresholds)
    values = np.concatenate([np.asarray(v) for v in thresholds.values()])
    np.testing.assert_array_equal(values.astype(np.float32).astype(np.float64), values)
    original: dict[int, list[float]] = {}
    opt._lightgbm_thresholds(booster, original)
    rows = np.concatenate([x, opt._generate(N_FEATURES, 2000, {
        j: np.asarray(v) for j, v in original.items()}, None, np.random.default_rng(0))])  # fmt: skip
    rows = rows.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(rounded.predict(rows), booster.predict(rows))


# --- schema and factory -----------------------------------------------------------------------


def base_config(**extra: Any) -> dict[str, Any]:
    return {
        "name": "m",
        "version": 1,
        "runtime": "sklearn",
        "artifact": "model.joblib",
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [
            {"name": "predict", "datatype": "INT64", "shape": [-1]},
            {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]},
        ],
        **extra,
    }


def test_optimized_block_in_model_yaml() -> None:
    text = yaml.safe_dump(
        base_config(
            optimized={
                "artifact": "optimized.onnx",
                "outputs": {"predict": "label", "predict_proba": {"source": "probabilities"}},
            }
        )
    )
    config = ModelConfig.from_yaml(text, "m/1/model.yaml")
    assert config.optimized is not None
    assert config.optimized.enabled and config.optimized.runtime == "onnx"
    assert config.optimized.outputs["predict"].source == "label"
    assert config.optimized.outputs["predict"].column is None
    assert ModelConfig.from_yaml(config.to_yaml(), "again") == config
    with pytest.raises(RepositoryError, match=r"optimized\.typo"):
        ModelConfig.from_yaml(
            yaml.safe_dump(base_config(optimized={"artifact": "a.onnx", "outputs": {}, "typo": 1})),
            "m/1/model.yaml",
        )


def test_create_runtime_honours_enabled_and_opt_out(
    tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    from sklearn.ensemble import RandomForestClassifier

    x, y = data()
    model = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(x, y)
    config, local = registered(sklearn_artifact(tmp_path, model))
    assert isinstance(create_runtime(config, local), OptimizedRuntime)
    assert type(create_runtime(config, local, optimized=False)) is get_runtime("sklearn")
    assert config.optimized is not None
    off = config.model_copy(
        update={"optimized": config.optimized.model_copy(update={"enabled": False})}
    )
    assert type(create_runtime(off, local)) is get_runtime("sklearn")


def test_adapter_refuses_an_unchecked_artifact(
    tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    from sklearn.ensemble import RandomForestClassifier

    x, y = data()
    model = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(x, y)
    config, local = registered(sklearn_artifact(tmp_path, model))
    assert config.optimized is not None
    unchecked = config.model_copy(
        update={"sha256": {config.artifact: config.sha256[config.artifact]}}
    )
    with pytest.raises(RepositoryError, match="no sha256 for the optimized artifact"):
        create_runtime(unchecked, local).load()


def test_non_optimizable_runtimes_say_why(
    tmp_path: Path, repo: Repository, make_onnx_model: Callable[..., str]
) -> None:
    path = make_onnx_model(tmp_path / "sum.onnx")
    config = register(repo, "s", path, optimize=OptimizeOptions(**FAST))
    report = config.metadata["optimization"]
    assert report["converted"] is False and "ONNX already" in report["reason"]
    assert config.optimized is None


def test_several_inputs_are_stacked_as_columns(
    tmp_path: Path, registered: Callable[..., Registered]
) -> None:
    from sklearn.ensemble import RandomForestClassifier

    x, y = data()
    model = RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0).fit(x, y)
    inputs = [TensorSpec("a", "FP32", [-1, 5]), TensorSpec("b", "FP64", [-1]),
              TensorSpec("c", "FP64", [-1, 2])]  # fmt: skip
    config, local = registered(sklearn_artifact(tmp_path, model), inputs=inputs)
    runtime = assert_optimized(config, local)
    rows = fresh_rows(50)
    got = runtime.predict({"a": rows[:, :5].astype(np.float32), "b": rows[:, 5], "c": rows[:, 6:]})
    stacked = np.column_stack([rows[:, :5].astype(np.float32), rows[:, 5], rows[:, 6:]])
    np.testing.assert_allclose(got["predict_proba"], model.predict_proba(stacked), atol=ATOL)


def test_speed_is_the_median_call_so_a_preempted_call_does_not_decide() -> None:
    """On a busy machine a few calls stall for milliseconds; the verdict must not follow them."""
    import time as _time

    class Stalling:
        calls = 0

        def predict(self, feed: dict[str, np.ndarray]) -> None:
            self.calls += 1
            _time.sleep(0.03 if self.calls % 5 == 0 else 0.0002)

    rows_per_s = opt._rows_per_s(Stalling(), {"x": np.zeros((4, 2))}, 4, budget_s=0.05)
    assert rows_per_s > 4 / 0.002, f"{rows_per_s:.0f} rows/s: the stalls decided"
