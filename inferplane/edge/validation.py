"""Validate request tensors against a model signature, with messages a caller can act on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from inferplane.errors import BadRequest
from inferplane.repository.schema import ModelConfig
from inferplane.tensors import DATATYPE_TO_DTYPE, datatype_of


def validate_inputs(
    config: ModelConfig, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
) -> None:
    if _plainly_valid(config, inputs, outputs):
        return
    _check(config, inputs, outputs)


def _plainly_valid(
    config: ModelConfig, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
) -> bool:
    """The common request, accepted in a few comparisons: one declared input of the declared
    numpy dtype and shape, declared outputs. Anything else gets the full check and its message."""
    if outputs:
        known = [t.name for t in config.outputs]
        if any(n not in known for n in outputs):
            return False
    specs = config.inputs
    if len(specs) != 1 or len(inputs) != 1:
        return False
    spec = specs[0]
    arr = inputs.get(spec.name)
    if arr is None or arr.dtype != DATATYPE_TO_DTYPE.get(spec.datatype):
        return False
    shape = arr.shape
    want = spec.shape
    if len(shape) != len(want):
        return False
    return all(d == -1 or d == s for d, s in zip(want, shape, strict=True))


def _check(
    config: ModelConfig, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
) -> None:
    model = f"model '{config.name}' version {config.version}"
    declared = {t.name: t for t in config.inputs}
    unknown = [n for n in inputs if n not in declared]
    if unknown:
        raise BadRequest(
            f"{model} has no input named {', '.join(repr(n) for n in unknown)}; "
            f"inputs are {', '.join(declared)}"
        )
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise BadRequest(f"{model}: missing input {', '.join(repr(n) for n in missing)}")
    batch: int | None = None
    for name, spec in declared.items():
        arr = inputs[name]
        datatype = datatype_of(arr)
        if datatype != spec.datatype:
            raise BadRequest(
                f"{model}: input '{name}' has datatype {datatype}, the model expects {spec.datatype}"
            )
        shape = arr.shape
        if len(shape) != len(spec.shape) or any(
            d != -1 and d != s for d, s in zip(spec.shape, shape, strict=True)
        ):
            raise BadRequest(
                f"{model}: input '{name}' has shape {list(shape)}, the model expects "
                f"{list(spec.shape)} (-1 = any size)"
            )
        if spec.shape and spec.shape[0] == -1 and len(declared) > 1:
            if batch is not None and shape[0] != batch:
                raise BadRequest(
                    f"{model}: inputs disagree on the batch size ({batch} vs {shape[0]})"
                )
            batch = shape[0]
    if outputs:
        known = [t.name for t in config.outputs]
        bad = [n for n in outputs if n not in known]
        if bad:
            raise BadRequest(
                f"{model} has no output named {', '.join(repr(n) for n in bad)}; "
                f"outputs are {', '.join(known)}"
            )
