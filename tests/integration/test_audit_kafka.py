"""The shared audit sink on a real Kafka-protocol broker (Tansu): a real server writes one record
per answered request, keyed by request id; `inferplane audit --sink kafka://...` reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from inferplane.observability.audit import AuditLog, AuditRecord
from inferplane.observability.audit_kafka import KafkaAuditSink
from inferplane.repository.register import register
from inferplane.repository.store import Repository
from tests.conftest import free_port
from tests.integration.servers import ROOT, start_server
from tests.integration.streaming.harness import Tansu

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "INFERPLANE_AUDIT"}
    return subprocess.run(
        [sys.executable, "-m", "inferplane", "audit", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def _record(rid: str) -> AuditRecord:
    return AuditRecord(
        request_id=rid, time=time.time(), service="s", model="m", version="1",
        route="direct", status=200, latency_ms=1.0,
    )  # fmt: skip


def test_a_server_writes_one_keyed_record_per_answer_and_audit_reads_them(
    tansu: Tansu, tmp_path: Path, make_onnx_model: Callable[..., str]
) -> None:
    topic = f"audit-{uuid.uuid4().hex[:8]}"
    tansu.create_topics(topic, partitions=3)
    repo = tmp_path / "repo"
    register(Repository(str(repo)), "m", make_onnx_model(tmp_path / "a" / "m.onnx"))
    server = start_server(repo, tmp_path, "--audit-sink", tansu.url(topic), grpc=False)
    ids = [f"req-{i}" for i in range(40)]
    try:
        with httpx.Client() as client:
            for rid in ids:
                body = {**BODY, "id": rid}
                r = client.post(f"{server.url}/v2/models/m/infer", json=body)
                assert r.status_code == 200, r.text
    finally:
        server.stop()  # flushes the audit
    assert server.process.returncode == 0, server.log()
    result = _audit("--sink", tansu.url(topic), "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert {r["model"] for r in rows} == {"m"} and {r["status"] for r in rows} == {200}
    one = _audit("--sink", tansu.url(topic), "--request-id", "req-7", "--json")
    assert [json.loads(x)["request_id"] for x in one.stdout.splitlines()] == ["req-7"]

    # keyed by request id (a consumer can find or compact by it)
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": tansu.bootstrap, "group.id": uuid.uuid4().hex})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(3)])
        keys: set[str] = set()
        deadline = time.monotonic() + 30
        while len(keys) < len(ids) and time.monotonic() < deadline:
            for msg in consumer.consume(100, timeout=1.0):
                if msg.error() is None:
                    assert json.loads(msg.value())["request_id"] == msg.key().decode()
                    keys.add(msg.key().decode())
        assert keys == set(ids)
    finally:
        consumer.close()


def test_two_replicas_share_one_topic(tansu: Tansu) -> None:
    topic = f"audit-{uuid.uuid4().hex[:8]}"
    tansu.create_topics(topic, partitions=2)
    logs = [AuditLog(KafkaAuditSink(tansu.url(topic))) for _ in range(2)]
    for n, audit in enumerate(logs):
        for i in range(25):
            audit.record(_record(f"r{n}-{i}"))
    for audit in logs:
        audit.close()
    result = _audit("--sink", tansu.url(topic), "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 50


def test_a_broker_gone_counts_drops_and_keeps_accepting(tansu: Tansu) -> None:
    # A broker that accepts the start-up check, then goes away: here, a topic on a port where
    # nothing listens is refused at start with the reason.
    dead = f"kafka://127.0.0.1:{free_port()}/audit"
    result = subprocess.run(
        [sys.executable, "-c", f"from inferplane.observability.audit import open_sink; open_sink({dead!r})"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "audit sink kafka://" in result.stderr
    missing = _audit("--sink", tansu.url("no-such-topic-" + uuid.uuid4().hex[:6]))
    assert missing.returncode == 2 and "no such topic" in missing.stderr
    bad = _audit("--sink", tansu.url("t", bogus="1"))
    assert bad.returncode == 2 and "unknown option 'bogus'" in bad.stderr
