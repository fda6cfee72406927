"""The local engine: a process pool over fragments, one predictor per worker process.

Each worker gets its own slice of the machine's cores (CPU affinity), so that a runtime sizing its
thread pool from the cores it may use (ONNX Runtime's intra-op threads) does not oversubscribe the
machine. Workers die with the job (PR_SET_PDEATHSIG): a killed job leaves nothing writing behind
it, and the rerun starts from the committed fragments.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from inferplane.batch.fragment import FragmentScorer
from inferplane.batch.progress import JobProgress
from inferplane.batch.readers import Fragment, InputTable
from inferplane.batch.spec import JobFailed, JobSpec, error_from_wire, error_to_wire
from inferplane.errors import InferplaneError

OnDone = Callable[[dict[str, Any]], None]


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def run_local(
    job: JobSpec,
    table: InputTable,
    pending: list[Fragment],
    progress: JobProgress,
    on_done: OnDone,
    *,
    workers: int | None = None,
    stopping: threading.Event | None = None,
) -> None:
    """Score `pending` in worker processes; once `stopping` is set no new fragment starts and
    this returns when the ones being scored are committed."""
    if not pending:
        return
    stopping = stopping or threading.Event()
    count = min(workers or len(usable_cores()), len(pending))
    if count == 1:
        _run_inline(job, table, pending, progress, on_done, stopping)
        return
    ctx = mp.get_context("spawn")  # no fork of a process with threads (ORT, asyncio)
    tasks: Any = ctx.Queue()
    events: Any = ctx.Queue()
    stop: Any = ctx.Event()  # workers take no new fragment once it is set
    for fragment in pending:
        tasks.put(fragment)
    for _ in range(count):
        tasks.put(None)
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, count, job, table, tasks, events, stop),
            name=f"inferplane-batch-{i}",
            daemon=True,
        )
        for i in range(count)
    ]
    for p in procs:
        p.start()
    remaining = len(pending)
    ok = False
    try:
        while remaining:
            if stopping.is_set() and not stop.is_set():
                stop.set()
            try:
                kind, payload = events.get(timeout=0.2 if stop.is_set() else 0.5)
            except queue.Empty:
                if stop.is_set() and not any(p.is_alive() for p in procs):
                    break  # every worker finished its fragment and left; all events are read
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise JobFailed(
                        f"worker process {dead[0].name} died (exit code {dead[0].exitcode}); "
                        "committed fragments are kept, rerun the job to resume"
                    ) from None
                continue
            if kind == "rows":
                progress.advance(payload)
            elif kind == "done":
                remaining -= 1
                on_done(payload)
            else:
                raise error_from_wire(*payload)
        ok = True
    finally:
        for p in procs:
            if not ok and p.is_alive():
                p.kill()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        tasks.close()
        events.close()


def _run_inline(
    job: JobSpec,
    table: InputTable,
    pending: list[Fragment],
    progress: JobProgress,
    on_done: OnDone,
    stopping: threading.Event,
) -> None:
    scorer = FragmentScorer(job, table)
    try:
        for fragment in pending:
            if stopping.is_set():
                return
            on_done(scorer.score(fragment, progress.advance))
    finally:
        scorer.close()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pin(index: int, count: int) -> None:
    cores = usable_cores()
    if count <= len(cores) and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cores[index::count])


def _worker(
    index: int, count: int, job: JobSpec, table: InputTable, tasks: Any, events: Any, stop: Any
) -> None:
    _die_with_parent()
    # The job stops its workers itself (SIGTERM: through `stop`, at a fragment boundary).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _pin(index, count)
    try:
        scorer = FragmentScorer(job, table)
    except InferplaneError as exc:
        events.put(("failed", error_to_wire(exc)))
        return
    try:
        while not stop.is_set() and (fragment := tasks.get()) is not None:
            try:
                entry = scorer.score(fragment, lambda rows: events.put(("rows", rows)))
            except InferplaneError as exc:
                events.put(("failed", error_to_wire(exc)))
                return
            except Exception as exc:
                traceback.print_exc()
                events.put(("failed", (1, f"input '{fragment.key}': {type(exc).__name__}: {exc}")))
                return
            events.put(("done", entry))
    finally:
        scorer.close()
