"""scikit-learn estimators and pipelines saved with joblib.

Each output is named after the estimator method that computes it: `predict`, `predict_proba`,
`decision_function`, `transform`, ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import joblib
import numpy as np
import sklearn  # noqa: F401  # a missing scikit-learn is reported here, as the extra to install

from inferplane.errors import RepositoryError
from inferplane.runtimes.base import Runtime, Signature, as_declared, feature_matrix
from inferplane.tensors import BYTES, TensorSpec, bytes_as_str

# Methods that change the model or need labels: never reachable through an output name.
_NOT_OUTPUTS = ("_", "fit", "partial_fit", "set_")


def _label_datatype(classes: np.ndarray) -> str:
    kind = np.asarray(classes).dtype.kind
    return {"i": "INT64", "u": "INT64", "b": "BOOL", "f": "FP64"}.get(kind, BYTES)


class SklearnRuntime(Runtime):
    name = "sklearn"
    platform = "sklearn_joblib"
    # Most estimators run in Python between short native calls: threads would only contend.
    releases_gil = False
    artifact_suffixes = (".joblib", ".pkl")

    def load(self) -> None:
        if self.config.device != "cpu":
            raise RepositoryError(
                f"device '{self.config.device}': scikit-learn runs on the CPU only; set device: cpu"
            )
        self.model = joblib.load(self.artifact_path)
        self._methods: dict[str, Callable[[Any], Any]] = {}
        for out in self.config.outputs:
            # getattr with a default: available_if properties raise AttributeError when absent.
            method = getattr(self.model, out.name, None)
            if out.name.startswith(_NOT_OUTPUTS) or out.name == "score" or not callable(method):
                raise RepositoryError(
                    f"sklearn model '{self.config.name}': output '{out.name}' must name a method "
                    f"of {type(self.model).__name__} that takes the features, such as predict, "
                    "predict_proba, decision_function or transform"
                )
            self._methods[out.name] = method
        self._inputs = [(i.name, i.datatype == BYTES) for i in self.config.inputs]

    def pickled_files(self) -> list[str]:
        return [self.config.artifact]  # joblib files are pickles, whatever their suffix

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        columns = [bytes_as_str(inputs[n]) if text else inputs[n] for n, text in self._inputs]
        x = feature_matrix(columns)
        names = list(outputs) if outputs else list(self._methods)
        return as_declared(self.config, {n: self._methods[n](x) for n in names}, names)

    def unload(self) -> None:
        self.model = None
        self._methods = {}

    @classmethod
    def infer_signature(cls, artifact_path: str) -> Signature:
        model = joblib.load(artifact_path)
        n_features = getattr(model, "n_features_in_", None)
        inputs = [TensorSpec("input", "FP64", [-1, int(n_features)])] if n_features else None
        classes = getattr(model, "classes_", None)  # classifiers, and pipelines ending in one
        outputs = []
        if hasattr(model, "predict"):
            datatype = "FP64" if classes is None else _label_datatype(classes)
            outputs.append(TensorSpec("predict", datatype, [-1]))
        if classes is not None and hasattr(model, "predict_proba"):
            outputs.append(TensorSpec("predict_proba", "FP64", [-1, len(classes)]))
        if not outputs and hasattr(model, "transform"):
            outputs.append(TensorSpec("transform", "FP64", [-1, -1]))
        return Signature(inputs, outputs or None)
