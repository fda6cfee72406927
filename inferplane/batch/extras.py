"""Optional packages the batch job needs, with an install hint instead of an ImportError."""

from __future__ import annotations

from types import ModuleType

from inferplane.errors import MissingExtra


def require_pyarrow() -> ModuleType:
    try:
        import pyarrow
        import pyarrow.dataset  # the part the readers use
    except ImportError:
        raise MissingExtra("pyarrow", "batch") from None
    return pyarrow


def require_ray() -> ModuleType:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtra("ray[data]", "ray") from None
    return ray
