"""LightGBM boosters (text model files); prediction runs in C++ without the GIL.

Outputs: `predict`, what the booster computes (probabilities for classifiers, values for
regressors), and for classification objectives `label`, the predicted class index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightgbm as lgb
import numpy as np

from inferplane.errors import RepositoryError
from inferplane.runtimes.base import (
    Runtime,
    Signature,
    as_declared,
    check_outputs,
    feature_matrix,
    threads_per_instance,
)
from inferplane.tensors import TensorSpec

_CLASSIFIERS = ("binary", "multiclass", "multiclassova")


def _objective(booster: lgb.Booster) -> str:
    """The canonical objective name (the model's parameters may hold an alias such as softmax)."""
    # Dumping one iteration is enough for the header and cheap whatever the model's size.
    objective: str = booster.dump_model(num_iteration=1).get("objective", "")
    return objective.split(" ", 1)[0]


def _outputs(booster: lgb.Booster, objective: str) -> list[TensorSpec]:
    per_row = booster.num_model_per_iteration()
    specs = [TensorSpec("predict", "FP64", [-1, per_row] if per_row > 1 else [-1])]
    if objective in _CLASSIFIERS:
        specs.append(TensorSpec("label", "INT64", [-1]))
    return specs


class LightGBMRuntime(Runtime):
    name = "lightgbm"
    platform = "lightgbm_lightgbm"
    releases_gil = True
    artifact_suffixes = (".lgb",)

    def load(self) -> None:
        if self.config.device != "cpu":
            raise RepositoryError(
                f"device '{self.config.device}': LightGBM predicts on the CPU only; set device: cpu"
            )
        self.booster = lgb.Booster(model_file=self.artifact_path)
        self._objective = _objective(self.booster)
        available = [o.name for o in _outputs(self.booster, self._objective)]
        check_outputs(self.config, available, f"LightGBM {self._objective or 'custom'}")
        self._threads = threads_per_instance(self.config)
        self._inputs = [i.name for i in self.config.inputs]

    def use_one_thread(self) -> None:
        self._threads = 1

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        columns = [inputs[n] for n in self._inputs]
        x = feature_matrix(columns)
        result = np.asarray(
            self.booster.predict(x.astype(np.float64, copy=False), num_threads=self._threads)
        )
        results = {"predict": result}
        if self._objective in _CLASSIFIERS:
            results["label"] = result.argmax(axis=1) if result.ndim == 2 else result > 0.5
        names = list(outputs) if outputs else [o.name for o in self.config.outputs]
        return as_declared(self.config, results, names)

    def unload(self) -> None:
        self.booster = None  # type: ignore[assignment]

    @classmethod
    def infer_signature(cls, artifact_path: str) -> Signature:
        booster = lgb.Booster(model_file=artifact_path)
        inputs = [TensorSpec("input", "FP64", [-1, booster.num_feature()])]
        return Signature(inputs, _outputs(booster, _objective(booster)))

    @classmethod
    def sniff(cls, artifact_path: str) -> bool:
        if super().sniff(artifact_path):
            return True
        if not artifact_path.endswith(".txt") or not os.path.isfile(artifact_path):
            return False
        with open(artifact_path, "rb") as fh:
            return fh.readline(64).strip() == b"tree"
