"""The audit trail: one record per prediction, written in batches by a thread off the hot path.

`AuditLog.record()` is what the predictor calls for every answer (online, stream or batch): it
appends to a bounded buffer under a lock and returns; a daemon thread drains the buffer into a
sink (`open_sink`: SQLite by default, JSONL or Parquet files). When the sink falls behind and the
buffer is full, new records are dropped and counted rather than queued without bound or blocking
the caller. `close()` (and `flush()`) wait until everything recorded so far is written.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from inferplane.observability.redaction import MAX_VALUES, NO_REDACTION

if TYPE_CHECKING:
    import numpy as np
    from prometheus_client import CollectorRegistry

log = logging.getLogger("inferplane.audit")

DEFAULT_SINK = "./inferplane-audit.db"
DROP_REASONS = ("buffer_full", "sink_error", "closed")
# A sink that keeps failing would otherwise write one log line per batch.
_ERROR_LOG_INTERVAL_S = 10.0


@dataclass(slots=True)
class AuditRecord:
    request_id: str
    time: float  # epoch seconds when the request arrived
    service: str  # the target the caller named (a service or a model name)
    model: str  # the model that answered ("" if none did)
    version: str
    route: str  # direct, production, canary, ab:<arm>, fallback, cache, shadow...
    latency_ms: float
    status: int  # HTTP-style: 200, 400, 404, 503, 504, 500
    tenant: str | None = None
    error: str | None = None
    pattern: str = "online"  # online | stream | batch
    payload_hash: str | None = None  # of the redacted payload (docs/audit.md)
    payload: str | None = None
    # Who called, as the edge authenticated them; last, so that positional records and
    # databases written before it existed (their column is added at the end) keep working.
    principal: str | None = None
    trace_id: str | None = (
        None  # the W3C trace the request belongs to (traced or sent by the caller)
    )
    # None for a prediction; "rollout" for a rollout controller's decision (docs/rollouts.md)
    kind: str | None = None


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AuditRecord))


class AuditSink(Protocol):
    """Where records end up. `write` is only ever called from the log's writer thread."""

    description: str  # e.g. "sqlite:/var/lib/inferplane/audit.db", for log lines

    def write(self, records: Sequence[AuditRecord]) -> None: ...

    def close(self) -> None: ...


def open_sink(spec: str) -> AuditSink:
    """`audit.db` or `sqlite:///abs/audit.db` (SQLite), `jsonl:/path/a.jsonl`, `parquet:/dir`."""
    from inferplane.observability.audit_sinks import open_sink as _open

    return _open(spec)


def query(
    spec_or_path: str,
    *,
    request_id: str | None = None,
    since_s: float | None = None,
    service: str | None = None,
    model: str | None = None,
    status: int | None = None,
    principal: str | None = None,
    trace_id: str | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """The latest `limit` matching records of a sink, oldest first (SQLite, JSONL or Parquet)."""
    from inferplane.observability.audit_sinks import query as _query

    return _query(
        spec_or_path,
        request_id=request_id,
        since_s=since_s,
        service=service,
        model=model,
        status=status,
        principal=principal,
        trace_id=trace_id,
        kind=kind,
        limit=limit,
    )


class AuditLog:
    """A bounded buffer of records and the one thread that writes them to `sink` in batches."""

    def __init__(
        self,
        sink: AuditSink,
        *,
        capacity: int = 65536,
        batch_size: int = 2048,
        # Short, so that each wake of the writer holds the GIL briefly: at 8,000 requests/s a
        # 250 ms interval stalled the event loop long enough to add ~2-3 ms to the p99 of
        # concurrency 32 (docs/audit.md); 20 ms keeps it within noise of no audit at all.
        flush_interval_s: float = 0.02,
        registry: CollectorRegistry | None = None,
        payload_sample_rate: float = 0.0,
    ) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError("capacity and batch_size must be >= 1")
        if flush_interval_s <= 0:
            raise ValueError("flush_interval_s must be > 0")
        if not 0.0 <= payload_sample_rate <= 1.0:
            raise ValueError("payload_sample_rate must be within [0, 1]")
        self.sink = sink
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.payload_sample_rate = payload_sample_rate
        self._buf: deque[AuditRecord] = deque()
        self._limit = capacity  # set to 0 by close(): later records are refused the same way
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._accepted = 0  # records that entered the buffer
        self._done = 0  # records the writer finished with (written or lost to the sink)
        self._written = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._stopping = False
        self._closed = False
        self._last_error_log = 0.0
        self._errors_since_log = 0
        self._random = random.Random()
        self._collector: _AuditCollector | None = None
        if registry is not None:
            self._collector = _AuditCollector(self)
            registry.register(self._collector)
        self._thread = threading.Thread(
            target=self._run, name="inferplane-audit-writer", daemon=True
        )
        self._thread.start()
        # A process that exits without close() (a script, a killed loop) still writes its tail.
        atexit.register(self.close)

    # -- the hot path ------------------------------------------------------------------------

    def record(self, rec: AuditRecord) -> None:
        """Queue one record; never blocks on the sink. A full buffer drops it and counts it."""
        with self._lock:
            n = len(self._buf)
            if n >= self._limit:
                self._dropped["closed" if self._closed else "buffer_full"] += 1
                return
            self._buf.append(rec)
            self._accepted += 1
        if n + 1 == self.batch_size:
            self._wake.set()

    def wants_payload(self) -> bool:
        """Whether this request's payload should be captured (payload_sample_rate)."""
        rate = self.payload_sample_rate
        return rate > 0.0 and (rate >= 1.0 or self._random.random() < rate)

    # -- counters ----------------------------------------------------------------------------

    @property
    def written(self) -> int:
        return self._written

    @property
    def dropped(self) -> int:
        """Records lost for any reason: buffer full, the sink failing, or recorded after close."""
        return sum(self._dropped.values())

    def dropped_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dropped)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # -- flush and shutdown ------------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record accepted so far is written (or lost to a sink error).

        Returns False when `timeout_s` passed first. Blocks: call it from a thread (e.g.
        `asyncio.to_thread`), not from the event loop, except at shutdown.
        """
        with self._lock:
            target = self._accepted
        self._wake.set()
        with self._progress:
            done = self._progress.wait_for(lambda: self._done >= target, timeout_s)
        if not done:
            log.warning(
                "audit flush timed out after %.1f s with %d records unwritten (sink %s)",
                timeout_s,
                target - self._done,
                self.sink.description,
            )
        return done

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything, stop the writer thread and close the sink. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._limit = 0
            self._stopping = True
        atexit.unregister(self.close)
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            # The sink hangs: leave the daemon thread to die with the process rather than
            # closing the sink under it.
            log.error(
                "audit writer did not finish within %.1f s; %d records unwritten (sink %s)",
                timeout_s,
                len(self._buf),
                self.sink.description,
            )
            return
        try:
            self.sink.close()
        except Exception:
            log.exception("closing audit sink %s failed", self.sink.description)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            while self._buf:
                self._write_batch(self._take_batch())
            if self._stopping and not self._buf:
                return

    def _take_batch(self) -> list[AuditRecord]:
        buf = self._buf
        # Only this thread pops, and record() only appends, so popleft needs no lock.
        return [buf.popleft() for _ in range(min(self.batch_size, len(buf)))]

    def _write_batch(self, batch: list[AuditRecord]) -> None:
        try:
            self.sink.write(batch)
        except Exception as exc:
            with self._lock:
                self._dropped["sink_error"] += len(batch)
            self._log_sink_error(exc, len(batch))
        else:
            self._written += len(batch)
        with self._progress:
            self._done += len(batch)
            self._progress.notify_all()

    def _log_sink_error(self, exc: Exception, lost: int) -> None:
        self._errors_since_log += lost
        now = time.monotonic()
        if now - self._last_error_log < _ERROR_LOG_INTERVAL_S:
            return
        log.error(
            "audit sink %s failed, %d records lost since the last report: %s: %s",
            self.sink.description,
            self._errors_since_log,
            type(exc).__name__,
            exc,
        )
        self._last_error_log = now
        self._errors_since_log = 0


class _AuditCollector:
    """Reads the log's counters at scrape time, so record() pays nothing for metrics."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def describe(self) -> Iterator[Metric]:
        yield from self._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        written = CounterMetricFamily(
            "inferplane_audit_records", "Audit records written to the audit sink."
        )
        dropped = CounterMetricFamily(
            "inferplane_audit_dropped",
            "Audit records lost: buffer full (sink behind), sink error, or recorded after close.",
            labels=["reason"],
        )
        buffered = GaugeMetricFamily(
            "inferplane_audit_buffer_records", "Audit records waiting in the buffer for the writer."
        )
        if with_samples:
            written.add_metric([], self.audit.written)
            for reason, n in self.audit.dropped_by_reason().items():
                dropped.add_metric([reason], n)
            buffered.add_metric([], self.audit.buffered)
        yield from (written, dropped, buffered)


# -- payload capture (for sampled requests) ----------------------------------------------------


def payload_hash(inputs: Mapping[str, np.ndarray]) -> str:
    """sha256 of the input tensors (names, dtypes, shapes, values): equal inputs, equal hash.

    Unredacted; `redaction.Redactor.digest` is the same digest with a target's rules applied.
    """
    return NO_REDACTION.digest(inputs)


def payload_json(inputs: Mapping[str, np.ndarray], max_values: int = MAX_VALUES) -> str:
    """The inputs as JSON ({name: {dtype, shape, data}}), at most `max_values` values per tensor.

    A larger tensor keeps its first values and says `"truncated": true`, so a sampled payload
    never makes the audit trail grow with request size. Unredacted, like `payload_hash`.
    """
    return NO_REDACTION.payload_json(inputs, max_values)
