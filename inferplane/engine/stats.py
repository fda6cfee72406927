"""Per-version counters in the shape of the V2 statistics extension (cumulative count + ns)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class ExecutionTiming:
    """What one execution cost; `queue_ns` holds one entry per request of the batch."""

    rows: int
    queue_ns: list[int] = field(default_factory=list)
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class VersionStats:
    """Updated from worker threads and the event loop alike, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0  # batch elements served
        self.execution_count = 0  # model runs
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = {}

    def record_execution(self, timing: ExecutionTiming) -> None:
        """One model run. As in Triton, every request of the batch is charged the batch's compute
        time in `inference_stats` (per request), and the run itself counts once in `batch_stats`."""
        n = len(timing.queue_ns)
        with self._lock:
            self.execution_count += 1
            self.inference_count += timing.rows
            self.last_inference_ms = time.time_ns() // 1_000_000
            for q in timing.queue_ns:
                self.queue.add(q)
            for total, ns in (
                (self.compute_input, timing.input_ns),
                (self.compute_infer, timing.infer_ns),
                (self.compute_output, timing.output_ns),
            ):
                total.count += n
                total.ns += ns * n
            stats = self.batches.setdefault(timing.rows, BatchStats())
            stats.compute_input.add(timing.input_ns)
            stats.compute_infer.add(timing.infer_ns)
            stats.compute_output.add(timing.output_ns)

    def record_request(self, ok: bool, total_ns: int) -> None:
        with self._lock:
            (self.success if ok else self.fail).add(total_ns)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.as_dict(),
                    "fail": self.fail.as_dict(),
                    "queue": self.queue.as_dict(),
                    "compute_input": self.compute_input.as_dict(),
                    "compute_infer": self.compute_infer.as_dict(),
                    "compute_output": self.compute_output.as_dict(),
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": b.compute_input.as_dict(),
                        "compute_infer": b.compute_infer.as_dict(),
                        "compute_output": b.compute_output.as_dict(),
                    }
                    for size, b in sorted(self.batches.items())
                ],
            }
