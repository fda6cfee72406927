"""PyTorch models: TorchScript (`.pt`, `.torchscript`) or torch.export programs (`.pt2`).

Inputs are passed positionally in model.yaml order; the result (a tensor, a tuple or list of
tensors, or a dict of tensors) maps to the declared outputs in order, or by key for a dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.export.passes import move_to_device_pass

from inferplane.errors import InternalError, RepositoryError
from inferplane.runtimes.base import Runtime, Signature, as_declared, threads_per_instance
from inferplane.tensors import TensorSpec

EXPORT_SUFFIX = ".pt2"
_TORCH_TYPES = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}
_BF16 = np.dtype(ml_dtypes.bfloat16)


def torch_device(device: str, cuda_available: bool) -> str:
    """The torch device for a model.yaml `device`, refusing CUDA where there is none."""
    if device != "cpu" and not cuda_available:
        raise RepositoryError(
            f"device '{device}' requested, but torch sees no CUDA GPU (a CPU-only torch build, "
            "or no GPU visible to this process); install a CUDA build of torch or set device: cpu"
        )
    return device


def _to_tensor(array: np.ndarray, device: str) -> torch.Tensor:
    # torch cannot share read-only buffers (request bodies) or negative strides, nor numpy bf16.
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")
    if array.dtype == _BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(array).to(device)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(_BF16)
    return tensor.numpy()


def _spec(name: str, value: Any) -> TensorSpec | None:
    """A signature entry from an export's fake tensor, the first dimension being the batch."""
    if not isinstance(value, torch.Tensor) or value.dtype not in _TORCH_TYPES:
        return None
    shape = [d if isinstance(d, int) else -1 for d in value.shape]
    return TensorSpec(name, _TORCH_TYPES[value.dtype], [-1, *shape[1:]] if shape else [])


def _specs(names: list[str], args: list[str], nodes: dict[str, Any]) -> list[TensorSpec] | None:
    """Specs for the graph values `args`, called `names`; None unless every one is a tensor."""
    specs = [
        _spec(n, nodes[a].meta.get("val")) for n, a in zip(names, args, strict=True) if a in nodes
    ]
    found = [s for s in specs if s is not None]
    return found if len(found) == len(args) else None


class TorchRuntime(Runtime):
    name = "torch"
    platform = "pytorch_torchscript"
    releases_gil = True
    artifact_suffixes = (".pt", EXPORT_SUFFIX, ".torchscript")

    @property
    def model_platform(self) -> str:
        return "pytorch_export" if self.artifact_path.endswith(EXPORT_SUFFIX) else self.platform

    def load(self) -> None:
        self.device = torch_device(self.config.device, torch.cuda.is_available())
        # Process-wide in torch: the last model loaded sets it for all.
        torch.set_num_threads(threads_per_instance(self.config))
        if self.artifact_path.endswith(EXPORT_SUFFIX):
            program = torch.export.load(self.artifact_path)
            if self.device != "cpu":
                program = move_to_device_pass(program, self.device)
            self.module: Any = program.module()
        else:
            try:
                self.module = torch.jit.load(self.artifact_path, map_location=self.device)
            except RuntimeError as exc:
                raise RepositoryError(
                    f"'{self.config.artifact}' is not a TorchScript file ({exc}); save models "
                    "with torch.jit.script(model).save(path) or torch.export.save(...) as .pt2"
                ) from None
            self.module.eval()
        self._inputs = [i.name for i in self.config.inputs]
        self._outputs = [o.name for o in self.config.outputs]

    def pickled_files(self) -> list[str]:
        # torch.export.load reads a .pt2's weights and constants with torch.load(weights_only=
        # False) (torch 2.13, pt2_archive/_package.py), which unpickles; TorchScript archives go
        # through torch's own restricted unpickler and are left out.
        return [self.config.artifact] if self.artifact_path.endswith(EXPORT_SUFFIX) else []

    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            result = self.module(*(_to_tensor(inputs[n], self.device) for n in self._inputs))
            if isinstance(result, dict):
                tensors = dict(result)
            else:
                flat = list(result) if isinstance(result, tuple | list) else [result]
                if len(flat) != len(self._outputs):
                    raise InternalError(
                        f"torch model '{self.config.name}' returned {len(flat)} tensors for "
                        f"{len(self._outputs)} declared outputs ({', '.join(self._outputs)})"
                    )
                tensors = dict(zip(self._outputs, flat, strict=True))
            names = list(outputs) if outputs else self._outputs
            missing = [n for n in names if not isinstance(tensors.get(n), torch.Tensor)]
            if missing:
                raise InternalError(
                    f"torch model '{self.config.name}' returned no tensor for "
                    f"{', '.join(missing)} (it returned {', '.join(map(str, tensors))})"
                )
            return as_declared(self.config, {n: _to_numpy(tensors[n]) for n in names}, names)

    def unload(self) -> None:
        self.module = None
        if getattr(self, "device", "cpu") != "cpu":
            torch.cuda.empty_cache()

    @classmethod
    def infer_signature(cls, artifact_path: str) -> Signature:
        """A `.pt2` program records its tensors; TorchScript does not, so the user names them."""
        if not artifact_path.endswith(EXPORT_SUFFIX):
            return Signature(None, None)
        program = torch.export.load(artifact_path)
        nodes = {node.name: node for node in program.graph.nodes}
        sig = program.graph_signature
        in_names = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
        out_args = [s.arg.name for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
        out_spec = program.call_spec.out_spec
        # A dict result is matched by key in predict, so its keys are the output names.
        if (
            out_spec is not None
            and out_spec.type is dict
            and len(out_spec.context) == len(out_args)
        ):
            out_names = [str(k) for k in out_spec.context]
        else:
            out_names = out_args
        return Signature(_specs(in_names, in_names, nodes), _specs(out_names, out_args, nodes))
