"""Framework runtimes, imported lazily so that a missing optional framework only affects its models.

Each entry: runtime name -> (module, class, pip extra that installs its framework).
"""

from __future__ import annotations

import importlib

from inferplane.errors import MissingExtra, RepositoryError
from inferplane.runtimes.base import Runtime, Signature

_RUNTIMES: dict[str, tuple[str, str, str]] = {
    "onnx": ("inferplane.runtimes.onnx", "OnnxRuntime", "onnx"),
    "sklearn": ("inferplane.runtimes.sklearn", "SklearnRuntime", "sklearn"),
    "xgboost": ("inferplane.runtimes.xgboost", "XGBoostRuntime", "xgboost"),
    "lightgbm": ("inferplane.runtimes.lightgbm", "LightGBMRuntime", "lightgbm"),
    "torch": ("inferplane.runtimes.torch", "TorchRuntime", "torch"),
    "python": ("inferplane.runtimes.python", "PythonRuntime", "python"),
}
# The framework packages each runtime imports, to name them in the missing-extra error.
_FRAMEWORK: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime",),
    "sklearn": ("sklearn", "joblib"),
    "xgboost": ("xgboost",),
    "lightgbm": ("lightgbm",),
    "torch": ("torch",),
}


def runtime_names() -> list[str]:
    return list(_RUNTIMES)


def get_runtime(name: str) -> type[Runtime]:
    try:
        module_name, cls_name, extra = _RUNTIMES[name]
    except KeyError:
        raise RepositoryError(
            f"unknown runtime '{name}'; expected one of {', '.join(_RUNTIMES)}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in _FRAMEWORK.get(name, ()):
            raise MissingExtra(missing, extra) from None
        raise
    cls: type[Runtime] = getattr(module, cls_name)
    return cls


def guess_runtime(artifact_path: str) -> str | None:
    """The runtime whose `sniff` recognises the artifact, trying only installed frameworks."""
    for name in _RUNTIMES:
        try:
            cls = get_runtime(name)
        except MissingExtra:
            continue
        if cls.sniff(artifact_path):
            return name
    return None


__all__ = ["Runtime", "Signature", "get_runtime", "guess_runtime", "runtime_names"]
