"""`inferplane models register`: copy an artifact into the repository as a new immutable version."""

from __future__ import annotations

import os
import re
import tempfile
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from inferplane.errors import RepositoryError, VersionTaken
from inferplane.repository.optimize import OPTIMIZED_ARTIFACT, OptimizeOptions, optimize_version
from inferplane.repository.schema import (
    Batching,
    ModelConfig,
    TensorDecl,
    check_model_name,
    describe,
)
from inferplane.repository.store import Repository
from inferplane.runtimes import get_runtime, guess_runtime
from inferplane.tensors import TensorSpec

_TENSOR_ARG = re.compile(r"^([^:]+):([A-Z0-9]+):(-?\d+(?:,-?\d+)*)?$")


def parse_tensor_arg(text: str) -> TensorSpec:
    """`name:DTYPE:d1,d2` (e.g. `input:FP32:-1,32`) -> TensorSpec."""
    m = _TENSOR_ARG.match(text.strip())
    if not m:
        raise RepositoryError(
            f"tensor '{text}': expected name:DATATYPE:shape, e.g. input:FP32:-1,32"
        )
    name, datatype, dims = m.groups()
    shape = [int(d) for d in dims.split(",")] if dims else []
    try:
        return TensorDecl(name=name, datatype=datatype, shape=shape).spec()
    except ValidationError as exc:
        raise RepositoryError(f"tensor '{text}': {describe(exc)}") from None


def _collect_files(artifact: str) -> tuple[str, dict[str, str]]:
    """(artifact name inside the version folder, {relative name: source path})."""
    artifact = os.path.abspath(artifact)
    if not os.path.exists(artifact):
        raise RepositoryError(f"artifact '{artifact}' does not exist")
    if os.path.isfile(artifact):
        name = os.path.basename(artifact)
        return name, {name: artifact}
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(artifact):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            src = os.path.join(dirpath, fn)
            files[os.path.relpath(src, os.path.dirname(artifact))] = src
    if not files:
        raise RepositoryError(f"artifact folder '{artifact}' is empty")
    return os.path.basename(artifact), files


def register(
    repository: Repository,
    name: str,
    artifact: str,
    *,
    runtime: str | None = None,
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    batching: Batching | None = None,
    instances: int = 1,
    instance_kind: str = "auto",
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    version: int | None = None,
    optimize: OptimizeOptions | None = None,
    residency: str | None = None,
    idle_unload_s: float | None = None,
    memory: int | str | None = None,
) -> ModelConfig:
    """Add `artifact` (a file, or a folder for multi-file models) as the next version of `name`.

    With `optimize`, a scikit-learn, XGBoost or LightGBM model is also converted to ONNX and checked
    against the original (`repository.optimize`): both artifacts are stored, `optimized` in
    model.yaml says which one serves, and `metadata.optimization` holds the check's figures or the
    reason the original serves as it is.

    `residency` (pinned or on_demand), `idle_unload_s` and `memory` (bytes, or a size such as
    "512MiB": `resources.memory`) go into model.yaml as given; unset, the server decides.
    """
    check_model_name(name)  # before anything opens the artifact
    art_name, files = _collect_files(artifact)
    runtime = runtime or guess_runtime(os.path.abspath(artifact))
    if runtime is None:
        raise RepositoryError(
            f"cannot tell the runtime of '{artifact}'; pass --runtime "
            "(onnx, sklearn, xgboost, lightgbm, torch, python)"
        )
    runtime_cls = get_runtime(runtime)
    if inputs is None or outputs is None:
        found = runtime_cls.infer_signature(os.path.abspath(artifact))
        inputs = inputs if inputs is not None else found.inputs
        outputs = outputs if outputs is not None else found.outputs
    missing = [what for what, v in (("--input", inputs), ("--output", outputs)) if not v]
    if missing:
        raise RepositoryError(
            f"the {runtime} artifact does not describe its signature; pass "
            f"{' and '.join(missing)} name:DATATYPE:shape (e.g. --input input:FP32:-1,32)"
        )
    existing = repository.list_versions(name)
    new_version = version if version is not None else (existing[-1] + 1 if existing else 1)
    config = ModelConfig.checked(
        f"{name} version {new_version}",
        name=name,
        version=new_version,
        runtime=runtime,
        artifact=art_name,
        inputs=[TensorDecl(**t.as_dict()) for t in inputs or []],
        outputs=[TensorDecl(**t.as_dict()) for t in outputs or []],
        batching=batching,
        instances=instances,
        instance_kind=instance_kind,
        device=device,
        options=options or {},
        residency=residency,
        idle_unload_s=idle_unload_s,
        resources=None if memory is None else {"memory": memory},
        metadata={
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **(metadata or {}),
        },
    )
    if optimize is None:
        return _commit(repository, config, files, auto_version=version is None)
    return _add_optimized(
        repository, config, files, os.path.abspath(artifact), optimize, version is None
    )


def _commit(
    repository: Repository, config: ModelConfig, files: dict[str, str], auto_version: bool
) -> ModelConfig:
    """Write the version; a number chosen for the caller moves on when a racing registration
    took it first (an explicit `version` is the caller's to pick again)."""
    for _ in range(64):
        try:
            return repository.add_version(config, files)
        except VersionTaken:
            if not auto_version:
                raise
            config = config.model_copy(update={"version": config.version + 1})
    raise RepositoryError(f"model '{config.name}': no free version number after 64 tries")


def _add_optimized(
    repository: Repository,
    config: ModelConfig,
    files: dict[str, str],
    artifact: str,
    options: OptimizeOptions,
    auto_version: bool,
) -> ModelConfig:
    stem, n = OPTIMIZED_ARTIFACT.removesuffix(".onnx"), 1
    name = OPTIMIZED_ARTIFACT
    while name in files or name == config.artifact:
        n += 1
        name = f"{stem}-{n}.onnx"
    with tempfile.TemporaryDirectory(prefix="inferplane-optimize-") as workdir:
        result = optimize_version(config, os.path.dirname(artifact), workdir, options, name)
        metadata = {**config.metadata, "optimization": result.report}
        config = config.model_copy(update={"optimized": result.block, "metadata": metadata})
        if result.block is not None and result.onnx_path is not None:
            files = {**files, result.block.artifact: result.onnx_path}
        # Re-validated: what is written is what a reader will accept.
        config = ModelConfig.checked(
            f"{config.name} version {config.version}", **config.model_dump(exclude_none=True)
        )
        return _commit(repository, config, files, auto_version)
