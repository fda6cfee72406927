"""ONNX models through ONNX Runtime (releases the GIL while it runs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from inferplane.errors import RepositoryError
from inferplane.runtimes.base import Runtime, Signature, threads_per_instance
from inferplane.tensors import TensorSpec, bytes_as_str

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def providers_for(device: str, available: Sequence[str]) -> list[Any]:
    """Execution providers for a model.yaml `device`; cuda:N pins the GPU by device_id."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RepositoryError(
            f"device '{device}' needs ONNX Runtime's CUDAExecutionProvider, which this install "
            f"lacks (available: {', '.join(available)}); install onnxruntime-gpu or set device: cpu"
        )
    device_id = int(device.split(":", 1)[1]) if ":" in device else 0
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def _specs(args: Sequence[Any], where: str) -> list[TensorSpec]:
    specs = []
    for arg in args:
        if arg.type not in _ORT_TYPES:
            raise RepositoryError(
                f"{where} '{arg.name}' has ONNX type {arg.type}, which is not a plain tensor; "
                "export the model with tensor outputs (e.g. skl2onnx option zipmap=False)"
            )
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or [])]
        specs.append(TensorSpec(arg.name, _ORT_TYPES[arg.type], shape))
    return specs


class OnnxRuntime(Runtime):
    name = "onnx"
    platform = "onnxruntime_onnx"
    releases_gil = True
    artifact_suffixes = (".onnx",)

    def load(self) -> None:
        self._open(threads_per_instance(self.config))

    def use_one_thread(self) -> None:
        if self.session.get_session_options().intra_op_num_threads != 1:
            self._open(1)

    def _open(self, intra_op_threads: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = int(self.option(self.config, "inter_op_threads", 1))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's pool threads busy-wait after each run by default. In a server that burns
        # the cores the event loop and the other requests need: measured on the example forest at
        # concurrency 32, turning it off gave +15-18 % throughput and a shorter tail, for about
        # +70 us at concurrency 1 (docs/runtimes.md). `options: {allow_spinning: true}` restores it.
        spin = "1" if self.option(self.config, "allow_spinning", False) else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        providers = providers_for(self.config.device, ort.get_available_providers())
        self.session = ort.InferenceSession(self.artifact_path, opts, providers=providers)
        self._string_inputs = {
            i.name for i in self.session.get_inputs() if i.type == "tensor(string)"
        }
        self._output_names = [o.name for o in self.session.get_outputs()]

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        feed = {
            k: (bytes_as_str(v) if k in self._string_inputs else v)  # ORT wants str, we hold bytes
            for k, v in inputs.items()
        }
        names = list(outputs) if outputs else self._output_names
        results = self.session.run(names, feed)
        return dict(zip(names, results, strict=True))

    def unload(self) -> None:
        del self.session

    @classmethod
    def infer_signature(cls, artifact_path: str) -> Signature:
        session = ort.InferenceSession(artifact_path, providers=["CPUExecutionProvider"])
        return Signature(
            _specs(session.get_inputs(), "input"), _specs(session.get_outputs(), "output")
        )
