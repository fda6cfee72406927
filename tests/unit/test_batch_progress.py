"""Batch progress: plain lines off a terminal (rows, files, rows/s, ETA), a rich bar on one."""

from __future__ import annotations

import io

from inferplane.batch.progress import JobProgress


def test_plain_lines_carry_rows_files_rate_and_eta() -> None:
    out = io.StringIO()
    progress = JobProgress(1000, 2, stream=out, interval_s=0.0, fancy=False)
    progress.advance(250)
    progress.fragment_done()
    progress.close()
    first = out.getvalue().splitlines()[0]
    assert first.startswith("batch: 250/1,000 rows (25.0%), 0/2 files, ")
    assert "rows/s, ETA " in first
    assert out.getvalue().splitlines()[-1].startswith("batch: 250/1,000 rows (25.0%), 1/2 files")


def test_unknown_totals_leave_the_eta_out_and_lines_are_spaced() -> None:
    out = io.StringIO()
    progress = JobProgress(None, 3, stream=out, interval_s=3600, fancy=False)
    progress.advance(10)  # within the interval: no line
    assert out.getvalue() == ""
    for _ in range(3):
        progress.fragment_done()  # the last file always gets its line
    line = out.getvalue().strip()
    assert line.startswith("batch: 10 rows, 3/3 files, ") and "ETA" not in line


def test_the_terminal_bar_shows_rows_per_second() -> None:
    out = io.StringIO()
    progress = JobProgress(100, 1, stream=out, fancy=True)
    progress.advance(100)
    progress.fragment_done()
    progress.close()
    text = out.getvalue()
    assert "100/100" in text and "rows/s" in text and "1/1 files" in text
