"""Audit sinks (SQLite, JSONL, Parquet) and reading their records back.

A sink spec is a path (SQLite, the default; `*.jsonl` means JSONL) or `kind:path` with kind
`sqlite`, `jsonl` or `parquet`; `kind:///abs/path` and `kind:/abs/path` are both absolute. A
fleet shares `kafka://HOST:PORT/TOPIC` (observability/audit_kafka.py).
"""

from __future__ import annotations

import heapq
import operator
import os
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from inferplane.errors import BadRequest, MissingExtra, NotFound
from inferplane.observability.audit import FIELDS, AuditRecord, AuditSink

KINDS = ("sqlite", "jsonl", "parquet", "kafka")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.DOTALL)  # 2+ letters: not C:\
_row = operator.attrgetter(*FIELDS)
PREDICTION = "prediction"  # the kind of a record that has none


def parse_spec(spec: str) -> tuple[str, str]:
    """(kind, path) of a sink spec."""
    text = spec.strip()
    if not text:
        raise BadRequest("the audit sink is empty; give a path such as ./inferplane-audit.db")
    match = _SCHEME.match(text)
    if match:
        kind, path = match.group(1).lower(), match.group(2)
        if kind not in KINDS:
            raise BadRequest(
                f"unknown audit sink kind '{kind}:' in '{spec}'; use a path (SQLite), "
                "sqlite:PATH, jsonl:PATH, parquet:DIR or kafka://HOST:PORT/TOPIC"
            )
        if kind == "kafka":
            return kind, text  # the whole URL: hosts, topic, options
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise BadRequest(f"the audit sink '{spec}' names no path")
        return kind, path
    if Path(text).suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl", text
    return "sqlite", text


def open_sink(spec: str) -> AuditSink:
    kind, path = parse_spec(spec)
    if kind == "kafka":
        from inferplane.observability.audit_kafka import KafkaAuditSink

        return KafkaAuditSink(path)
    if kind == "jsonl":
        return JsonlSink(path)
    if kind == "parquet":
        return ParquetSink(path)
    return SQLiteSink(path)


# -- SQLite ------------------------------------------------------------------------------------

_SQL_TYPES = {"time": "REAL", "latency_ms": "REAL", "status": "INTEGER"}
_CREATE = (
    "CREATE TABLE IF NOT EXISTS audit ("
    + ", ".join(f"{name} {_SQL_TYPES.get(name, 'TEXT')}" for name in FIELDS)
    + ")"
)
_VALUES = f"({', '.join('?' * len(FIELDS))})"
# Multi-row INSERTs of a few fixed sizes: each runs in one sqlite3_step with the GIL released,
# where executemany() takes and releases the GIL once per row (and the event loop's thread
# makes the writer wait for it each time); fixed sizes keep the statement cache small.
_CHUNKS = (512, 64, 8, 1)
_INSERTS = {
    n: f"INSERT INTO audit ({', '.join(FIELDS)}) VALUES {', '.join([_VALUES] * n)}" for n in _CHUNKS
}


def _columns(conn: sqlite3.Connection) -> list[str]:
    return [row[1] for row in conn.execute("PRAGMA table_info(audit)")]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a database written by an older inferplane up to FIELDS (new fields are added at
    the end of AuditRecord, old rows read NULL in them).

    Under BEGIN IMMEDIATE, so that replicas opening one old file at once add each column once.
    """
    if set(FIELDS) <= set(_columns(conn)):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        present = set(_columns(conn))
        for name in FIELDS:
            if name not in present:
                conn.execute(f"ALTER TABLE audit ADD COLUMN {name} {_SQL_TYPES.get(name, 'TEXT')}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class SQLiteSink:
    """One table `audit`, indexed on time; one transaction per batch.

    No index on request_id: ids are random, so each insert would land on another page of it and
    the writer's CPU per record grew from 2.6 µs to 10-23 µs (with the file's size), several per
    cent of a busy server's throughput. A lookup by id scans instead (about 0.2 s per million
    rows here; narrow it with --since). Where lookups matter more than ingest, add the index:
    `CREATE INDEX audit_request_id ON audit (request_id)`.

    WAL lets `inferplane audit` read while the server writes, and several processes (replicas,
    stream workers) share one file; synchronous=NORMAL survives a process crash, not power loss.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened here so a bad path fails at startup; used by the writer thread only after.
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpointing the WAL less often writes each page fewer times (measured 1.5-2x
            # faster than the default of 1000 pages with a random-key index).
            self._conn.execute("PRAGMA wal_autocheckpoint=8192")
            with self._conn:
                self._conn.execute(_CREATE)
                self._conn.execute("CREATE INDEX IF NOT EXISTS audit_time ON audit (time)")
            _add_missing_columns(self._conn)
        except (OSError, sqlite3.Error) as exc:
            raise BadRequest(f"cannot open the audit database '{self.path}': {exc}") from None

    def write(self, records: Sequence[AuditRecord]) -> None:
        rows = list(map(_row, records))
        with self._conn:
            start = 0
            for size in _CHUNKS:
                while len(rows) - start >= size:
                    chunk = rows[start : start + size]
                    self._conn.execute(_INSERTS[size], [v for row in chunk for v in row])
                    start += size

    def close(self) -> None:
        self._conn.close()


# -- JSON lines --------------------------------------------------------------------------------


class JsonlSink:
    """One JSON object per line, appended; the file is flushed after every batch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = f"jsonl:{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - open for the sink's lifetime
        except OSError as exc:
            raise BadRequest(f"cannot open the audit file '{self.path}': {exc}") from None

    def write(self, records: Sequence[AuditRecord]) -> None:
        # One write per batch: O_APPEND keeps batches of several processes from interleaving.
        self._file.write(b"".join([orjson.dumps(r) + b"\n" for r in records]))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# -- Parquet -----------------------------------------------------------------------------------


def _arrow_schema() -> Any:
    try:
        import pyarrow as pa
    except ImportError:
        raise MissingExtra("pyarrow", "batch") from None
    types = {"time": pa.float64(), "latency_ms": pa.float64(), "status": pa.int32()}
    return pa.schema([(name, types.get(name, pa.string())) for name in FIELDS])


class ParquetSink:
    """Parquet files under a folder or any fsspec URL (`parquet:s3://lake/audit`), partitioned
    by the hour of each record (`date=YYYY-MM-DD/hour=HH/`, UTC, Hive style), one file per
    replica, flush and hour. Names carry the replica (INFERPLANE_REPLICA, else the host name:
    a pod's name), the pid, a time and a sequence, so replicas sharing a prefix never write one
    name twice; a local file appears whole (written under a dot name, then renamed), an object
    store gets one PUT per file."""

    def __init__(self, path: str) -> None:
        import fsspec

        self.schema = _arrow_schema()
        try:
            self.fs, self.root = fsspec.core.url_to_fs(path)
        except (ImportError, ValueError) as exc:
            raise BadRequest(f"cannot open the audit folder '{path}': {exc}") from None
        self.root = self.root.rstrip("/") or "/"
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self.description = f"parquet:{path}"
        self.replica = re.sub(
            r"[^A-Za-z0-9_.-]", "_", os.environ.get("INFERPLANE_REPLICA") or socket.gethostname()
        )
        self._seq = 0
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise BadRequest(f"cannot create the audit folder '{path}': {exc}") from None

    def write(self, records: Sequence[AuditRecord]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        hours: dict[str, list[AuditRecord]] = {}
        for rec in records:
            hour = time.strftime("date=%Y-%m-%d/hour=%H", time.gmtime(rec.time or 0.0))
            hours.setdefault(hour, []).append(rec)
        for hour, recs in hours.items():
            columns = list(zip(*map(_row, recs), strict=True))
            table = pa.table(
                {
                    name: pa.array(col, type=self.schema.field(name).type)
                    for name, col in zip(FIELDS, columns, strict=True)
                },
                schema=self.schema,
            )
            self._seq += 1
            folder = f"{self.root}/{hour}"
            name = f"audit-{self.replica}-{os.getpid()}-{time.time_ns()}-{self._seq:06d}.parquet"
            if self.local:
                self.fs.makedirs(folder, exist_ok=True)
                tmp = f"{folder}/.{name}.tmp"  # readers skip dot files: never read half-written
                pq.write_table(table, tmp)
                os.replace(tmp, f"{folder}/{name}")
            else:
                with self.fs.open(f"{folder}/{name}", "wb") as out:
                    pq.write_table(table, out)

    def close(self) -> None:
        pass


# -- reading records back ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Filter:
    request_id: str | None
    since: float | None  # epoch seconds
    service: str | None
    model: str | None
    status: int | None
    principal: str | None
    trace_id: str | None = None
    kind: str | None = None  # "prediction" also matches records with no kind

    def matches(self, rec: dict[str, Any]) -> bool:
        return (
            (self.request_id is None or rec.get("request_id") == self.request_id)
            and (self.since is None or (rec.get("time") or 0.0) >= self.since)
            and (self.service is None or rec.get("service") == self.service)
            and (self.model is None or rec.get("model") == self.model)
            and (self.status is None or rec.get("status") == self.status)
            and (self.principal is None or rec.get("principal") == self.principal)
            and (self.trace_id is None or rec.get("trace_id") == self.trace_id)
            and (self.kind is None or (rec.get("kind") or PREDICTION) == self.kind)
        )


def query(
    spec_or_path: str,
    *,
    request_id: str | None = None,
    since_s: float | None = None,
    service: str | None = None,
    model: str | None = None,
    status: int | None = None,
    principal: str | None = None,
    trace_id: str | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    if limit < 1:
        raise BadRequest(f"limit must be >= 1, got {limit}")
    if since_s is not None and since_s < 0:
        raise BadRequest(f"since must be >= 0 seconds, got {since_s}")
    flt = _Filter(
        request_id=request_id,
        since=None if since_s is None else time.time() - since_s,
        service=service,
        model=model,
        status=status,
        principal=principal,
        trace_id=trace_id.lower() if trace_id else None,
        kind=kind,
    )
    sink_kind, path = parse_spec(spec_or_path)
    if sink_kind == "kafka":
        from inferplane.observability.audit_kafka import read_kafka

        return _latest((r for r in read_kafka(path) if flt.matches(r)), limit)
    readers: dict[str, Callable[[Path, _Filter, int], list[AuditRecord]]] = {
        "sqlite": _query_sqlite,
        "jsonl": _query_jsonl,
    }
    if sink_kind == "parquet":
        return _query_parquet(path, flt, limit)
    where = Path(path)
    if not where.exists():
        what = (
            "audit folder"
            if sink_kind == "parquet"
            else "audit database"
            if sink_kind == "sqlite"
            else "audit file"
        )
        raise NotFound(f"{what} '{path}' does not exist")
    return readers[sink_kind](where, flt, limit)


def _record(row: dict[str, Any]) -> AuditRecord:
    return AuditRecord(**{name: row[name] for name in FIELDS if name in row})


def _latest(rows: Iterable[dict[str, Any]], limit: int) -> list[AuditRecord]:
    newest = heapq.nlargest(limit, rows, key=lambda r: r.get("time") or 0.0)
    return [_record(r) for r in reversed(newest)]


def _query_sqlite(path: Path, flt: _Filter, limit: int) -> list[AuditRecord]:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        try:
            # Read-only, so nothing migrates here: a database written before a field existed
            # reads NULL in it (and matches no filter on it).
            present = set(_columns(conn))
            clauses: list[str] = []
            params: list[Any] = []
            for column, value, op in (
                ("request_id", flt.request_id, "="),
                ("time", flt.since, ">="),
                ("service", flt.service, "="),
                ("model", flt.model, "="),
                ("status", flt.status, "="),
                ("principal", flt.principal, "="),
                ("trace_id", flt.trace_id, "="),
            ):
                if value is not None:
                    clauses.append(f"{column if column in present else 'NULL'} {op} ?")
                    params.append(value)
            if flt.kind is not None:
                kind_column = "kind" if "kind" in present else "NULL"
                clauses.append(f"COALESCE({kind_column}, '{PREDICTION}') = ?")
                params.append(flt.kind)
            where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
            select = ", ".join(name if name in present else "NULL" for name in FIELDS)
            rows = conn.execute(
                f"SELECT {select} FROM audit{where} ORDER BY time DESC LIMIT ?", [*params, limit]
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise BadRequest(
                f"'{path}' is not an inferplane audit database (no audit table)"
            ) from None
        raise BadRequest(f"cannot read the audit database '{path}': {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise BadRequest(f"'{path}' is not an audit database: {exc}") from None
    return [AuditRecord(*row) for row in reversed(rows)]


def _query_jsonl(path: Path, flt: _Filter, limit: int) -> list[AuditRecord]:
    def rows() -> Iterable[dict[str, Any]]:
        with open(path, "rb") as lines:
            for line in lines:
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line another process is still writing
                if isinstance(row, dict) and flt.matches(row):
                    yield row

    try:
        return _latest(rows(), limit)
    except OSError as exc:
        raise BadRequest(f"cannot read the audit file '{path}': {exc}") from None


def _query_parquet(path: str, flt: _Filter, limit: int) -> list[AuditRecord]:
    """Every file read whole on this thread, then filtered column-wise. Not a pyarrow dataset:
    its scanner reads an fsspec store from Arrow's I/O threads, and a CLI exiting while one of
    them still held a Python callback aborted ("terminate called without an active exception",
    seen on moto S3 in CI)."""
    schema = _arrow_schema()
    import fsspec
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from inferplane.batch.readers import hive_values

    try:
        fs, root = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise BadRequest(f"cannot open the audit folder '{path}': {exc}") from None
    if not fs.exists(root):
        raise NotFound(f"audit folder '{path}' does not exist")
    first_hour = None
    if flt.since is not None:
        # whole hours before --since are skipped without opening their files
        first_hour = time.strftime("%Y-%m-%d/%H", time.gmtime(flt.since))
    tables = []
    for name in sorted(fs.find(root)):
        base = name.rsplit("/", 1)[-1]
        if base.startswith((".", "_")) or not base.endswith(".parquet"):
            continue
        parts = hive_values(name)
        hour = f"{parts.get('date')}/{parts.get('hour')}"
        if first_hour is not None and "date" in parts and "hour" in parts and hour < first_hour:
            continue
        table = pq.ParquetFile(pa.BufferReader(fs.cat_file(name))).read(use_threads=False)
        columns = [
            table[f].cast(schema.field(f).type)
            if f in table.column_names
            else pa.nulls(table.num_rows, schema.field(f).type)
            for f in FIELDS
        ]
        table = pa.table(columns, schema=schema)
        mask = None
        for column, value in (
            ("request_id", flt.request_id),
            ("service", flt.service),
            ("model", flt.model),
            ("status", flt.status),
            ("principal", flt.principal),
            ("trace_id", flt.trace_id),
            ("time", flt.since),
        ):
            if value is None:
                continue
            term = (
                pc.greater_equal(table[column], value)
                if column == "time"
                else pc.equal(table[column], value)
            )
            mask = term if mask is None else pc.and_(mask, term)
        if flt.kind is not None:
            term = pc.equal(pc.fill_null(table["kind"], PREDICTION), flt.kind)
            mask = term if mask is None else pc.and_(mask, term)
        if mask is not None:
            table = table.filter(pc.fill_null(mask, False))
        if table.num_rows:
            tables.append(table)
    if not tables:
        return []
    return _latest(pa.concat_tables(tables).to_pylist(), limit)
