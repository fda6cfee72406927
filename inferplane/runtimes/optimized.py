"""A version served from its optimized ONNX artifact, under the original model's signature.

`models register --optimize` stores a converted ONNX graph next to a scikit-learn, XGBoost or
LightGBM artifact once it has checked that both answer the same (`inferplane.repository.optimize`).
This adapter runs that graph with ONNX Runtime and presents exactly what the original runtime would:
the declared input names (stacked as feature columns, cast to the graph's input type), the declared
output names (mapped through `optimized.outputs`, a column picked where the original gives one
probability) and the declared datatypes and ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np

from inferplane.errors import RepositoryError
from inferplane.repository.schema import ModelConfig, Optimized
from inferplane.runtimes.base import Runtime, as_declared, feature_matrix
from inferplane.runtimes.onnx import OnnxRuntime

# The V2 platform of each runtime that can be optimized (kept here so that loading an optimized
# version never imports the original framework).
_PLATFORMS = {
    "sklearn": "sklearn_joblib",
    "xgboost": "xgboost_xgboost",
    "lightgbm": "lightgbm_lightgbm",
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def optimized_block(config: ModelConfig) -> Optimized:
    if config.optimized is None:
        raise RepositoryError(f"model '{config.name}' version {config.version} is not optimized")
    return config.optimized


class OptimizedRuntime(Runtime):
    name = "optimized"
    platform = "onnxruntime_onnx"
    releases_gil = True  # ONNX Runtime computes without the GIL

    def __init__(self, config: ModelConfig, local_dir: str) -> None:
        super().__init__(config, local_dir)
        self.block = optimized_block(config)
        self.onnx_path = os.path.join(local_dir, self.block.artifact)
        # The inner runtime sees the optimized artifact; threads, device and options stay the
        # version's own.
        inner = config.model_copy(
            update={"runtime": "onnx", "artifact": self.block.artifact, "optimized": None}
        )
        self.inner = OnnxRuntime(inner, local_dir)

    @property
    def model_platform(self) -> str:
        original = _PLATFORMS.get(self.config.runtime, self.config.runtime)
        return f"{original}+onnx"

    def load(self) -> None:
        config, block = self.config, self.block
        if block.artifact not in config.sha256:
            raise RepositoryError(
                f"model '{config.name}' version {config.version}: model.yaml records no sha256 for "
                f"the optimized artifact '{block.artifact}'; refusing to load an unchecked file"
            )
        unmapped = [o.name for o in config.outputs if o.name not in block.outputs]
        if unmapped:
            raise RepositoryError(
                f"model '{config.name}': optimized.outputs maps no source for declared output "
                f"{', '.join(unmapped)}"
            )
        self.inner.load()
        session = self.inner.session
        graph_inputs = session.get_inputs()
        if len(graph_inputs) != 1 or graph_inputs[0].type not in _ORT_DTYPES:
            raise RepositoryError(
                f"model '{config.name}': the optimized graph must take one numeric feature "
                f"matrix, it takes {', '.join(f'{i.name} ({i.type})' for i in graph_inputs)}"
            )
        self._feed_name = graph_inputs[0].name
        self._feed_dtype = np.dtype(_ORT_DTYPES[graph_inputs[0].type])
        available = {o.name for o in session.get_outputs()}
        missing = sorted({m.source for m in block.outputs.values()} - available)
        if missing:
            raise RepositoryError(
                f"model '{config.name}': the optimized graph has no output "
                f"{', '.join(missing)} (it gives {', '.join(sorted(available))})"
            )
        self._inputs = [i.name for i in config.inputs]
        # declared name -> (graph output, column or None, declared rank)
        self._plan = {
            o.name: (block.outputs[o.name].source, block.outputs[o.name].column, len(o.shape))
            for o in config.outputs
        }
        self._all = [o.name for o in config.outputs]

    def use_one_thread(self) -> None:
        self.inner.use_one_thread()

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        columns = [inputs[n] for n in self._inputs]
        x = feature_matrix(columns)
        x = x.astype(self._feed_dtype, copy=False)
        names = list(outputs) if outputs else self._all
        sources = list(dict.fromkeys(self._plan[n][0] for n in names))
        got = dict(zip(sources, self.inner.session.run(sources, {self._feed_name: x}), strict=True))
        results = {}
        for n in names:
            source, column, rank = self._plan[n]
            value = got[source]
            if column is not None:
                value = value[:, column]
            if value.ndim > rank and value.shape[-1] == 1:
                value = value.reshape(value.shape[:rank])  # a [N, 1] regressor output -> [N]
            results[n] = value
        return as_declared(self.config, results, names)

    def unload(self) -> None:
        with contextlib.suppress(AttributeError):
            self.inner.unload()

    def memory_bytes(self) -> int:
        """What is loaded: the ONNX graph, not the original artifact stored beside it."""
        try:
            return os.path.getsize(self.onnx_path)
        except OSError:
            return 0
