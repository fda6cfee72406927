"""Job progress: a rich bar (rows/s, ETA) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class JobProgress:
    """Counts rows and fragments; `interval_s` spaces the plain log lines."""

    def __init__(
        self,
        total_rows: int | None,
        total_fragments: int,
        *,
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        fancy: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
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
                TextColumn("[bold]scoring"),
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

    def _frags(self) -> str:
        return f"{self.fragments}/{self.total_fragments} files"

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    def advance(self, rows: int) -> None:
        self.rows += rows
        self._update()

    def fragment_done(self) -> None:
        self.fragments += 1
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
        parts = [f"batch: {self.rows:,}"]
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


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
