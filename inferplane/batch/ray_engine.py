"""The Ray engine: Ray Data hands fragments to an actor pool; each actor loads the model once.

Every actor runs the same `FragmentScorer` as the local engine, so both engines write the same
files, commit the same way and resume the same way. Actors ask for a fraction of a CPU
(`--ray-cpus-per-actor`, 0.5 by default) so that on a small machine Ray Data's own tasks still
find a CPU and the pipeline cannot deadlock waiting for one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from inferplane.batch.extras import require_ray
from inferplane.batch.fragment import FragmentScorer
from inferplane.batch.progress import JobProgress
from inferplane.batch.readers import Fragment, InputTable
from inferplane.batch.spec import JobFailed, JobSpec, error_from_wire, error_to_wire
from inferplane.errors import InferplaneError


class FragmentActor:
    """Ray Data calls this with batches of fragment indexes; it answers their commit entries."""

    def __init__(self, job: JobSpec, table: InputTable, fragments: list[Fragment]) -> None:
        self.fragments = fragments
        self.scorer = FragmentScorer(job, table)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Our errors travel back as data: through Ray's exception wrappers the job would lose
        # their type, hence the exit code, and Ray Data could retry a fragment that must stop.
        entries = []
        for i in batch["index"]:
            try:
                entries.append(json.dumps(self.scorer.score(self.fragments[int(i)])))
            except InferplaneError as exc:
                entries.append(json.dumps({"error": error_to_wire(exc)}))
        return {"entry": np.array(entries, dtype=object)}


def run_ray(
    job: JobSpec,
    table: InputTable,
    pending: list[Fragment],
    progress: JobProgress,
    on_done: Callable[[dict[str, Any]], None],
    *,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 0.5,
    stopping: threading.Event | None = None,
) -> None:
    """Once `stopping` is set, returns after the next committed fragment (the actors' other
    work in flight is dropped uncommitted: a rerun scores it)."""
    if not pending:
        return
    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        size = actors or max(1, min(len(pending), int(cpus)))
        items = [{"index": i} for i in range(len(pending))]
        dataset = ray.data.from_items(items, override_num_blocks=len(pending)).map_batches(
            FragmentActor,
            batch_size=1,
            concurrency=size,
            num_cpus=cpus_per_actor,
            fn_constructor_kwargs={"job": job, "table": table, "fragments": pending},
        )
        try:
            for row in dataset.iter_rows():
                entry = json.loads(row["entry"])
                if "error" in entry:
                    raise error_from_wire(*entry["error"])
                progress.advance(int(entry["rows_in"]))
                on_done(entry)
                if stopping is not None and stopping.is_set():
                    return
        except InferplaneError:
            raise
        except Exception as exc:
            raise _unwrap(exc) from exc
    finally:
        if started_here:
            ray.shutdown()


def _unwrap(exc: BaseException) -> InferplaneError:
    """The error an actor raised, out of Ray's wrappers (they chain or subclass it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, InferplaneError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return JobFailed(f"the Ray job failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
