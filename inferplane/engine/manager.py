"""The model manager: which versions are loaded, their state, and running them off the event loop.

Loading a version = fetch artifact -> verify sha256 -> the --pickles policy -> runtime.load ->
warm-up -> READY. A version that fails any step is UNAVAILABLE with the reason, and every other
model keeps serving. Model code runs in each version's Scheduler (its instance threads, with
batching), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from inferplane.engine.process_runtime import ProcessRuntime, uses_processes
from inferplane.engine.residency import ResidencyOptions
from inferplane.engine.scheduler import Scheduler
from inferplane.engine.stats import ExecutionTiming, VersionStats
from inferplane.engine.warmup import warm_up
from inferplane.errors import (
    InferplaneError,
    InternalError,
    NotFound,
    Unavailable,
)
from inferplane.observability.metrics import Metrics, VersionMetrics
from inferplane.repository.schema import ModelConfig, check_model_name
from inferplane.repository.store import Repository, verify
from inferplane.runtimes import Runtime, create_runtime
from inferplane.runtimes.base import PICKLE_POLICIES, check_pickles

log = logging.getLogger("inferplane.engine")


class State(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load; `reason` says why
    UNLOADED = "UNLOADED"


@dataclass(eq=False)
class LoadedVersion:
    config: ModelConfig
    state: State = State.LOADING
    reason: str = ""
    runtime: Runtime | None = None
    scheduler: Scheduler | None = None
    stats: VersionStats = field(default_factory=VersionStats)
    platform: str = ""
    observe: VersionMetrics | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return str(self.config.version)


@dataclass
class ModelEntry:
    """All versions of one model name, plus its aliases as of the last (re)load."""

    name: str
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    unloaded: bool = False
    reason: str = ""


class ModelManager:
    def __init__(
        self,
        repository: Repository,
        metrics: Metrics,
        models: Sequence[str] | None = None,
        strict_readiness: bool = False,
        pickles: str = "warn",
        residency: ResidencyOptions | None = None,
    ) -> None:
        if pickles not in PICKLE_POLICIES:
            raise ValueError(f"pickles is one of {', '.join(PICKLE_POLICIES)}, not {pickles!r}")
        self.residency = residency or ResidencyOptions()
        self.pickles = pickles  # what loading a pickled artifact does (runtimes.base.check_pickles)
        self.repository = repository
        self.metrics = metrics
        self.selected = list(models) if models else None
        self.strict_readiness = strict_readiness
        # Inference requests inside the protocol handlers right now (the batcher's hint that
        # more work may still arrive); only the event loop thread changes it.
        self.inflight = 0
        self.models: dict[str, ModelEntry] = {}
        self.started = False  # the initial load has finished (successfully or not)
        self._lock = asyncio.Lock()
        self._repo_lock = threading.Lock()  # fsspec filesystems are not all thread-safe

    # loading -----------------------------------------------------------------------------
    async def load_initial(self) -> None:
        """Load every selected model; one failing model never stops the others."""
        names: list[str] = []
        try:
            names = (
                self.selected if self.selected else await asyncio.to_thread(self.repository_models)
            )
        except InferplaneError as exc:
            log.error("cannot list the repository: %s", exc.message)
        for name in names:
            try:
                await self.load_model(name)
            except InferplaneError as exc:
                log.error("model %s: %s", name, exc.message)
        self.started = True

    def repository_models(self) -> list[str]:
        """Model names in the repository, loaded or not (blocking I/O: call it in a thread)."""
        with self._repo_lock:
            return self.repository.list_models()

    async def load_model(self, name: str) -> ModelEntry:
        """(Re)load all versions of `name`; old versions keep serving until the new ones are ready."""
        async with self._lock:
            configs, aliases = await asyncio.to_thread(self._read_model, name)
            entry = self.models.get(name)
            new_entry = ModelEntry(name=name, aliases=aliases)
            for config in configs:
                lv = LoadedVersion(config=config)
                new_entry.versions[config.version] = lv
            if entry is None or entry.unloaded:
                self.models[name] = new_entry  # visible as LOADING while it loads
            for lv in new_entry.versions.values():
                await self._load_version(lv)
            self.models[name] = new_entry
            if entry is not None:
                for old in entry.versions.values():
                    if old not in new_entry.versions.values():
                        self._retire(old)
            return new_entry

    def _read_model(self, name: str) -> tuple[list[ModelConfig], dict[str, int]]:
        with self._repo_lock:
            versions = self.repository.list_versions(name)
            if not versions:
                raise NotFound(f"unknown model '{name}' in repository {self.repository.url}")
            configs = []
            for v in versions:
                try:
                    configs.append(self.repository.read_config(name, v))
                except InferplaneError as exc:
                    # A broken model.yaml takes out its version only.
                    log.error("model %s version %s: %s", name, v, exc.message)
            return configs, self.repository.aliases(name)

    async def _load_version(self, lv: LoadedVersion) -> None:
        started = time.perf_counter()
        labels = (lv.name, lv.version)
        try:
            runtime, on_loop = await asyncio.to_thread(self._load_runtime, lv.config)
        except InferplaneError as exc:
            lv.state, lv.reason = State.UNAVAILABLE, exc.message
        except Exception as exc:  # a framework's own error while loading a bad artifact
            lv.state, lv.reason = State.UNAVAILABLE, f"load failed: {type(exc).__name__}: {exc}"
        else:
            lv.runtime, lv.platform = runtime, runtime.model_platform
            lv.observe = VersionMetrics(self.metrics, lv.name, lv.version)
            lv.scheduler = Scheduler(
                runtime,
                lv.config,
                self._recorder(lv),
                arrivals_hint=lambda: self.inflight,
                on_loop=on_loop,
            )
            lv.state = State.READY
        if lv.state is State.READY:
            log.info(
                "model %s version %s ready in %.2fs (executions on %s)",
                *labels,
                time.perf_counter() - started,
                _placement(lv),
            )
        else:
            log.error("model %s version %s unavailable: %s", *labels, lv.reason)
        self.metrics.model_ready.labels(*labels).set(1 if lv.state is State.READY else 0)
        self.metrics.model_load_seconds.labels(*labels).set(time.perf_counter() - started)

    def _load_runtime(self, config: ModelConfig) -> tuple[Runtime, bool]:
        """The loaded, warmed-up runtime, and whether its executions run on the event loop."""
        with self._repo_lock:
            local_dir = self.repository.fetch(config)
        verify(config, local_dir)
        runtime = create_runtime(config, local_dir)
        check_pickles(runtime, self.pickles)  # here, once: worker processes load it again
        if uses_processes(config, runtime):
            runtime = ProcessRuntime(runtime)
        runtime.load()
        try:
            on_loop = warm_up(runtime, config)
        except Exception as exc:
            runtime.unload()
            raise InternalError(f"warm-up failed: {type(exc).__name__}: {exc}") from exc
        return runtime, on_loop

    async def unload_model(self, name: str) -> None:
        check_model_name(name)  # the same 400 as load for a name that no repository can hold
        async with self._lock:
            entry = self.models.get(name)
            if entry is None or entry.unloaded:
                raise NotFound(f"model '{name}' is not loaded")
            entry.unloaded = True
            for lv in entry.versions.values():
                self._retire(lv)

    def _retire(self, lv: LoadedVersion) -> None:
        """Stop new work; queued and running requests finish, then the runtime is unloaded."""
        if lv.state is State.UNLOADED:
            return
        lv.state = State.UNLOADED
        self.metrics.model_ready.labels(lv.name, lv.version).set(0)
        if lv.scheduler is not None:
            lv.scheduler.close()

    async def close(self) -> None:
        for entry in self.models.values():
            for lv in entry.versions.values():
                if lv.state is State.READY:
                    self._retire(lv)

    # lookup ------------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        if entry.unloaded:
            raise Unavailable(f"model '{name}' is unloaded")
        return entry

    @property
    def ready(self) -> bool:
        """Server readiness: the initial load is done and nothing is still loading.

        A model that failed to load is reported (index, model ready, 503 on infer) but does not hold
        the whole server out of traffic, unless `strict_readiness` asks for Triton's rule: every
        model must have a ready version.
        """
        if not self.started:
            return False
        entries = [e for e in self.models.values() if not e.unloaded]
        if any(lv.state is State.LOADING for e in entries for lv in e.versions.values()):
            return False
        if self.strict_readiness:
            return all(any(lv.state is State.READY for lv in e.versions.values()) for e in entries)
        return True

    # running -----------------------------------------------------------------------------
    def _recorder(self, lv: LoadedVersion) -> Callable[[ExecutionTiming], None]:
        stats = lv.stats

        def record(timing: ExecutionTiming) -> None:  # called from the instance threads
            stats.record_execution(timing)
            if lv.observe is not None:
                lv.observe.execution(timing)

        return record

    def infer(
        self,
        lv: LoadedVersion,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None = None,
        priority: int = 0,
        oversize: bool = False,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queue one request on the version's scheduler (`deadline` is a time.monotonic()); await
        the future for its outputs. Not a coroutine: one frame less on every request's path."""
        scheduler = lv.scheduler
        if lv.state is not State.READY or scheduler is None:
            raise Unavailable(f"model '{lv.name}' version {lv.version} is not ready")
        return scheduler.submit(inputs, outputs, deadline, priority, oversize)


def _placement(lv: LoadedVersion) -> str:
    scheduler = lv.scheduler
    if scheduler is not None and scheduler.on_loop:
        return "the event loop"
    n = lv.config.instances
    if isinstance(lv.runtime, ProcessRuntime):
        return f"{n} worker process" + ("es" if n > 1 else "")
    return f"{n} instance thread" + ("s" if n > 1 else "")
