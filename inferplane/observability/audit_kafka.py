"""The audit trail on a Kafka topic, shared by every replica: `kafka://HOST:PORT[,...]/TOPIC`.

One JSON record per prediction (the JSONL sink's form), keyed by request id, so that a
compacted or keyed consumer finds a request's record by its id. Produced with acks=all and
idempotence; `write` returns once the broker has the batch, or raises (the audit log counts the
batch as dropped and says why), so the serving path never waits on the broker: the audit
buffer is bounded and sheds records when the broker is away.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from inferplane.errors import BadRequest, MissingExtra
from inferplane.observability.audit import AuditRecord

log = logging.getLogger("inferplane.audit.kafka")
_DELIVERY_TIMEOUT_S = 30.0
# Options a spec may set (`?acks=1&compression=zstd`): librdkafka names, a short list on purpose.
_OPTIONS = {"acks": "acks", "compression": "compression.type", "linger_ms": "linger.ms"}


def _kafka() -> Any:
    try:
        import confluent_kafka
    except ImportError:
        raise MissingExtra("confluent-kafka", "stream") from None
    return confluent_kafka


def parse_kafka(spec: str) -> tuple[str, str, dict[str, str]]:
    """(bootstrap servers, topic, librdkafka options) of `kafka://h:p[,h:p]/TOPIC[?opts]`."""
    parts = urlsplit(spec if spec.startswith("kafka://") else "kafka://" + spec.lstrip("/"))
    topic = parts.path.strip("/")
    if not parts.netloc or not topic or "/" in topic:
        raise BadRequest(
            f"audit sink '{spec}': use kafka://HOST:PORT[,HOST:PORT...]/TOPIC (one topic)"
        )
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query):
        if key not in _OPTIONS:
            raise BadRequest(
                f"audit sink '{spec}': unknown option '{key}'; known: {', '.join(_OPTIONS)}"
            )
        options[_OPTIONS[key]] = value
    return parts.netloc, topic, options


class KafkaAuditSink:
    def __init__(self, spec: str) -> None:
        kafka = _kafka()
        self.hosts, self.topic, options = parse_kafka(spec)
        self.description = f"kafka://{self.hosts}/{self.topic}"
        self._producer = kafka.Producer(
            {
                "bootstrap.servers": self.hosts,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "compression.type": "lz4",
                "message.timeout.ms": int(_DELIVERY_TIMEOUT_S * 1000),
                "logger": log,  # librdkafka's own lines through logging, not raw on stderr
                **options,
            }
        )
        # A missing topic or an unreachable broker fails here, at start-up, with its reason.
        try:
            metadata = self._producer.list_topics(self.topic, timeout=10)
        except kafka.KafkaException as exc:
            raise BadRequest(f"audit sink {self.description}: {exc}") from None
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None:
            raise BadRequest(
                f"audit sink {self.description}: topic '{self.topic}' is not there "
                f"({found.error if found else 'unknown'}); create it first"
            )

    def write(self, records: Sequence[AuditRecord]) -> None:
        failures: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for rec in records:
            while True:
                try:
                    self._producer.produce(
                        self.topic,
                        orjson.dumps(rec),
                        rec.request_id.encode(),
                        on_delivery=delivered,
                    )
                    break
                except BufferError:  # librdkafka's queue is full: let deliveries drain it
                    self._producer.poll(0.05)
        left = self._producer.flush(_DELIVERY_TIMEOUT_S)
        if left or failures:
            raise RuntimeError(
                f"{len(failures) + left} of {len(records)} audit records not delivered to "
                f"{self.description}: {failures[0] if failures else 'delivery timed out'}"
            )

    def close(self) -> None:
        self._producer.flush(_DELIVERY_TIMEOUT_S)


def read_kafka(spec: str) -> list[dict[str, Any]]:
    """Every record on the topic, from the start to the high watermarks of now (no consumer
    group offsets are committed)."""
    kafka = _kafka()
    hosts, topic, _ = parse_kafka(spec)
    consumer = kafka.Consumer(
        {
            "bootstrap.servers": hosts,
            "group.id": f"inferplane-audit-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "log_level": 0,  # a command line: the one error line below says what failed
        }
    )
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=10)
        except kafka.KafkaException as exc:
            raise BadRequest(f"cannot read kafka://{hosts}/{topic}: {exc}") from None
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise BadRequest(f"kafka://{hosts}/{topic}: no such topic")
        ends: dict[int, int] = {}
        assign = []
        for partition in found.partitions:
            tp = kafka.TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            if high > low:
                ends[partition] = high
                assign.append(kafka.TopicPartition(topic, partition, low))
        rows: list[dict[str, Any]] = []
        if not assign:
            return rows
        consumer.assign(assign)
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error() is not None:
                    continue
                partition, offset = msg.partition(), msg.offset()
                if partition in ends and offset >= ends[partition] - 1:
                    del ends[partition]
                try:
                    row = orjson.loads(msg.value())
                except orjson.JSONDecodeError:
                    continue  # not ours: someone else's message on the topic
                if isinstance(row, dict):
                    rows.append(row)
        if ends:
            raise BadRequest(f"kafka://{hosts}/{topic}: reading did not reach the end in 60 s")
        return rows
    finally:
        consumer.close()
