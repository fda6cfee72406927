"""Residency: the admission policy alone, then the real engine on a local repository of tiny ONNX
models (on-demand loads, single flight, LRU eviction under a budget, pinning, budget exhausted,
failed-load back-off, idle unload, the repository API, deadlines, process instances).

Footprints are measured from the process's resident set, which other tests in this process move;
here `rss_bytes` is held still so that a footprint is the artifact's size (the measured floor),
and the budgets are a known number of models."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from inferplane.context import RequestContext
from inferplane.engine import manager as manager_module
from inferplane.engine.manager import ModelManager, State
from inferplane.engine.residency import (
    BudgetExhausted,
    ResidencyOptions,
    Resident,
    next_backoff,
    plan_admission,
)
from inferplane.errors import DeadlineExceeded, Unavailable
from inferplane.observability.metrics import Metrics
from inferplane.predictor import InProcessPredictor
from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec


# --- the policy ---------------------------------------------------------------------------------
def _r(name: str, size: int, used: float, **kw: bool) -> Resident:
    return Resident(key=(name, 1), footprint=size, last_used=used, **kw)


def test_no_budget_admits_everything() -> None:
    assert plan_admission([_r("a", 10**12, 0)], 10**12, None).victims == []


def test_fits_without_evicting() -> None:
    assert plan_admission([_r("a", 40, 0), _r("b", 40, 1)], 20, 100).victims == []


def test_evicts_least_recently_used_first_and_only_as_many_as_needed() -> None:
    residents = [_r("new", 30, 9), _r("old", 30, 1), _r("older", 30, 0)]
    assert plan_admission(residents, 30, 100).victims == [("older", 1)]
    assert plan_admission(residents, 60, 100).victims == [("older", 1), ("old", 1)]


def test_pinned_busy_and_loading_versions_are_never_evicted() -> None:
    residents = [
        _r("pinned", 30, 0, pinned=True),
        _r("busy", 30, 1, busy=True),
        _r("loading", 30, 2, loading=True),
        _r("idle", 10, 3),
    ]
    assert plan_admission(residents, 10, 100).victims == [("idle", 1)]
    with pytest.raises(BudgetExhausted) as caught:
        plan_admission(residents, 30, 100)
    assert "memory budget exhausted" in str(caught.value)
    assert caught.value.held == 90 and caught.value.evictable == 10


def test_backoff_doubles_up_to_its_ceiling() -> None:
    options = ResidencyOptions(failure_backoff_s=2, failure_backoff_max_s=10)
    assert [next_backoff(n, options) for n in (1, 2, 3, 4)] == [2, 4, 8, 10]


def test_options_refuse_nonsense() -> None:
    for bad in ({"load": "lazy"}, {"memory_budget": 0}, {"idle_unload_s": -1}):
        with pytest.raises(ValueError):
            ResidencyOptions(**bad)  # type: ignore[arg-type]


# --- the engine ---------------------------------------------------------------------------------
N_MODELS = 6


@pytest.fixture
def repo(tmp_path: Path, make_onnx_model: Callable[..., str]) -> Repository:
    """Models m1..m6; model mi sums i features, so its answer to ones is i."""
    repository = Repository(str(tmp_path / "repo"))
    for i in range(1, N_MODELS + 1):
        path = make_onnx_model(tmp_path / f"src/m{i}.onnx", n_features=i)
        register(
            repository,
            f"m{i}",
            path,
            inputs=[TensorSpec("input", "FP32", [-1, i])],
            outputs=[TensorSpec("output", "FP32", [-1, 1])],
        )
    return repository


@pytest.fixture(autouse=True)
def steady_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_module, "rss_bytes", lambda pid="self": 100 << 20)


def artifact_size(repo: Repository, name: str = "m1") -> int:
    config = repo.read_config(name, 1)
    return os.path.getsize(os.path.join(repo.version_path(name, 1), config.artifact))


async def _open(repo: Repository, lazy: bool = False, **options: object) -> InProcessPredictor:
    """The engine as the server starts it: listed, then (unless `lazy`) every model.yaml read."""
    manager = ModelManager(repo, Metrics(), residency=ResidencyOptions(**options))  # type: ignore[arg-type]
    await manager.load_initial()
    if not lazy:
        await manager.read_catalogue_if_pending()
    return InProcessPredictor(manager)


async def ask(predictor: InProcessPredictor, i: int) -> float:
    context = RequestContext(request_id=f"r{i}")
    result = await predictor.predict(
        f"m{i}", {"input": np.ones((1, i), dtype=np.float32)}, context=context
    )
    return float(result.outputs["output"][0, 0])


def loads(manager: ModelManager, reason: str | None = None) -> float:
    total = 0.0
    for metric in manager.metrics.model_loads.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and reason in (None, sample.labels["reason"]):
                total += sample.value
    return total


def evictions(manager: ModelManager, reason: str) -> float:
    return manager.metrics.model_evictions.labels(reason)._value.get()


def state(manager: ModelManager, i: int) -> State:
    return manager.models[f"m{i}"].versions[1].state


async def test_on_demand_reads_the_catalogue_and_loads_nothing(repo: Repository) -> None:
    predictor = await _open(repo, load="on-demand")
    manager = predictor.manager
    try:
        assert manager.ready and sorted(manager.models) == [f"m{i}" for i in range(1, 7)]
        assert all(state(manager, i) is State.UNLOADED for i in range(1, 7))
        assert manager.servable(manager.models["m3"].versions[1])  # ready: loadable
        assert await ask(predictor, 3) == 3.0
        assert state(manager, 3) is State.READY and loads(manager, "first_use") == 1
        assert state(manager, 2) is State.UNLOADED
    finally:
        await predictor.aclose()


async def test_on_demand_is_ready_from_the_listing_and_reads_a_named_model_first(
    repo: Repository,
) -> None:
    from inferplane.protocols.model_views import repository_index

    repo.set_alias("m5", "production", 1)
    predictor = await _open(repo, lazy=True, load="on-demand", pin_aliases=("production",))
    manager = predictor.manager
    try:
        assert manager.ready and manager.models == {} and len(manager.unread) == N_MODELS
        rows = repository_index([], manager.models, False, manager.unread)
        assert [(r["name"], r["state"]) for r in rows] == [
            (f"m{i}", "UNLOADED") for i in range(1, 7)
        ]
        assert await ask(predictor, 3) == 3.0  # reads m3's model.yaml, then loads it
        assert set(manager.models) == {"m3"} and "m3" not in manager.unread
        await manager.read_catalogue_if_pending()
        assert manager.unread == {} and len(manager.models) == N_MODELS
        assert state(manager, 5) is State.READY  # pinned: loaded once its alias was read
        assert state(manager, 3) is State.READY and loads(manager) == 2
    finally:
        await predictor.aclose()


async def test_eager_mode_loads_everything_at_start(repo: Repository) -> None:
    predictor = await _open(repo)
    try:
        assert all(state(predictor.manager, i) is State.READY for i in range(1, 7))
        assert loads(predictor.manager, "startup") == N_MODELS
    finally:
        await predictor.aclose()


async def test_concurrent_cold_requests_share_one_load(repo: Repository) -> None:
    predictor = await _open(repo, load="on-demand")
    try:
        answers = await asyncio.gather(*(ask(predictor, 4) for _ in range(20)))
        assert answers == [4.0] * 20
        assert loads(predictor.manager) == 1
    finally:
        await predictor.aclose()


async def test_budget_evicts_the_least_recently_used(repo: Repository) -> None:
    size = artifact_size(repo, "m6")  # the largest: every model fits in this much
    predictor = await _open(repo, load="on-demand", memory_budget=int(size * 2.5))
    manager = predictor.manager
    try:
        for i in (1, 2):
            assert await ask(predictor, i) == float(i)
        assert await ask(predictor, 1) == 1.0  # m1 is now the more recent
        assert await ask(predictor, 3) == 3.0  # does not fit: m2 goes
        assert state(manager, 2) is State.EVICTED and state(manager, 1) is State.READY
        assert "memory budget" in manager.models["m2"].versions[1].reason
        assert evictions(manager, "memory") == 1
        budget = manager.residency.memory_budget
        assert budget is not None
        assert manager.residency_report()["resident_bytes"] <= budget
        for i in range(1, 7):  # every answer right, however often they come and go
            assert await ask(predictor, i) == float(i)
        assert await ask(predictor, 2) == 2.0
        assert loads(manager, "after_eviction") >= 2
        assert sum(1 for i in range(1, 7) if state(manager, i) is State.READY) == 2
    finally:
        await predictor.aclose()


async def test_pinned_versions_are_loaded_at_start_and_never_evicted(repo: Repository) -> None:
    repo.set_alias("m1", "production", 1)
    size = artifact_size(repo, "m6")
    predictor = await _open(
        repo, load="on-demand", memory_budget=int(size * 2.5), pin_aliases=("production",)
    )
    manager = predictor.manager
    try:
        assert state(manager, 1) is State.READY and manager.models["m1"].versions[1].pinned
        for i in (2, 3, 4, 5):
            assert await ask(predictor, i) == float(i)
        assert state(manager, 1) is State.READY  # the least recently used, but pinned
        assert evictions(manager, "memory") == 3
    finally:
        await predictor.aclose()


async def test_budget_exhausted_answers_503_at_once(repo: Repository) -> None:
    size = artifact_size(repo, "m6")
    predictor = await _open(repo, load="on-demand", memory_budget=int(size * 1.5))
    manager = predictor.manager
    try:
        assert await manager.load_model("m1")  # the repository API pins it
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(ask(predictor, 2), 5)
        assert "memory budget exhausted" in caught.value.message
        assert state(manager, 2) is State.UNLOADED  # not a failure: loadable once room frees
        assert manager.servable(manager.models["m2"].versions[1])
        await manager.unload_model("m1")  # on demand again, and no longer held
        assert await ask(predictor, 2) == 2.0
    finally:
        await predictor.aclose()


async def test_a_busy_version_is_not_evicted_and_a_cold_request_waits_for_it(
    repo: Repository,
) -> None:
    size = artifact_size(repo, "m6")
    predictor = await _open(repo, load="on-demand", memory_budget=int(size * 1.5))
    manager = predictor.manager
    try:
        assert await ask(predictor, 1) == 1.0
        lv = manager.models["m1"].versions[1]
        lv.waiters += 1  # a request of m1 in flight, as far as eviction can tell
        cold = asyncio.ensure_future(ask(predictor, 2))
        await asyncio.sleep(0.2)
        assert not cold.done() and state(manager, 1) is State.READY  # waits, m1 stays
        lv.waiters -= 1  # m1's request ended: now it can go
        assert await asyncio.wait_for(cold, 5) == 2.0
        assert state(manager, 1) is State.EVICTED
    finally:
        await predictor.aclose()


async def test_a_measurement_over_the_budget_is_not_kept(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load of a process also measures the framework's one-time start-up: refused
    once, the version must load on a later request, not be kept out by that figure forever."""
    size = artifact_size(repo, "m6")
    readings = iter([100 << 20, (100 << 20) + 10 * size])  # the first load grows by 10 models

    def rss(pid: object = "self") -> int:
        return next(readings, 100 << 20)

    monkeypatch.setattr(manager_module, "rss_bytes", rss)
    predictor = await _open(repo, load="on-demand", memory_budget=int(size * 1.5))
    manager = predictor.manager
    try:
        with pytest.raises(Unavailable, match="memory budget exhausted"):
            await ask(predictor, 1)
        lv = manager.models["m1"].versions[1]
        assert lv.state is State.UNLOADED and lv.footprint is None and lv.reserved == 0
        assert await ask(predictor, 1) == 1.0  # admitted by its artifact size, measured again
        assert lv.footprint == artifact_size(repo, "m1")
        # Not a first load any more: an over-budget figure now is kept, and refuses at once.
        readings = iter([100 << 20, (100 << 20) + 10 * size])
        with pytest.raises(Unavailable, match="memory budget exhausted"):
            await ask(predictor, 2)
        before = loads(manager)
        with pytest.raises(Unavailable, match="memory budget exhausted"):
            await ask(predictor, 2)
        assert loads(manager) == before  # refused by the kept figure, without loading again
    finally:
        await predictor.aclose()


async def test_a_refused_repository_load_holds_nothing(repo: Repository) -> None:
    size = artifact_size(repo, "m6")
    predictor = await _open(repo, load="on-demand", memory_budget=int(size * 1.5))
    manager = predictor.manager
    try:
        await manager.load_model("m1")
        entry = await manager.load_model("m2")  # no room: m1 is held
        lv = entry.versions[1]
        assert lv.state is not State.READY and not lv.held
        await manager.unload_model("m1")
        assert await ask(predictor, 2) == 2.0 and not lv.held
    finally:
        await predictor.aclose()


async def test_a_failed_load_backs_off_instead_of_looping(repo: Repository) -> None:
    path = os.path.join(repo.version_path("m2", 1), repo.read_config("m2", 1).artifact)
    with open(path, "ab") as fh:
        fh.write(b"tampered")
    predictor = await _open(repo, load="on-demand", failure_backoff_s=0.3)
    manager = predictor.manager
    lv = manager.models["m2"].versions[1]
    try:
        with pytest.raises(Unavailable) as first:
            await ask(predictor, 2)
        assert "sha256" in first.value.message and lv.state is State.FAILED
        assert first.value.retry_after_s is not None
        with pytest.raises(Unavailable, match="next try in"):
            await ask(predictor, 2)  # within the back-off: refused without loading
        assert lv.failures == 1 and not manager.servable(lv)
        # one failed load, counted once (the refusal within the back-off is not a load)
        failures = manager.metrics.registry.get_sample_value(
            "inferplane_model_load_failures_total", {"model": "m2", "version": "1"}
        )
        assert failures == 1.0
        assert await ask(predictor, 1) == 1.0  # everyone else keeps serving
        await asyncio.sleep(0.35)
        with pytest.raises(Unavailable):
            await ask(predictor, 2)
        assert lv.failures == 2  # tried again after the back-off, once
        assert lv.retry_at - time.monotonic() > 0.3  # and it doubled
    finally:
        await predictor.aclose()


async def test_idle_versions_unload_and_come_back(repo: Repository) -> None:
    predictor = await _open(repo, load="on-demand", idle_unload_s=0.05)
    manager = predictor.manager
    try:
        assert await ask(predictor, 1) == 1.0
        manager.unload_idle()
        assert state(manager, 1) is State.READY  # not idle long enough yet
        await asyncio.sleep(0.1)
        manager.unload_idle()
        assert state(manager, 1) is State.EVICTED and evictions(manager, "idle") == 1
        assert await ask(predictor, 1) == 1.0
        assert loads(manager, "after_idle") == 1
        assert manager.residency_report()["models_resident"] == 1
    finally:
        await predictor.aclose()


async def test_the_repository_api_pins_and_unloads(repo: Repository) -> None:
    predictor = await _open(repo, load="on-demand", idle_unload_s=0.01)
    manager = predictor.manager
    try:
        await manager.load_model("m1")
        lv = manager.models["m1"].versions[1]
        assert lv.state is State.READY and lv.held and loads(manager, "explicit") == 1
        await asyncio.sleep(0.05)
        manager.unload_idle()
        assert lv.state is State.READY  # held by the explicit load
        await manager.unload_model("m1")
        assert lv.state is State.UNLOADED and not lv.held
        assert await ask(predictor, 1) == 1.0  # on demand: back on its next request
        assert loads(manager, "after_unload") == 1
    finally:
        await predictor.aclose()


async def test_explicit_unload_in_eager_mode_keeps_the_model_out(repo: Repository) -> None:
    predictor = await _open(repo)
    manager = predictor.manager
    try:
        await manager.unload_model("m1")
        with pytest.raises(Unavailable, match="unloaded"):
            await ask(predictor, 1)
        await manager.load_model("m1")
        assert await ask(predictor, 1) == 1.0
    finally:
        await predictor.aclose()


SLOW = textwrap.dedent(
    """
    import time
    import numpy as np

    class Model:
        def load(self, path):
            time.sleep(0.6)

        def predict(self, inputs):
            return {"y": inputs["x"] * 2}
    """
)


async def test_a_load_longer_than_the_deadline_answers_504_and_goes_on(
    repo: Repository, tmp_path: Path
) -> None:
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "model.py").write_text(SLOW)
    register(
        repo,
        "slow",
        str(folder),
        inputs=[TensorSpec("x", "FP32", [-1])],
        outputs=[TensorSpec("y", "FP32", [-1])],
    )
    predictor = await _open(repo, load="on-demand")
    manager = predictor.manager
    lv = manager.models["slow"].versions[1]
    try:
        context = RequestContext(request_id="x", deadline=time.monotonic() + 0.1)
        with pytest.raises(DeadlineExceeded, match="still loading"):
            await predictor.predict("slow", {"x": np.ones(2, np.float32)}, context=context)
        assert lv.state is State.LOADING
        late = RequestContext(request_id="y")
        result = await predictor.predict("slow", {"x": np.ones(2, np.float32)}, context=late)
        assert result.outputs["y"].tolist() == [2.0, 2.0] and loads(manager) == 1
    finally:
        await predictor.aclose()


PROCESS_MODEL = textwrap.dedent(
    """
    import numpy as np

    class Model:
        def load(self, path):
            self.table = np.ones(4 << 20)  # 32 MiB in each worker process

        def predict(self, inputs):
            return {"y": inputs["x"] + 1}
    """
)


async def test_process_instances_are_budgeted_with_their_workers(
    repo: Repository, tmp_path: Path
) -> None:
    folder = tmp_path / "proc"
    folder.mkdir()
    (folder / "model.py").write_text(PROCESS_MODEL)
    register(
        repo,
        "proc",
        str(folder),
        inputs=[TensorSpec("x", "FP32", [-1])],
        outputs=[TensorSpec("y", "FP32", [-1])],
        instances=2,
        instance_kind="process",
    )
    predictor = await _open(repo, load="on-demand")
    try:
        result = await predictor.predict(
            "proc", {"x": np.zeros(3, np.float32)}, context=RequestContext(request_id="p")
        )
        assert result.outputs["y"].tolist() == [1.0, 1.0, 1.0]
        footprint = predictor.manager.models["proc"].versions[1].footprint
        assert footprint is not None and footprint >= 2 * (32 << 20)  # both workers' tables
    finally:
        await predictor.aclose()
