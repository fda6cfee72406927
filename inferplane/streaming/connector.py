"""The interface a broker implements, and the URL shapes that pick one.

A `Source` hands out events and acknowledges them; a `Sink` returns from `write` only once the broker
has durably accepted every record (Redis: the XADD replies; Kafka: delivery reports with acks=all).
The worker acknowledges an input only after its output or dead-letter record is written, which is
what makes delivery at-least-once whatever the broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from inferplane.errors import BadRequest


@dataclass(slots=True)
class Event:
    """One input message, whatever broker it came from."""

    payload: bytes
    key: bytes | None
    headers: dict[str, str]
    message_id: str  # the broker's id: a Redis entry id, or a Kafka offset
    output_id: str  # stable across redeliveries: outputs carry it so consumers can de-duplicate
    position: dict[str, Any]  # where the event sits in the source, for dead-letter records
    timestamp_ms: int | None = None  # the broker's timestamp, when it has one
    redelivered: bool = False  # handed out before to some consumer (claimed or re-read)
    token: Any = None  # what the source needs to acknowledge it


@dataclass(slots=True)
class Record:
    """One output (or dead-letter) message."""

    value: bytes
    key: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Source(Protocol):
    name: str

    async def start(self) -> None: ...

    async def fetch(self, max_events: int, timeout_s: float) -> list[Event]:
        """Up to `max_events`; waits at most `timeout_s` for the first one (may return none)."""
        ...

    async def ack(self, events: Sequence[Event]) -> None:
        """Mark these events done; they arrive in the order `fetch` returned them."""
        ...

    async def lag(self) -> int | None:
        """Entries the group has not yet read or acknowledged, when the broker can tell."""
        ...

    async def close(self) -> None: ...


class Sink(Protocol):
    name: str

    async def start(self) -> None: ...

    async def write(self, records: Sequence[Record]) -> None:
        """Returns once the broker has accepted every record durably; raises otherwise."""
        ...

    async def submit(self, records: Sequence[Record]) -> asyncio.Future[None]:
        """Hand the records over in order; the receipt settles once they are all durable.

        Returns when the next batch may be submitted behind these without being reordered.
        """
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class SourceOptions:
    group: str
    consumer: str
    start: str = "earliest"  # where a new consumer group begins: earliest | latest
    claim_idle_ms: int = 30_000  # Redis: pending entries idle this long are taken over


@dataclass(slots=True)
class BrokerURL:
    scheme: str
    hosts: str  # host:port[,host:port...]
    path: str
    query: dict[str, str]


def parse_url(url: str, what: str) -> BrokerURL:
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise BadRequest(
            f"{what} '{url}': unknown scheme '{parts.scheme}'; use "
            "redis://host:port/db?stream=NAME or kafka://host:port/TOPIC"
        )
    if not parts.netloc:
        raise BadRequest(f"{what} '{url}': needs host:port")
    return BrokerURL(parts.scheme, parts.netloc, parts.path, dict(parse_qsl(parts.query)))


SCHEMES = ("redis", "rediss", "kafka")


def open_source(url: str, options: SourceOptions) -> Source:
    parsed = parse_url(url, "--source")
    if parsed.scheme == "kafka":
        from inferplane.streaming.kafka import KafkaSource

        return KafkaSource(parsed, options)
    from inferplane.streaming.redis_streams import RedisSource

    return RedisSource(parsed, options)


def open_sink(url: str, what: str = "--sink") -> Sink:
    parsed = parse_url(url, what)
    if parsed.scheme == "kafka":
        from inferplane.streaming.kafka import KafkaSink

        return KafkaSink(parsed)
    from inferplane.streaming.redis_streams import RedisSink

    return RedisSink(parsed)
