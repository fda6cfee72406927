"""`inferplane batch --shards N --shard-index I`: processes sharing one job and one output, as
the pods of a Kubernetes Indexed Job do (deploy/batch/indexed-job.yaml)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.integration.batch.conftest import (
    assert_scores,
    read_scores,
    run_batch,
    write_parquet_files,
)
from tests.integration.servers import ROOT


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "inferplane", "batch", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_three_shards_at_once_score_every_row_once_and_the_last_writes_the_manifest(
    repo: Path, tmp_path: Path
) -> None:
    x = write_parquet_files(tmp_path / "in", files=6, rows=2000)
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular", "-r", str(repo),
            "--id-column", "customer_id", "--workers", "1", "--log-interval", "0",
            "--job-id", "nightly", "--shards", "3"]  # fmt: skip
    procs = [_start(*args, "--shard-index", str(i)) for i in range(3)]
    results = [(p, *p.communicate(timeout=120)) for p in procs]
    for i, (proc, stdout, stderr) in enumerate(results):
        assert proc.returncode == 0, (i, stdout, stderr)
        assert f"batch shard {i}/3: 4,000/4,000 rows (100.0%), 2/2 files" in stderr  # its share
    last = [i for i, (_, stdout, _) in enumerate(results) if "succeeded" in stdout]
    assert last, "no shard wrote the manifest"  # two may, when they finish at the same time
    for i, (_, stdout, _) in enumerate(results):
        if i in last:
            assert f"2 files scored, 0 already committed; shard {i}/3 finished last" in stdout
            assert "rows: 12,000 in, 12,000 out, 0 errored" in stdout
        else:
            assert (
                f"job nightly: shard {i}/3: 2 of its 2 fragments committed; " in stdout
                and " for the whole job; the last shard to finish writes the manifest" in stdout
            ), stdout

    table = read_scores(out)
    assert_scores(table, repo, x, range(12000))  # every row exactly once
    assert set(table["job_id"].to_pylist()) == {"nightly"}
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == {"in": 12000, "out": 12000, "errored": 0}
    assert len(manifest["fragments"]) == 6 and (out / "_SUCCESS").exists()
    # The shards planned at the same time, each wrote _job.json: the manifest agrees with it.
    assert manifest["created_at"] == json.loads((out / "_job.json").read_text())["created_at"]
    assert not (out / "_tmp").exists()

    again = run_batch(*args, "--shard-index", "1")
    assert again.returncode == 0, again.stderr
    assert "job nightly: already complete" in again.stdout and "12,000 rows scored" in again.stdout


def test_a_shard_with_no_files_exits_0_and_reports_the_job(repo: Path, tmp_path: Path) -> None:
    write_parquet_files(tmp_path / "in", files=2, rows=10)
    out = tmp_path / "out"
    done = run_batch("-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular",
                     "-r", str(repo), "--job-id", "j", "--shards", "5",
                     env={"JOB_COMPLETION_INDEX": "4"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        "job j: shard 4/5: 0 of its 0 fragments committed; 0 of 2 for the whole job; the last "
        "shard to finish writes the manifest"
    ) in " ".join(done.stdout.split())
    assert not (out / "_SUCCESS").exists()


def test_a_shard_stopped_by_sigterm_exits_3_and_its_rerun_finishes_the_job(
    repo: Path, tmp_path: Path
) -> None:
    files, rows = 12, 20_000
    write_parquet_files(tmp_path / "in", files=files, rows=rows)
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular", "-r", str(repo),
            "--id-column", "customer_id", "--workers", "1", "--job-id", "j",
            "--shards", "2"]  # fmt: skip
    proc = _start(*args, "--shard-index", "0")
    entries = out / "_manifest"
    deadline = time.monotonic() + 60
    while not (entries.exists() and any(entries.iterdir())):
        assert proc.poll() is None, "the shard ended before the test could stop it"
        assert time.monotonic() < deadline, "no fragment committed within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "stopped by SIGTERM at a fragment boundary" in stderr
    assert "rerun shard 0/2 to resume" in " ".join(stderr.split())
    stopped = len(list(entries.iterdir()))
    assert 0 < stopped < files // 2, f"{stopped} of shard 0's {files // 2} files committed"

    # As if another shard had planned at the same time and its _job.json had won the race.
    job_file = json.loads((out / "_job.json").read_text())
    job_file["created_at"] = "2026-11-28T01:30:00.000+00:00"
    (out / "_job.json").write_text(json.dumps(job_file))

    other = run_batch(*args, "--shard-index", "1")
    assert other.returncode == 0, other.stderr
    assert (
        f"shard 1/2: 6 of its 6 fragments committed; {stopped + 6} of {files} for the whole job"
    ) in other.stdout
    assert not (out / "_SUCCESS").exists()

    rerun = run_batch(*args, "--shard-index", "0")
    assert rerun.returncode == 0, rerun.stderr
    assert (
        f"{6 - stopped} files scored, {stopped} already committed; shard 0/2 finished last "
        "(6 files by the other shards) and wrote the manifest"
    ) in " ".join(rerun.stdout.split())
    table = read_scores(out)
    assert np.array_equal(table["customer_id"].to_numpy(), np.arange(files * rows))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == {"in": files * rows, "out": files * rows, "errored": 0}
    assert manifest["created_at"] == "2026-11-28T01:30:00.000+00:00"
    assert (out / "_SUCCESS").exists() and not (out / "_tmp").exists()

    done = run_batch(*args, "--shard-index", "1")
    assert done.returncode == 0 and "already complete" in done.stdout, done.stderr
