"""The model manager: which versions are loaded, their state, and running them off the event loop.

Loading a version = fetch artifact -> verify sha256 -> the --pickles policy -> admission under the
memory budget -> runtime.load -> warm-up -> READY. A version that fails any step is FAILED with the
reason, retried by a later request after a back-off, and every other model keeps serving. Model
code runs in each version's Scheduler (its instance threads, with batching), never on the event
loop.

Residency (docs/serving.md "Many models"): a version is loaded at start (eager mode, or pinned) or
by its first request (on-demand); concurrent requests share one load and wait for it within their
deadline. Each loaded version counts against the memory budget by its measured footprint; a load
that does not fit evicts the least recently used idle, unpinned versions, and a version unused for
its `idle_unload_s` is unloaded. Evicted versions come back on their next request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from inferplane.engine.footprint import children_bytes, return_free_memory, rss_bytes
from inferplane.engine.process_runtime import ProcessRuntime, uses_processes
from inferplane.engine.queue_metrics import QueueDepthCollector
from inferplane.engine.residency import (
    EAGER,
    BudgetExhausted,
    ResidencyOptions,
    Resident,
    next_backoff,
    plan_admission,
)
from inferplane.engine.scheduler import Scheduler
from inferplane.engine.stats import ExecutionTiming, VersionStats
from inferplane.engine.warmup import warm_up
from inferplane.errors import (
    CataloguePending,
    DeadlineExceeded,
    InferplaneError,
    InternalError,
    NotFound,
    Unavailable,
)
from inferplane.observability.metrics import Metrics, VersionMetrics
from inferplane.repository.schema import ModelConfig, check_model_name
from inferplane.repository.store import Repository
from inferplane.runtimes import Runtime, create_runtime
from inferplane.runtimes.base import PICKLE_POLICIES, check_pickles
from inferplane.sizes import format_size

log = logging.getLogger("inferplane.engine")

ROOM_WAIT_S = 30.0  # longest a load waits for busy versions to free budget room
_ROOM_POLL_S = 0.005
_LOAD_ATTEMPTS = 3  # loads of one version in a row that measured more than the room there was


class State(StrEnum):
    UNLOADED = "UNLOADED"  # known from model.yaml, not in memory (on-demand, or unloaded)
    LOADING = "LOADING"
    READY = "READY"
    EVICTED = "EVICTED"  # unloaded by the memory budget or idleness; its next request reloads it
    FAILED = "FAILED"  # the last load failed; `reason` says why (Triton calls it UNAVAILABLE)


# Why a version was loaded: the `reason` label of inferplane_model_loads_total.
STARTUP, FIRST_USE, AFTER_EVICTION, AFTER_IDLE, AFTER_UNLOAD, AFTER_FAILURE, EXPLICIT, WATCH = (
    "startup",
    "first_use",
    "after_eviction",
    "after_idle",
    "after_unload",
    "after_failure",
    "explicit",
    "watch",  # a version that appeared in the repository while serving (serve --watch)
)
MEMORY, IDLE = "memory", "idle"  # why a version was evicted


@dataclass(eq=False)
class LoadedVersion:
    config: ModelConfig
    state: State = State.UNLOADED
    reason: str = ""
    runtime: Runtime | None = None
    scheduler: Scheduler | None = None
    stats: VersionStats = field(default_factory=VersionStats)
    platform: str = ""
    observe: VersionMetrics | None = None
    # --- residency ---
    pinned: bool = False  # model.yaml `residency: pinned` or a --pin-aliases alias: never evicted
    held: bool = False  # loaded by the repository API: kept until it unloads it
    loadable: bool = True  # False after an explicit unload of a version that is not on-demand
    idle_unload_s: float | None = None
    footprint: int | None = None  # bytes its last load measured
    measured: list[int] = field(default_factory=list)  # its last three measured footprints
    reserved: int = 0  # bytes it counts against the budget now
    last_used: float = 0.0  # time.monotonic() of its last request
    waiters: int = 0  # requests waiting for its load
    load_task: asyncio.Task[None] | None = None
    next_reason: str = FIRST_USE  # the reason label of its next load
    failures: int = 0  # failed loads in a row
    retry_at: float = 0.0  # no new load before this time.monotonic()
    loads: int = 0
    load_seconds: float = 0.0
    load_source: str = ""  # local | cache | remote

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return str(self.config.version)

    @property
    def busy(self) -> bool:
        """Requests queued, running or waiting for its load: never evicted then."""
        if self.waiters:
            return True
        s = self.scheduler
        return s is not None and (s.queued > 0 or s.executing > 0)

    def residency(self) -> dict[str, Any]:
        """What `/inferplane/models` and `models show --server` report of its residency."""
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state.value,
            "reason": self.reason,
            "pinned": self.pinned,
            "held": self.held,
            "footprint_bytes": self.footprint,
            "reserved_bytes": self.reserved,
            "memory_hint_bytes": self.config.memory_hint,
            "idle_unload_s": self.idle_unload_s,
            "idle_s": round(time.monotonic() - self.last_used, 3) if self.last_used else None,
            "loads": self.loads,
            "last_load_seconds": round(self.load_seconds, 4),
            "last_load_source": self.load_source,
        }


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
        self.draining = False  # SIGTERM came: out of load balancers' rotation, still serving
        self._lock = asyncio.Lock()  # repository API loads and unloads, one at a time
        # No lock around repository reads: s3fs/gcsfs/adlfs run every call on their own event
        # loop thread and the artifact cache locks per version. One lock here made a request's
        # read of its own model.yaml wait behind the whole background catalogue read (9 s for
        # 1,000 models on moto). Single-connection stores (sftp, ftp) are not supported.
        # One load at a time is measured: the resident set's growth across it is its footprint.
        self._measure_lock = threading.Lock()
        self._held: set[LoadedVersion] = set()  # versions holding memory: loading or loaded
        self._measured_runtimes: set[str] = set()  # runtimes whose first load was measured
        self._blocking = 0  # startup and repository-API loads in progress (server not ready)
        # On demand: models listed at start whose model.yaml files are still being read (in the
        # background, or at once by the first request that names one); empty once read.
        self.unread: dict[str, list[int]] = {}
        self._reading: dict[str, asyncio.Task[None]] = {}
        self._catalogue_pending = False  # on demand: listed at start, model.yaml files not read
        budget = self.residency.memory_budget
        if budget is not None:
            metrics.memory_budget.set(budget)
        metrics.resident_bytes.set_function(lambda: sum(lv.reserved for lv in self._held))
        metrics.registry.register(QueueDepthCollector(self._queues))
        metrics.models_resident.set_function(
            lambda: sum(1 for lv in self._held if lv.state is State.READY)
        )

    def _queues(self) -> list[tuple[str, str, Scheduler]]:
        return [(lv.name, lv.version, lv.scheduler) for lv in list(self._held) if lv.scheduler]

    # the catalogue -----------------------------------------------------------------------
    async def load_initial(self) -> None:
        """Eager: read the catalogue (every model.yaml, no artifact), then load every version.
        On demand: list the repository (no file read) and be ready; the model.yaml files are read
        in the background (`read_catalogue`), then pinned versions load. One failing model never
        stops the others."""
        if self.residency.load != EAGER:
            self._catalogue_pending = True
            try:
                self.unread = await asyncio.to_thread(self.repository.index, self.selected)
            except InferplaneError as exc:
                log.error("cannot list the repository: %s", exc.message)
            log.info(
                "index: %d models, %d versions in %s (model.yaml files read in the background)",
                len(self.unread),
                sum(len(v) for v in self.unread.values()),
                self.repository.url,
            )
            self.started = True
            return
        await self.read_catalogue()
        self.started = True

    async def read_catalogue(self) -> None:
        """Read every model.yaml (concurrently, no artifact) and load what loads at start.
        Eager mode awaits it in `load_initial`; on demand the server runs it after start (the
        server is ready meanwhile: pinned versions load while it serves)."""
        try:
            try:
                catalogue = await asyncio.to_thread(self._read_catalogue, self.selected)
            except InferplaneError as exc:
                log.error("cannot list the repository: %s", exc.message)
                catalogue = {}
            for name, (configs, aliases) in catalogue.items():
                if name not in self.models:  # a request may have read it first
                    self.models[name] = self._new_entry(name, configs, aliases)
            self.unread.clear()
            if self.selected:
                for name in self.selected:
                    if name not in catalogue:
                        log.error("model %s: not in repository %s", name, self.repository.url)
            versions = [lv for e in self.models.values() for lv in e.versions.values()]
            on_demand = sum(1 for lv in versions if not self._loads_at_start(lv))
            log.info(
                "catalogue: %d models, %d versions (%d on demand) in %s",
                len(self.models),
                len(versions),
                on_demand,
                self.repository.url,
            )
            for lv in versions:
                if self._loads_at_start(lv) and lv.state is State.UNLOADED:
                    await self._load_logged(lv, STARTUP)
        finally:
            self._catalogue_pending = False

    async def read_catalogue_if_pending(self) -> None:
        """On demand, after `load_initial`: read the model.yaml files (see read_catalogue)."""
        if self._catalogue_pending:
            await self.read_catalogue()

    async def read_now(self, name: str) -> None:
        """Read one listed model's model.yaml files now (a request names it before the
        background read got to it); requests for the same model share the read."""
        if name not in self.unread:
            return
        task = self._reading.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._read_one(name))
            self._reading[name] = task
        await asyncio.shield(task)

    async def _read_one(self, name: str) -> None:
        try:
            configs, aliases = await asyncio.to_thread(self._read_model, name)
            if name in self.unread and name not in self.models:
                self.models[name] = self._new_entry(name, configs, aliases)
        except InferplaneError as exc:
            log.error("model %s: %s", name, exc.message)  # unreadable: unknown from now on
        finally:
            self.unread.pop(name, None)
            self._reading.pop(name, None)

    def _read_catalogue(
        self, models: list[str] | None
    ) -> dict[str, tuple[list[ModelConfig], dict[str, int]]]:
        """Model -> (readable versions, aliases); each unreadable file is logged and takes out
        only its version (or the aliases)."""
        out = {}
        for name, item in self.repository.catalogue(models).items():
            for problem in item.problems:
                log.error("model %s: %s", name, problem)
            if item.configs:
                out[name] = (item.configs, item.aliases)
        return out

    def repository_models(self) -> list[str]:
        """Model names in the repository, loaded or not (blocking I/O: call it in a thread). On
        demand without --model the catalogue already holds them all: no listing."""
        if self.residency.load != EAGER and not self.selected and self.started:
            return sorted(set(self.models) | set(self.unread))
        return self.repository.list_models()

    def _new_entry(
        self, name: str, configs: Iterable[ModelConfig], aliases: dict[str, int]
    ) -> ModelEntry:
        pinned_numbers = self._pinned_numbers(aliases)
        entry = ModelEntry(name=name, aliases=aliases)
        for config in configs:
            entry.versions[config.version] = LoadedVersion(
                config=config,
                pinned=_pinned(config, pinned_numbers),
                idle_unload_s=config.idle_unload_s or self.residency.idle_unload_s,
            )
        return entry

    def _pinned_numbers(self, aliases: dict[str, int]) -> set[int]:
        """The versions the --pin-aliases aliases name."""
        return {aliases[a] for a in self.residency.pin_aliases if a in aliases}

    def _loads_at_start(self, lv: LoadedVersion) -> bool:
        if lv.pinned:
            return True
        return self.residency.load == EAGER and lv.config.residency != "on_demand"

    # loading -----------------------------------------------------------------------------
    async def activate(self, lv: LoadedVersion, deadline: float | None = None) -> None:
        """Make `lv` READY: join its load, or start one, and wait within `deadline` (a
        time.monotonic()). Unavailable (503) when it cannot be loaded now, DeadlineExceeded (504)
        when the load outlasts the deadline (the load itself goes on for later requests)."""
        if lv.state is State.READY:
            return
        self.check_servable(lv)
        task = lv.load_task
        if task is None:
            reason = AFTER_FAILURE if lv.state is State.FAILED else lv.next_reason
            task = self._start_load(lv, reason)
        lv.waiters += 1
        try:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{lv.name}' version {lv.version} is still loading at the request's "
                "deadline; the load goes on"
            ) from None
        finally:
            lv.waiters -= 1
        if lv.state is not State.READY:  # unloaded again between the load and this request
            raise Unavailable(f"model '{lv.name}' version {lv.version} is not loaded: {lv.reason}")

    def check_servable(self, lv: LoadedVersion) -> None:
        """Unavailable unless `lv` is loaded or a request may load it now."""
        if lv.state is State.READY or lv.load_task is not None:
            return
        if not lv.loadable:
            raise Unavailable(f"model '{lv.name}' version {lv.version} is unloaded")
        if lv.state is State.FAILED:
            wait = lv.retry_at - time.monotonic()
            if wait > 0:
                raise Unavailable(
                    f"model '{lv.name}' version {lv.version} failed to load: {lv.reason} "
                    f"(next try in {wait:.0f} s)",
                    retry_after_s=wait,
                )

    def servable(self, lv: LoadedVersion) -> bool:
        """Loaded or loadable: what /v2/models/m/ready answers for an existing version."""
        try:
            self.check_servable(lv)
        except Unavailable:
            return False
        return lv.state is not State.FAILED or lv.load_task is not None

    def _start_load(self, lv: LoadedVersion, reason: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._load(lv, reason))
        lv.load_task = task
        # A load whose waiters all gave up (deadline) still ends; nobody reads its error.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _load_logged(self, lv: LoadedVersion, reason: str) -> None:
        """Load `lv` at start or for the repository API: errors are logged and left in its
        state, not raised."""
        try:
            if lv.load_task is None:
                self._start_load(lv, reason)
            assert lv.load_task is not None
            await asyncio.shield(lv.load_task)
        except InferplaneError:
            pass  # _load logged it and left the reason in lv.reason

    async def _load(self, lv: LoadedVersion, reason: str) -> None:
        """The one load of `lv` that every waiting request shares."""
        started = time.perf_counter()
        before, lv.state, lv.reason = lv.state, State.LOADING, ""
        labels = (lv.name, lv.version)
        estimate: int | None = None  # set when a measured load must be admitted again
        for attempt in range(_LOAD_ATTEMPTS):
            try:
                runtime, source = await asyncio.to_thread(self._prepare, lv.config)
                estimate = (
                    estimate
                    or self._estimate(lv)
                    or lv.config.memory_hint
                    or runtime.memory_bytes()
                )
                try:
                    await self._room(lv, estimate, reason)
                except BudgetExhausted as exc:  # the runtime is not loaded yet: nothing to free
                    lv.state, lv.reason = before, str(exc)  # not a failure: loadable later
                    log.warning("model %s version %s not loaded: %s", *labels, exc)
                    raise Unavailable(
                        f"model '{lv.name}' version {lv.version}: {exc}", 1.0
                    ) from None
                runtime, on_loop, footprint = await asyncio.to_thread(
                    self._start, runtime, lv.config
                )
                first_of_runtime = lv.config.runtime not in self._measured_runtimes
                self._measured_runtimes.add(lv.config.runtime)
            except Unavailable:
                if lv.state is State.LOADING:
                    lv.state = before
                lv.load_task = None
                raise
            except Exception as exc:  # ours, or a framework's own error on a bad artifact
                raise self._failed(
                    lv,
                    exc.message
                    if isinstance(exc, InferplaneError)
                    else f"load failed: {type(exc).__name__}: {exc}",
                ) from None
            try:
                # It may have measured more than it was admitted with. No waiting here: loaded
                # versions waiting for each other's room would never move.
                await self._room(lv, footprint, reason, wait=False)
                break
            except BudgetExhausted as exc:
                runtime.unload()
                self._release(lv)
                if not exc.lasting and attempt + 1 < _LOAD_ATTEMPTS:
                    # Busy or loading versions are in the way: unload, then be admitted by the
                    # measured figure (waiting for room holds no memory) and load again.
                    estimate = footprint
                    continue
                # A runtime's first load in this process also measures the framework's one-time
                # start-up: that figure must not keep the version out for good, so it is
                # dropped. Later ones are kept: a version too large is refused at once next time.
                if not first_of_runtime:
                    lv.measured = [*lv.measured[-2:], footprint]
                lv.state, lv.reason, lv.load_task = before, f"measured {exc}", None
                log.warning("model %s version %s unloaded again: %s", *labels, exc)
                raise Unavailable(f"model '{lv.name}' version {lv.version}: {exc}", 1.0) from None
        lv.footprint = footprint
        lv.measured = [*lv.measured[-2:], footprint]
        lv.runtime, lv.platform = runtime, runtime.model_platform
        lv.observe = lv.observe or VersionMetrics(self.metrics, lv.name, lv.version)
        lv.scheduler = Scheduler(
            runtime,
            lv.config,
            self._recorder(lv),
            arrivals_hint=lambda: self.inflight,
            on_loop=on_loop,
        )
        lv.state, lv.failures, lv.load_task = State.READY, 0, None
        lv.last_used = time.monotonic()
        lv.loads += 1
        lv.load_seconds, lv.load_source = time.perf_counter() - started, source
        self.metrics.model_loads.labels(*labels, reason).inc()
        self.metrics.model_load_seconds.labels(source).observe(lv.load_seconds)
        self.metrics.model_ready.labels(*labels).set(1)
        log.info(
            "model %s version %s ready in %.2fs (%s, from %s; footprint %s; executions on %s)",
            *labels,
            lv.load_seconds,
            reason,
            source,
            format_size(footprint),
            _placement(lv),
        )

    @staticmethod
    def _estimate(lv: LoadedVersion) -> int | None:
        """What a version is admitted with: the median of its last three measured loads (one
        load's measurement also counts what other threads allocated meanwhile)."""
        if not lv.measured:
            return None
        return sorted(lv.measured)[len(lv.measured) // 2]

    def _failed(self, lv: LoadedVersion, reason: str) -> Unavailable:
        """Mark `lv` FAILED for a back-off; the 503 its waiters get."""
        self._release(lv)
        lv.failures += 1
        wait = next_backoff(lv.failures, self.residency)
        lv.state, lv.reason, lv.retry_at = State.FAILED, reason, time.monotonic() + wait
        lv.load_task = None
        self.metrics.model_ready.labels(lv.name, lv.version).set(0)
        self.metrics.model_load_failures.labels(lv.name, lv.version).inc()
        log.error(
            "model %s version %s failed to load: %s (a request retries it after %.0f s)",
            lv.name,
            lv.version,
            reason,
            wait,
        )
        return Unavailable(f"model '{lv.name}' version {lv.version} failed to load: {reason}", wait)

    def _prepare(self, config: ModelConfig) -> tuple[Runtime, str]:
        """The version's runtime, constructed but not loaded, and where its files came from."""
        # Verified against model.yaml's sha256 as it returns; safe in parallel (the artifact
        # cache serializes fetches of one version), so cold loads download side by side.
        local_dir, source = self.repository.fetch_with_source(config)
        runtime = create_runtime(config, local_dir)
        check_pickles(runtime, self.pickles)  # here, once: worker processes load it again
        return runtime, source

    def _start(self, runtime: Runtime, config: ModelConfig) -> tuple[Runtime, bool, int]:
        """Load and warm up `runtime`: (runtime, whether it runs on the event loop, footprint)."""
        with self._measure_lock:
            return_free_memory(force=True)  # or the load reuses freed heap and looks smaller
            before = rss_bytes()
            if uses_processes(config, runtime):
                runtime = ProcessRuntime(runtime)
            runtime.load()
            try:
                on_loop = warm_up(runtime, config)
            except Exception as exc:
                runtime.unload()
                raise InternalError(f"warm-up failed: {type(exc).__name__}: {exc}") from exc
            after = rss_bytes()
        grown = after - before if after is not None and before is not None else 0
        if isinstance(runtime, ProcessRuntime):
            grown += children_bytes(runtime.pids())
        return runtime, on_loop, max(grown, runtime.memory_bytes())

    # the memory budget ---------------------------------------------------------------------
    def _residents(self) -> list[Resident[LoadedVersion]]:
        return [
            Resident(
                key=lv,
                footprint=lv.reserved,
                pinned=lv.pinned or lv.held,
                busy=lv.busy,
                last_used=lv.last_used,
                loading=lv.state is State.LOADING,
            )
            for lv in self._held
        ]

    async def _room(self, lv: LoadedVersion, need: int, reason: str, wait: bool = True) -> None:
        """Count `need` bytes for `lv` (instead of what it counted so far), evicting least
        recently used idle versions to make room. While only busy or loading versions stand in
        the way (evictable once their requests end) it waits; BudgetExhausted at once when
        pinned versions fill the budget, after ROOM_WAIT_S, or once no request waits for it.
        The plan and the evictions run on the loop without an await between them: no other
        request changes the residents meanwhile."""
        give_up = time.monotonic() + ROOM_WAIT_S
        while True:
            try:
                plan = plan_admission(
                    self._residents(), need, self.residency.memory_budget, exclude=lv
                )
            except BudgetExhausted as exc:
                waited_for = lv.waiters > 0 or reason == EXPLICIT
                if not wait or exc.lasting or time.monotonic() > give_up or not waited_for:
                    raise
                await asyncio.sleep(_ROOM_POLL_S)
                continue
            for victim in plan.victims:
                self.evict(victim, MEMORY)
            lv.reserved = need
            self._held.add(lv)
            return

    def evict(self, lv: LoadedVersion, why: str) -> None:
        """Unload an idle version; its next request loads it again."""
        idle = time.monotonic() - lv.last_used
        log.info(
            "evicting model %s version %s (%s; footprint %s, unused for %.1f s)",
            lv.name,
            lv.version,
            "memory budget" if why == MEMORY else f"idle past {lv.idle_unload_s:g} s",
            format_size(lv.reserved),
            idle,
        )
        self._unload(lv)
        lv.state = State.EVICTED
        lv.reason = "evicted: memory budget" if why == MEMORY else "evicted: idle"
        lv.next_reason = AFTER_EVICTION if why == MEMORY else AFTER_IDLE
        self.metrics.model_evictions.labels(why).inc()

    def _release(self, lv: LoadedVersion) -> None:
        self._held.discard(lv)
        lv.reserved = 0

    def _unload(self, lv: LoadedVersion) -> None:
        """Stop new work; queued and running requests finish, then the runtime is unloaded and
        its memory handed back."""
        self._release(lv)
        self.metrics.model_ready.labels(lv.name, lv.version).set(0)
        scheduler, lv.scheduler, lv.runtime = lv.scheduler, None, None
        if scheduler is None:
            return
        scheduler.close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.run_in_executor(None, _free_after, scheduler)

    async def housekeeping(self, interval_s: float = 0.5) -> None:
        """Unload versions idle past their idle_unload_s (the server runs this for its life)."""
        while True:
            await asyncio.sleep(interval_s)
            self.unload_idle()

    def unload_idle(self) -> None:
        now = time.monotonic()
        for lv in list(self._held):
            idle = lv.idle_unload_s
            if (
                idle is not None
                and lv.state is State.READY
                and not (lv.pinned or lv.held or lv.busy)
                and now - lv.last_used >= idle
            ):
                self.evict(lv, IDLE)

    # serve --watch -------------------------------------------------------------------------
    async def refresh(self) -> bool:
        """Converge on the repository as it is now (serve --watch); True when anything changed.

        New versions of served models, and new models, join as they would have at start (they
        load first when they load at start). Then aliases move, after the versions they name
        have loaded, so that an `apply` that registers version 3 and points `production` at it
        turns traffic over only once 3 is warm on this replica; pins follow the
        --pin-aliases aliases. Versions gone from the repository keep serving (a loaded
        version is never pulled from under its traffic by a listing), and models the repository
        API unloaded stay unloaded. On a remote store a pass costs one recursive listing plus a
        read of the files whose ETag changed.
        """
        if not self.started or self._catalogue_pending:
            return False  # the start-up read is still going: it sees the same files
        try:
            catalogue = await asyncio.to_thread(self._read_catalogue, self.selected)
        except InferplaneError as exc:
            log.warning("watch: cannot read the repository: %s", exc.message)
            return False
        changed = False
        async with self._lock:
            for name, (configs, aliases) in catalogue.items():
                if name in self.unread:
                    continue  # on demand and not read yet: its first request reads it whole
                entry = self.models.get(name)
                if entry is None:
                    entry = self.models[name] = self._new_entry(name, configs, aliases)
                    log.info("watch: model %s appeared (versions %s)", name, sorted(entry.versions))
                    await self._load_at_start(entry.versions.values())
                    changed = True
                    continue
                if entry.unloaded:
                    continue
                fresh = self._new_entry(
                    name, [c for c in configs if c.version not in entry.versions], aliases
                )
                if fresh.versions:
                    log.info("watch: model %s: new versions %s", name, sorted(fresh.versions))
                    entry.versions.update(fresh.versions)
                    await self._load_at_start(fresh.versions.values())
                    changed = True
                if aliases != entry.aliases:
                    await self._move_aliases(entry, aliases)
                    changed = True
        return changed

    async def _load_at_start(self, versions: Iterable[LoadedVersion]) -> None:
        for lv in list(versions):
            if self._loads_at_start(lv) and lv.state is State.UNLOADED:
                await self._load_logged(lv, WATCH)

    async def _move_aliases(self, entry: ModelEntry, aliases: dict[str, int]) -> None:
        pinned_numbers = self._pinned_numbers(aliases)
        for lv in entry.versions.values():
            lv.pinned = _pinned(lv.config, pinned_numbers)
        await self._load_at_start(entry.versions.values())  # a newly pinned version, first
        moves = [
            f"{alias} {entry.aliases.get(alias, '-')} -> {aliases.get(alias, '-')}"
            for alias in sorted(set(entry.aliases) | set(aliases))
            if entry.aliases.get(alias) != aliases.get(alias)
        ]
        entry.aliases = dict(aliases)
        log.info("watch: model %s: aliases %s", entry.name, ", ".join(moves))

    # the repository API --------------------------------------------------------------------
    async def load_model(self, name: str) -> ModelEntry:
        """(Re)read `name` and load all its versions now; they stay loaded (never evicted) until
        the repository API unloads them. A version already loaded with the same model.yaml
        keeps serving as it is; replaced versions serve until the new ones are ready."""
        check_model_name(name)  # 400 before any repository path is built from it
        async with self._lock:
            configs, aliases = await asyncio.to_thread(self._read_model, name)
            old = self.models.get(name)
            entry = self._new_entry(name, configs, aliases)
            if old is not None:
                for number, lv in entry.versions.items():
                    kept = old.versions.get(number)
                    if kept is not None and kept.config == lv.config:
                        kept.pinned = lv.pinned
                        entry.versions[number] = kept
            if old is None or old.unloaded:
                self.models[name] = entry  # visible as LOADING while it loads
            self._blocking += 1
            try:
                for lv in entry.versions.values():
                    lv.held, lv.loadable = True, True
                    if lv.state is not State.READY:
                        await self._load_logged(lv, EXPLICIT)
                    lv.held = lv.state is State.READY  # a refused load holds nothing
            finally:
                self._blocking -= 1
            self.models[name] = entry
            if old is not None:
                for lv in old.versions.values():
                    if lv not in entry.versions.values():
                        self._unload(lv)
                        lv.state = State.UNLOADED
            return entry

    def _read_model(self, name: str) -> tuple[list[ModelConfig], dict[str, int]]:
        found = self._read_catalogue([name]).get(name)
        if found is None:
            raise NotFound(f"unknown model '{name}' in repository {self.repository.url}")
        return found

    async def unload_model(self, name: str) -> None:
        """Unload every version of `name`. On-demand versions come back on their next request;
        the others stay unloaded until the repository API loads them again."""
        check_model_name(name)  # the same 400 as load for a name that no repository can hold
        async with self._lock:
            entry = self.models.get(name)
            if entry is None or entry.unloaded:
                raise NotFound(f"model '{name}' is not loaded")
            for lv in entry.versions.values():
                self._unload(lv)
                lv.held = False
                lv.state, lv.reason, lv.next_reason = State.UNLOADED, "unloaded", AFTER_UNLOAD
                lv.loadable = not self._loads_at_start(lv)
            entry.unloaded = not any(lv.loadable for lv in entry.versions.values())

    async def close(self) -> None:
        for entry in self.models.values():
            for lv in entry.versions.values():
                if lv.state is State.READY:
                    self._unload(lv)
                    lv.state = State.UNLOADED

    # lookup ------------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            if name in self.unread:
                raise CataloguePending(name, functools.partial(self.read_now, name))
            raise NotFound(f"unknown model '{name}'")
        if entry.unloaded:
            raise Unavailable(f"model '{name}' is unloaded")
        return entry

    @property
    def ready(self) -> bool:
        """Server readiness: the catalogue is read, no startup or repository-API load is still
        running (on-demand loads never take the server out of traffic) and no drain has begun.

        A model that failed to load is reported (index, model ready, 503 on infer) but does not
        hold the whole server out of traffic, unless `strict_readiness` asks for Triton's rule:
        every model must have a version that is ready or loadable.
        """
        if not self.started or self._blocking or self.draining:
            return False
        if self.strict_readiness:
            entries = [e for e in self.models.values() if not e.unloaded]
            return all(any(self.servable(lv) for lv in e.versions.values()) for e in entries)
        return True

    def residency_report(self) -> dict[str, Any]:
        """The server-wide view behind `/inferplane/models`."""
        rows = [lv.residency() for entry in self.models.values() for lv in entry.versions.values()]
        for name, versions in self.unread.items():
            rows.extend(_unread_row(name, v) for v in versions)
        rows.sort(key=lambda row: (row["name"], int(row["version"])))
        return {
            "load": self.residency.load,
            "memory_budget_bytes": self.residency.memory_budget,
            "resident_bytes": sum(lv.reserved for lv in self._held),
            "models_resident": sum(1 for lv in self._held if lv.state is State.READY),
            "versions": rows,
        }

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
        trace: Any = None,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queue one request on the version's scheduler (`deadline` is a time.monotonic()); await
        the future for its outputs. Not a coroutine: one frame less on every request's path.
        The version must be READY (`activate` first). `trace`: the span context of a traced
        request, for the execution's span to link to."""
        scheduler = lv.scheduler
        if lv.state is not State.READY or scheduler is None:
            raise Unavailable(f"model '{lv.name}' version {lv.version} is not ready")
        lv.last_used = time.monotonic()
        return scheduler.submit(inputs, outputs, deadline, priority, oversize, trace)


def _unread_row(name: str, version: int) -> dict[str, Any]:
    return {
        "name": name,
        "version": str(version),
        "state": State.UNLOADED.value,
        "reason": "model.yaml not read yet",
        "loads": 0,
    }


def _free_after(scheduler: Scheduler) -> None:
    """Once the scheduler's threads have unloaded the runtime, return the memory."""
    for thread in scheduler.threads:
        thread.join(30)
    return_free_memory()


def _placement(lv: LoadedVersion) -> str:
    scheduler = lv.scheduler
    if scheduler is not None and scheduler.on_loop:
        return "the event loop"
    n = lv.config.instances
    if isinstance(lv.runtime, ProcessRuntime):
        return f"{n} worker process" + ("es" if n > 1 else "")
    return f"{n} instance thread" + ("s" if n > 1 else "")


def _pinned(config: ModelConfig, pinned_numbers: set[int]) -> bool:
    """model.yaml says `residency: pinned`, or a --pin-aliases alias names the version."""
    return config.residency == "pinned" or config.version in pinned_numbers
