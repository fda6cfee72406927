"""`inferplane batch` from and to S3 (a real moto_server on loopback), with a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import s3fs

from tests.conftest import MotoS3
from tests.integration.batch.conftest import (
    assert_scores,
    read_scores,
    run_batch,
    write_parquet_files,
)


def test_scores_a_table_on_s3_into_s3_and_resumes_a_lost_fragment(
    repo: Path, tmp_path: Path, moto_s3: MotoS3
) -> None:
    bucket = moto_s3.new_bucket("lake")
    x = write_parquet_files(tmp_path / "in", files=3, rows=1000)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(tmp_path / "in") + "/", f"{bucket}/customers/", recursive=True)
    args = ["-i", f"s3://{bucket}/customers/", "-o", f"s3://{bucket}/scores/2026-11-28/",
            "-s", "tabular", "-r", str(repo), "--id-column", "customer_id", "--workers", "2"]  # fmt: skip
    done = run_batch(*args)
    assert done.returncode == 0, done.stderr
    assert "3 files scored" in done.stdout

    out = f"{bucket}/scores/2026-11-28"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(out)) == [
        "_SUCCESS", "_job.json", "_manifest", "_manifest.json",
        "part-000.parquet", "part-001.parquet", "part-002.parquet",
    ]  # fmt: skip
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    assert_scores(read_scores(out, arrow_fs), repo, x, range(3000))
    manifest = json.loads(fs.cat_file(f"{out}/_manifest.json"))
    assert manifest["rows"] == {"in": 3000, "out": 3000, "errored": 0}
    assert [f["rows_out"] for f in manifest["fragments"]] == [1000, 1000, 1000]

    # Lose one fragment's commit (as if the job died before writing it): only it is redone.
    entry = next(p for p in fs.ls(f"{out}/_manifest") if "part-001" in fs.cat_file(p).decode())
    fs.rm(entry)
    fs.rm(f"{out}/_SUCCESS")
    again = run_batch(*args)
    assert again.returncode == 0, again.stderr
    assert "1 files scored, 2 already committed" in again.stdout
    fs.invalidate_cache()
    assert_scores(read_scores(out, arrow_fs), repo, x, range(3000))
    assert fs.exists(f"{out}/_SUCCESS") and not fs.exists(f"{out}/_tmp")
