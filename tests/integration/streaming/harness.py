"""Helpers for the streaming tests: broker handles, `inferplane stream` processes, waiting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.servers import ROOT


@dataclass
class RedisServer:
    port: int

    def url(self, stream: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?stream={stream}"

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port)


@dataclass
class Tansu:
    """A Kafka-compatible (Tansu) broker."""

    bootstrap: str

    def url(self, topic: str, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"kafka://{self.bootstrap}/{topic}" + (f"?{query}" if query else "")

    def create_topics(self, *names: str, partitions: int = 4) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
        for future in futures.values():
            future.result(30)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(
                    f"worker ignored SIGTERM for {timeout}s:\n{self.log()}"
                ) from None
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def start_worker(args: list[str], log_dir: Path, name: str = "worker") -> WorkerProcess:
    log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    cmd = [sys.executable, "-m", "inferplane", "stream", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return WorkerProcess(proc, log_path)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, worker: WorkerProcess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if worker is not None and worker.process.poll() is not None:
            raise AssertionError(f"worker exited ({worker.process.returncode}):\n{worker.log()}")
        time.sleep(0.1)
    detail = f"\n{worker.log()[-4000:]}" if worker is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


def run_until(
    args: list[str], log_dir: Path, done: Callable[[], bool], timeout: float, what: str
) -> WorkerProcess:
    """Start a worker, wait until `done`, then stop it; it must exit cleanly (0) on SIGTERM.
    Returns the stopped worker, for its log."""
    worker = start_worker(args, log_dir)
    try:
        wait_for(done, timeout, what, worker)
    finally:
        assert worker.stop() == 0, worker.log()
    return worker


# --- data in and out ----------------------------------------------------------------------------


def rows(n: int, seed: int = 0) -> list[list[float]]:
    """Feature rows for the `tabular` model (32 FP32 features), rounded to keep payloads small."""
    import numpy as np

    data = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return [[round(float(v), 4) for v in row] for row in data]


def redis_fill(client: Any, stream: str, entries: list[dict[str, Any]]) -> list[str]:
    """XADD each entry (field -> bytes/str); returns the entry ids."""
    ids: list[str] = []
    for start in range(0, len(entries), 2000):
        pipe = client.pipeline(transaction=False)
        for fields in entries[start : start + 2000]:
            pipe.xadd(stream, fields)
        ids.extend(i.decode() for i in pipe.execute())
    return ids


def redis_read(client: Any, stream: str) -> list[tuple[str, dict[str, bytes]]]:
    """Every entry of a stream, oldest first, fields decoded to str keys."""
    out: list[tuple[str, dict[str, bytes]]] = []
    start = "-"
    while True:
        batch = client.xrange(stream, start, "+", count=5000)
        if start != "-":
            batch = batch[1:]
        if not batch:
            return out
        out.extend((i.decode(), {k.decode(): v for k, v in f.items()}) for i, f in batch)
        start = batch[-1][0].decode()


def kafka_produce(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]
) -> None:
    """(key, value, headers) each, with acks=all; returns once all are delivered."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for i, (key, value, headers) in enumerate(messages):
        producer.produce(topic, value=value, key=key, headers=headers)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0, "kafka did not confirm every test message"


class KafkaTail:
    """Reads a whole topic from the beginning (partitions assigned directly: no group join wait).

    Counting by consuming, not by watermarks: Tansu's high watermarks can trail the last offset.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int = 4) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": unique("tail"),
             "enable.auto.commit": False}
        )  # fmt: skip
        self.consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        )
        self.messages: list[Any] = []

    def poll(self) -> int:
        """Read what has arrived; returns how many messages were read so far."""
        # One read per call: under a steady flow, "until nothing comes" would never return.
        self.messages.extend(m for m in self.consumer.consume(5000, 0.1) if not m.error())
        return len(self.messages)

    def read(self, expected: int, timeout: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while self.poll() < expected and time.monotonic() < deadline:
            pass
        return self.messages

    def close(self) -> None:
        self.consumer.close()


def reporting_worker(
    redis: RedisServer, base: str, events: int, repo: Path, consumer: str, port: int, log_dir: Path
) -> WorkerProcess:
    """`events` tabular events on `<base>-in` and a worker named `consumer` scoring them, its
    metrics on `port`: what the stream views (GET /inferplane/streams, the console) read."""
    redis_fill(redis.client(), f"{base}-in", [{"data": f'{{"id": "e{i}", "features": {r}}}'}
                                              for i, r in enumerate(rows(events))])  # fmt: skip
    return start_worker(
        ["--source", redis.url(f"{base}-in"), "--sink", redis.url(f"{base}-out"),
         "--dlq", redis.url(f"{base}-dlq"), "--group", "scorers", "--consumer", consumer,
         "--service", "tabular", "--repository", str(repo), "-m", "tabular",
         "--metrics-port", str(port)],
        log_dir,
    )  # fmt: skip
