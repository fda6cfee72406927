"""`inferplane batch --server`: rows go to a real `inferplane serve` in V2 requests."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.batch.conftest import (
    assert_scores,
    read_scores,
    run_batch,
    write_parquet_files,
)
from tests.integration.servers import start_server


def test_remote_mode_sends_requests_of_batch_size_rows(repo: Path, tmp_path: Path) -> None:
    x = write_parquet_files(tmp_path / "in", files=2, rows=500)
    server = start_server(repo, tmp_path, grpc=False)
    try:
        done = run_batch(
            "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-s", "tabular",
            "--server", server.url, "--id-column", "customer_id", "--batch-size", "16",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "via remote http://127.0.0.1" in done.stderr
        assert "16 rows per request" in done.stderr
        stats = httpx.get(f"{server.url}/v2/models/tabular/stats").json()["model_stats"]
        served = {s["version"]: s for s in stats}["1"]
        # 500 rows per file in requests of 16: 32 requests per file (31 full, one of 4)
        assert served["inference_stats"]["success"]["count"] == 64
        assert served["inference_count"] == 1000
    finally:
        server.stop()
    assert_scores(read_scores(tmp_path / "out"), repo, x, range(1000))


def test_an_unreachable_server_exits_3_for_a_retry_later(
    repo: Path, tmp_path: Path, free_port
) -> None:  # type: ignore[no-untyped-def]
    write_parquet_files(tmp_path / "in", files=1, rows=10)
    done = run_batch("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-s", "tabular",
                     "--server", f"http://127.0.0.1:{free_port()}")  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("error: cannot reach http://127.0.0.1:")
