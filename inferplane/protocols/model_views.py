"""Model descriptions shared by REST and gRPC: V2 metadata, Triton-style config, repository index."""

from __future__ import annotations

import asyncio
from typing import Any

from inferplane.engine.manager import LoadedVersion, ModelEntry, ModelManager, State
from inferplane.errors import BadRequest, CataloguePending, InferplaneError, NotFound
from inferplane.repository.schema import ModelConfig, TensorDecl
from inferplane.routing.router import Router

TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def model_metadata(entry: ModelEntry, lv: LoadedVersion) -> dict[str, Any]:
    config = lv.config
    return {
        "name": config.name,
        "versions": [str(v) for v in sorted(entry.versions)],
        "platform": lv.platform or config.runtime,
        "inputs": [t.spec().as_dict() for t in config.inputs],
        "outputs": [t.spec().as_dict() for t in config.outputs],
        "parameters": {"version": str(config.version), "runtime": config.runtime},
    }


def _triton_tensor(t: TensorDecl, batched: bool) -> dict[str, Any]:
    dims = t.shape[1:] if batched and t.shape else t.shape
    return {"name": t.name, "data_type": TRITON_TYPES[t.datatype], "dims": list(dims)}


def model_config(config: ModelConfig, platform: str) -> dict[str, Any]:
    """The model configuration extension in Triton's shape (perf_analyzer reads it at start)."""
    batched = config.max_batch_size > 0
    doc: dict[str, Any] = {
        "name": config.name,
        "platform": platform or config.runtime,
        "backend": config.runtime,
        "version_policy": {"specific": {"versions": [config.version]}},
        "max_batch_size": config.max_batch_size,
        "input": [_triton_tensor(t, batched) for t in config.inputs],
        "output": [_triton_tensor(t, batched) for t in config.outputs],
        "instance_group": [
            {
                "name": f"{config.name}_0",
                "count": config.instances,
                "kind": "KIND_GPU" if config.device.startswith("cuda") else "KIND_CPU",
            }
        ],
        "parameters": {k: {"string_value": str(v)} for k, v in config.metadata.items()},
    }
    if config.batching is not None and config.batching.enabled:
        doc["dynamic_batching"] = {
            "preferred_batch_size": config.batching.preferred_batch_sizes,
            "max_queue_delay_microseconds": config.batching.max_queue_delay_us,
        }
    return doc


def repository_index(
    names_in_repository: list[str],
    loaded: dict[str, ModelEntry],
    ready_only: bool,
    unread: dict[str, list[int]] | None = None,
) -> list[dict[str, Any]]:
    """Triton's index rows; `unread`: listed models whose model.yaml is not read yet."""
    rows: list[dict[str, Any]] = []
    unread = unread or {}
    for name in sorted(set(names_in_repository) | set(loaded) | set(unread)):
        entry = loaded.get(name)
        if entry is None and name in unread:
            rows.extend(
                {"name": name, "version": str(v), "state": "UNLOADED", "reason": ""}
                for v in unread[name]
            )
            continue
        if entry is None:
            rows.append({"name": name, "state": "UNLOADED", "reason": "not served (see --model)"})
            continue
        for number, lv in sorted(entry.versions.items()):
            rows.append(
                {"name": name, "version": str(number), "state": lv.state.value, "reason": lv.reason}
            )
    if ready_only:
        rows = [r for r in rows if r["state"] == "READY"]
    return rows


# Request logic shared by the REST and gRPC front ends, so that both answer alike.


def model_ready(router: Router, name: str, version: str | None) -> bool:
    """Is the version `router` would serve loaded, or loadable by a request now (on demand,
    evicted)? Only an unknown model or version is an error (NotFound); failed or unloaded
    versions are simply not ready."""
    try:
        lv, _ = router.resolve(name, version)
    except (NotFound, CataloguePending):  # the front end reads a pending model.yaml and asks again
        raise
    except InferplaneError:
        return False
    return router.manager.servable(lv)


def statistics(
    manager: ModelManager, name: str | None, version: str | None
) -> list[dict[str, Any]]:
    """Statistics rows (VersionStats.as_dict) of one model, or of every model when `name` is
    empty; `version` narrows to one version, which must then exist."""
    rows: list[dict[str, Any]] = []
    names = [name] if name else sorted(manager.models)
    for model in names:
        entry = manager.entry(model) if name else manager.models[model]
        for number, lv in sorted(entry.versions.items()):
            if version is not None and str(number) != version:
                continue
            rows.append(lv.stats.as_dict(model, str(number)))
    if name and version is not None and not rows:
        raise NotFound(f"model '{name}' has no version {version}")
    return rows


async def list_repository(manager: ModelManager, ready_only: bool) -> list[dict[str, Any]]:
    """The repository index: every model in the repository or loaded, with its state."""
    names = await asyncio.to_thread(manager.repository_models)
    return repository_index(names, manager.models, ready_only, dict(manager.unread))


async def load_model(manager: ModelManager, name: str) -> ModelEntry:
    """(Re)load `name`; BadRequest (Triton's choice for load failures) unless a version is ready."""
    try:
        entry = await manager.load_model(name)
    except NotFound as exc:
        raise BadRequest(exc.message) from None
    if not any(lv.state is State.READY for lv in entry.versions.values()):
        reasons = "; ".join(f"v{v}: {lv.reason}" for v, lv in sorted(entry.versions.items()))
        raise BadRequest(f"failed to load '{name}': {reasons or 'no versions'}")
    return entry
