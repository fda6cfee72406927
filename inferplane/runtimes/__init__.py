"""Framework runtimes, imported lazily so that a missing optional framework only affects its models.

Each entry: runtime name -> (module, class, pip extra that installs its framework).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from inferplane.errors import MissingExtra, RepositoryError
from inferplane.runtimes.base import Runtime, Signature

if TYPE_CHECKING:
    from inferplane.repository.schema import ModelConfig

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


def create_runtime(config: ModelConfig, local_dir: str, *, optimized: bool = True) -> Runtime:
    """The runtime that serves a version: its optimized ONNX artifact when registration made and
    enabled one (`model.yaml` `optimized`), else the runtime `config.runtime` names.

    `optimized=False` serves the original artifact even so (a server-wide opt-out).
    """
    block = config.optimized
    if optimized and block is not None and block.enabled:
        from inferplane.runtimes.optimized import OptimizedRuntime

        return OptimizedRuntime(config, local_dir)
    return get_runtime(config.runtime)(config, local_dir)


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


__all__ = [
    "Runtime",
    "Signature",
    "create_runtime",
    "get_runtime",
    "guess_runtime",
    "runtime_names",
]
