"""`models register --optimize`: convert a tree or linear model to ONNX, prove it answers the same, and
measure whether it is faster.

Supported: scikit-learn estimators and pipelines (skl2onnx), XGBoost and LightGBM boosters
(onnxmltools, whose converters skl2onnx itself registers for these frameworks). Steps:

1. convert (float32 first; float64 where the converter supports it and float32 did not match);
2. run the converted graph through the serving adapter (`runtimes.optimized`) and the original
   through its own runtime on the same samples: the user's (`--samples`, an .npy [N, n_features])
   plus generated rows (a quarter normal, a quarter uniform over each feature's threshold range, half
   on both sides of the model's own split thresholds, so that every comparison the trees make is
   exercised at float32 resolution);
3. compare every declared output: labels (integer, boolean, string outputs) exactly, numbers within
   `atol + rtol * |expected|`;
4. time both at batch 1 and 32 and serve the ONNX graph when it matched and is faster.

The outcome (figures, or the reason it is served as it is) goes to `metadata.optimization`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np

from inferplane.errors import InferplaneError, MissingExtra, RepositoryError
from inferplane.repository.schema import ModelConfig, Optimized, OptimizedOutput
from inferplane.tensors import BYTES, dtype_of

DEFAULT_ATOL = 1e-5
GENERATED_SAMPLES = 1000
OPTIMIZED_ARTIFACT = "optimized.onnx"
OPTIMIZABLE = ("sklearn", "xgboost", "lightgbm")
# ONNX Runtime >= 1.18, the oldest the project supports, runs opset 21 and ai.onnx.ml 3.
MAX_OPSET = 21
ML_OPSET = 3
TIMED_BATCHES = (1, 32)
_FLOATS = ("FP16", "BF16", "FP32", "FP64")


@dataclass
class OptimizeOptions:
    samples: str | None = None  # .npy file, shape [N, n_features]
    atol: float = DEFAULT_ATOL
    rtol: float = 0.0
    generated: int = GENERATED_SAMPLES
    seed: int = 0
    timing_s: float = 0.25  # per runtime and batch size


@dataclass
class OptimizeResult:
    report: dict[str, Any]  # -> metadata.optimization
    block: Optimized | None = None  # -> model.yaml `optimized` (converted and matched)
    onnx_path: str | None = None  # the converted graph to store beside the original

    @property
    def serves_optimized(self) -> bool:
        return self.block is not None and self.block.enabled


class NotOptimized(Exception):
    """The model is served as it is; the message says why."""


@dataclass
class _Conversion:
    model: Any  # onnx.ModelProto
    outputs: dict[str, OptimizedOutput]
    converter: str
    precision: str
    attempts: list[dict[str, str]] = field(default_factory=list)


# --- entry point ------------------------------------------------------------------------------


def optimize_version(
    config: ModelConfig,
    source_dir: str,
    workdir: str,
    options: OptimizeOptions,
    artifact_name: str = OPTIMIZED_ARTIFACT,
) -> OptimizeResult:
    """Convert and check `config`'s artifact (in `source_dir`); the ONNX file goes to `workdir`.

    Raises RepositoryError for bad user input (an unreadable samples file) and MissingExtra when
    the converters are not installed; every problem of the model itself becomes the reason in the
    report, and the version is then served as it is.
    """
    report: dict[str, Any] = {
        "converted": False,
        "served": "original",
        "tolerance": {"atol": options.atol, "rtol": options.rtol},
    }
    widths = _input_widths(config)
    n_features = sum(widths) if widths else 0
    user = _load_samples(options.samples, n_features) if options.samples else None
    try:
        if widths is None:
            raise NotOptimized(
                "only models whose inputs are numeric feature columns ([-1, K] or [-1]) convert"
            )
        if config.runtime not in OPTIMIZABLE:
            why = "it is ONNX already" if config.runtime == "onnx" else "no converter for it"
            raise NotOptimized(f"runtime '{config.runtime}': {why}")
        if config.device != "cpu":
            raise NotOptimized(f"device '{config.device}': the check runs on the CPU")
        _require_converters(config.runtime)
        return _optimize(config, source_dir, workdir, options, artifact_name, user, report)
    except NotOptimized as exc:
        report["reason"] = str(exc)
        return OptimizeResult(report)


def _optimize(
    config: ModelConfig,
    source_dir: str,
    workdir: str,
    options: OptimizeOptions,
    artifact_name: str,
    user: np.ndarray | None,
    report: dict[str, Any],
) -> OptimizeResult:
    from inferplane.runtimes import get_runtime

    original = get_runtime(config.runtime)(config, source_dir)
    try:
        original.load()
    except Exception as exc:
        raise NotOptimized(f"the original model does not load: {_describe(exc)}") from None
    try:
        return _check(config, original, workdir, options, artifact_name, user, report)
    finally:
        with contextlib.suppress(Exception):
            original.unload()


def _check(
    config: ModelConfig,
    original: Any,
    workdir: str,
    options: OptimizeOptions,
    artifact_name: str,
    user: np.ndarray | None,
    report: dict[str, Any],
) -> OptimizeResult:
    from inferplane.runtimes.optimized import OptimizedRuntime

    widths = _input_widths(config) or []
    rng = np.random.default_rng(options.seed)
    thresholds, centre = _feature_profile(config, original, sum(widths))
    generated = _generate(sum(widths), options.generated, thresholds, centre, rng)
    rows = generated if user is None else np.concatenate([user, generated])
    inputs = _split_inputs(config, widths, rows)
    report["samples"] = {
        "user": 0 if user is None else len(user),
        "generated": len(generated),
        "checked": len(rows),
    }
    try:
        expected = original.predict(inputs)
    except Exception as exc:
        raise NotOptimized(f"the original model fails on the samples: {_describe(exc)}") from None

    attempts: list[dict[str, str]] = []
    path = os.path.join(workdir, artifact_name)
    for precision in _precisions(config, original):
        try:
            conv = _convert(config, original, precision, sum(widths))
        except NotOptimized as exc:
            attempts.append({"precision": precision, "reason": str(exc)})
            continue
        with open(path, "wb") as fh:
            fh.write(conv.model.SerializeToString())
        block = Optimized(artifact=artifact_name, outputs=conv.outputs)
        trial = config.model_copy(update={"optimized": block, "sha256": {artifact_name: "-"}})
        adapter = OptimizedRuntime(trial, workdir)
        try:
            adapter.load()
            got = adapter.predict(inputs)
        except Exception as exc:
            attempts.append({"precision": precision, "reason": f"ONNX Runtime: {_describe(exc)}"})
            continue
        figures, mismatch = _compare(config, expected, got, options.atol, options.rtol)
        if mismatch:
            attempts.append({"precision": precision, "reason": mismatch})
            continue
        report.update(
            converted=True,
            converter=conv.converter,
            versions=_versions(config.runtime),
            precision=precision,
            opsets={(o.domain or "ai.onnx"): int(o.version) for o in conv.model.opset_import},
            **figures,
        )
        if attempts:
            report["attempts"] = attempts
        original_speed = {
            b: _rows_per_s(original, inputs, b, options.timing_s) for b in TIMED_BATCHES
        }
        onnx_speed = {b: _rows_per_s(adapter, inputs, b, options.timing_s) for b in TIMED_BATCHES}
        adapter.unload()
        speedup = {b: onnx_speed[b] / original_speed[b] for b in TIMED_BATCHES}
        report["rows_per_s"] = {
            "original": {f"batch_{b}": _round(v) for b, v in original_speed.items()},
            "onnx": {f"batch_{b}": _round(v) for b, v in onnx_speed.items()},
        }
        report["speedup"] = {f"batch_{b}": _round(v) for b, v in speedup.items()}
        faster = math.prod(speedup.values()) >= 1.0  # geometric mean over the batch sizes
        if faster:
            report["served"] = "onnx"
        else:
            report["reason"] = "the ONNX graph is not faster: speed-up " + ", ".join(
                f"{_round(v)}x at batch {b}" for b, v in speedup.items()
            )
        return OptimizeResult(report, block.model_copy(update={"enabled": faster}), path)
    report["attempts"] = attempts
    raise NotOptimized("; ".join(f"{a['precision']}: {a['reason']}" for a in attempts))


# --- signature and samples --------------------------------------------------------------------


def _input_widths(config: ModelConfig) -> list[int] | None:
    """Feature columns per declared input (stacked in order, as the runtimes do), or None."""
    widths = []
    for t in config.inputs:
        if t.datatype == BYTES:
            return None
        if len(t.shape) == 1:
            widths.append(1)
        elif len(t.shape) == 2 and t.shape[1] > 0:
            widths.append(t.shape[1])
        else:
            return None
    return widths


def _load_samples(path: str, n_features: int) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"--samples '{path}': not a readable .npy array ({exc})") from None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != n_features:
        shape = getattr(data, "shape", "?")
        raise RepositoryError(
            f"--samples '{path}': expected shape [N, {n_features}] (one row per sample), got "
            f"{list(shape) if isinstance(shape, tuple) else shape}"
        )
    if data.dtype.kind not in "biuf" or len(data) == 0:
        raise RepositoryError(f"--samples '{path}': expected a non-empty numeric array")
    return data.astype(np.float64)


def _split_inputs(
    config: ModelConfig, widths: list[int], rows: np.ndarray
) -> dict[str, np.ndarray]:
    """The sample matrix as the declared inputs, each in its declared datatype."""
    out, start = {}, 0
    for t, w in zip(config.inputs, widths, strict=True):
        block = rows[:, start : start + w] if len(t.shape) == 2 else rows[:, start]
        start += w
        dtype = np.dtype(dtype_of(t.datatype))
        if dtype.kind == "b":
            block = block > 0.5
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            block = np.clip(np.rint(np.nan_to_num(block)), info.min, info.max)
        out[t.name] = np.ascontiguousarray(block.astype(dtype))
    return out


def _round_down_f32(v: float) -> float:
    """The largest float32 <= v: for float32 x, `x <= v` iff `x <= _round_down_f32(v)`."""
    r = np.float32(v)
    if float(r) > v:
        r = np.nextafter(r, np.float32(-np.inf))
    return float(r)


def _generate(
    n_features: int,
    n: int,
    thresholds: dict[int, np.ndarray],
    centre: tuple[np.ndarray, np.ndarray] | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """`n` rows: normal, uniform over the threshold range, and on both sides of split thresholds."""
    if n <= 0:
        return np.empty((0, n_features))
    n_normal, n_uniform = n // 4, n // 4
    n_edge = n - n_normal - n_uniform
    mean, scale = centre if centre is not None else (np.zeros(n_features), np.ones(n_features))
    x = np.empty((n, n_features))
    for j in range(n_features):
        t = thresholds.get(j)
        if t is not None and len(t):
            lo, hi = float(t.min()), float(t.max())
            span = hi - lo or max(abs(hi), 1.0)
            lo, hi = lo - 0.1 * span, hi + 0.1 * span
            mu, sd = float(t.mean()), float(t.std()) or span
        else:
            mu, sd = float(mean[j]), float(scale[j]) or 1.0
            lo, hi = mu - 3 * sd, mu + 3 * sd
        x[:n_normal, j] = rng.normal(mu, sd, n_normal)
        x[n_normal : n_normal + n_uniform, j] = rng.uniform(lo, hi, n_uniform)
        if t is None or not len(t):
            x[n_normal + n_uniform :, j] = rng.normal(mu, sd, n_edge)
            continue
        picked = t[rng.integers(0, len(t), n_edge)]
        down = np.array([_round_down_f32(v) for v in picked], dtype=np.float32)
        up = np.where(
            down.astype(np.float64) < picked, np.nextafter(down, np.float32(np.inf)), down
        )
        side = rng.integers(0, 4, n_edge)
        edge = np.select(
            [side == 0, side == 1, side == 2],
            [down, up, np.nextafter(down, np.float32(-np.inf))],
            np.nextafter(up, np.float32(np.inf)),
        )
        x[n_normal + n_uniform :, j] = edge.astype(np.float64)
    x[-1] = 0.0  # the warm-up row
    return x


def _feature_profile(
    config: ModelConfig, original: Any, n_features: int
) -> tuple[dict[int, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """(split thresholds per feature, (mean, scale) of the features when a scaler tells them)."""
    found: dict[int, list[float]] = {}
    try:
        if config.runtime == "sklearn":
            _sklearn_thresholds(original.model, found)
        elif config.runtime == "xgboost":
            _xgboost_thresholds(original.booster, found)
        elif config.runtime == "lightgbm":
            _lightgbm_thresholds(original.booster, found)
    except Exception:  # a model layout we do not know: fall back to the generic rows
        found = {}
    thresholds = {
        j: np.unique(np.asarray(v, dtype=np.float64))
        for j, v in found.items()
        if 0 <= j < n_features and v
    }
    centre = None
    if config.runtime == "sklearn":
        centre = _sklearn_centre(original.model, n_features)
    return thresholds, centre


def _sklearn_thresholds(model: Any, found: dict[int, list[float]]) -> None:
    trees: list[Any] = []
    if hasattr(model, "tree_"):
        trees = [model]
    elif hasattr(model, "estimators_"):
        trees = [
            e for e in np.ravel(np.asarray(model.estimators_, dtype=object)) if hasattr(e, "tree_")
        ]
    for est in trees:
        tree = est.tree_
        inner = tree.feature >= 0
        for f, v in zip(tree.feature[inner], tree.threshold[inner], strict=True):
            found.setdefault(int(f), []).append(float(v))
    for predictors in getattr(model, "_predictors", []) or []:  # HistGradientBoosting*
        for p in predictors:
            nodes = p.nodes[~p.nodes["is_leaf"].astype(bool)]
            for f, v in zip(nodes["feature_idx"], nodes["num_threshold"], strict=True):
                found.setdefault(int(f), []).append(float(v))


def _sklearn_centre(model: Any, n_features: int) -> tuple[np.ndarray, np.ndarray] | None:
    first = model.steps[0][1] if hasattr(model, "steps") else model
    mean, scale = getattr(first, "mean_", None), getattr(first, "scale_", None)
    if mean is None or np.shape(mean) != (n_features,):
        return None
    scale = np.ones(n_features) if scale is None else np.asarray(scale, dtype=np.float64)
    return np.asarray(mean, dtype=np.float64), scale


def _xgboost_thresholds(booster: Any, found: dict[int, list[float]]) -> None:
    raw = json.loads(bytes(booster.save_raw(raw_format="json")))
    gb = raw["learner"]["gradient_booster"]
    trees = (gb.get("gbtree", gb))["model"]["trees"]
    for tree in trees:
        left = tree["left_children"]
        for i, f in enumerate(tree["split_indices"]):
            if left[i] != -1:
                found.setdefault(int(f), []).append(float(tree["split_conditions"][i]))


def _lightgbm_thresholds(booster: Any, found: dict[int, list[float]]) -> None:
    for info in booster.dump_model()["tree_info"]:
        stack = [info["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_feature" not in node:
                continue
            if node.get("decision_type") == "<=":
                found.setdefault(int(node["split_feature"]), []).append(float(node["threshold"]))
            stack += [node["left_child"], node["right_child"]]


# --- conversion -------------------------------------------------------------------------------

_CONVERTERS = {
    "sklearn": (("skl2onnx", "onnx"), "optimize"),
    "xgboost": (("onnxmltools", "skl2onnx", "onnx"), "optimize"),
    "lightgbm": (("onnxmltools", "skl2onnx", "onnx"), "optimize"),
}


def _require_converters(runtime: str) -> None:
    modules, extra = _CONVERTERS[runtime]
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(module, extra) from None


def _versions(runtime: str) -> dict[str, str]:
    packages = {
        "sklearn": ["scikit-learn", "skl2onnx"],
        "xgboost": ["xgboost", "onnxmltools"],
        "lightgbm": ["lightgbm", "onnxmltools"],
    }[runtime] + ["onnx", "onnxruntime"]
    out = {}
    for p in packages:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            out[p] = importlib_metadata.version(p)
    return out


def _precisions(config: ModelConfig, original: Any) -> list[str]:
    """float32 first (what tree runtimes compute in); float64 where the converter has it."""
    if config.runtime == "sklearn":
        return ["float32", "float64"]
    if config.runtime == "lightgbm" and original._objective not in (
        "binary",
        "multiclass",
        "multiclassova",
    ):
        return ["float32", "float64"]  # onnxmltools converts LightGBM regressors in float64 too
    return ["float32"]


def _opset(converter_max: int) -> int:
    import onnx

    return min(MAX_OPSET, converter_max, onnx.defs.onnx_opset_version())


def _convert(config: ModelConfig, original: Any, precision: str, n_features: int) -> _Conversion:
    convert: Callable[[Any, str, int, str], _Conversion] = {
        "sklearn": _convert_sklearn,
        "xgboost": _convert_xgboost,
        "lightgbm": _convert_lightgbm,
    }[config.runtime]
    input_name = config.inputs[0].name if len(config.inputs) == 1 else "input"
    try:
        conv = convert(original, precision, n_features, input_name)
        _finish(conv.model)
    except NotOptimized:
        raise
    except Exception as exc:  # converters raise anything from RuntimeError to KeyError
        raise NotOptimized(f"conversion failed: {_describe(exc)}") from None
    declared = [o.name for o in config.outputs]
    unmapped = [n for n in declared if n not in conv.outputs]
    if unmapped:
        raise NotOptimized(
            f"output {', '.join(unmapped)} has no counterpart in the ONNX graph (converted: "
            f"{', '.join(conv.outputs) or 'none'})"
        )
    conv.outputs = {n: conv.outputs[n] for n in declared}
    return conv


def _tensor_type(module: Any, precision: str, n_features: int) -> Any:
    cls = module.DoubleTensorType if precision == "float64" else module.FloatTensorType
    return cls([None, n_features])


def _graph_outputs(model: Any) -> list[str]:
    return [o.name for o in model.graph.output]


def _final_estimator(model: Any) -> Any:
    while hasattr(model, "steps"):
        model = model.steps[-1][1]
    return model


def _convert_sklearn(
    original: Any, precision: str, n_features: int, input_name: str
) -> _Conversion:
    import skl2onnx
    from skl2onnx.common import data_types

    model = original.model
    final = _final_estimator(model)
    classifier = hasattr(model, "classes_") and hasattr(model, "predict_proba")
    options = {id(final): {"zipmap": False}} if classifier else None
    onx = skl2onnx.to_onnx(
        model,
        initial_types=[(input_name, _tensor_type(data_types, precision, n_features))],
        options=options,
        target_opset={"": _opset(skl2onnx.__max_supported_opset__), "ai.onnx.ml": ML_OPSET},
    )
    names = _graph_outputs(onx)
    if classifier and len(names) == 2:
        outputs = {"predict": OptimizedOutput(source=names[0]),
                   "predict_proba": OptimizedOutput(source=names[1])}  # fmt: skip
    elif not classifier and len(names) == 1 and hasattr(model, "predict"):
        outputs = {"predict": OptimizedOutput(source=names[0])}
    else:
        raise NotOptimized(f"unexpected ONNX outputs {names} for {type(model).__name__}")
    return _Conversion(onx, outputs, f"skl2onnx {skl2onnx.__version__}", precision)


def _onnxmltools_opset() -> int:
    try:
        from onnxmltools.convert.common.onnx_ex import get_maximum_opset_supported

        return _opset(int(get_maximum_opset_supported()))
    except ImportError:
        return _opset(15)


def _booster_outputs(kind: str, names: list[str]) -> dict[str, OptimizedOutput]:
    """The runtimes' `predict`/`label` from onnxmltools' `label`/`probabilities` or `variable`."""
    if kind == "binary" and len(names) == 2:
        return {"predict": OptimizedOutput(source=names[1], column=1),
                "label": OptimizedOutput(source=names[0])}  # fmt: skip
    if kind == "multi" and len(names) == 2:
        return {"predict": OptimizedOutput(source=names[1]),
                "label": OptimizedOutput(source=names[0])}  # fmt: skip
    if kind == "multi_label" and len(names) == 2:  # multi:softmax gives the class as its value
        return {"predict": OptimizedOutput(source=names[0]),
                "label": OptimizedOutput(source=names[0])}  # fmt: skip
    if kind == "regression" and len(names) == 1:
        return {"predict": OptimizedOutput(source=names[0])}
    raise NotOptimized(f"unexpected ONNX outputs {names} for a {kind} booster")


def _convert_xgboost(
    original: Any, precision: str, n_features: int, input_name: str
) -> _Conversion:
    import onnxmltools
    from onnxmltools.convert.common import data_types

    objective = original._objective
    if objective.startswith("binary:") and objective != "binary:logistic":
        raise NotOptimized(f"objective '{objective}' is not converted (only binary:logistic)")
    onx = onnxmltools.convert_xgboost(
        original.booster,
        initial_types=[(input_name, _tensor_type(data_types, precision, n_features))],
        target_opset=_onnxmltools_opset(),
    )
    kind = {"binary:logistic": "binary", "multi:softprob": "multi", "multi:softmax": "multi_label"}
    outputs = _booster_outputs(kind.get(objective, "regression"), _graph_outputs(onx))
    return _Conversion(onx, outputs, f"onnxmltools {onnxmltools.__version__}", precision)


# LightGBM reads any |x| <= 1e-35f as 0 before comparing, and splits at zero with t = +-1e-35f.
_LGB_ZERO = float(np.float32(1e-35))
_LGB_BELOW_ZERO = float(np.nextafter(np.float32(-_LGB_ZERO), np.float32(-np.inf)))


def _lightgbm_f32_threshold(t: float) -> float:
    """A float32 threshold u such that, for every float32 x, LightGBM's `x <= t` is `x <= u`."""
    if -_LGB_ZERO <= t < 0.0:
        return _LGB_BELOW_ZERO  # x in [-1e-35, t] is read as 0 > t: only x < -1e-35 goes left
    if 0.0 <= t < _LGB_ZERO:
        return _LGB_ZERO  # x in (t, 1e-35] is read as 0 <= t: it goes left too
    return _round_down_f32(t)


def _round_lightgbm_thresholds(text: str) -> str:
    """The model text with each numerical threshold made float32 without changing a decision.

    LightGBM compares in float64 (`x <= t`), the ONNX graph in float32: rounding t to the nearest
    float32 would send float32 inputs just above t to the left (see `_lightgbm_f32_threshold`).
    `tree_sizes` is dropped because the tree blocks change length (LightGBM then parses them
    sequentially).
    """
    lines = [line for line in text.split("\n") if not line.startswith("tree_sizes=")]
    thr_at: int | None = None
    for i, line in enumerate(lines):
        if line.startswith("Tree="):
            thr_at = None
        elif line.startswith("threshold="):
            thr_at = i
        elif line.startswith("decision_type=") and thr_at is not None:
            kinds = [int(v) for v in line.split("=", 1)[1].split()]
            values = lines[thr_at].split("=", 1)[1].split()
            lines[thr_at] = "threshold=" + " ".join(
                v if k & 1 else repr(_lightgbm_f32_threshold(float(v)))  # bit 0: categorical
                for v, k in zip(values, kinds, strict=True)
            )
            thr_at = None
    return "\n".join(lines)


def _convert_lightgbm(
    original: Any, precision: str, n_features: int, input_name: str
) -> _Conversion:
    import lightgbm
    import onnxmltools
    from onnxmltools.convert.common import data_types

    booster = original.booster
    if precision == "float32":
        booster = lightgbm.Booster(model_str=_round_lightgbm_thresholds(booster.model_to_string()))
    onx = onnxmltools.convert_lightgbm(
        booster,
        initial_types=[(input_name, _tensor_type(data_types, precision, n_features))],
        target_opset=_onnxmltools_opset(),
        zipmap=False,
    )
    objective = original._objective
    kind = {"binary": "binary", "multiclass": "multi", "multiclassova": "multi"}
    outputs = _booster_outputs(kind.get(objective, "regression"), _graph_outputs(onx))
    return _Conversion(onx, outputs, f"onnxmltools {onnxmltools.__version__}", precision)


def _finish(model: Any) -> None:
    """Every output's first dimension is the batch (onnxmltools declares some as [1]), then check."""
    import onnx

    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value"):
            dims[0].dim_param = "N"
    onnx.checker.check_model(model)


# --- comparison and timing --------------------------------------------------------------------


def _compare(
    config: ModelConfig,
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    atol: float,
    rtol: float,
) -> tuple[dict[str, Any], str]:
    """(figures for the report, "" or the reason the outputs do not match)."""
    max_abs: dict[str, float] = {}
    agreement: dict[str, float] = {}
    problems = []
    for out in config.outputs:
        e, g = np.asarray(expected[out.name]), np.asarray(got[out.name])
        if e.shape != g.shape:
            problems.append(
                f"{out.name}: shape {list(g.shape)}, the original gives {list(e.shape)}"
            )
            continue
        if out.datatype in _FLOATS:
            e64, g64 = e.astype(np.float64), g.astype(np.float64)
            diff = np.abs(e64 - g64)
            both_nan = np.isnan(e64) & np.isnan(g64)
            worst = float(np.max(np.where(both_nan, 0.0, diff), initial=0.0))
            max_abs[out.name] = worst if math.isfinite(worst) else float("inf")
            bad = int(np.sum(~(np.isclose(g64, e64, rtol=rtol, atol=atol) | both_nan)))
            if bad:
                problems.append(
                    f"{out.name}: {bad} of {e.size} values differ by more than atol {atol:g}"
                    + (f" + rtol {rtol:g}" if rtol else "")
                    + f" (max |diff| {_round(worst)})"
                )
        else:
            same = e == g
            agreement[out.name] = float(np.mean(same)) if same.size else 1.0
            if not bool(np.all(same)):
                problems.append(f"{out.name}: {int(np.sum(~same))} of {same.size} labels differ")
    figures: dict[str, Any] = {}
    if max_abs:
        figures["max_abs_diff"] = {k: float(f"{v:.3g}") for k, v in max_abs.items()}
    if agreement:
        figures["label_agreement"] = agreement
    return figures, "; ".join(problems)


def _rows_per_s(runtime: Any, inputs: dict[str, np.ndarray], batch: int, budget_s: float) -> float:
    n_rows = len(next(iter(inputs.values())))
    reps = -(-batch // max(n_rows, 1))
    feed = {
        k: np.ascontiguousarray(np.concatenate([v] * reps)[:batch] if reps > 1 else v[:batch])
        for k, v in inputs.items()
    }
    runtime.predict(feed)  # warm
    # The median call, not the mean over the window: a machine busy with other work preempts a
    # few calls for milliseconds, which a mean turns into a wrong "not faster" verdict.
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runtime.predict(feed)
        times.append(time.perf_counter() - t0)
        if t0 - started >= budget_s and len(times) >= 3:
            return batch / max(statistics.median(times), 1e-9)


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def _describe(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, InferplaneError) else str(exc)
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text[:300]}"
