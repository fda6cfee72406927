"""Kafka (and Kafka-compatible brokers): consumer groups, manual commits, idempotent acks=all producer.

URL: `kafka://host:port[,host:port...]/TOPIC`; query parameters are passed to librdkafka as they
are (e.g. `?session.timeout.ms=6000&security.protocol=SSL`). Offsets are committed only for events
whose outputs were delivered, in the order they were read, so a restart or a rebalance re-reads at
most the work that was in flight. Producers use acks=all and enable.idempotence, so a write counts
as accepted only when every in-sync replica has it, and retries never reorder or duplicate it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from inferplane.errors import BadRequest, Unavailable
from inferplane.streaming.connector import BrokerURL, Event, Record, SourceOptions

log = logging.getLogger("inferplane.stream.kafka")
T = TypeVar("T")


def _topic(url: BrokerURL) -> str:
    topic = url.path.strip("/")
    if not topic or "/" in topic:
        raise BadRequest(
            f"kafka URL kafka://{url.hosts}{url.path} needs exactly one topic: "
            "kafka://host:port/TOPIC"
        )
    return topic


class _Thread:
    """librdkafka handles are driven from one thread: calls run there in order, off the loop."""

    def __init__(self, name: str) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


def _partitions(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "none"


def _on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
    log.info("kafka: assigned %s", _partitions(partitions))


class KafkaSource:
    def __init__(self, url: BrokerURL, options: SourceOptions) -> None:
        self.topic = _topic(url)
        self.name = f"kafka:{self.topic}"
        self.config: dict[str, Any] = {
            "bootstrap.servers": url.hosts,
            "group.id": options.group,
            "client.id": options.consumer,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": options.start,
            # Measured on Tansu: the 500 ms default put p99 end-to-end lag near 1 s at half the
            # drain rate; 10 ms brings it to ~60 ms. Brokers that answer on fetch.min.bytes are
            # unaffected, except for more fetches while the topic is idle.
            "fetch.wait.max.ms": 10,
            "on_commit": self._on_commit,
            **url.query,
        }
        self.thread = _Thread("kafka-consumer")
        self.consumer: Consumer | None = None
        self._seen: dict[int, int] = {}  # partition -> highest offset read by this process
        self._acked: dict[int, int] = {}  # partition -> next offset to commit

    @staticmethod
    def _on_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            # A commit lost to a rebalance only means the next owner re-reads (at-least-once).
            log.warning("offset commit failed: %s", err)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Held work for these partitions still gets written and its commit may fail: the next
        # owner re-reads it (duplicates, never loss). The final commit skips them, so that it
        # cannot move the new owner's committed offset back.
        log.info("kafka: revoked %s", _partitions(partitions))
        for tp in partitions:
            self._acked.pop(tp.partition, None)

    async def start(self) -> None:
        def make() -> Consumer:
            consumer = Consumer(self.config)
            consumer.subscribe([self.topic], on_assign=_on_assign, on_revoke=self._on_revoke)
            return consumer

        try:
            self.consumer = await self.thread.run(make)
        except KafkaException as exc:
            raise Unavailable(f"kafka consumer for '{self.topic}' failed: {exc}") from exc

    async def fetch(self, max_events: int, timeout_s: float) -> list[Event]:
        assert self.consumer is not None
        messages = await self.thread.run(self.consumer.consume, max_events, timeout_s)
        return [e for e in (self._event(m) for m in messages) if e is not None]

    def _event(self, msg: Message) -> Event | None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("kafka consume error: %s", err)
            return None
        partition, offset = msg.partition() or 0, msg.offset() or 0
        seen = self._seen.get(partition, -1)
        if offset > seen:
            self._seen[partition] = offset
        kind, ts = msg.timestamp()
        headers: dict[str, str] = {}
        raw = msg.headers() or []
        # Consumed messages carry headers as (name, bytes) pairs; the type also allows a dict.
        for name, value in raw.items() if isinstance(raw, dict) else raw:
            headers[name] = (
                value.decode(errors="replace") if isinstance(value, bytes) else value or ""
            )
        topic = msg.topic() or self.topic
        return Event(
            payload=msg.value() or b"",
            key=msg.key(),
            headers=headers,
            message_id=str(offset),
            output_id=f"{topic}:{partition}:{offset}",
            position={"topic": topic, "partition": partition, "offset": offset},
            timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else ts,
            redelivered=offset <= seen,
            token=(topic, partition, offset),
        )

    async def ack(self, events: Sequence[Event]) -> None:
        assert self.consumer is not None
        latest: dict[tuple[str, int], int] = {}
        for e in events:
            topic, partition, offset = e.token
            latest[(topic, partition)] = max(latest.get((topic, partition), -1), offset + 1)
        consumer, acked = self.consumer, self._acked

        def commit() -> None:
            # On the consumer thread, like the revoke callback: the assignment cannot change
            # under us, and partitions given away are never committed by this worker again.
            owned = {tp.partition for tp in consumer.assignment()}
            offsets = [TopicPartition(t, p, o) for (t, p), o in latest.items() if p in owned]
            if not offsets:
                return
            for tp in offsets:
                acked[tp.partition] = tp.offset
            try:
                consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:
                log.warning("offset commit failed: %s", exc)

        await self.thread.run(commit)

    async def lag(self) -> int | None:
        assert self.consumer is not None
        consumer = self.consumer

        def measure() -> int | None:
            assigned = consumer.assignment()
            if not assigned:
                return None
            total = 0
            for tp in consumer.committed(assigned, timeout=5):
                low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
                start = tp.offset if tp.offset >= 0 else low
                total += max(0, high - start)
            return total

        try:
            return await self.thread.run(measure)
        except KafkaException as exc:
            log.debug("kafka lag unavailable: %s", exc)
            return None

    async def close(self) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        acked, topic = self._acked, self.topic

        def finish() -> None:
            offsets = [TopicPartition(topic, p, o) for p, o in acked.items()]
            if offsets:
                try:
                    # The last acknowledgements, synchronously: a clean stop re-reads nothing.
                    consumer.commit(offsets=offsets, asynchronous=False)
                except KafkaException as exc:
                    log.warning("final offset commit failed: %s", exc)
            consumer.close()

        await self.thread.run(finish)
        self.thread.shutdown()
        self.consumer = None


class KafkaSink:
    """An idempotent acks=all producer; `submit` queues a batch and returns its delivery receipt.

    Batches are queued in order and the producer keeps that order (idempotence), so the worker can
    queue the next batch while the previous one is still being confirmed.
    """

    def __init__(self, url: BrokerURL) -> None:
        self.topic = _topic(url)
        self.name = f"kafka:{self.topic}"
        self.config: dict[str, Any] = {
            "bootstrap.servers": url.hosts,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 2,
            **url.query,
        }
        self.thread = _Thread("kafka-producer")
        self.producer: Producer | None = None
        self._poller: threading.Thread | None = None
        self._polling = False

    async def start(self) -> None:
        try:
            self.producer = await self.thread.run(Producer, self.config)
        except KafkaException as exc:
            raise Unavailable(f"kafka producer for '{self.topic}' failed: {exc}") from exc
        self._polling = True
        # Delivery reports arrive through poll(); a thread of its own keeps them flowing while
        # the producing thread is busy queueing the next batch.
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        producer = self.producer
        while self._polling and producer is not None:
            producer.poll(0.05)

    async def submit(self, records: Sequence[Record]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        receipt: asyncio.Future[None] = loop.create_future()
        if not records:
            receipt.set_result(None)
            return receipt
        assert self.producer is not None
        producer, topic = self.producer, self.topic
        left: list[int] = [len(records)]
        errors: list[KafkaError] = []

        def settle() -> None:
            if receipt.done():
                return
            if errors:
                receipt.set_exception(
                    Unavailable(f"kafka refused records to '{topic}': {errors[0]}")
                )
            else:
                receipt.set_result(None)

        def delivered(err: KafkaError | None, _msg: Message) -> None:  # on the delivery thread
            if err is not None:
                errors.append(err)
            left[0] -= 1
            if left[0] == 0:
                loop.call_soon_threadsafe(settle)

        def send() -> None:
            for record in records:
                headers: list[tuple[str, str | bytes | None]] = list(record.headers.items())
                while True:
                    try:
                        producer.produce(
                            topic,
                            value=record.value,
                            key=record.key,
                            headers=headers,
                            on_delivery=delivered,
                        )
                        break
                    except BufferError:
                        time.sleep(0.01)  # the local queue is full: deliveries drain it

        await self.thread.run(send)
        return receipt

    async def write(self, records: Sequence[Record]) -> None:
        await (await self.submit(records))

    async def close(self) -> None:
        if self.producer is not None:
            await self.thread.run(self.producer.flush, 30)
        self._polling = False
        if self._poller is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._poller.join)
        self.producer = None
        self.thread.shutdown()
