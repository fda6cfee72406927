"""`inferplane batch` on local disk with the local engine: outputs, manifest, bad rows, resume."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tests.integration.batch.conftest import (
    FEATURES,
    assert_scores,
    expected_scores,
    features,
    read_scores,
    run_batch,
    write_parquet_files,
)
from tests.integration.servers import ROOT


def test_scores_parquet_with_a_process_pool_and_a_rerun_is_a_no_op(
    repo: Path, tmp_path: Path
) -> None:
    x = write_parquet_files(tmp_path / "in", files=3, rows=3000)
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular", "-r", str(repo),
            "--id-column", "customer_id", "--workers", "2", "--log-interval", "0"]  # fmt: skip
    done = run_batch(*args)
    assert done.returncode == 0, done.stderr
    assert "3 files scored, 0 already committed" in done.stdout
    assert "rows: 9,000 in, 9,000 out, 0 errored" in done.stdout
    assert "batch: 9,000/9,000 rows (100.0%), 3/3 files" in done.stderr  # plain progress lines

    assert sorted(p.name for p in out.iterdir()) == [
        "_SUCCESS", "_job.json", "_manifest", "_manifest.json",
        "part-000.parquet", "part-001.parquet", "part-002.parquet",
    ]  # fmt: skip
    table = read_scores(out)
    assert table.column_names == [
        "customer_id", "label", "probabilities", "model_name", "model_version", "job_id",
        "scored_at",
    ]  # fmt: skip
    assert table.schema.field("probabilities").type == pa.list_(pa.float32(), 2)
    assert_scores(table, repo, x, range(9000))

    manifest = json.loads((out / "_manifest.json").read_text())
    assert set(table["job_id"].to_pylist()) == {manifest["job_id"]}
    assert manifest["rows"] == {"in": 9000, "out": 9000, "errored": 0}
    assert manifest["model"] == {"name": "tabular", "versions": {"1": 9000}}
    assert manifest["status"] == "succeeded" and manifest["engine"] == "local"
    for entry in manifest["fragments"]:
        data = (out / entry["output"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["output_bytes"] == len(data)
        assert entry["rows_in"] == entry["rows_out"] == 3000 and entry["duration_s"] > 0

    again = run_batch(*args)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout and "9,000 rows scored" in again.stdout


def test_csv_in_hive_partitions_with_map_and_bad_rows_in_an_errors_file(
    repo: Path, tmp_path: Path
) -> None:
    x = features(40, seed=3)
    columns = {f"f{i}": x[:, i].astype(object) for i in range(FEATURES)}
    columns["f7"][5] = "n/a"  # a cell that is not a number
    columns["f9"][11] = None  # an empty cell
    for half, day in ((0, "2026-11-27"), (1, "2026-11-28")):
        rows = slice(half * 20, (half + 1) * 20)
        table = pa.table(
            {"customer_id": np.arange(40)[rows],
             **{k: pa.array([None if v is None else str(v) for v in c[rows]]) for k, c in columns.items()}}
        )  # fmt: skip
        folder = tmp_path / "in" / f"day={day}"
        folder.mkdir(parents=True)
        pacsv.write_csv(table, folder / "scores.csv")
    out = tmp_path / "out"
    done = run_batch(
        "-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular", "-r", str(repo),
        "--id-column", "customer_id", "--id-column", "day", "--map", "input=f*",
        "--max-error-rate", "0.1", "--workers", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rows: 40 in, 38 out, 2 errored (5.00%)" in done.stdout
    assert (out / "day=2026-11-27" / "scores.parquet").exists()
    table = read_scores(out)
    good = [i for i in range(40) if i not in (5, 11)]
    assert_scores(table, repo, x, good)
    # the partition column stays in the folder names, as in the input
    assert table["day"].to_pylist() == ["2026-11-27"] * 18 + ["2026-11-28"] * 20
    assert "day" not in pq.read_schema(out / "day=2026-11-27" / "scores.parquet").names

    errors = pq.ParquetFile(out / "_errors" / "day=2026-11-27" / "scores.parquet").read()
    assert errors.column_names == ["customer_id", "row", "error", "input", "job_id"]
    assert errors.to_pylist()[0]["customer_id"] == 5
    assert [(r["row"], r["error"]) for r in errors.to_pylist()] == [
        (5, "column 'f7': 'n/a' is not a number"),
        (11, "column 'f9' is null"),
    ]
    manifest = json.loads((out / "_manifest.json").read_text())
    first = manifest["fragments"][0]
    assert first["rows_errored"] == 2 and first["errors_file"].startswith("_errors/")
    assert manifest["inputs"][0]["columns"] == [f"f{i}" for i in range(FEATURES)]


def test_json_lines_input(repo: Path, tmp_path: Path) -> None:
    x = features(30, seed=4)
    (tmp_path / "in").mkdir()
    lines = [json.dumps({"customer_id": i, "input": x[i].tolist()}) for i in range(30)]
    (tmp_path / "in" / "rows.jsonl").write_text("\n".join(lines) + "\n")
    done = run_batch("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-s", "tabular",
                     "-r", str(repo), "--id-column", "customer_id")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_scores(read_scores(tmp_path / "out"), repo, x, range(30))


def test_too_many_bad_rows_exit_1_and_the_rerun_resumes(repo: Path, tmp_path: Path) -> None:
    x = write_parquet_files(tmp_path / "in", files=2, rows=500)
    bad = pq.read_table(tmp_path / "in" / "part-001.parquet")
    lists = bad["input"].to_pylist()
    for i in range(0, 500, 10):
        lists[i] = lists[i][:31]  # 10% of the rows have one feature too few
    pq.write_table(
        bad.set_column(1, "input", pa.array(lists, pa.list_(pa.float32()))),
        tmp_path / "in" / "part-001.parquet",
    )
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular", "-r", str(repo),
            "--id-column", "customer_id", "--workers", "1"]  # fmt: skip
    failed = run_batch(*args, "--max-error-rate", "0.05")
    assert failed.returncode == 1, failed.stderr
    assert (
        "error: input 'part-001.parquet': 50 of 500 rows (10.00%) could not be scored, above "
        "--max-error-rate 5%; first: row 0: column 'input' has 31 values, input 'input' takes 32"
    ) in " ".join(failed.stderr.split())
    assert (out / "part-000.parquet").exists() and not (out / "part-001.parquet").exists()
    assert not (out / "_SUCCESS").exists()
    assert (out / "_errors" / "part-001.parquet").exists()  # the reasons, for the fix

    resumed = run_batch(*args, "--max-error-rate", "0.2")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 files scored, 1 already committed" in resumed.stdout
    assert "1,000 in, 950 out, 50 errored" in resumed.stdout
    assert_scores(read_scores(out), repo, x, [i for i in range(1000) if i < 500 or i % 10])


def test_configuration_mistakes_exit_2_with_one_line(repo: Path, tmp_path: Path) -> None:
    write_parquet_files(tmp_path / "in", files=1, rows=10)
    base = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-r", str(repo)]
    cases = [
        (["-s", "tabular", "--map", "input=customer_id"],
         "error: model 'tabular' input 'input' (FP32 [-1, 32]) takes 32 values per row; column "
         "'customer_id' holds one (map 32 columns with --map input=col1,col2,...)"),
        (["-s", "nosuchmodel"], "error: "),
        (["-s", "tabular", "--id-column", "cust"],
         "error: --id-column 'cust': no such column in the input; columns are customer_id, input"),
        (["-s", "tabular", "--max-error-rate", "5"], "error: --max-error-rate is a fraction"),
    ]  # fmt: skip
    for extra, message in cases:
        done = run_batch(*base, *extra)
        assert done.returncode == 2, (extra, done.stdout, done.stderr)
        assert " ".join(done.stderr.split()).startswith(message), (extra, done.stderr)
        assert "Traceback" not in done.stderr
    assert run_batch(*base, "-s", "tabular", "--job-id", "a").returncode == 0
    other = run_batch(*base, "-s", "tabular", "--job-id", "b")
    assert other.returncode == 2
    assert "holds job 'a', not 'b'" in other.stderr


def test_killed_midway_then_rerun_gives_exactly_one_row_per_input_row(
    repo: Path, tmp_path: Path
) -> None:
    files, rows = 8, 30_000
    x = write_parquet_files(tmp_path / "in", files=files, rows=rows)
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular", "-r", str(repo),
            "--id-column", "customer_id", "--workers", "2", "--chunk-rows", "2048"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferplane", "batch", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    entries = out / "_manifest"
    deadline = time.monotonic() + 90
    while not (entries.exists() and any(entries.iterdir())):
        assert proc.poll() is None, "the job ended before the test could kill it"
        assert time.monotonic() < deadline, "no fragment committed within 90 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    committed = len(list(entries.iterdir()))
    assert 0 < committed < files, f"{committed} of {files} committed when killed"
    assert not (out / "_SUCCESS").exists()
    # The workers die with the job (PR_SET_PDEATHSIG): nothing commits after the kill, although
    # an orphaned worker would finish a 30,000-row file in well under this wait.
    time.sleep(2)
    assert len(list(entries.iterdir())) == committed

    rerun = run_batch(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "already committed" in rerun.stdout
    skipped = int(rerun.stdout.split(" files scored, ")[1].split(" already")[0])
    assert skipped >= committed
    table = read_scores(out)
    assert table.num_rows == files * rows
    ids = table["customer_id"].to_numpy()
    assert np.array_equal(ids, np.arange(files * rows))  # each id once, none missing
    assert_scores(table.slice(0, 2000), repo, x, range(2000))
    assert not (out / "_tmp").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == {"in": files * rows, "out": files * rows, "errored": 0}


def test_sigterm_stops_at_a_fragment_boundary_exit_3_and_the_rerun_resumes(
    repo: Path, tmp_path: Path
) -> None:
    """What a Kubernetes Job pod gets on eviction: the fragments being scored commit, none
    starts after, exit 3 (retry) without _SUCCESS; the rerun scores only the rest."""
    files, rows = 16, 30_000
    write_parquet_files(tmp_path / "in", files=files, rows=rows)
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in"), "-o", str(out), "-s", "tabular", "-r", str(repo),
            "--id-column", "customer_id", "--workers", "2", "--chunk-rows", "2048"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferplane", "batch", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    entries = out / "_manifest"
    deadline = time.monotonic() + 90
    while not (entries.exists() and any(entries.iterdir())):
        assert proc.poll() is None, "the job ended before the test could stop it"
        assert time.monotonic() < deadline, "no fragment committed within 90 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "stopped by SIGTERM at a fragment boundary" in stderr
    committed = len(list(entries.iterdir()))
    assert 0 < committed < files, f"{committed} of {files} committed when stopped"
    assert not (out / "_SUCCESS").exists()
    leftovers = (
        [p for p in (out / "_tmp").rglob("*") if p.is_file()] if (out / "_tmp").exists() else []
    )
    assert not leftovers, f"half-written files after the stop: {leftovers}"
    # Every committed fragment is whole: the stop waited for the ones being scored.
    table = read_scores(out)
    assert table.num_rows == committed * rows

    rerun = run_batch(*args)
    assert rerun.returncode == 0, rerun.stderr
    table = read_scores(out)
    assert np.array_equal(table["customer_id"].to_numpy(), np.arange(files * rows))


def test_a_service_splits_rows_between_versions_and_each_row_names_its_own(
    repo: Path, tmp_path: Path
) -> None:
    x = write_parquet_files(tmp_path / "in", files=1, rows=2000)
    policy = tmp_path / "services.yaml"
    policy.write_text(
        "services:\n"
        "  propensity:\n"
        "    routes:\n"
        "      - {model: tabular, version: 1, weight: 50}\n"
        "      - {model: tabular, version: 2, weight: 50}\n"
    )
    out = tmp_path / "out"
    done = run_batch("-i", str(tmp_path / "in"), "-o", str(out), "-s", "propensity",
                     "-r", str(repo), "--services", str(policy), "--id-column", "customer_id",
                     "--batch-size", "32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = read_scores(out)
    assert table["customer_id"].to_pylist() == list(range(2000))
    assert set(table["model_name"].to_pylist()) == {"tabular"}
    versions = np.array(table["model_version"].to_pylist())
    assert set(versions) == {"1", "2"}  # 63 requests of 32 rows, each routed at random
    labels = table["label"].to_numpy()
    for version in ("1", "2"):
        rows = np.flatnonzero(versions == version)
        expected, _ = expected_scores(repo, x[rows], version=int(version))
        np.testing.assert_array_equal(labels[rows], expected)
    manifest = json.loads((out / "_manifest.json").read_text())
    counts = manifest["model"]["versions"]
    assert counts == {v: int((versions == v).sum()) for v in ("1", "2")}
    assert manifest["target"] == "propensity"
