"""Redis Streams: consumer groups, XACK after the output is written, XAUTOCLAIM of abandoned work.

URL: `redis://[user:password@]host:port/db?stream=NAME` (`rediss://` for TLS). Each stream entry
keeps the event in one field (`data`, or `?field=...`); a `key` field is the event's key and every
other field travels as a header (e.g. `traceparent`). Sinks write entries of the same shape;
`?maxlen=N` trims the output stream approximately, `?wait=N` makes each write wait for N replicas
(Redis WAIT) before it counts as accepted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from inferplane.errors import BadRequest, Unavailable
from inferplane.streaming.connector import BrokerURL, Event, Record, SourceOptions

KEY_FIELD = b"key"

# Reading and writing a batch as ONE JSON string: redis-py parses replies in Python one element at
# a time, which costs more than scoring the event. Both scripts run atomically.
# Read (never blocks; the blocking wait for new entries stays a plain XREADGROUP):
_XREADGROUP_JSON = """
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], ARGV[4])
if not r then return '[]' end
return cjson.encode(r[1][2])
"""

# Write: ARGV[1] is the MAXLEN ("" for none), ARGV[2] a JSON list of [field, value, ...] lists.
_XADD_JSON = """
local head = {}
if ARGV[1] ~= '' then head = {'MAXLEN', '~', ARGV[1]} end
head[#head + 1] = '*'
local added = 0
for _, fields in ipairs(cjson.decode(ARGV[2])) do
  local args = {}
  for i, v in ipairs(head) do args[i] = v end
  for _, v in ipairs(fields) do args[#args + 1] = v end
  redis.call('XADD', KEYS[1], unpack(args))
  added = added + 1
end
return added
"""


def _client(url: BrokerURL) -> aioredis.Redis:
    db = url.path.strip("/") or "0"
    if not db.isdigit():
        raise BadRequest(f"redis URL path must be a database number, got '/{db}'")
    return aioredis.Redis.from_url(f"{url.scheme}://{url.hosts}/{db}", decode_responses=False)


def _stream(url: BrokerURL) -> str:
    stream = url.query.get("stream")
    if not stream:
        raise BadRequest(
            f"redis URL {url.scheme}://{url.hosts}{url.path} needs ?stream=NAME "
            "(e.g. redis://127.0.0.1:6379/0?stream=transactions)"
        )
    return stream


class RedisSource:
    def __init__(self, url: BrokerURL, options: SourceOptions) -> None:
        self.stream = _stream(url)
        self.field = url.query.get("field", "data").encode()
        self.options = options
        self.name = f"redis:{self.stream}"
        self.client = _client(url)
        self._read_json = self.client.register_script(_XREADGROUP_JSON)
        self._pending_cursor: str | None = "0"  # None once our own old pending list is read
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._held: set[bytes] = set()  # fetched, not yet acknowledged: never claim our own

    async def start(self) -> None:
        try:
            await self.client.xgroup_create(
                self.stream,
                self.options.group,
                id="0" if self.options.start == "earliest" else "$",
                mkstream=True,
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        except OSError as exc:
            raise Unavailable(f"redis for stream '{self.stream}' is unreachable: {exc}") from exc

    async def fetch(self, max_events: int, timeout_s: float) -> list[Event]:
        if self._pending_cursor is not None:
            # Entries this consumer name was given before a restart and never acknowledged.
            entries = await self._read(self._pending_cursor, max_events)
            if entries:
                self._pending_cursor = entries[-1][0].decode()
                return self._wrap(entries, redelivered=True)
            self._pending_cursor = None
        if time.monotonic() >= self._next_claim:
            events = await self._claim(max_events)
            if events:
                return events
        entries = await self._read(">", max_events)
        if entries:
            return self._wrap(entries, redelivered=False)
        reply = await self.client.xreadgroup(
            self.options.group,
            self.options.consumer,
            {self.stream: ">"},
            count=max_events,
            block=max(1, int(timeout_s * 1000)),
        )
        return self._events(reply, redelivered=False)

    async def _read(self, start: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """XREADGROUP without blocking, the reply as one JSON string (see _XREADGROUP_JSON)."""
        raw: bytes = await self._read_json(
            keys=[self.stream], args=[self.options.group, self.options.consumer, count, start]
        )
        try:
            items = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # Payload bytes that are not UTF-8 pass through cjson raw: read them back losslessly.
            items = json.loads(raw.decode("utf-8", "surrogateescape"))
        if not isinstance(items, list):  # cjson writes an empty list as {}
            return []
        out: list[tuple[bytes, dict[bytes, bytes]]] = []
        for entry_id, flat in items:
            if not isinstance(flat, list):  # an entry deleted while pending has no fields
                continue
            encoded = [v.encode("utf-8", "surrogateescape") for v in flat]
            out.append((entry_id.encode(), dict(zip(encoded[::2], encoded[1::2], strict=True))))
        return out

    async def _claim(self, max_events: int) -> list[Event]:
        """Take over entries another (dead or stuck) consumer left pending too long."""
        reply = await self.client.xautoclaim(
            self.stream,
            self.options.group,
            self.options.consumer,
            min_idle_time=self.options.claim_idle_ms,
            start_id=self._claim_cursor,
            count=max_events,
        )
        cursor, entries = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:
            # Trimmed or deleted before anyone finished them: nothing left to score.
            await self.client.xack(self.stream, self.options.group, *deleted)
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        self._claim_cursor = cursor
        if cursor == "0-0":
            # A full pass over the pending list: look again after a fraction of the idle limit.
            self._next_claim = time.monotonic() + max(0.2, self.options.claim_idle_ms / 4000)
        entries = [(i, f) for i, f in entries if i not in self._held and f is not None]
        return self._wrap(entries, redelivered=True)

    def _events(self, reply: Any, *, redelivered: bool) -> list[Event]:
        if not reply:
            return []
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        for _stream, items in reply:
            entries.extend((i, f) for i, f in items if f)
        return self._wrap(entries, redelivered=redelivered)

    def _wrap(
        self, entries: list[tuple[bytes, dict[bytes, bytes]]], *, redelivered: bool
    ) -> list[Event]:
        out: list[Event] = []
        stream, field = self.stream, self.field
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            self._held.add(raw_id)
            headers = {
                k.decode(): v.decode(errors="replace")
                for k, v in fields.items()
                if k != field and k != KEY_FIELD
            }
            out.append(
                Event(
                    payload=fields.get(field, b""),
                    key=fields.get(KEY_FIELD),
                    headers=headers,
                    message_id=entry_id,
                    output_id=f"{stream}:{entry_id}",
                    position={"stream": stream, "id": entry_id},
                    timestamp_ms=int(entry_id.partition("-")[0]),
                    redelivered=redelivered,
                    token=raw_id,
                )
            )
        return out

    async def ack(self, events: Sequence[Event]) -> None:
        if not events:
            return
        ids = [e.token for e in events]
        await self.client.xack(self.stream, self.options.group, *ids)
        self._held.difference_update(ids)

    async def lag(self) -> int | None:
        for group in await self.client.xinfo_groups(self.stream):
            if group.get("name") in (self.options.group, self.options.group.encode()):
                lag, pending = group.get("lag"), group.get("pending") or 0
                # lag: entries not yet delivered to the group; pending: delivered, not acked.
                return None if lag is None else int(lag) + int(pending)
        return None

    async def close(self) -> None:
        await self.client.aclose()


class RedisSink:
    def __init__(self, url: BrokerURL) -> None:
        self.stream = _stream(url)
        self.field = url.query.get("field", "data").encode()
        self.maxlen = int(url.query["maxlen"]) if "maxlen" in url.query else None
        self.replicas = int(url.query.get("wait", "0"))
        self.name = f"redis:{self.stream}"
        self.client = _client(url)
        self._xadd_json = self.client.register_script(_XADD_JSON)

    async def start(self) -> None:
        try:
            await self.client.ping()
        except OSError as exc:
            raise Unavailable(f"redis for stream '{self.stream}' is unreachable: {exc}") from exc

    async def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        try:
            batch = [self._fields(r) for r in records]
        except UnicodeDecodeError:
            await self._write_pipelined(records)  # binary keys or values: one XADD each
        else:
            maxlen = "" if self.maxlen is None else str(self.maxlen)
            added = await self._xadd_json(keys=[self.stream], args=[maxlen, orjson.dumps(batch)])
            if added != len(records):
                raise Unavailable(
                    f"redis added {added} of {len(records)} entries to '{self.stream}'"
                )
        if self.replicas:
            acked = await self.client.wait(self.replicas, 5000)
            if acked < self.replicas:
                raise Unavailable(
                    f"only {acked} of {self.replicas} redis replicas confirmed the write"
                )

    async def submit(self, records: Sequence[Record]) -> asyncio.Future[None]:
        # A Redis write is durable when its reply arrives, and a second connection could
        # reorder batches: write now, hand back a settled receipt.
        await self.write(records)
        receipt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        receipt.set_result(None)
        return receipt

    def _fields(self, record: Record) -> list[str]:
        fields = {self.field.decode(): record.value.decode()}
        if record.key is not None:
            fields[KEY_FIELD.decode()] = record.key.decode()
        for name, value in record.headers.items():
            fields.setdefault(name, value)
        return [x for item in fields.items() for x in item]

    async def _write_pipelined(self, records: Sequence[Record]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for record in records:
            fields: dict[Any, Any] = {self.field: record.value}
            if record.key is not None:
                fields[KEY_FIELD] = record.key
            for name, value in record.headers.items():
                fields.setdefault(name.encode(), value.encode())
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()
