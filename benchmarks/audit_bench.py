"""Micro-benchmark of the audit trail: what record() costs the hot path, what the writer sustains.

    .venv/bin/python benchmarks/audit_bench.py [--records 300000] [--work-us 120] [--seconds 3]

Measures, in this process and on a temporary folder:
1. `AuditLog.record()` per call in ns (accepted into the buffer; refused when full), and the cost
   of building the AuditRecord the caller pays besides;
2. the writer's sustained records/s into SQLite (and JSONL, Parquet): record as fast as possible,
   then time until flush() returns; and the sink alone (write() of 2,048-record batches);
3. the throughput cost on a simulated request loop: each request holds the GIL for `--work-us` µs
   of Python (about what inferplane's server spends per request at ~8k req/s on 2 cores), then
   builds and records its AuditRecord while the writer thread writes SQLite (or JSONL). Requests/s with and
   without auditing, alternated, median of rounds. Pure-Python work competes with the writer for
   the GIL on every instruction, so this is the pessimistic case (model code in ONNX Runtime
   releases the GIL).

Timed steps hold the machine's benchmark lock (/tmp/inferplane-bench.lock, as `make bench` does).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferplane.observability.audit import AuditLog, AuditRecord, open_sink

LOCK = os.environ.get("BENCH_LOCK", "/tmp/inferplane-bench.lock")


@contextlib.contextmanager
def bench_lock(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with open(LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {LOCK} (another benchmark runs)...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_records(n: int) -> list[AuditRecord]:
    now = time.time()
    return [
        AuditRecord(
            request_id=str(uuid.uuid4()),
            time=now,
            service="reco",
            model="tabular",
            version="2",
            route="canary",
            latency_ms=0.42,
            status=200,
            tenant="acme",
        )
        for _ in range(n)
    ]


def record_cost_ns(folder: Path, records: list[AuditRecord], rounds: int) -> dict[str, float]:
    accepted, refused = [], []
    for i in range(rounds):
        log = AuditLog(open_sink(str(folder / f"cost-{i}.db")), capacity=len(records) + 1)
        record = log.record
        t0 = time.perf_counter_ns()
        for rec in records:
            record(rec)
        accepted.append((time.perf_counter_ns() - t0) / len(records))
        log.close()
        # A closed log refuses like a full one: same branch under the same lock.
        t0 = time.perf_counter_ns()
        for rec in records:
            record(rec)
        refused.append((time.perf_counter_ns() - t0) / len(records))
    now = time.time()
    n = len(records)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        AuditRecord("0f1e2d3c", now, "reco", "tabular", "2", "canary", 0.42, 200, "acme")
    build = (time.perf_counter_ns() - t0) / n
    return {
        "record_ns": statistics.median(accepted),
        "refused_ns": statistics.median(refused),
        "build_ns": build,
    }


def writer_rate(spec: str, records: list[AuditRecord]) -> tuple[float, float]:
    """Records/s from the first record() to the end of flush(), and CPU µs per record (all
    threads: record() plus the writer's work, in and out of the GIL)."""
    log = AuditLog(open_sink(spec), capacity=len(records) + 1)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for rec in records:
        log.record(rec)
    if not log.flush(timeout_s=600):
        raise SystemExit(f"{spec}: flush timed out")
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    log.close()
    assert log.written == len(records), (log.written, len(records))
    return len(records) / elapsed, cpu / len(records) * 1e6


def sink_rate(spec: str, records: list[AuditRecord], batch: int = 2048) -> float:
    sink = open_sink(spec)
    t0 = time.perf_counter()
    for i in range(0, len(records), batch):
        sink.write(records[i : i + batch])
    elapsed = time.perf_counter() - t0
    sink.close()
    return len(records) / elapsed


def calibrate(work_us: float) -> int:
    """Iterations of a pure-Python loop that take `work_us` µs."""
    n = 10_000
    t0 = time.perf_counter()
    busy(n)
    per_iter = (time.perf_counter() - t0) / n
    return max(1, round(work_us * 1e-6 / per_iter))


def busy(n: int) -> int:
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return acc


def request_loop(seconds: float, iters: int, log: AuditLog | None) -> float:
    """Requests/s of a loop doing `iters` of Python work per request, auditing each or not."""
    done = 0
    t_end = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < t_end:
        for _ in range(100):
            t_req = time.time()
            busy(iters)
            if log is not None:
                log.record(
                    AuditRecord(
                        str(done),
                        t_req,
                        "reco",
                        "tabular",
                        "2",
                        "canary",
                        (time.time() - t_req) * 1e3,
                        200,
                        "acme",
                    )
                )
            done += 1
    return done / (time.perf_counter() - started)


def throughput_cost(
    folder: Path, kind: str, work_us: float, seconds: float, rounds: int
) -> dict[str, float]:
    iters = calibrate(work_us)
    request_loop(0.5, iters, None)  # warm-up
    off, on = [], []
    drops = backlog = 0
    for i in range(rounds):
        off.append(request_loop(seconds, iters, None))
        spec = (
            str(folder / f"loop-{i}.db") if kind == "sqlite" else f"jsonl:{folder}/loop-{i}.jsonl"
        )
        log = AuditLog(open_sink(spec))
        on.append(request_loop(seconds, iters, log))
        # What the writer had not written when the load stopped: it kept up if this stays
        # around one flush interval's worth of records.
        backlog = max(backlog, log.buffered)
        log.close()
        drops += log.dropped
    med_off, med_on = statistics.median(off), statistics.median(on)
    return {
        "off_rps": med_off,
        "on_rps": med_on,
        "cost_pct": (1 - med_on / med_off) * 100,
        "dropped": drops,
        "backlog": backlog,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work-us", type=float, nargs="+", default=[120.0])
    parser.add_argument("--loop-sinks", nargs="+", default=["sqlite", "jsonl"])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput round")
    parser.add_argument("--no-lock", action="store_true", help="do not take the bench lock")
    args = parser.parse_args()

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}; {args.records:,} records",
        flush=True,
    )
    records = make_records(args.records)
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp, bench_lock(not args.no_lock):
        folder = Path(tmp)
        cost = record_cost_ns(folder, records, args.rounds)
        print(
            f"record(): {cost['record_ns']:.0f} ns/call accepted, {cost['refused_ns']:.0f} ns/call "
            f"refused (buffer full/closed); building the AuditRecord: {cost['build_ns']:.0f} ns",
            flush=True,
        )
        for kind, spec, alone_spec in (
            ("sqlite", str(folder / "w.db"), str(folder / "s.db")),
            ("jsonl", f"jsonl:{folder}/w.jsonl", f"jsonl:{folder}/s.jsonl"),
            ("parquet", f"parquet:{folder}/w", f"parquet:{folder}/s"),
        ):
            through_log, cpu_us = writer_rate(spec, records)
            alone = sink_rate(alone_spec, records)
            print(
                f"writer into {kind}: {through_log:,.0f} records/s sustained "
                f"(record + flush), {cpu_us:.1f} µs CPU per record (all threads); sink alone "
                f"{alone:,.0f} records/s in 2,048-record batches; a CPU-bound server spending "
                + ", ".join(f"{w:g} µs" for w in args.work_us)
                + " per request loses about "
                + ", ".join(f"{cpu_us / (w + cpu_us) * 100:.1f}%" for w in args.work_us),
                flush=True,
            )
        for work_us, kind in itertools.product(args.work_us, args.loop_sinks):
            res = throughput_cost(folder, kind, work_us, args.seconds, args.rounds)
            print(
                f"request loop, {work_us:g} µs Python work/request: {res['off_rps']:,.0f} req/s "
                f"without audit, {res['on_rps']:,.0f} req/s with audit into {kind} -> "
                f"{res['cost_pct']:+.1f}% throughput cost (dropped {res['dropped']:.0f}, largest backlog "
                f"at the end of a round {res['backlog']:.0f} records)",
                flush=True,
            )


if __name__ == "__main__":
    main()
