"""The streaming loop: fetch -> decode -> micro-batched predict -> write -> acknowledge.

Two tasks joined by a bounded queue. The reader fetches micro-batches and starts scoring each at
once; the writer takes them in the order they were read, writes outputs, then dead letters, and
only then acknowledges the inputs. So scoring overlaps I/O, at most `max_in_flight` batches are
held (backpressure), outputs keep the source's order, and an input is never acknowledged before
its result is durably in a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from inferplane.errors import (
    BadRequest,
    DeadlineExceeded,
    InferplaneError,
    NotFound,
    Unavailable,
)
from inferplane.observability import tracing
from inferplane.observability.tracing import TRACEPARENT
from inferplane.predictor import Predictor, RequestContext
from inferplane.streaming.codec import (
    Decoded,
    Decoder,
    best_effort_id,
    dead_letter_record,
    output_record,
)
from inferplane.streaming.connector import Event, Record, Sink, Source
from inferplane.streaming.metrics import StreamMetrics

log = logging.getLogger("inferplane.stream")

# Worth retrying: the model or server may be back in a moment; the event itself is fine.
TRANSIENT: tuple[type[BaseException], ...] = (
    Unavailable,
    DeadlineExceeded,
    NotFound,
    httpx.TransportError,
    OSError,
    asyncio.TimeoutError,
)


@dataclass(slots=True)
class WorkerSettings:
    target: str
    version: str | None = None
    batch_size: int = 256
    max_wait_ms: float = 20.0
    max_in_flight: int = 4
    max_retries: int = 5
    retry_backoff_ms: float = 100.0
    max_backoff_ms: float = 10_000.0
    timeout_ms: float = 10_000.0
    drain_timeout_s: float = 30.0
    id_field: str = "id"
    lag_interval_s: float = 5.0
    log_interval_s: float = 10.0


@dataclass(slots=True)
class WorkerStats:
    events_in: int = 0
    events_out: int = 0
    events_dlq: int = 0
    redelivered: int = 0
    retries: int = 0
    batches: int = 0
    lag: int | None = None


@dataclass(slots=True)
class _Scored:
    outputs: list[Record] = field(default_factory=list)
    dead: list[tuple[Record, str]] = field(default_factory=list)  # (record, kind of failure)
    event_times_ms: list[int] = field(default_factory=list)


_Written = tuple[list[Event], _Scored, "asyncio.Future[None]", "asyncio.Future[None]"]


class StreamWorker:
    def __init__(
        self,
        predictor: Predictor,
        decoder: Decoder,
        source: Source,
        sink: Sink,
        dlq: Sink,
        settings: WorkerSettings,
        metrics: StreamMetrics | None = None,
    ) -> None:
        self.predictor = predictor
        self.decoder = decoder
        self.source = source
        self.sink = sink
        self.dlq = dlq
        self.settings = settings
        self.metrics = metrics or StreamMetrics()
        self.stats = WorkerStats()
        signature = decoder.signature
        limit = signature.max_batch_size if signature.max_batch_size > 0 else settings.batch_size
        self.max_rows = limit if decoder.batched else 1
        self._stopping = asyncio.Event()
        self._drain_deadline: float | None = None
        self._finished_ms: float | None = None  # newest event time acknowledged (lag in seconds)
        self._queue: asyncio.Queue[tuple[list[Event], asyncio.Task[_Scored]] | None] = (
            asyncio.Queue(maxsize=max(1, settings.max_in_flight))
        )
        # Written, waiting for the sink's confirmation before the inputs are acknowledged.
        self._acks: asyncio.Queue[_Written | None] = asyncio.Queue(maxsize=2)

    # lifecycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop reading; what was read is still scored, written and acknowledged (drain)."""
        if not self._stopping.is_set():
            log.info("stream: stopping; draining %d batches", self._queue.qsize())
            self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
            self._stopping.set()

    async def run(self) -> WorkerStats:
        for part in (self.sink, self.dlq, self.source):
            await part.start()
        background = [
            asyncio.create_task(self._watch_lag()),
            asyncio.create_task(self._log_progress()),
        ]
        reader = asyncio.create_task(self._read_loop())
        writer = asyncio.create_task(self._write_loop())
        acker = asyncio.create_task(self._ack_loop())
        try:
            pending: set[asyncio.Task[None]] = {reader, writer, acker}
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=0.5, return_when=asyncio.FIRST_EXCEPTION
                )
                for task in done:
                    error = task.exception()
                    if error is not None:
                        # A stage died (a bug, or a broker gone past the drain deadline): stop
                        # here; what is not acknowledged is redelivered to the group.
                        raise error
                late = self._drain_deadline is not None and time.monotonic() > self._drain_deadline
                if pending and late:
                    log.warning(
                        "stream: drain timed out; %d batches left unacknowledged will be "
                        "redelivered",
                        self._held() + 1,
                    )
                    break
        finally:
            for task in (reader, writer, acker, *background):
                task.cancel()
            await asyncio.gather(reader, writer, acker, *background, return_exceptions=True)
            await self._close()
            self._log_line("stopped")
        return self.stats

    async def _close(self) -> None:
        for part in (self.source, self.sink, self.dlq):
            try:
                await part.close()
            except Exception as exc:  # closing the rest matters more than this one's error
                log.warning("stream: closing %s failed: %s", part.name, exc)

    # reading -------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    events = await self._micro_batch()
                    failures = 0
                except Exception as exc:
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning("stream: reading %s failed (%s); retrying in %.1fs",
                                self.source.name, exc, delay)  # fmt: skip
                    await self._sleep_unless_stopping(delay)
                    continue
                if not events:
                    continue
                self.stats.events_in += len(events)
                self.metrics.events_in.inc(len(events))
                again = sum(1 for e in events if e.redelivered)
                if again:
                    self.stats.redelivered += again
                    self.metrics.redelivered.inc(again)
                self.metrics.batch_size.observe(len(events))
                task = asyncio.create_task(self._score(events))
                await self._queue.put((events, task))  # blocks while max_in_flight are held
                self.metrics.in_flight.set(self._queue.qsize())
        finally:
            await self._queue.put(None)

    async def _micro_batch(self) -> list[Event]:
        """Up to batch_size events, waiting at most max_wait_ms once the first has arrived."""
        size, wait_s = self.settings.batch_size, self.settings.max_wait_ms / 1000
        batch = await self.source.fetch(size, wait_s)
        if not batch:
            return batch
        deadline = time.monotonic() + wait_s
        while len(batch) < size and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                more = await self.source.fetch(size - len(batch), left)
            except Exception as exc:
                # Never drop what was already read: Kafka would commit past it.
                log.warning("stream: reading %s failed (%s)", self.source.name, exc)
                break
            if not more:
                break
            batch.extend(more)
        return batch

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    # scoring -------------------------------------------------------------------------------
    async def _score(self, events: list[Event]) -> _Scored:
        scored = _Scored()
        decoded: list[Decoded] = []
        failed: dict[int, tuple[Record, str]] = {}
        for i, event in enumerate(events):
            try:
                decoded.append(self.decoder.decode(event))
            except BadRequest as exc:
                failed[i] = (
                    self._dead(event, f"undecodable event: {exc.message}", exc, 0),
                    "decode",
                )
            except Exception as exc:  # a payload shape the decoder did not foresee: still poison
                reason = f"undecodable event: {_describe(exc)}"
                failed[i] = (self._dead(event, reason, exc, 0), "decode")
        tracer = tracing.ACTIVE
        if tracer is not None:
            self._start_spans(tracer, decoded)
        results = await asyncio.gather(*(self._predict(c) for c in self._chunks(decoded)))
        if tracer is not None:
            _end_spans(results)
        by_event: dict[int, tuple[Record, str | None]] = {}
        times: dict[int, int] = {}
        ids = {id(e): i for i, e in enumerate(events)}
        for result in results:
            for d, record, kind in result:
                by_event[ids[id(d.event)]] = (record, kind)
                times[ids[id(d.event)]] = d.event_time_ms
        for i in range(len(events)):
            if i in failed:
                scored.dead.append(failed[i])
                continue
            record, kind = by_event[i]
            if kind is None:
                scored.outputs.append(record)
                scored.event_times_ms.append(times[i])
            else:
                scored.dead.append((record, kind))
        return scored

    def _start_spans(self, tracer: tracing.Tracing, decoded: list[Decoded]) -> None:
        """Each event's consumer span, continuing the trace its producer sent (a Kafka header,
        a Redis field); the output event carries this span as its parent."""
        system = type(self.source).__name__.lower().removesuffix("source")
        for d in decoded:
            d.span = tracer.start_request(
                f"process {self.source.name}",
                d.event.headers.get(TRACEPARENT),
                {
                    "messaging.system": system,
                    "messaging.operation": "process",
                    "messaging.destination.name": self.source.name,
                    "messaging.message.id": d.event.message_id,
                    "inferplane.event_id": d.event_id,
                },
                kind=tracer.CONSUMER,
            )

    def _chunks(self, decoded: list[Decoded]) -> list[list[Decoded]]:
        """Events that can share one predictor call, at most max_rows rows each, in order."""
        chunks: list[list[Decoded]] = []
        open_chunk: dict[Any, tuple[list[Decoded], int]] = {}
        for d in decoded:
            key = d.shape_key if self.max_rows > 1 else id(d)
            chunk, rows = open_chunk.get(key, ([], 0))
            if chunk and rows + d.rows > self.max_rows:
                chunk, rows = [], 0
            if not chunk:
                chunks.append(chunk)
            chunk.append(d)
            open_chunk[key] = (chunk, rows + d.rows)
        return chunks

    async def _predict(self, chunk: list[Decoded]) -> list[tuple[Decoded, Record, str | None]]:
        """Score a chunk; a rejected chunk is split to find the poison events, transient errors
        are retried with exponential backoff and dead-lettered after max_retries."""
        s = self.settings
        if len(chunk) == 1:
            inputs = chunk[0].inputs
        else:
            names = chunk[0].inputs.keys()
            inputs = {n: np.concatenate([d.inputs[n] for d in chunk]) for n in names}
        span = None
        tracer = tracing.ACTIVE
        traced = [d.span for d in chunk if d.span is not None] if tracer is not None else []
        if traced and tracer is not None:
            # One predictor call for the chunk: under the first traced event, linked to all.
            span = tracer.child(
                traced[0],
                f"predict {s.target}",
                {"inferplane.stream.events": len(chunk)},
                links=[sp.get_span_context() for sp in traced],
            )
        try:
            return await self._attempts(chunk, inputs, span)
        finally:
            if span is not None:
                span.end()

    async def _attempts(
        self, chunk: list[Decoded], inputs: dict[str, np.ndarray], span: Any
    ) -> list[tuple[Decoded, Record, str | None]]:
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            context = RequestContext(
                request_id=f"{self.source.name}/{chunk[0].event.output_id}"
                + (f"+{len(chunk) - 1}" if len(chunk) > 1 else ""),
                deadline=time.monotonic() + s.timeout_ms / 1000,
                traceparent=chunk[0].event.headers.get("traceparent") if len(chunk) == 1 else None,
                pattern="stream",
                span=span,
            )
            try:
                prediction = await self.predictor.predict(
                    s.target, inputs, version=s.version, context=context
                )
                return self._split(chunk, prediction.outputs, prediction)
            except TRANSIENT as exc:
                if attempt > s.max_retries:
                    reason = f"gave up after {attempt} attempts: {_describe(exc)}"
                    return [(d, self._dead(d.event, reason, exc, attempt, d), "transient")
                            for d in chunk]  # fmt: skip
                self.stats.retries += 1
                self.metrics.retries.inc()
                delay = self._backoff(attempt)
                log.debug("stream: retrying %s in %.2fs: %s", context.request_id, delay, exc)
                await asyncio.sleep(delay)
            except Exception as exc:
                if len(chunk) > 1:
                    # One bad event fails the whole call: score each alone to find it.
                    parts = await asyncio.gather(*(self._predict([d]) for d in chunk))
                    return [item for part in parts for item in part]
                reason = f"model rejected the event: {_describe(exc)}"
                return [(chunk[0], self._dead(chunk[0].event, reason, exc, attempt, chunk[0]),
                         "rejected")]  # fmt: skip

    def _split(
        self, chunk: list[Decoded], outputs: dict[str, np.ndarray], prediction: Any
    ) -> list[tuple[Decoded, Record, str | None]]:
        total = sum(d.rows for d in chunk)
        if self.decoder.batched:
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != total:
                    raise InferplaneError(
                        f"output '{name}' has {array.shape[:1]} rows for {total} input rows"
                    )
        scored_at = int(time.time() * 1000)
        out: list[tuple[Decoded, Record, str | None]] = []
        start = 0
        for d in chunk:
            if self.decoder.batched:
                mine = {n: a[start : start + d.rows] for n, a in outputs.items()}
            else:
                mine = {n: a[np.newaxis] for n, a in outputs.items()}
            start += d.rows
            record = output_record(
                d,
                mine,
                model_name=prediction.model_name,
                model_version=prediction.model_version,
                route=prediction.route,
                scored_at_ms=scored_at,
            )
            out.append((d, record, None))
        return out

    def _dead(
        self,
        event: Event,
        reason: str,
        exc: BaseException,
        attempts: int,
        decoded: Decoded | None = None,
    ) -> Record:
        return dead_letter_record(
            event,
            source=self.source.name,
            reason=reason,
            error=type(exc).__name__,
            attempts=attempts,
            event_id=decoded.event_id if decoded else best_effort_id(event, self.settings.id_field),
        )

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        base = min(s.max_backoff_ms, s.retry_backoff_ms * 2 ** (attempt - 1)) / 1000
        return base * random.uniform(0.5, 1.0)  # jitter: workers do not retry in lockstep

    # writing -------------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        """Hands scored batches to the sinks in read order; confirming them is _ack_loop's job."""
        try:
            while True:
                item = await self._queue.get()
                self.metrics.in_flight.set(self._held())
                if item is None:
                    return
                events, task = item
                scored = await task
                dead = [r for r, _ in scored.dead]
                out_receipt = await self._submit(self.sink, scored.outputs)
                dead_receipt = await self._submit(self.dlq, dead)
                await self._acks.put((events, scored, out_receipt, dead_receipt))
        finally:
            await self._acks.put(None)

    async def _ack_loop(self) -> None:
        """Once a batch's outputs and dead letters are durable, acknowledge its inputs, in order."""
        while True:
            item = await self._acks.get()
            self.metrics.in_flight.set(self._held())
            if item is None:
                return
            events, scored, out_receipt, dead_receipt = item
            dead = [r for r, _ in scored.dead]
            await self._settle(out_receipt, self.sink, scored.outputs)
            await self._settle(dead_receipt, self.dlq, dead)
            await self._durably(f"acknowledge on {self.source.name}", self.source.ack, events)
            now_ms = time.time() * 1000
            if scored.event_times_ms:
                self._finished_ms = max(self._finished_ms or 0.0, max(scored.event_times_ms))
            for t in scored.event_times_ms:
                self.metrics.end_to_end.observe(max(0.0, (now_ms - t) / 1000))
            self.stats.batches += 1
            self.stats.events_out += len(scored.outputs)
            self.stats.events_dlq += len(scored.dead)
            self.metrics.events_out.inc(len(scored.outputs))
            for _, kind in scored.dead:
                self.metrics.events_dlq.labels(kind).inc()

    def _held(self) -> int:
        return self._queue.qsize() + self._acks.qsize()

    async def _submit(self, sink: Sink, records: list[Record]) -> asyncio.Future[None]:
        attempt = 0
        while True:
            try:
                return await sink.submit(records)
            except Exception as exc:
                attempt += 1
                if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                    raise
                delay = self._backoff(attempt)
                log.warning("stream: could not write to %s (%s); retrying in %.1fs",
                            sink.name, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)

    async def _settle(
        self, receipt: asyncio.Future[None], sink: Sink, records: list[Record]
    ) -> None:
        try:
            await receipt
        except Exception as exc:
            # The broker gave up on a queued batch (e.g. down past the producer's own retries):
            # write it again; the inputs stay unacknowledged until it is in.
            log.warning("stream: %s did not confirm %d records (%s); writing them again",
                        sink.name, len(records), exc)  # fmt: skip
            await self._durably(f"write to {sink.name}", sink.write, records)

    async def _durably(
        self, what: str, call: Callable[[Sequence[Any]], Awaitable[None]], items: Sequence[Any]
    ) -> None:
        """Until the broker takes it: nothing may be acknowledged past a write that failed."""
        if not items:
            return
        attempt = 0
        while True:
            try:
                await call(items)
                return
            except Exception as exc:
                attempt += 1
                if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                    raise
                delay = self._backoff(attempt)
                log.warning("stream: could not %s (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)

    # observing -----------------------------------------------------------------------------
    async def _watch_lag(self) -> None:
        while True:
            try:
                lag = await self.source.lag()
            except Exception as exc:
                log.debug("stream: lag unavailable: %s", exc)
                lag = None
            self.stats.lag = lag
            if lag is not None:
                self.metrics.consumer_lag.set(lag)
                if lag == 0:
                    self.metrics.consumer_lag_seconds.set(0)
                elif self._finished_ms is not None:
                    age = max(0.0, time.time() - self._finished_ms / 1000)
                    self.metrics.consumer_lag_seconds.set(age)
            await asyncio.sleep(self.settings.lag_interval_s)

    async def _log_progress(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log_interval_s)
            self._log_line("running")

    def _log_line(self, state: str) -> None:
        s = self.stats
        log.info(
            "stream %s: in=%d out=%d dlq=%d redelivered=%d retries=%d batches=%d lag=%s",
            state, s.events_in, s.events_out, s.events_dlq, s.redelivered, s.retries,
            s.batches, "?" if s.lag is None else s.lag,
        )  # fmt: skip


def _describe(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, InferplaneError) else str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _end_spans(results: list[list[tuple[Decoded, Record, str | None]]]) -> None:
    """Close the events' spans once scored; a dead-lettered event's span is an error."""
    for result in results:
        for d, _, kind in result:
            if d.span is not None:
                d.span.set_attribute("inferplane.stream.outcome", kind or "scored")
                if kind is not None:
                    tracing.fail(d.span, f"dead-lettered ({kind})")
                d.span.end()
