"""The one interface every framework runtime implements, and what the engine may ask of it."""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from inferplane.errors import RepositoryError
from inferplane.repository.schema import ModelConfig
from inferplane.tensors import BYTES, DATATYPE_TO_DTYPE, TensorSpec

log = logging.getLogger("inferplane.engine")
# What `inferplane serve --pickles` may say about artifacts that are unpickled when loaded.
PICKLE_POLICIES = ("warn", "allow", "refuse")
SECURITY_DOCS = "docs/security.md"


@dataclass(slots=True)
class Signature:
    """What registration could learn from an artifact; None entries must come from the user."""

    inputs: list[TensorSpec] | None
    outputs: list[TensorSpec] | None


class Runtime(ABC):
    """Loads one model version and runs it on a dict of numpy arrays.

    `predict` is called from an instance thread, or from the event loop for a `loop_safe` runtime
    that measured fast enough (engine/warmup.py), with inputs already validated against the
    signature. It returns every output it can, or those in `outputs`.
    """

    name: ClassVar[str]
    platform: ClassVar[str]  # the V2 `platform` string, e.g. onnx_onnxv1
    releases_gil: ClassVar[bool] = True  # may the engine run several instances in threads?
    # may a fast model run on the event loop? Not when predict may block on I/O or other processes
    loop_safe: ClassVar[bool] = True
    artifact_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig, local_dir: str) -> None:
        self.config = config
        self.local_dir = local_dir
        self.artifact_path = os.path.join(local_dir, config.artifact)

    @property
    def model_platform(self) -> str:
        """The V2 platform of this loaded model (a runtime serving several formats refines it)."""
        return self.platform

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def predict(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]: ...

    def pickled_files(self) -> list[str]:
        """The files (relative to the version folder) that `load` unpickles. Unpickling runs
        whatever code the file carries, so these fall under `--pickles` (see check_pickles)."""
        return []

    def use_one_thread(self) -> None:  # noqa: B027 - optional hook
        """Compute on the calling thread only (no intra-op pool). Executions on the event loop
        take microseconds, where waking pool threads costs more than it saves."""

    def unload(self) -> None:  # noqa: B027 - optional hook, most runtimes need nothing
        """Drop references so that memory can be returned; subclasses free native handles."""

    def memory_bytes(self) -> int:
        """Estimated resident size once loaded; the artifact's size unless a runtime knows better."""
        total = 0
        for rel in self.config.sha256:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(self.local_dir, rel))
        return total

    @classmethod
    def infer_signature(cls, artifact_path: str) -> Signature:
        """Read the signature from the artifact where the format allows; default: nothing known."""
        return Signature(None, None)

    @classmethod
    def sniff(cls, artifact_path: str) -> bool:
        """Does this file look like one of ours? Used to pick a runtime at registration."""
        return artifact_path.endswith(cls.artifact_suffixes) if cls.artifact_suffixes else False

    @staticmethod
    def option(config: ModelConfig, key: str, default: Any) -> Any:
        return config.options.get(key, default)


def feature_matrix(columns: Sequence[np.ndarray]) -> np.ndarray:
    """The declared inputs, in order, as one feature matrix: a single input as it is, several as
    its columns (or column blocks)."""
    return columns[0] if len(columns) == 1 else np.column_stack(columns)


def threads_per_instance(config: ModelConfig) -> int:
    """Intra-op threads for one instance so that all instances together fit the cores."""
    explicit = config.options.get("intra_op_threads")
    if explicit:
        return int(explicit)
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return max(1, cores // config.instances)


def as_datatype(value: Any, datatype: str) -> np.ndarray:
    """`value` as an array of a V2 datatype's dtype; BYTES is an object array of `bytes`."""
    array = np.asarray(value)
    if datatype != BYTES:
        return array.astype(DATATYPE_TO_DTYPE[datatype], copy=False)
    flat = [bytes(v) if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def as_declared(
    config: ModelConfig, results: dict[str, Any], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The outputs `names` of `results`, each in the datatype model.yaml declares for it."""
    datatypes = {o.name: o.datatype for o in config.outputs}
    return {n: as_datatype(results[n], datatypes[n]) for n in names}


def check_outputs(config: ModelConfig, available: Sequence[str], what: str) -> None:
    """Refuse at load time a model.yaml that declares an output the model cannot produce."""
    unknown = [o.name for o in config.outputs if o.name not in available]
    if unknown:
        raise RepositoryError(
            f"model '{config.name}' declares output {', '.join(unknown)}, but a {what} model "
            f"only gives {', '.join(available)}"
        )


def check_pickles(runtime: Runtime, policy: str) -> None:
    """Apply the server's `--pickles` policy to a runtime about to load: `allow` says nothing,
    `warn` logs one warning naming each pickled file and its sha256 pin, `refuse` raises
    RepositoryError (the version is then unavailable with that reason; other models serve).

    Called once per version in the server process, before any worker process loads it."""
    files = runtime.pickled_files()
    if not files or policy == "allow":
        return
    config = runtime.config
    named = ", ".join(repr(f) for f in files)
    if policy == "refuse":
        raise RepositoryError(
            f"refused to load pickled artifact {named}: the server runs with --pickles refuse, "
            "and unpickling runs any code the file carries. Register a format that holds no "
            "code (ONNX: models register --optimize), or serve it with --pickles warn if you "
            f"trust the file; see {SECURITY_DOCS}"
        )
    pins = "; ".join(
        f"{f}: sha256 {config.sha256[f][:12]}... pinned in model.yaml, verified before loading"
        if f in config.sha256
        else f"{f}: no sha256 pin in model.yaml"
        for f in files
    )
    log.warning(
        "model %s version %s loads pickled artifact %s (%s): unpickling runs any code the file "
        "carries, so serve only artifacts you trust; see %s (--pickles allow silences this, "
        "--pickles refuse blocks pickled artifacts)",
        config.name,
        config.version,
        named,
        pins,
        SECURITY_DOCS,
    )
