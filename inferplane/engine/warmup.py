"""A request built from a model's signature, run once before the model takes traffic."""

from __future__ import annotations

import numpy as np

from inferplane.repository.schema import ModelConfig
from inferplane.tensors import BYTES, dtype_of


def warmup_inputs(config: ModelConfig) -> dict[str, np.ndarray]:
    """One row per input: variable dims become 1, numbers are zero, strings are "0"."""
    inputs: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.datatype == BYTES:
            arr = np.empty(shape, dtype=object)
            arr.fill(b"0")
        else:
            arr = np.zeros(shape, dtype=dtype_of(spec.datatype))
        inputs[spec.name] = arr
    return inputs
