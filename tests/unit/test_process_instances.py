"""Instances in worker processes for GIL-holding models, through the real engine."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from inferplane.context import RequestContext
from inferplane.engine.manager import ModelManager, State
from inferplane.errors import BadRequest, InternalError
from inferplane.observability.metrics import Metrics
from inferplane.predictor import InProcessPredictor
from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec

MODEL = textwrap.dedent(
    """
    import os, time
    import numpy as np

    class Model:
        def load(self, path):
            if os.path.exists(os.path.join(path, "refuse")):
                raise RuntimeError("refusing to load on purpose")

        def predict(self, inputs):
            x = inputs["x"]
            if x.size and x[0] == -1:
                raise ValueError("x must not be -1")
            if x.size and x[0] == -2:
                os._exit(3)  # a crash in native code, as far as the server can tell
            started = time.time()
            end = time.perf_counter() + (0.3 if x.size and x[0] == 1 else 0)
            while time.perf_counter() < end:  # pure Python: holds the GIL
                pass
            n = x.shape[0]
            return {"pid": np.full(n, os.getpid(), dtype=np.int64),
                    "span": np.tile(np.array([started, time.time()]), (n, 1))}
    """
)


def _register(tmp_path: Path, name: str, kind: str, refuse: bool = False) -> Repository:
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    (folder / "model.py").write_text(MODEL)
    if refuse:
        (folder / "refuse").write_text("")
    repo = Repository(str(tmp_path / "repo"))
    register(
        repo,
        name,
        str(folder),
        inputs=[TensorSpec("x", "FP32", [-1])],
        outputs=[TensorSpec("pid", "INT64", [-1]), TensorSpec("span", "FP64", [-1, 2])],
        instances=2,
        instance_kind=kind,
    )
    return repo


@pytest.fixture
async def predictor(tmp_path: Path) -> AsyncIterator[InProcessPredictor]:
    repo = _register(tmp_path, "proc", "auto")
    _register(tmp_path, "threads", "thread")
    manager = ModelManager(repo, Metrics())
    await manager.load_initial()
    try:
        yield InProcessPredictor(manager)
    finally:
        await manager.close()


async def _call(p: InProcessPredictor, model: str, value: float) -> dict[str, np.ndarray]:
    x = np.array([value], dtype=np.float32)
    return (await p.predict(model, {"x": x}, context=RequestContext())).outputs


async def test_python_instances_run_in_parallel_worker_processes(
    predictor: InProcessPredictor,
) -> None:
    a, b = await asyncio.gather(_call(predictor, "proc", 1), _call(predictor, "proc", 1))
    pids = {int(a["pid"][0]), int(b["pid"][0])}
    assert len(pids) == 2 and os.getpid() not in pids
    (start_a, end_a), (start_b, end_b) = a["span"][0], b["span"][0]
    assert start_a < end_b and start_b < end_a, "the two calls did not overlap"


async def test_thread_kind_stays_in_this_process(predictor: InProcessPredictor) -> None:
    out = await _call(predictor, "threads", 0)
    assert int(out["pid"][0]) == os.getpid()


async def test_a_value_error_in_the_child_is_a_bad_request(predictor: InProcessPredictor) -> None:
    with pytest.raises(BadRequest, match="x must not be -1"):
        await _call(predictor, "proc", -1)
    assert int((await _call(predictor, "proc", 0))["pid"][0]) != os.getpid()


async def test_a_dead_child_fails_its_batch_and_is_restarted(
    predictor: InProcessPredictor,
) -> None:
    before = {int((await _call(predictor, "proc", 0))["pid"][0]) for _ in range(4)}
    with pytest.raises(InternalError, match="died"):
        await _call(predictor, "proc", -2)
    after = {int((await _call(predictor, "proc", 0))["pid"][0]) for _ in range(6)}
    assert after - before, "a new worker process took the dead one's place"
    assert len(after) <= 2


async def test_a_model_that_fails_to_load_in_its_process_is_unavailable(tmp_path: Path) -> None:
    repo = _register(tmp_path, "refuser", "process", refuse=True)
    manager = ModelManager(repo, Metrics())
    await manager.load_initial()
    try:
        lv = manager.entry("refuser").versions[1]
        assert lv.state is State.FAILED
        assert "refusing to load on purpose" in lv.reason
    finally:
        await manager.close()
