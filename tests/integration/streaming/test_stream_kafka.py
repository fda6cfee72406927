"""Streaming over a Kafka-compatible broker (Tansu) with real `inferplane stream` processes."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import orjson

from tests.integration.streaming.harness import (
    KafkaTail,
    Tansu,
    kafka_produce,
    rows,
    start_worker,
    unique,
    wait_for,
)

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# Tansu joins a consumer group in about half the session timeout: keep it short in tests.
GROUP_OPTIONS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


def test_scores_a_topic_keeps_keys_headers_and_order(
    tansu: Tansu, tabular_repo: Path, tmp_path: Path
) -> None:
    base = unique("kafka")
    tansu.create_topics(f"{base}-in", f"{base}-out", f"{base}-dlq")
    messages: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
    for i, row in enumerate(rows(400, seed=5)):
        headers = [("traceparent", TRACE.encode()), ("tenant", b"acme")]
        messages.append((f"card-{i % 20}".encode(), orjson.dumps({"id": i, "features": row}),
                         headers))  # fmt: skip
    messages[50] = (b"card-10", b"\xff\xfe not json", [])
    messages[51] = (b"card-11", orjson.dumps({"id": 51, "features": [0.0] * 31}), [])
    kafka_produce(tansu.bootstrap, f"{base}-in", messages)
    worker = start_worker(
        ["--source", tansu.url(f"{base}-in", **GROUP_OPTIONS), "--sink", tansu.url(f"{base}-out"),
         "--dlq", tansu.url(f"{base}-dlq"), "--group", "scorers", "--service", "tabular",
         "--repository", str(tabular_repo), "-m", "tabular", "--batch-size", "64",
         "--max-wait-ms", "5"],
        tmp_path,
    )  # fmt: skip
    out_tail, dlq_tail = (
        KafkaTail(tansu.bootstrap, f"{base}-out"),
        KafkaTail(tansu.bootstrap, f"{base}-dlq"),
    )
    try:
        wait_for(
            lambda: out_tail.poll() + dlq_tail.poll() >= 400,
            90, "400 outputs and dead letters", worker,
        )  # fmt: skip
        outputs, dead_messages = out_tail.read(398, 5), dlq_tail.read(2, 5)
    finally:
        out_tail.close()
        dlq_tail.close()
        assert worker.stop() == 0, worker.log()
    assert len(outputs) == 398
    per_key: dict[bytes, list[int]] = defaultdict(list)
    for msg in outputs:
        doc = orjson.loads(msg.value())
        headers = dict(msg.headers())
        assert msg.key() == f"card-{int(doc['id']) % 20}".encode()  # the input key is kept
        assert doc["key"] == msg.key().decode()
        assert headers["tenant"] == b"acme"  # input headers travel with the output
        assert headers["traceparent"].decode() == doc["traceparent"]
        assert doc["traceparent"].split("-")[1] == TRACE.split("-")[1]
        assert headers["output_id"].decode() == doc["output_id"]
        assert doc["output_id"].startswith(f"{base}-in:")
        assert doc["model_version"] == "1" and doc["outputs"]["label"] in (0, 1)
        per_key[msg.key()].append(int(doc["id"]))
    # One key lives on one partition in and out, and outputs keep the input order.
    for key, ids in per_key.items():
        assert ids == sorted(ids), f"outputs for {key!r} out of order: {ids}"

    dead = [orjson.loads(m.value()) for m in dead_messages]
    by_key = {d["key"]: d for d in dead}
    assert set(by_key) == {"card-10", "card-11"}
    assert by_key["card-10"]["payload_encoding"] == "base64"  # not UTF-8: kept byte for byte
    assert "not JSON" in by_key["card-10"]["reason"]
    assert "needs 32 values per event" in by_key["card-11"]["reason"]
    assert by_key["card-11"]["id"] == "51"
    assert set(by_key["card-11"]["position"]) == {"topic", "partition", "offset"}

    # Every offset was committed: a new worker in the group would find nothing left.
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": tansu.bootstrap, "group.id": "scorers"})
    try:
        committed = consumer.committed([TopicPartition(f"{base}-in", p) for p in range(4)], 10)
        assert sum(tp.offset for tp in committed) == 400
    finally:
        consumer.close()
