"""Per-version scheduling: a bounded priority queue, dynamic batching, and where executions run.

Requests are queued from the event loop. An execution takes work off the queue, packs it into one
batch along the first dimension (never splitting a request), runs the model once and hands every
request its own rows back. Executions run either

- on instance threads (the default): model code runs beside the event loop, which suits anything
  that takes longer than a thread handoff; or
- on the event loop itself (`on_loop`), for models whose whole batch runs in tens of
  microseconds. There a thread costs more than the model: the worker finishes in ~30 us and then
  waits for the GIL, which a busy event loop gives up only every switch interval (5 ms), and the
  loop must be woken to deliver. On the loop, the requests that arrived in one loop iteration form
  one batch, run at once, and are answered without any handoff.

Batching rule: an instance that becomes free takes everything queued (up to `max_batch_size` rows)
at once, so under load batches form without any wait. It waits up to `max_queue_delay_us` for more
only while other requests are in the server and may still arrive; a lone request at concurrency 1
runs immediately.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferplane.engine.stats import ExecutionTiming
from inferplane.errors import (
    BadRequest,
    DeadlineExceeded,
    InternalError,
    Overloaded,
    Unavailable,
)
from inferplane.observability import tracing
from inferplane.repository.schema import ModelConfig
from inferplane.runtimes import Runtime

log = logging.getLogger("inferplane.engine")

Outputs = dict[str, np.ndarray]


@dataclass(slots=True, eq=False)
class Work:
    inputs: dict[str, np.ndarray]
    rows: int
    outputs: Sequence[str] | None
    future: asyncio.Future[Outputs]
    loop: asyncio.AbstractEventLoop
    enqueued_ns: int
    deadline: float | None  # time.monotonic()
    expired: bool = False
    timer: asyncio.TimerHandle | None = None
    trace: Any = None  # the span context of a traced request (observability/tracing.py)


def batch_rows(inputs: dict[str, np.ndarray]) -> int:
    for arr in inputs.values():
        return int(arr.shape[0]) if arr.ndim else 1
    return 1


class Scheduler:
    """Runs one model version for every protocol: one queue, `instances` worker threads."""

    def __init__(
        self,
        runtime: Runtime,
        config: ModelConfig,
        on_execution: Callable[[ExecutionTiming], None],
        arrivals_hint: Callable[[], int] | None = None,
        on_loop: bool = False,
    ) -> None:
        self.runtime = runtime
        self.name = f"{config.name} v{config.version}"
        self.model, self.version, self.kind = config.name, str(config.version), config.runtime
        batching = config.batching
        self.batch_dim = config.max_batch_size > 0
        self.batching = batching is not None and batching.enabled and batching.max_batch_size > 1
        self.max_rows = batching.max_batch_size if batching is not None else 0
        self.delay_s = batching.max_queue_delay_us / 1e6 if self.batching and batching else 0.0
        preferred = sorted(batching.preferred_batch_sizes) if batching else []
        self.preferred_max = preferred[-1] if preferred else 0
        self.max_queue = config.queue.max_size
        self.default_timeout_s = config.queue.default_timeout_us / 1e6
        self.levels: list[deque[Work]] = [deque() for _ in range(config.queue.priority_levels)]
        self.on_execution = on_execution
        # requests in the server that may still queue here; None: not known (never run alone)
        self.arrivals_hint = arrivals_hint
        # `lock` guards the queue and counts; `cond` (the same lock) wakes instance threads. The
        # loop's own paths take the bare lock: no thread waits there, and Condition's Python-level
        # enter/notify cost a few microseconds per request.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.queued = 0
        self.executing = 0  # requests inside running executions
        self.closing = False
        self.on_loop = on_loop
        # loops with a flush pending: one in a server; tests and embedders may drive others
        self._flush_scheduled: set[asyncio.AbstractEventLoop] = set()
        self.threads = [
            threading.Thread(target=self._worker, name=f"{self.name}#{i}", daemon=True)
            for i in range(0 if on_loop else config.instances)
        ]
        self._alive = len(self.threads)
        for t in self.threads:
            t.start()

    # event-loop side ---------------------------------------------------------------------
    def submit(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None = None,
        priority: int = 0,
        oversize: bool = False,
        trace: Any = None,
    ) -> asyncio.Future[Outputs]:
        """Queue one request; await the returned future for its outputs. Not a coroutine: one
        frame less on every request's path. Refusals (queue full, unloading, too many rows) raise
        here, before anything is queued. `oversize`: accept more rows than max_batch_size (run
        alone, in one execution)."""
        rows = batch_rows(inputs) if self.batch_dim else 1
        if self.batch_dim and rows > self.max_rows and not oversize:
            # Triton's rule: a request larger than one execution is the caller's error.
            raise BadRequest(
                f"model {self.name}: batch of {rows} rows exceeds max_batch_size {self.max_rows}"
            )
        if deadline is None and self.default_timeout_s:
            deadline = time.monotonic() + self.default_timeout_s
        loop = asyncio.get_running_loop()
        work = Work(
            inputs, rows, outputs, loop.create_future(), loop, time.perf_counter_ns(), deadline
        )
        if trace is not None:
            work.trace = trace
        level = min(max(priority - 1, 0), len(self.levels) - 1) if priority else 0
        with self.lock:
            if self.closing:
                raise Unavailable(f"model {self.name} is unloading")
            if self.queued >= self.max_queue:
                raise Overloaded(
                    f"model {self.name}: queue full ({self.max_queue} requests waiting); retry later"
                )
            self.levels[level].append(work)
            self.queued += 1
            if self.threads:
                self.cond.notify()
        if self.on_loop:
            # After the handlers that are ready in this loop iteration: they batch together.
            # (Running a request at once when the server holds no other was tried: the server
            # cannot see requests not yet parsed, so at concurrency 32 every request ran alone,
            # -25 % throughput, for 5 us at concurrency 1.)
            self._schedule_flush(loop)
        if deadline is not None:
            work.timer = loop.call_at(
                loop.time() + (deadline - time.monotonic()), self._expire, work
            )
        return work.future

    def _expire(self, work: Work) -> None:
        """The caller's deadline passed: answer 504 now; the worker drops the work if not started."""
        work.expired = True
        if not work.future.done():
            work.future.set_exception(
                DeadlineExceeded(
                    f"model {self.name}: the request's deadline passed before it finished; "
                    "work not yet started was dropped"
                )
            )

    # loop side (on_loop) -------------------------------------------------------------------
    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop not in self._flush_scheduled:
            self._flush_scheduled.add(loop)
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run one batch of what is queued; another flush follows while work remains, so that the
        loop reads sockets between executions."""
        self._flush_scheduled.discard(loop)
        with self.lock:
            batch: list[Work] = []
            self._take(batch, 0)
            self.executing += len(batch)
        if batch:
            self._run_taken(batch)
        with self.lock:
            more = self.queued > 0
            last = self.closing and not more and not self.executing
        if more:
            self._schedule_flush(loop)
        elif last:
            self._unload()

    # worker side -------------------------------------------------------------------------
    def _take(self, batch: list[Work], rows: int) -> int:
        """Move queued work into `batch` (holding the lock) without exceeding max rows."""
        limit = self.max_rows if self.batching else 1
        now = time.monotonic()
        for level in self.levels:
            while level:
                work = level[0]
                if work.expired or (work.deadline is not None and now >= work.deadline):
                    level.popleft()
                    self.queued -= 1
                    if not work.expired:
                        work.expired = True
                        with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                            work.loop.call_soon_threadsafe(self._expire, work)
                    continue
                if batch and (not self.batching or rows + work.rows > limit):
                    return rows
                level.popleft()
                self.queued -= 1
                batch.append(work)
                rows += work.rows
        return rows

    def _others_may_come(self, batch: list[Work]) -> bool:
        if self.arrivals_hint is None:
            return False
        return self.arrivals_hint() - self.queued - self.executing - len(batch) > 0

    def _collect(self) -> list[Work] | None:
        with self.cond:
            batch: list[Work] = []
            rows = 0
            while not batch:
                rows = self._take(batch, rows)
                if batch:
                    break
                if self.closing:
                    return None
                self.cond.wait()
            if self.batching and self.delay_s:
                end = time.monotonic() + self.delay_s
                while rows < self.max_rows and (
                    not self.preferred_max or rows < self.preferred_max
                ):
                    remaining = end - time.monotonic()
                    if remaining <= 0 or not self._others_may_come(batch):
                        break
                    self.cond.wait(remaining)
                    rows = self._take(batch, rows)
            self.executing += len(batch)
            return batch

    def _worker(self) -> None:
        try:
            while (batch := self._collect()) is not None:
                self._run_taken(batch)
        finally:
            with self.cond:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._unload()

    def _run_taken(self, batch: list[Work]) -> None:
        """Execute a batch taken off the queue (counted in `executing`). A fault outside the
        model (statistics, delivery) must not stop the instance thread or the loop's flushes: its
        callers get a 500 and serving goes on."""
        try:
            self._execute(batch)
        except Exception as exc:
            log.exception("execution of %s failed outside the model", self.name)
            self._resolve(batch, None, InternalError(f"model {self.name}: {exc}"))
        finally:
            with self.lock:
                self.executing -= len(batch)

    def _unload(self) -> None:
        try:
            self.runtime.unload()
        except Exception:
            log.exception("unloading %s failed", self.name)

    def _execute(self, batch: list[Work]) -> None:
        started = time.perf_counter_ns()
        timing = ExecutionTiming(rows=sum(w.rows for w in batch))
        timing.queue_ns = [started - w.enqueued_ns for w in batch]
        try:
            results = self._run(batch, timing)
        except Exception as exc:
            if len(batch) > 1:
                # One request's values may have broken the whole batch: run each alone so that
                # only the culprit fails and everyone else still gets an answer.
                for work in batch:
                    self._execute([work])
                return
            self._resolve(batch, None, exc)
            if tracing.ACTIVE is not None and batch[0].trace is not None:
                self._trace(batch, timing, started, str(exc))
            return
        here = _running_loop() if self.on_loop else None
        if here is None:
            self.on_execution(timing)
            self._resolve(batch, results, None)
        else:
            # On the loop the answers go out first: the waiting handlers resume in the next loop
            # iteration and the statistics (~10 us of Python) are counted right after them, ahead
            # of the handler of any request read meanwhile (so a statistics call that follows an
            # answer always sees its execution).
            self._resolve(batch, results, None)
            here.call_soon(self.on_execution, timing)
        if tracing.ACTIVE is not None:
            self._trace(batch, timing, started, None)

    def _trace(
        self, batch: list[Work], timing: ExecutionTiming, started: int, error: str | None
    ) -> None:
        """The execution's spans, when a request it served is traced; after the answers went
        out, so that tracing never delays them."""
        traced = [(w.trace, w.enqueued_ns) for w in batch if w.trace is not None]
        tracer = tracing.ACTIVE
        if not traced or tracer is None:
            return
        infer_start = started + timing.input_ns
        infer_end = infer_start + timing.infer_ns if timing.infer_ns else time.perf_counter_ns()
        try:
            tracer.record_execution(
                self.model,
                self.version,
                self.kind,
                traced,
                timing.rows,
                started,
                infer_start,
                infer_end,
                error,
            )
        except Exception:  # a tracing fault must never stop an instance thread
            log.exception("recording the spans of an execution of %s failed", self.name)

    def _run(self, batch: list[Work], timing: ExecutionTiming) -> list[Outputs]:
        t0 = time.perf_counter_ns()
        if len(batch) == 1:
            inputs = batch[0].inputs
            wanted = batch[0].outputs
        else:
            inputs = {k: np.concatenate([w.inputs[k] for w in batch]) for k in batch[0].inputs}
            wanted = _union([w.outputs for w in batch])
        t1 = time.perf_counter_ns()
        result = self.runtime.predict(inputs, wanted)
        t2 = time.perf_counter_ns()
        if len(batch) == 1:
            parts = [result]
        else:
            parts = []
            offset = 0
            for work in batch:
                end = offset + work.rows
                parts.append(
                    {
                        k: _rows(k, v, offset, end, timing.rows, self.name)
                        for k, v in result.items()
                        if not work.outputs or k in work.outputs
                    }
                )
                offset = end
        timing.input_ns, timing.infer_ns = t1 - t0, t2 - t1
        timing.output_ns = time.perf_counter_ns() - t2
        return parts

    def _resolve(
        self, batch: list[Work], results: list[Outputs] | None, error: BaseException | None
    ) -> None:
        if self.on_loop:
            here = _running_loop()
            if all(w.loop is here for w in batch):
                _deliver(batch, results, error)
                return
            if any(w.loop is not batch[0].loop for w in batch):
                for i, work in enumerate(batch):  # each request back to its own loop
                    self._resolve([work], None if results is None else [results[i]], error)
                return
        # One wake-up of the event loop per execution, not one per request.
        try:
            batch[0].loop.call_soon_threadsafe(_deliver, batch, results, error)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody waits
            log.debug("dropped results of %s: event loop closed", self.name)

    # lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking new work; queued and running work finishes, then the runtime unloads."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            idle = self.on_loop and not self.queued and not self.executing
        if idle and not self._flush_scheduled:
            self._unload()

    @property
    def depth(self) -> int:
        return self.queued


def _deliver(batch: list[Work], results: list[Outputs] | None, error: BaseException | None) -> None:
    for i, work in enumerate(batch):
        if work.timer is not None:
            work.timer.cancel()
        if work.future.done():
            continue  # expired meanwhile; its 504 is already out
        if error is not None:
            work.future.set_exception(error)
        else:
            assert results is not None
            work.future.set_result(results[i])


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _union(wanted: list[Sequence[str] | None]) -> list[str] | None:
    if any(not w for w in wanted):
        return None
    names: dict[str, None] = {}
    for w in wanted:
        names.update(dict.fromkeys(w or ()))
    return list(names)


def _rows(name: str, arr: np.ndarray, start: int, end: int, total: int, model: str) -> Any:
    if arr.ndim == 0 or arr.shape[0] != total:
        raise InternalError(
            f"model {model}: output '{name}' has shape {list(arr.shape)}, which does not carry the "
            f"batch of {total} rows on its first dimension; declare the model without batching"
        )
    return arr[start:end]
