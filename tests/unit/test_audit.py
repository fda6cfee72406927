"""The audit log: buffer, writer thread, sinks, metrics and queries, on real files."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inferplane.errors import BadRequest, NotFound
from inferplane.observability.audit import (
    AuditLog,
    AuditRecord,
    open_sink,
    payload_hash,
    payload_json,
    query,
)
from inferplane.observability.audit_sinks import JsonlSink, ParquetSink, SQLiteSink, parse_spec


def rec(request_id: str, **kw: object) -> AuditRecord:
    fields: dict[str, object] = {
        "time": time.time(),
        "service": "reco",
        "model": "tabular",
        "version": "1",
        "route": "production",
        "latency_ms": 1.5,
        "status": 200,
    }
    fields.update(kw)
    return AuditRecord(request_id=request_id, **fields)  # type: ignore[arg-type]


class ListSink:
    """A sink that keeps what it is given, optionally slowly or failing some batches."""

    description = "list:"

    def __init__(self, delay_s: float = 0.0, fail_every: int = 0) -> None:
        self.records: list[AuditRecord] = []
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.calls = 0
        self.closed = False
        self.threads: set[str] = set()

    def write(self, records: Sequence[AuditRecord]) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise OSError("disk full (on purpose)")
        self.records.extend(records)
        self.batches.append(len(records))

    def close(self) -> None:
        self.closed = True


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"metric {name}{labels} not exported"
    return value


# -- writing --------------------------------------------------------------------------------


def test_records_from_many_threads_are_written_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = AuditLog(open_sink(str(db)), capacity=100_000, batch_size=512, flush_interval_s=0.05)
    n_threads, per_thread = 8, 5_000

    def produce(t: int) -> None:
        for i in range(per_thread):
            log.record(rec(f"t{t}-{i}", version=str(i % 3)))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()

    total = n_threads * per_thread
    assert (log.written, log.dropped) == (total, 0)
    with sqlite3.connect(db) as conn:
        assert conn.execute(
            "SELECT count(*), count(DISTINCT request_id) FROM audit"
        ).fetchone() == (
            total,
            total,
        )
        # Each record kept its own fields through the batch insert.
        wrong = conn.execute(
            "SELECT count(*) FROM audit WHERE CAST(substr(request_id, instr(request_id, '-') + 1)"
            " AS INTEGER) % 3 != CAST(version AS INTEGER)"
        ).fetchone()[0]
        assert wrong == 0
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexed = {row[1] for row in conn.execute("PRAGMA index_list(audit)")}
        assert "audit_time" in indexed and "audit_request_id" not in indexed  # see SQLiteSink


def test_writes_happen_on_the_writer_thread_in_batches() -> None:
    sink = ListSink()
    log = AuditLog(sink, batch_size=100, flush_interval_s=60)
    for i in range(1_000):
        log.record(rec(str(i)))
    assert log.flush(timeout_s=10)
    log.close()
    assert sink.threads == {"inferplane-audit-writer"}
    assert max(sink.batches) <= 100
    assert [r.request_id for r in sink.records] == [str(i) for i in range(1_000)]


def test_close_flushes_everything_and_is_idempotent() -> None:
    sink = ListSink()
    # A long interval and a large batch: only close() makes the writer write.
    log = AuditLog(sink, batch_size=10_000, flush_interval_s=60)
    for i in range(1_234):
        log.record(rec(str(i)))
    log.close()
    log.close()
    assert len(sink.records) == 1_234
    assert sink.closed
    assert (log.written, log.dropped) == (1_234, 0)


def test_flush_waits_for_the_sink_without_closing(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = AuditLog(open_sink(f"sqlite://{db}"), batch_size=10_000, flush_interval_s=60)
    for i in range(300):
        log.record(rec(f"r{i}"))
    assert log.flush(timeout_s=10)
    assert len(query(str(db), limit=1_000)) == 300  # readable while the log stays open
    log.record(rec("after-flush"))
    log.close()
    assert [r.request_id for r in query(str(db), request_id="after-flush")] == ["after-flush"]


def test_close_gives_up_on_a_hung_sink(caplog: pytest.LogCaptureFixture) -> None:
    sink = ListSink(delay_s=2.0)
    log = AuditLog(sink, flush_interval_s=0.01)
    log.record(rec("stuck"))
    time.sleep(0.1)  # the writer is now inside the slow write
    log.record(rec("behind"))
    started = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="inferplane.audit"):
        log.close(timeout_s=0.2)
    assert time.perf_counter() - started < 1.5
    assert not sink.closed  # never closed under a writer that is still inside write()
    assert "did not finish within 0.2 s; 1 records unwritten" in caplog.text


def test_records_after_close_are_counted_as_dropped() -> None:
    registry = CollectorRegistry()
    sink = ListSink()
    log = AuditLog(sink, registry=registry)
    log.record(rec("before"))
    log.close()
    log.record(rec("after"))
    assert [r.request_id for r in sink.records] == ["before"]
    assert log.dropped_by_reason()["closed"] == 1
    assert sample(registry, "inferplane_audit_dropped_total", reason="closed") == 1


def test_a_slow_sink_makes_drops_not_waits_and_the_buffer_stays_bounded() -> None:
    registry = CollectorRegistry()
    sink = ListSink(delay_s=0.05)
    capacity = 200
    log = AuditLog(sink, capacity=capacity, batch_size=20, flush_interval_s=0.01, registry=registry)
    total = 20_000
    started = time.perf_counter()
    high_water = 0
    for i in range(total):
        log.record(rec(str(i)))
        high_water = max(high_water, log.buffered)
    elapsed = time.perf_counter() - started
    # Writing everything would take the sink total/20 * 50 ms = 50 s; recording never waits.
    assert elapsed < 5.0, f"record() waited for the sink: {elapsed:.1f} s for {total} records"
    assert high_water <= capacity
    assert sample(registry, "inferplane_audit_buffer_records") <= capacity
    log.close()
    assert log.dropped_by_reason()["buffer_full"] > 0
    assert log.written + log.dropped == total
    assert len(sink.records) == log.written
    assert sample(registry, "inferplane_audit_dropped_total", reason="buffer_full") == log.dropped
    assert sample(registry, "inferplane_audit_records_total") == log.written
    assert sample(registry, "inferplane_audit_buffer_records") == 0


def test_sink_errors_are_logged_counted_and_survived(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    sink = ListSink(fail_every=2)
    log = AuditLog(sink, batch_size=10, flush_interval_s=60, registry=registry)
    with caplog.at_level(logging.ERROR, logger="inferplane.audit"):
        for round_ in range(6):
            for i in range(10):
                log.record(rec(f"{round_}-{i}"))
            assert log.flush(timeout_s=10)
    log.record(rec("last"))
    log.close()
    assert sink.calls == 7
    assert log.dropped_by_reason()["sink_error"] == 30
    assert log.written == 31
    assert sink.records[-1].request_id == "last"
    assert sample(registry, "inferplane_audit_dropped_total", reason="sink_error") == 30
    messages = [r.getMessage() for r in caplog.records]
    assert any("disk full (on purpose)" in m and "list:" in m for m in messages), messages
    # Throttled: one report per interval, not one per failed batch.
    assert len(messages) == 1


def test_metrics_are_registered_on_the_given_registry() -> None:
    registry = CollectorRegistry()
    log = AuditLog(ListSink(), registry=registry)
    for i in range(5):
        log.record(rec(str(i)))
    log.flush()
    assert sample(registry, "inferplane_audit_records_total") == 5
    for reason in ("buffer_full", "sink_error", "closed"):
        assert sample(registry, "inferplane_audit_dropped_total", reason=reason) == 0
    log.close()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        AuditLog(ListSink(), capacity=0)
    with pytest.raises(ValueError, match="payload_sample_rate"):
        AuditLog(ListSink(), payload_sample_rate=1.5)


# -- payloads -------------------------------------------------------------------------------


def test_payload_sampling_follows_the_rate() -> None:
    with AuditLog(ListSink()) as never, AuditLog(ListSink(), payload_sample_rate=1.0) as always:
        assert not any(never.wants_payload() for _ in range(1_000))
        assert all(always.wants_payload() for _ in range(1_000))
    with AuditLog(ListSink(), payload_sample_rate=0.1) as some:
        hits = sum(some.wants_payload() for _ in range(20_000))
    assert 1_500 < hits < 2_500


def test_payload_hash_and_json() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    same = payload_hash({"input": x.copy()})
    assert payload_hash({"input": x}) == same
    assert payload_hash({"input": x + 1}) != same
    assert payload_hash({"input": x.astype(np.float64)}) != same  # dtype is part of the payload
    text = np.array([b"hello", "wörld"], dtype=object)
    assert payload_hash({"text": text}) != payload_hash({"text": text[::-1].copy()})

    doc = json.loads(payload_json({"input": x, "text": text}, max_values=3))
    assert doc["input"] == {
        "dtype": "float32",
        "shape": [2, 4],
        "data": [0.0, 1.0, 2.0],
        "truncated": True,
    }
    assert doc["text"]["data"] == ["hello", "wörld"]
    assert "truncated" not in doc["text"]


# -- sinks and queries ----------------------------------------------------------------------


def test_sink_specs() -> None:
    assert parse_spec("audit.db") == ("sqlite", "audit.db")
    assert parse_spec("sqlite:///var/audit.db") == ("sqlite", "/var/audit.db")
    assert parse_spec("sqlite:rel/audit.db") == ("sqlite", "rel/audit.db")
    assert parse_spec("jsonl:/tmp/a.jsonl") == ("jsonl", "/tmp/a.jsonl")
    assert parse_spec("logs/audit.jsonl") == ("jsonl", "logs/audit.jsonl")
    assert parse_spec("parquet:///lake/audit") == ("parquet", "/lake/audit")
    assert parse_spec("parquet:s3://lake/audit") == ("parquet", "s3://lake/audit")
    assert parse_spec("kafka://b1:9092,b2:9092/audit") == ("kafka", "kafka://b1:9092,b2:9092/audit")
    with pytest.raises(BadRequest, match="unknown audit sink kind 'redis:'"):
        parse_spec("redis://broker/topic")
    with pytest.raises(BadRequest, match="empty"):
        parse_spec("  ")
    with pytest.raises(BadRequest, match="names no path"):
        parse_spec("jsonl:")


def test_open_sink_kinds_and_bad_paths(tmp_path: Path) -> None:
    kinds = {
        str(tmp_path / "a.db"): SQLiteSink,
        f"jsonl:{tmp_path}/a.jsonl": JsonlSink,
        f"parquet:{tmp_path}/pq": ParquetSink,
    }
    for spec, kind in kinds.items():
        sink = open_sink(spec)
        assert isinstance(sink, kind)
        sink.close()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BadRequest, match="cannot open the audit database"):
        open_sink(str(blocker / "audit.db"))


SPECS = ["sqlite:{d}/audit.db", "jsonl:{d}/audit.jsonl", "parquet:{d}/audit"]


@pytest.mark.parametrize("spec_template", SPECS, ids=["sqlite", "jsonl", "parquet"])
def test_query_filters(tmp_path: Path, spec_template: str) -> None:
    spec = spec_template.format(d=tmp_path)
    now = time.time()
    with AuditLog(open_sink(spec)) as log:
        log.record(rec("old", time=now - 7200, version="1"))
        log.record(
            rec(
                "canary",
                time=now - 60,
                version="2",
                route="canary",
                tenant="acme",
                principal="key:ci",
            )
        )
        log.record(rec("other", time=now - 30, service="fraud", model="forest"))
        log.record(
            rec("failed", time=now - 10, model="", version="", status=503, error="overloaded")
        )
        log.record(rec("new", time=now - 1, pattern="batch", payload_hash="ab12", payload="{}"))

    def ids(**kw: object) -> list[str]:
        return [r.request_id for r in query(spec, **kw)]  # type: ignore[arg-type]

    assert ids() == ["old", "canary", "other", "failed", "new"]  # oldest first
    assert ids(limit=2) == ["failed", "new"]  # the latest ones
    assert ids(since_s=600) == ["canary", "other", "failed", "new"]
    assert ids(since_s=600, service="reco") == ["canary", "failed", "new"]
    assert ids(model="forest") == ["other"]
    assert ids(status=503) == ["failed"]
    assert ids(request_id="nope") == []
    assert ids(principal="key:ci") == ["canary"]
    assert ids(principal="key:ci", service="fraud") == []
    [found] = query(spec, request_id="canary")
    assert found == AuditRecord(
        request_id="canary",
        time=pytest.approx(now - 60),  # type: ignore[arg-type]
        service="reco",
        model="tabular",
        version="2",
        route="canary",
        latency_ms=1.5,
        status=200,
        tenant="acme",
        principal="key:ci",
    )
    [newest] = query(spec, request_id="new")
    assert newest.principal is None
    assert (newest.pattern, newest.payload_hash, newest.payload) == ("batch", "ab12", "{}")


# The table as inferplane created it before records had a principal.
OLD_SCHEMA = (
    "CREATE TABLE audit (request_id TEXT, time REAL, service TEXT, model TEXT, version TEXT, "
    "route TEXT, latency_ms REAL, status INTEGER, tenant TEXT, error TEXT, pattern TEXT, "
    "payload_hash TEXT, payload TEXT)"
)


def _old_database(path: Path, now: float) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_SCHEMA)
        conn.execute("CREATE INDEX audit_time ON audit (time)")
        conn.execute(
            "INSERT INTO audit VALUES ('before', ?, 'reco', 'tabular', '1', 'direct', 1.0, 200, "
            "'acme', NULL, 'online', NULL, NULL)",
            [now - 10],
        )
    conn.close()


def test_an_old_database_without_the_principal_column_keeps_working(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    now = time.time()
    _old_database(db, now)
    # Read before any writer migrated it (read-only): the missing field reads None.
    [before] = query(str(db))
    assert (before.request_id, before.tenant, before.principal) == ("before", "acme", None)
    assert query(str(db), principal="key:ci") == []

    with AuditLog(open_sink(str(db))) as log:  # opening it adds the column
        log.record(rec("after", time=now, principal="key:ci"))
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(audit)")]
        assert columns[-3:] == ["principal", "trace_id", "kind"] and columns.count("principal") == 1
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (2,)
    conn.close()
    assert [(r.request_id, r.principal) for r in query(str(db))] == [
        ("before", None),
        ("after", "key:ci"),
    ]
    assert [r.request_id for r in query(str(db), principal="key:ci")] == ["after"]
    # Opening it again (another replica, a restart) finds nothing left to add.
    SQLiteSink(db).close()
    SQLiteSink(db).close()


def test_replicas_opening_one_old_database_at_once_migrate_it_once(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    _old_database(db, time.time())
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def open_it() -> None:
        try:
            start.wait()
            SQLiteSink(db).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(audit)")]
    conn.close()
    assert columns.count("principal") == 1


def test_old_jsonl_lines_and_parquet_files_read_without_a_principal(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    now = time.time()
    old_row = {"request_id": "before", "time": now - 5, "service": "reco", "model": "tabular",
               "version": "1", "route": "direct", "latency_ms": 1.0, "status": 200}  # fmt: skip
    lines = tmp_path / "audit.jsonl"
    lines.write_bytes(json.dumps(old_row).encode() + b"\n")
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([old_row]), folder / "audit-old.parquet")
    for spec in (f"jsonl:{lines}", f"parquet:{folder}"):
        with AuditLog(open_sink(spec)) as log:
            log.record(rec("after", time=now, principal="key:ci"))
        assert [(r.request_id, r.principal) for r in query(spec)] == [
            ("before", None),
            ("after", "key:ci"),
        ], spec
        assert [r.request_id for r in query(spec, principal="key:ci")] == ["after"], spec


def test_query_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"audit database '.*missing\.db' does not exist"):
        query(str(tmp_path / "missing.db"))
    with pytest.raises(NotFound, match="audit file"):
        query(f"jsonl:{tmp_path}/missing.jsonl")
    not_db = tmp_path / "not.db"
    not_db.write_text("hello")
    with pytest.raises(BadRequest, match="not an audit database"):
        query(str(not_db))
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(BadRequest, match="no audit table"):
        query(str(other))
    with pytest.raises(BadRequest, match="limit"):
        query(str(other), limit=0)


def test_jsonl_query_skips_a_line_being_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(open_sink(str(path))) as log:
        log.record(rec("whole"))
    with open(path, "ab") as f:
        f.write(b'{"request_id": "half", "ti')
    assert [r.request_id for r in query(str(path))] == ["whole"]
