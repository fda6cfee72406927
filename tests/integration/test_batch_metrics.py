"""`inferplane batch --metrics-port`: the job serves its Prometheus metrics while it runs.

The job scores with a python model that sleeps on each request, so that it runs long enough
for the test to scrape it between files."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from inferplane.batch.progress import BatchMetrics, JobProgress
from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec
from tests.conftest import free_port
from tests.integration.batch.conftest import write_parquet_files
from tests.integration.servers import ROOT

SLOW_MODEL = textwrap.dedent(
    """
    import time
    import numpy as np


    class Model:
        def predict(self, inputs):
            n = inputs["input"].shape[0]
            if inputs["input"].any():  # not the warm-up on zeros
                time.sleep(0.15)
            return {"label": np.ones(n, dtype=np.int64)}
    """
)
# Every name the batch job exports (tests/deploy/test_observability.py checks the dashboard
# against this list).
BATCH_METRICS = {
    "inferplane_batch_job_info",
    "inferplane_batch_job_start_time_seconds",
    "inferplane_batch_rows_total",
    "inferplane_batch_rows_processed_total",
    "inferplane_batch_rows_planned",
    "inferplane_batch_fragments",
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _slow_repo(tmp_path: Path) -> Path:
    repo, code = tmp_path / "repo", tmp_path / "slow"
    code.mkdir()
    (code / "model.py").write_text(SLOW_MODEL)
    register(
        Repository(str(repo)),
        "slow",
        str(code),
        inputs=[TensorSpec("input", "FP32", [-1, 32])],
        outputs=[TensorSpec("label", "INT64", [-1])],
    )
    return repo


def test_a_running_job_serves_its_progress_on_the_metrics_port(tmp_path: Path) -> None:
    repo = _slow_repo(tmp_path)
    write_parquet_files(tmp_path / "in", files=4, rows=100)
    port = free_port()
    cmd = [
        sys.executable, "-m", "inferplane", "batch", "-i", str(tmp_path / "in"),
        "-o", str(tmp_path / "out"), "-s", "slow", "-r", str(repo), "--workers", "1",
        "--batch-size", "25", "--concurrency", "1", "--job-id", "nightly-1",
        "--metrics-port", str(port), "--log-interval", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()
    )
    scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            scrapes.append(_samples(text))
            time.sleep(0.1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "rows: 400 in, 400 out, 0 errored" in out.decode()

    job = (("job", "nightly-1"),)
    running = [s for s in scrapes if ("inferplane_batch_fragments", (*job, ("state", "done"))) in s]
    assert len(running) >= 3, f"scraped the job {len(running)} times while it ran"
    names = {name for s in running for name, _ in s}
    for name in BATCH_METRICS - {
        "inferplane_batch_rows_total",
        "inferplane_batch_rows_processed_total",
    }:
        assert name in names
    assert (
        "inferplane_batch_rows_total" in names and "inferplane_batch_rows_processed_total" in names
    )

    first, last = running[0], running[-1]
    info = ("inferplane_batch_job_info", (("engine", "local"), *job, ("target", "slow")))
    assert first[info] == 1.0
    started = first[("inferplane_batch_job_start_time_seconds", job)]
    assert time.time() - 180 < started <= time.time()
    assert first[("inferplane_batch_rows_planned", job)] == 400.0

    def done(s: dict) -> float:
        return s[("inferplane_batch_fragments", (*job, ("state", "done")))]

    def pending(s: dict) -> float:
        return s[("inferplane_batch_fragments", (*job, ("state", "pending")))]

    def processed(s: dict) -> float:
        return s[("inferplane_batch_rows_processed_total", job)]

    def scored(s: dict) -> float:
        return s[("inferplane_batch_rows_total", (*job, ("status", "scored")))]

    assert all(done(s) + pending(s) == 4 for s in running)
    # Seen midway: some files committed, some pending, rows counted as they go.
    assert any(0 < done(s) < 4 and 0 < scored(s) < 400 for s in running)
    assert any(0 < processed(s) < 400 for s in running)
    # Counters only grow.
    for before, after in itertools.pairwise(running):
        assert processed(after) >= processed(before) and scored(after) >= scored(before)
        assert done(after) >= done(before)
    assert scored(last) <= processed(last) <= 400
    assert last[("inferplane_batch_rows_total", (*job, ("status", "failed")))] == 0.0

    # Gone with the job: the port is closed once it exits.
    try:
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
        raise AssertionError("the metrics port still answers after the job exited")
    except httpx.TransportError:
        pass


def test_without_the_flag_no_port_is_opened() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "inferplane", "batch", "--help"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    assert "--metrics-port" in help_text and "0: off" in help_text


def test_committed_files_split_their_rows_into_scored_and_failed() -> None:
    """With each file's manifest entry, rows count as scored or failed when the file commits;
    rows still being scored only count as processed."""
    metrics = BatchMetrics(job="j", target="fraud", engine="local")
    assert _samples(_render(metrics)) == {}, "nothing before the job starts scoring"
    with metrics.watch():
        progress = JobProgress(300, 3, stream=open(os.devnull, "w"), fancy=False)  # noqa: SIM115
    outside = JobProgress(10, 1, stream=open(os.devnull, "w"), fancy=False)  # noqa: SIM115
    outside.advance(10)  # made after watch() closed: not counted
    progress.advance(100)
    progress.fragment_done({"rows_in": 100, "rows_out": 97, "rows_errored": 3})
    progress.advance(60)
    got = _samples(_render(metrics))
    assert got[("inferplane_batch_rows_total", (("job", "j"), ("status", "scored")))] == 97
    assert got[("inferplane_batch_rows_total", (("job", "j"), ("status", "failed")))] == 3
    assert got[("inferplane_batch_rows_processed_total", (("job", "j"),))] == 160
    assert got[("inferplane_batch_fragments", (("job", "j"), ("state", "done")))] == 1
    assert got[("inferplane_batch_fragments", (("job", "j"), ("state", "pending")))] == 2
    # Without an entry every processed row not yet counted counts as scored.
    progress.fragment_done()
    got = _samples(_render(metrics))
    assert got[("inferplane_batch_rows_total", (("job", "j"), ("status", "scored")))] == 157
    assert {name for name, _ in got} == BATCH_METRICS


def test_the_job_id_comes_from_the_jobs_first_log_line() -> None:
    metrics = BatchMetrics()
    metrics.log_line("job 20261201T000000Z-abcd1234: 3 of 3 input files to score")
    metrics.log_line("job other: ignored, the id is known")
    assert metrics.job == "20261201T000000Z-abcd1234"


def _render(metrics: BatchMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
