"""The warm-up run before a version takes traffic, and where its executions should run.

The warm-up doubles as a measurement: a full batch is timed, and a model whose whole batch runs
within `LOOP_BUDGET_NS` is executed on the event loop (see engine/scheduler.py for why a thread
costs more than such a model).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from inferplane.repository.schema import ModelConfig
from inferplane.runtimes import Runtime
from inferplane.tensors import BYTES, dtype_of

# The longest execution the event loop may run itself: every other request on the loop waits
# that long. 150 us is about what parsing and answering three requests costs the loop.
LOOP_BUDGET_NS = 150_000
_TIMED_RUNS = 5


def warmup_inputs(config: ModelConfig, rows: int = 1) -> dict[str, np.ndarray]:
    """`rows` rows per input (on the batch dimension; variable dims become 1), numbers are zero,
    strings are "0"."""
    inputs: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if config.max_batch_size > 0 and shape:
            shape = (rows, *shape[1:])
        if spec.datatype == BYTES:
            arr = np.empty(shape, dtype=object)
            arr.fill(b"0")
        else:
            arr = np.zeros(shape, dtype=dtype_of(spec.datatype))
        inputs[spec.name] = arr
    return inputs


def warm_up(runtime: Runtime, config: ModelConfig) -> bool:
    """Run the model once on one row; True when its executions should run on the event loop:
    `instance_kind: loop`, or `auto` for one instance of a loop-safe runtime whose largest batch
    runs within the budget (timed only when one row already does, so that a slow model's load
    does not pay for several full batches)."""
    one_row = warmup_inputs(config)
    t0 = time.perf_counter_ns()
    runtime.predict(one_row)
    one_row_ns = time.perf_counter_ns() - t0
    eligible = config.instance_kind == "auto" and config.instances == 1 and runtime.loop_safe
    on_loop = config.instance_kind == "loop" or (
        eligible
        and one_row_ns <= 10 * LOOP_BUDGET_NS  # the first run also pays allocations
        and full_batch_ns(runtime, config) <= LOOP_BUDGET_NS
    )
    if on_loop and not config.options.get("intra_op_threads"):
        # Measured on the example forest: one thread gave p50 -10 us at concurrency 1 and the
        # same or better throughput at 32 (docs/serving.md).
        runtime.use_one_thread()
        runtime.predict(one_row)
    return on_loop


def full_batch_ns(runtime: Runtime, config: ModelConfig) -> int:
    """Median time of one execution of the largest batch the batcher forms."""
    inputs = warmup_inputs(config, max(1, config.max_batch_size))
    runtime.predict(inputs)  # first run of this shape: allocations, not the steady cost
    times = []
    for _ in range(_TIMED_RUNS):
        t0 = time.perf_counter_ns()
        runtime.predict(inputs)
        times.append(time.perf_counter_ns() - t0)
    return int(statistics.median(times))
