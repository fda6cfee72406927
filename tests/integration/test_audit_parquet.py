"""Parquet audit sinks replicas share: hour partitions, one file per replica and flush, never
overwritten; on a local folder and on S3 (a real moto_server), read back by `inferplane audit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from inferplane.observability.audit import AuditRecord
from inferplane.observability.audit_sinks import ParquetSink
from tests.integration.servers import ROOT

HOUR = 3600.0


def _record(rid: str, at: float) -> AuditRecord:
    return AuditRecord(
        request_id=rid, time=at, service="s", model="m", version="1", route="direct",
        latency_ms=1.0, status=200,
    )  # fmt: skip


def _audit(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "INFERPLANE_AUDIT"}
    out = subprocess.run(
        [sys.executable, "-m", "inferplane", "audit", *args, "--json", "--limit", "10000"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _two_replicas_write(url: str, monkeypatch: pytest.MonkeyPatch) -> float:
    now = time.time()
    for replica in ("pod-a", "pod-b"):
        monkeypatch.setenv("INFERPLANE_REPLICA", replica)
        sink = ParquetSink(url)
        # the same second, two flushes each, and records of the previous hour
        sink.write([_record(f"{replica}-{i}", now) for i in range(10)])
        sink.write([_record(f"{replica}-old-{i}", now - 2 * HOUR) for i in range(5)])
        sink.write([_record(f"{replica}-{i}", now) for i in range(10, 20)])
    return now


@pytest.mark.parametrize("where", ["local", "s3"])
def test_replicas_share_a_prefix_in_hour_partitions(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        moto = request.getfixturevalue("moto_s3")
        url = f"s3://{moto.new_bucket('audit')}/audit"
    else:
        url = str(tmp_path / "audit")
    now = _two_replicas_write(url, monkeypatch)
    fs, root = fsspec.core.url_to_fs(url)
    files = [f for f in fs.find(root) if f.endswith(".parquet")]
    assert len(files) == 6, files  # one per replica and flush and hour: nothing overwritten
    assert all("/date=" in f and "/hour=" in f for f in files)
    assert {"pod-a", "pod-b"} == {"-".join(Path(f).name.split("-")[1:3]) for f in files}
    assert len({time.strftime("%H", time.gmtime(t)) for t in (now, now - 2 * HOUR)}) == 2

    rows = _audit("--sink", f"parquet:{url}")
    assert len(rows) == 50
    assert len({r["request_id"] for r in rows}) == 50
    recent = _audit("--sink", f"parquet:{url}", "--since", "30m")
    assert len(recent) == 40 and not any("-old-" in r["request_id"] for r in recent)
    one = _audit("--sink", f"parquet:{url}", "--request-id", "pod-b-7")
    assert [r["request_id"] for r in one] == ["pod-b-7"]
