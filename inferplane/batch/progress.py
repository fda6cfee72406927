"""Job progress: a rich bar (rows/s, ETA) on a terminal, plain log lines otherwise, and the
job's Prometheus metrics (`inferplane batch --metrics-port`), read from the same counts."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class JobProgress:
    """Counts rows and fragments; `interval_s` spaces the plain log lines, which `label` (e.g.
    "shard 1/4") names."""

    def __init__(
        self,
        total_rows: int | None,
        total_fragments: int,
        *,
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        fancy: bool | None = None,
        label: str = "",
    ) -> None:
        self.stream = stream or sys.stderr
        self.label = label
        self.total_rows = total_rows
        self.total_fragments = total_fragments
        self.rows = 0
        self.fragments = 0
        self.interval_s = interval_s
        self.started = time.monotonic()
        self._last_line = self.started
        fancy = self.stream.isatty() if fancy is None else fancy
        self._bar: Progress | None = None
        self._task: Any = None
        if fancy:
            self._bar = Progress(
                TextColumn(f"[bold]scoring{' ' + escape(label) if label else ''}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows  {task.fields[rate]} rows/s  {task.fields[frags]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._bar.add_task(
                "scoring", total=total_rows, rate="-", frags=self._frags()
            )
            self._bar.start()
        self._watchers = list(_WATCHERS)  # the metrics watching when the job made this
        for watcher in self._watchers:
            watcher.started(self)

    def _frags(self) -> str:
        return f"{self.fragments}/{self.total_fragments} files"

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    def advance(self, rows: int) -> None:
        self.rows += rows
        self._update()

    def fragment_done(self, entry: Mapping[str, Any] | None = None) -> None:
        """One input file committed; `entry` (its manifest entry: rows_out, rows_errored) lets
        the metrics split its rows into scored and failed."""
        self.fragments += 1
        for watcher in self._watchers:
            watcher.fragment_done(self, entry)
        self._update(force=self._bar is None and self.fragments == self.total_fragments)

    def _update(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self.rows, rate=f"{self.rate():,.0f}", frags=self._frags()
            )
            return
        now = time.monotonic()
        if not force and now - self._last_line < self.interval_s:
            return
        self._last_line = now
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def line(self) -> str:
        rate = self.rate()
        parts = [f"batch{' ' + self.label if self.label else ''}: {self.rows:,}"]
        if self.total_rows:
            parts[0] += f"/{self.total_rows:,} rows ({100 * self.rows / self.total_rows:.1f}%)"
        else:
            parts[0] += " rows"
        parts.append(self._frags())
        parts.append(f"{rate:,.0f} rows/s")
        if self.total_rows and rate > 0:
            parts.append(f"ETA {_duration((self.total_rows - self.rows) / rate)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# BatchMetrics watching the JobProgress objects made while they are attached (`watch`).
_WATCHERS: list[BatchMetrics] = []
_JOB_LINE = re.compile(r"job (\S+): ")


class BatchMetrics:
    """A batch job's Prometheus metrics on a registry of their own, read at scrape time from
    the job's JobProgress (made by the job while this is attached):

    - `inferplane_batch_rows_total{job,status}`: rows of committed input files, `scored` or
      `failed` (written to _errors/); counted when each file commits;
    - `inferplane_batch_rows_processed_total{job}`: rows read and run so far, as they go (the
      rows/s of a job whose files are large);
    - `inferplane_batch_rows_planned{job}`: rows this run has to score (absent when the
      input's row counts are unknown);
    - `inferplane_batch_fragments{job,state}`: input files of this run `done` and `pending`;
    - `inferplane_batch_job_info{job,target,engine}` (1) and
      `inferplane_batch_job_start_time_seconds{job}` (Unix time the run started).
    """

    def __init__(self, *, job: str | None = None, target: str = "", engine: str = "") -> None:
        self.job = job or ""
        self.target, self.engine = target, engine
        self.start_time = time.time()
        self.progress: JobProgress | None = None
        self.scored = 0
        self.failed = 0
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(_BatchCollector(self))
        self._server: Any = None

    def log_line(self, line: str) -> None:
        """Learn the job id from the job's first log line ("job <id>: ...") when not given."""
        if not self.job:
            found = _JOB_LINE.match(line)
            if found:
                self.job = found.group(1)

    @contextmanager
    def watch(self) -> Iterator[BatchMetrics]:
        """Count the JobProgress made while this is open (for as long as it lives)."""
        _WATCHERS.append(self)
        try:
            yield self
        finally:
            _WATCHERS.remove(self)

    def started(self, progress: JobProgress) -> None:
        with self._lock:
            self.progress = progress
            self.start_time = time.time()

    def fragment_done(self, progress: JobProgress, entry: Mapping[str, Any] | None) -> None:
        with self._lock:
            if entry is not None and "rows_errored" in entry:
                failed = int(entry["rows_errored"])
                self.failed += failed
                self.scored += int(entry.get("rows_out", int(entry.get("rows_in", 0)) - failed))
            else:
                # No entry: every row processed and not yet counted counts as scored (with
                # parallel workers this includes rows of files still being scored).
                self.scored = max(self.scored, progress.rows - self.failed)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on `port` (0: any free port) in a thread; returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _BatchCollector(Collector):
    def __init__(self, metrics: BatchMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m = self.metrics
        with m._lock:
            progress, job, scored, failed = m.progress, m.job, m.scored, m.failed
        if progress is None:
            return  # still planning (the job id may not be known yet)
        info = GaugeMetricFamily(
            "inferplane_batch_job_info",
            "A batch job run: its id, target (service or model) and engine; always 1.",
            labels=["job", "target", "engine"],
        )
        info.add_metric([job, m.target, m.engine], 1)
        yield info
        start = GaugeMetricFamily(
            "inferplane_batch_job_start_time_seconds",
            "Unix time this run of the batch job started scoring.",
            labels=["job"],
        )
        start.add_metric([job], m.start_time)
        yield start
        rows = CounterMetricFamily(
            "inferplane_batch_rows",
            "Rows of committed input files by status: scored, or failed (written to _errors/).",
            labels=["job", "status"],
        )
        rows.add_metric([job, "scored"], scored)
        rows.add_metric([job, "failed"], failed)
        yield rows
        processed = CounterMetricFamily(
            "inferplane_batch_rows_processed",
            "Rows read and run through the model so far (scored or failed), as they go.",
            labels=["job"],
        )
        processed.add_metric([job], progress.rows)
        yield processed
        planned = GaugeMetricFamily(
            "inferplane_batch_rows_planned",
            "Rows this run of the job has to score (absent when the input does not say).",
            labels=["job"],
        )
        if progress.total_rows is not None:
            planned.add_metric([job], progress.total_rows)
        yield planned
        fragments = GaugeMetricFamily(
            "inferplane_batch_fragments",
            "Input files of this run by state: done (committed) or pending.",
            labels=["job", "state"],
        )
        done = progress.fragments
        fragments.add_metric([job, "done"], done)
        fragments.add_metric([job, "pending"], max(0, progress.total_fragments - done))
        yield fragments


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
