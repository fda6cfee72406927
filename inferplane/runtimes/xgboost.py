"""XGBoost boosters (JSON or UBJSON model files), run with `inplace_predict` (releases the GIL).

Outputs: `predict`, what the booster computes (probabilities for classifiers, values for
regressors), and for classification objectives `label`, the predicted class index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import xgboost as xgb

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

_SNIFF_BYTES = 4096


def _learner(booster: xgb.Booster) -> dict[str, Any]:
    learner: dict[str, Any] = json.loads(booster.save_config())["learner"]
    return learner


def _outputs(learner: dict[str, Any]) -> list[TensorSpec]:
    objective = learner["objective"]["name"]
    params = learner["learner_model_param"]
    num_class, num_target = int(params.get("num_class", 0)), int(params.get("num_target", 1))
    if objective == "multi:softprob":
        shape = [-1, num_class]
    elif num_target > 1:
        shape = [-1, num_target]
    else:
        shape = [-1]
    specs = [TensorSpec("predict", "FP32", shape)]
    if objective.startswith(("binary:", "multi:")):
        specs.append(TensorSpec("label", "INT64", [-1]))
    return specs


class XGBoostRuntime(Runtime):
    name = "xgboost"
    platform = "xgboost_xgboost"
    releases_gil = True
    artifact_suffixes = (".ubj", ".xgb")

    def load(self) -> None:
        self.booster = xgb.Booster(model_file=self.artifact_path)
        device = self.config.device
        self.booster.set_param({"nthread": threads_per_instance(self.config), "device": device})
        learner = _learner(self.booster)
        # XGBoost falls back to the CPU with only a warning when it finds no GPU.
        if device.startswith("cuda") and not learner["generic_param"]["device"].startswith("cuda"):
            raise RepositoryError(
                f"device '{device}' requested, but XGBoost found no usable CUDA GPU (is this "
                "xgboost build CUDA-enabled and the GPU visible?); set device: cpu"
            )
        self._objective: str = learner["objective"]["name"]
        check_outputs(self.config, [o.name for o in _outputs(learner)], self._objective)
        self._inputs = [i.name for i in self.config.inputs]

    def use_one_thread(self) -> None:
        self.booster.set_param({"nthread": 1})

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        columns = [inputs[n] for n in self._inputs]
        x = feature_matrix(columns)
        result = np.asarray(self.booster.inplace_predict(x))
        results = {"predict": result}
        if self._objective == "multi:softprob":
            results["label"] = result.argmax(axis=-1)
        elif self._objective == "multi:softmax":
            results["label"] = result
        elif self._objective.startswith("binary:"):
            # logitraw gives margins, whose decision boundary is 0, not 0.5.
            results["label"] = result > (0.0 if self._objective == "binary:logitraw" else 0.5)
        names = list(outputs) if outputs else [o.name for o in self.config.outputs]
        return as_declared(self.config, results, names)

    def unload(self) -> None:
        self.booster = None  # type: ignore[assignment]

    @classmethod
    def infer_signature(cls, artifact_path: str) -> Signature:
        booster = xgb.Booster(model_file=artifact_path)
        inputs = [TensorSpec("input", "FP32", [-1, booster.num_features()])]
        return Signature(inputs, _outputs(_learner(booster)))

    @classmethod
    def sniff(cls, artifact_path: str) -> bool:
        if super().sniff(artifact_path):
            return True
        if not artifact_path.endswith(".json") or not os.path.isfile(artifact_path):
            return False
        with open(artifact_path, "rb") as fh:
            return b'"learner"' in fh.read(_SNIFF_BYTES)
