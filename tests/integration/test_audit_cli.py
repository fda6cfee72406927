"""`inferplane audit`, run for real as a subprocess on audit files the AuditLog wrote."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferplane.observability.audit import AuditLog, AuditRecord, open_sink

RECORDS = [  # times: seconds before the file is written (see `stamped`)
    AuditRecord("req-old", 7200, "reco", "tabular", "1", "production", 1.1, 200),
    AuditRecord(
        "req-canary", 120, "reco", "tabular", "2", "canary", 2.25, 200, "acme", principal="key:ci"
    ),
    AuditRecord("req-fraud", 60, "fraud", "forest", "3", "direct", 0.5, 200),
    AuditRecord("req-503", 5, "reco", "", "", "fallback", 9.0, 503, error="model overloaded"),
]


def write(spec: str) -> float:
    """Write RECORDS, timed relative to now (a suite can take minutes to reach a test)."""
    now = time.time()
    with AuditLog(open_sink(spec)) as log:
        for rec in RECORDS:
            log.record(dataclasses.replace(rec, time=now - rec.time))
    return now


@dataclasses.dataclass
class AuditFile:
    path: Path
    now: float

    def __str__(self) -> str:
        return str(self.path)


def audit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "INFERPLANE_AUDIT"}
    full_env["COLUMNS"] = "300"  # whole table rows when piped
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "inferplane", "audit", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


def json_ids(stdout: str) -> list[str]:
    return [json.loads(line)["request_id"] for line in stdout.splitlines()]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Table rows keyed by request id (the second cell)."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[1]] = cells
    return rows


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory: pytest.TempPathFactory) -> AuditFile:
    path = tmp_path_factory.mktemp("audit") / "audit.db"
    return AuditFile(path, write(str(path)))


def test_request_id_as_json(audit_db: AuditFile) -> None:
    out = ok(audit("--db", str(audit_db), "--request-id", "req-canary", "--json"))
    [line] = out.splitlines()
    doc = json.loads(line)
    keys = ("service", "model", "version", "route", "status", "tenant", "principal")
    assert {k: doc[k] for k in keys} == {
        "service": "reco",
        "model": "tabular",
        "version": "2",
        "route": "canary",
        "status": 200,
        "tenant": "acme",
        "principal": "key:ci",
    }
    assert doc["time"] == pytest.approx(audit_db.now - 120)
    assert doc["time_iso"].endswith("Z")


def test_since_and_service_as_a_table(audit_db: AuditFile) -> None:
    out = ok(audit("--db", str(audit_db), "--since", "10m", "--service", "reco"))
    rows = table_rows(out)
    assert set(rows) == {"req-canary", "req-503"}
    time_iso, _, principal, tenant, service, model, version, route, latency, status, error = rows[
        "req-canary"
    ]
    assert principal == "key:ci" and rows["req-503"][2] == "-"
    assert time_iso.startswith(time.strftime("%Y-%m-%d", time.gmtime(audit_db.now - 120)))
    assert time_iso.endswith("Z")
    assert (tenant, service, model, version, route, latency, status) == (
        "acme",
        "reco",
        "tabular",
        "2",
        "canary",
        "2.25",
        "200",
    )
    assert error == ""
    assert rows["req-503"][-2:] == ["503", "model overloaded"]


def test_filters_and_limit(audit_db: AuditFile) -> None:
    db = str(audit_db)
    assert json_ids(ok(audit("--db", db, "--json"))) == [r.request_id for r in RECORDS]
    assert json_ids(ok(audit("--sink", db, "--json", "--limit", "2"))) == ["req-fraud", "req-503"]
    assert json_ids(ok(audit("--db", db, "--json", "--status", "503"))) == ["req-503"]
    assert json_ids(ok(audit("--db", db, "--json", "--model", "forest", "--since", "1h"))) == [
        "req-fraud"
    ]
    assert json_ids(ok(audit("--json", env={"INFERPLANE_AUDIT": db}))) == [
        r.request_id for r in RECORDS
    ]
    nothing = audit("--db", db, "--request-id", "nope")
    assert ok(nothing) == ""
    assert "no audit records match" in nothing.stderr


def test_principal_filter_and_column(audit_db: AuditFile) -> None:
    db = str(audit_db)
    assert json_ids(ok(audit("--db", db, "--json", "--principal", "key:ci"))) == ["req-canary"]
    assert json_ids(ok(audit("--db", db, "--json", "--principal", "key:other"))) == []
    # Records without a principal (a server without authentication) get no principal column.
    out = ok(audit("--db", db, "--service", "fraud"))
    assert "principal" not in out
    assert table_rows(out)["req-fraud"][2:4] == ["-", "fraud"]


def test_jsonl_sink(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write(f"jsonl:{path}")
    out = ok(audit("--sink", f"jsonl:{path}", "--since", "90s", "--json"))
    assert json_ids(out) == ["req-fraud", "req-503"]


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("10x", "--since '10x' is not a duration"),
        ("ten minutes", "use a number and a unit s, m, h or d"),
        ("10", "--since '10' is not a duration"),
        ("-5m", "--since '-5m' is not a duration"),
    ],
)
def test_bad_since(audit_db: AuditFile, since: str, expected: str) -> None:
    one_line_error(audit("--db", str(audit_db), "--since", since), expected)


def test_one_line_errors(tmp_path: Path) -> None:
    one_line_error(
        audit("--db", str(tmp_path / "missing.db")),
        f"audit database '{tmp_path / 'missing.db'}' does not exist",
    )
    not_db = tmp_path / "notes.db"
    not_db.write_text("not sqlite")
    one_line_error(audit("--db", str(not_db)), "is not an audit database")
    one_line_error(audit("--sink", "kafka://127.0.0.1:1/audit"), "cannot read kafka://127.0.0.1:1")
    one_line_error(audit("--sink", "redis://r/audit"), "unknown audit sink kind 'redis:'")
    one_line_error(audit("--db", str(not_db), "--limit", "0"), "--limit must be >= 1")
