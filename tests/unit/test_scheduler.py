"""The per-version scheduler: dynamic batching, instances, queue bound, deadlines, priorities.

Real runtimes throughout (ONNX Runtime on a forest and an MLP, a python model that records what it
is asked), driven by many concurrent asyncio callers with seeded random sizes and arrival times.
"""

from __future__ import annotations

import asyncio
import random
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferplane.engine.scheduler import Scheduler
from inferplane.engine.stats import VersionStats
from inferplane.errors import BadRequest, DeadlineExceeded, Overloaded, Unavailable
from inferplane.repository.register import parse_tensor_arg, register
from inferplane.repository.schema import Batching, ModelConfig, QueuePolicy
from inferplane.repository.store import Repository
from inferplane.runtimes import Runtime, get_runtime

RECORDER = textwrap.dedent(
    """
    import time
    import numpy as np

    class Model:
        def load(self, path):
            self.calls = []  # the rows of every execution, in order

        def predict(self, inputs):
            x = inputs["x"]
            self.calls.append(x[:, 0].copy())
            if (x[:, 0] < 0).any():
                raise ValueError("negative ids are refused")
            time.sleep(float(x[:, 1].max()))
            return {"y": x[:, 0] * 2}
    """
)


def _forest(path: Path) -> str:
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    x, y = make_classification(2000, 8, random_state=0)
    forest = RandomForestClassifier(20, max_depth=6, random_state=0).fit(x.astype(np.float32), y)
    onx = to_onnx(forest, x[:1].astype(np.float32), options={id(forest): {"zipmap": False}})
    path.write_bytes(onx.SerializeToString())
    return str(path)


def _mlp(path: Path) -> str:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [w1, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _runtime(
    tmp_path: Path, name: str, artifact: str, **kwargs: Any
) -> tuple[Runtime, ModelConfig]:
    repo = Repository(str(tmp_path / "repo"))
    config = register(repo, name, artifact, **kwargs)
    runtime = get_runtime(config.runtime)(config, repo.fetch(config))
    runtime.load()
    return runtime, config


def _recorder(tmp_path: Path, **kwargs: Any) -> tuple[Runtime, ModelConfig]:
    folder = tmp_path / "recorder"
    folder.mkdir(exist_ok=True)
    (folder / "model.py").write_text(RECORDER)
    return _runtime(
        tmp_path, "recorder", str(folder), inputs=[parse_tensor_arg("x:FP64:-1,2")],
        outputs=[parse_tensor_arg("y:FP64:-1")], **kwargs,
    )  # fmt: skip


def _scheduler(
    runtime: Runtime, config: ModelConfig, on_loop: bool = False, **updates: Any
) -> tuple[Scheduler, VersionStats]:
    stats = VersionStats()
    scheduler = Scheduler(
        runtime, config.model_copy(update=updates), stats.record_execution, on_loop=on_loop
    )
    return scheduler, stats


@pytest.mark.parametrize("on_loop", [False, True], ids=["threads", "on_loop"])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("model", ["forest", "mlp"])
async def test_batched_results_equal_unbatched(
    tmp_path: Path, model: str, seed: int, on_loop: bool
) -> None:
    artifact = _forest(tmp_path / "m.onnx") if model == "forest" else _mlp(tmp_path / "m.onnx")
    batching = Batching(max_batch_size=16, max_queue_delay_us=2000)
    instances = 1 if on_loop else 2
    runtime, config = _runtime(tmp_path, model, artifact, batching=batching, instances=instances)
    scheduler, stats = _scheduler(runtime, config, on_loop)
    rng = random.Random(seed)
    data = np.random.default_rng(seed).standard_normal((400, 8)).astype(np.float32)
    # Requests of 1..6 rows, arriving in bursts and trickles.
    requests, start = [], 0
    while start < len(data):
        size = min(rng.randint(1, 6), len(data) - start)
        requests.append((data[start : start + size], rng.choice([0, 0, 0, 0.0005, 0.002])))
        start += size

    async def call(x: np.ndarray, pause: float) -> dict[str, np.ndarray]:
        await asyncio.sleep(pause)
        return await scheduler.submit({config.inputs[0].name: x}, None)

    # Many callers at once, so that batches really mix requests.
    results = []
    for i in range(0, len(requests), 24):
        results += await asyncio.gather(*(call(x, p) for x, p in requests[i : i + 24]))
    assert stats.execution_count < len(requests), "no batch was ever formed"
    assert max(stats.batches) <= 16
    assert stats.inference_count == len(data)
    for (x, _), got in zip(requests, results, strict=True):
        alone = runtime.predict({config.inputs[0].name: x})
        for name, expected in alone.items():
            assert got[name].shape == expected.shape
            if model == "forest":
                np.testing.assert_array_equal(got[name], expected)  # exact for trees
            else:
                np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6)
    scheduler.close()


@pytest.mark.parametrize("on_loop", [False, True], ids=["threads", "on_loop"])
async def test_no_request_gets_another_requests_rows(tmp_path: Path, on_loop: bool) -> None:
    runtime, config = _recorder(
        tmp_path, batching=Batching(max_batch_size=8, max_queue_delay_us=3000)
    )
    scheduler, stats = _scheduler(runtime, config, on_loop)
    rng = random.Random(7)
    ids, next_id = [], 0
    for _ in range(60):
        n = rng.randint(1, 3)
        ids.append(list(range(next_id, next_id + n)))
        next_id += n
    results = await asyncio.gather(
        *(scheduler.submit({"x": np.array([[i, 0.001] for i in req], dtype=np.float64)}, None)
          for req in ids)
    )  # fmt: skip
    calls = [list(c) for c in runtime.model.calls]  # type: ignore[attr-defined]
    scheduler.close()
    for req, got in zip(ids, results, strict=True):
        assert got["y"].tolist() == [2.0 * i for i in req]
    assert stats.execution_count < len(ids)
    # A request is never split across executions.
    for req in ids:
        assert any(req == c[k : k + len(req)] for c in calls for k in range(len(c)))


async def test_a_lone_request_does_not_wait_for_company(tmp_path: Path) -> None:
    # A 300 ms window: a request alone in the server must not sit it out.
    runtime, config = _recorder(
        tmp_path, batching=Batching(max_batch_size=8, max_queue_delay_us=300_000)
    )
    scheduler, _ = _scheduler(runtime, config)
    started = time.monotonic()
    await scheduler.submit({"x": np.array([[1.0, 0.0]])}, None)
    assert time.monotonic() - started < 0.15
    scheduler.close()


async def test_waits_for_more_while_others_are_in_the_server(tmp_path: Path) -> None:
    runtime, config = _recorder(
        tmp_path, batching=Batching(max_batch_size=8, max_queue_delay_us=200_000)
    )
    stats = VersionStats()
    in_server = [3]  # what the protocols would count: three requests on their way
    scheduler = Scheduler(
        runtime, config, stats.record_execution, arrivals_hint=lambda: in_server[0]
    )

    async def late(i: int, pause: float) -> Any:
        await asyncio.sleep(pause)
        return await scheduler.submit({"x": np.array([[float(i), 0.0]])}, None)

    results = await asyncio.gather(late(1, 0), late(2, 0.02), late(3, 0.04))
    scheduler.close()
    assert [r["y"].tolist() for r in results] == [[2.0], [4.0], [6.0]]
    assert stats.execution_count == 1 and list(stats.batches) == [3]


async def test_request_larger_than_max_batch_is_refused(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path, batching=Batching(max_batch_size=4))
    scheduler, _ = _scheduler(runtime, config)
    with pytest.raises(BadRequest, match="batch of 5 rows exceeds max_batch_size 4"):
        await scheduler.submit({"x": np.zeros((5, 2))}, None)
    scheduler.close()


async def test_offline_callers_may_exceed_max_batch_in_one_execution(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path, batching=Batching(max_batch_size=4))
    scheduler, _ = _scheduler(runtime, config)
    x = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    big, one = await asyncio.gather(
        scheduler.submit({"x": x}, None, oversize=True),
        scheduler.submit({"x": np.array([[100.0, 0.0]])}, None),
    )
    scheduler.close()
    assert big["y"].tolist() == [2.0 * i for i in range(10)] and one["y"].tolist() == [200.0]
    assert sorted(len(c) for c in runtime.model.calls) == [1, 10], "alone, in one execution"


@pytest.mark.parametrize("on_loop", [False, True], ids=["threads", "on_loop"])
async def test_full_queue_answers_at_once_and_accepted_work_completes(
    tmp_path: Path, on_loop: bool
) -> None:
    runtime, config = _recorder(tmp_path)
    scheduler, stats = _scheduler(runtime, config, on_loop, queue=QueuePolicy(max_size=4))
    started = time.monotonic()

    async def call(i: int) -> Any:
        try:
            return await scheduler.submit({"x": np.array([[float(i), 0.2]])}, None)
        except Overloaded as exc:
            return (exc, time.monotonic() - started)

    results = await asyncio.gather(*(call(i) for i in range(30)))
    scheduler.close()
    rejected = [r for r in results if isinstance(r, tuple)]
    accepted = [r for r in results if not isinstance(r, tuple)]
    # Four waiting at most (plus one running once the worker took it); the rest refused at once.
    assert 4 <= len(accepted) <= 5 and len(rejected) == 30 - len(accepted)
    # Each model call takes 0.2 s: a refusal that waited for one would take longer than this
    # bound, which leaves room for a loaded machine (50 ms was crossed once under load).
    assert all(elapsed < 0.15 for _, elapsed in rejected), "a 503 waited for the model"
    assert all("queue full" in str(exc) for exc, _ in rejected)
    assert stats.inference_count == len(accepted)


async def test_expired_work_is_dropped_before_the_model(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path)
    scheduler, _ = _scheduler(runtime, config)
    blocker = asyncio.ensure_future(scheduler.submit({"x": np.array([[1.0, 0.2]])}, None))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await scheduler.submit(
            {"x": np.array([[99.0, 0.0]])}, None, deadline=time.monotonic() + 0.03
        )
    assert time.monotonic() - started < 0.15  # answered at its deadline, not after the blocker
    await blocker
    await scheduler.submit({"x": np.array([[3.0, 0.0]])}, None)  # the next one still runs
    scheduler.close()
    seen = [float(v) for c in runtime.model.calls for v in c]  # type: ignore[attr-defined]
    assert 99.0 not in seen and seen == [1.0, 3.0]


async def test_default_timeout_from_model_yaml(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path)
    scheduler, _ = _scheduler(runtime, config, queue=QueuePolicy(default_timeout_us=30_000))
    with pytest.raises(DeadlineExceeded):
        await scheduler.submit({"x": np.array([[1.0, 0.3]])}, None)
    scheduler.close()


async def test_priority_levels(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path)
    scheduler, _ = _scheduler(runtime, config, queue=QueuePolicy(priority_levels=2))
    blocker = asyncio.ensure_future(scheduler.submit({"x": np.array([[0.0, 0.1]])}, None))
    await asyncio.sleep(0.02)
    low = asyncio.ensure_future(scheduler.submit({"x": np.array([[1.0, 0.0]])}, None, priority=2))
    await asyncio.sleep(0.005)
    high = asyncio.ensure_future(scheduler.submit({"x": np.array([[2.0, 0.0]])}, None, priority=1))
    await asyncio.gather(blocker, low, high)
    scheduler.close()
    order = [float(c[0]) for c in runtime.model.calls]  # type: ignore[attr-defined]
    assert order == [0.0, 2.0, 1.0]


async def test_a_bad_request_in_a_batch_fails_alone(tmp_path: Path) -> None:
    runtime, config = _recorder(
        tmp_path, batching=Batching(max_batch_size=8, max_queue_delay_us=50_000)
    )
    scheduler, _ = _scheduler(runtime, config)
    blocker = asyncio.ensure_future(scheduler.submit({"x": np.array([[100.0, 0.05]])}, None))
    await asyncio.sleep(0.01)
    results = await asyncio.gather(
        *(scheduler.submit({"x": np.array([[float(i), 0.0]])}, None) for i in (1, -1, 2)),
        return_exceptions=True,
    )
    await blocker
    scheduler.close()
    assert results[0]["y"].tolist() == [2.0] and results[2]["y"].tolist() == [4.0]  # type: ignore[index]
    assert isinstance(results[1], ValueError)


async def test_instances_run_concurrently(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path, instances=3)
    scheduler, _ = _scheduler(runtime, config)
    started = time.monotonic()
    await asyncio.gather(
        *(scheduler.submit({"x": np.array([[float(i), 0.1]])}, None) for i in range(3))
    )
    assert (
        time.monotonic() - started < 0.25
    )  # three 100 ms calls side by side, not one after another
    scheduler.close()


async def test_close_finishes_queued_work_and_refuses_new(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path)
    scheduler, _ = _scheduler(runtime, config)
    pending = [asyncio.ensure_future(scheduler.submit({"x": np.array([[float(i), 0.01]])}, None))
               for i in range(5)]  # fmt: skip
    await asyncio.sleep(0)
    scheduler.close()
    with pytest.raises(Unavailable, match="unloading"):
        await scheduler.submit({"x": np.array([[9.0, 0.0]])}, None)
    assert [r["y"].tolist() for r in await asyncio.gather(*pending)] == [
        [2.0 * i] for i in range(5)
    ]


async def test_a_fault_outside_the_model_does_not_kill_the_instance(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path)
    calls = [0]

    def flaky_record(timing: object) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("statistics sink broke")

    scheduler = Scheduler(runtime, config, flaky_record)
    from inferplane.errors import InternalError

    with pytest.raises(InternalError, match="statistics sink broke"):
        await scheduler.submit({"x": np.array([[1.0, 0.0]])}, None)
    got = await asyncio.wait_for(scheduler.submit({"x": np.array([[2.0, 0.0]])}, None), 5)
    assert got["y"].tolist() == [4.0]
    scheduler.close()


# --- executions on the event loop (models that take microseconds) ---------------------------------


async def test_on_loop_requests_of_one_loop_iteration_form_one_batch(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path, batching=Batching(max_batch_size=8, max_queue_delay_us=0))
    scheduler, stats = _scheduler(runtime, config, on_loop=True)
    assert not scheduler.threads, "no instance thread when executions run on the loop"
    results = await asyncio.gather(
        *(scheduler.submit({"x": np.array([[float(i), 0.0]])}, None) for i in range(20))
    )
    sizes = [len(c) for c in runtime.model.calls]  # type: ignore[attr-defined]
    scheduler.close()
    assert [r["y"].tolist() for r in results] == [[2.0 * i] for i in range(20)]
    # 20 requests queued in one iteration: batches of 8, 8, 4, one flush after another
    assert sizes == [8, 8, 4]
    assert stats.execution_count == 3


async def test_on_loop_expired_work_never_reaches_the_model(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path)
    scheduler, _ = _scheduler(runtime, config, on_loop=True)
    with pytest.raises(DeadlineExceeded):
        await scheduler.submit({"x": np.array([[99.0, 0.0]])}, None, deadline=time.monotonic())
    got = await scheduler.submit({"x": np.array([[3.0, 0.0]])}, None)
    seen = [float(v) for c in runtime.model.calls for v in c]  # type: ignore[attr-defined]
    scheduler.close()
    assert got["y"].tolist() == [6.0] and seen == [3.0]


async def test_on_loop_close_finishes_queued_work_then_unloads(tmp_path: Path) -> None:
    runtime, config = _recorder(tmp_path)
    unloaded = []
    runtime.unload = lambda: unloaded.append(True)  # type: ignore[method-assign]
    scheduler, _ = _scheduler(runtime, config, on_loop=True)
    pending = [asyncio.ensure_future(scheduler.submit({"x": np.array([[float(i), 0.0]])}, None))
               for i in range(5)]  # fmt: skip
    await asyncio.sleep(0)  # submitted, not yet run
    scheduler.close()
    with pytest.raises(Unavailable, match="unloading"):
        await scheduler.submit({"x": np.array([[9.0, 0.0]])}, None)
    assert not unloaded, "unloaded under queued work"
    assert [r["y"].tolist() for r in await asyncio.gather(*pending)] == [
        [2.0 * i] for i in range(5)
    ]
    assert unloaded == [True]


async def test_on_loop_serves_callers_on_another_event_loop(tmp_path: Path) -> None:
    """One loop per process is the server's case; an embedder driving a second loop in another
    thread still gets its own answers, delivered on its own loop."""
    runtime, config = _runtime(tmp_path, "forest", _forest(tmp_path / "m.onnx"))
    scheduler, _ = _scheduler(runtime, config, on_loop=True)
    data = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    name = config.inputs[0].name

    async def many(rows: np.ndarray) -> list[np.ndarray]:
        out = await asyncio.gather(*(scheduler.submit({name: r[None]}, None) for r in rows))
        return [o["label"] for o in out]

    other = asyncio.to_thread(asyncio.run, many(data[32:]))
    mine, theirs = await asyncio.gather(many(data[:32]), other)
    expected = runtime.predict({name: data})["label"]
    scheduler.close()
    assert np.concatenate(mine + theirs).tolist() == expected.tolist()


def _wide_mlp(path: Path) -> str:
    """Millisecond batches: 32 rows through a 2048 x 2048 layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2048, 2048), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2048])],
        [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_warm_up_places_only_fast_loop_safe_single_instances_on_the_loop(tmp_path: Path) -> None:
    from inferplane.engine.warmup import warm_up

    forest = _forest(tmp_path / "forest.onnx")
    batching = Batching(max_batch_size=32)
    fast, config = _runtime(tmp_path, "fast", forest, batching=batching)
    assert warm_up(fast, config), "a forest of 20 shallow trees runs 32 rows in microseconds"
    assert not warm_up(fast, config.model_copy(update={"instances": 2}))
    assert not warm_up(fast, config.model_copy(update={"instance_kind": "thread"}))
    slow, slow_config = _runtime(
        tmp_path, "slow", _wide_mlp(tmp_path / "w.onnx"), batching=batching
    )
    assert not warm_up(slow, slow_config), "milliseconds per batch belong on instance threads"
    # user Python code may wait on I/O: never on the loop unless the model.yaml says so
    python, py_config = _recorder(tmp_path, batching=Batching(max_batch_size=4))
    assert not warm_up(python, py_config)
    assert warm_up(python, py_config.model_copy(update={"instance_kind": "loop"}))


def test_loop_instance_kind_takes_one_instance() -> None:
    from pydantic import ValidationError

    doc = {
        "name": "m", "version": 1, "runtime": "onnx", "artifact": "model.onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        "instance_kind": "loop", "instances": 2,
    }  # fmt: skip
    with pytest.raises(ValidationError, match="set instances: 1"):
        ModelConfig.model_validate(doc)
