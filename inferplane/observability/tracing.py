"""OpenTelemetry traces: off unless configured, and then cheap for requests not sampled.

`configure()` starts tracing once per process (`serve --otlp-endpoint`, `--trace-sample`, or
the standard `OTEL_*` variables) and makes `ACTIVE` a `Tracing`; while it is None every call
site costs one attribute test. The head-sampling decision is taken first (parent-based: a
caller's sampled flag is followed, a root request is kept with probability `sample`), so that
an unsampled request creates no span object at all; children are made only under a recorded
parent. Spans are recorded here as plain slots and exported by the OpenTelemetry SDK's OTLP
exporter in a child process (span_export.py): the serving process never encodes OTLP.

Spans of one request (online; streams and batch have their own, see their modules):
  SERVER    `POST /v2/models/{model}/infer` or the gRPC method, continuing `traceparent`
  INTERNAL  `route <target>`: service, route decision, model and version that answered
  INTERNAL  `infer <model>:<version>`: one per attempt (retries and fallbacks each get one)
  INTERNAL  `queue`: from enqueue to the start of its execution, linked to the execution
  INTERNAL  `execute <model>:<version>`: the shared batch execution, linked to every sampled
            request it served, with the batch size; its child `runtime <kind>` is the model call
Shadow calls are `shadow <model>:<version>` spans linked to the primary's route span.

This module imports no other layer (observability is called from every layer).
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("inferplane.tracing")

TRACEPARENT = "traceparent"
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
DEFAULT_SAMPLE = 0.1
PROTOCOLS = ("http/protobuf", "grpc")

Attributes = dict[str, str | int | float | bool]  # handed over: the span keeps the dict

ACTIVE: Tracing | None = None  # the process's tracing; None: off


@dataclass(frozen=True, slots=True)
class Parent:
    """A caller's W3C trace context, parsed."""

    trace_id: int
    span_id: int
    sampled: bool


def parse_traceparent(value: str | None) -> Parent | None:
    """The parent a W3C `traceparent` names; None when absent or malformed (the spec says a
    receiver then starts a new trace)."""
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip().lower())
    if match is None or match.group(1) == _ZERO_TRACE or match.group(2) == _ZERO_SPAN:
        return None
    return Parent(
        int(match.group(1), 16), int(match.group(2), 16), bool(int(match.group(3), 16) & 1)
    )


def traceparent_of(span: Any) -> str:
    """The `traceparent` that makes `span` the parent of whatever receives it."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"


def trace_id_of(span: Any) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def trace_id_from(traceparent: str | None) -> str | None:
    """The trace id a caller's `traceparent` carries, for the audit when no span was made."""
    parent = parse_traceparent(traceparent)
    return None if parent is None else f"{parent.trace_id:032x}"


def epoch_ns(perf_ns: int) -> int:
    """A `time.perf_counter_ns()` reading as the epoch nanoseconds spans are stamped with."""
    return perf_ns + _PERF_TO_EPOCH


_PERF_TO_EPOCH = time.time_ns() - time.perf_counter_ns()


@dataclass(frozen=True, slots=True)
class TraceSettings:
    endpoint: str | None = None  # OTLP endpoint; None: from OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT
    sample: float | None = None  # share of root requests kept; None: OTEL_TRACES_SAMPLER_ARG or 0.1
    protocol: str | None = None  # http/protobuf | grpc; None: OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL
    service_name: str = "inferplane"  # unless OTEL_SERVICE_NAME says otherwise


def settings_from_env(
    endpoint: str | None = None, sample: float | None = None, service_name: str = "inferplane"
) -> TraceSettings | None:
    """What the flags and the standard variables ask for; None when tracing stays off (no
    endpoint anywhere, OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none)."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return None
    endpoint = (
        endpoint
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not endpoint:
        return None
    if sample is None and env.get("OTEL_TRACES_SAMPLER_ARG"):
        try:
            sample = float(env["OTEL_TRACES_SAMPLER_ARG"])
        except ValueError:
            raise ValueError(
                f"OTEL_TRACES_SAMPLER_ARG={env['OTEL_TRACES_SAMPLER_ARG']!r} is not a number"
            ) from None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    return TraceSettings(endpoint, sample, protocol, service_name)


class Ctx:
    """A span's identity, what children and links refer to."""

    __slots__ = ("span_id", "trace_id")

    def __init__(self, trace_id: int, span_id: int) -> None:
        self.trace_id, self.span_id = trace_id, span_id


class Span:
    """One span being recorded: plain slots, turned into a tuple when it ends. The SDK's span
    costs about 26 us to start and end (measured, 1.27) and its OTLP encoding 40 us more on
    the GIL; this one about 2 us, and the encoding happens in the exporter process."""

    __slots__ = (
        "attributes",
        "kind",
        "links",
        "name",
        "parent_id",
        "recorder",
        "span_id",
        "start_ns",
        "status",
        "trace_id",
    )

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        trace_id: int,
        span_id: int,
        parent_id: int,
        kind: int,
        attributes: Attributes | None,
        links: Sequence[Ctx],
        start_ns: int | None,
    ) -> None:
        self.recorder, self.name, self.kind = recorder, name, kind
        self.trace_id, self.span_id, self.parent_id = trace_id, span_id, parent_id
        # Callers hand a fresh dict (a literal at each call site): kept, not copied.
        self.attributes: dict[str, Any] = {} if attributes is None else attributes
        self.links = links
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.status: str | None = None  # an error's description; None: unset

    def set_attribute(self, key: str, value: str | int | float | bool) -> None:
        self.attributes[key] = value

    def get_span_context(self) -> Ctx:
        return Ctx(self.trace_id, self.span_id)

    def is_recording(self) -> bool:
        return True

    def end(self, end_time: int | None = None) -> None:
        self.recorder.add(
            (
                self.name,
                self.trace_id,
                self.span_id,
                self.parent_id,
                self.kind,
                self.start_ns,
                time.time_ns() if end_time is None else end_time,
                self.attributes,
                [(c.trace_id, c.span_id) for c in self.links] if self.links else (),
                self.status,
            )
        )


class Recorder:
    """Ended spans wait in a bounded buffer; a thread hands them to the exporter every
    OTEL_BSP_SCHEDULE_DELAY ms (or sooner when a batch is full). Past OTEL_BSP_MAX_QUEUE_SIZE
    spans are dropped and counted, as the SDK's batch processor does."""

    def __init__(self, sink: Any) -> None:
        env = os.environ
        self.delay_s = int(env.get("OTEL_BSP_SCHEDULE_DELAY", "5000")) / 1000
        self.max_queue = int(env.get("OTEL_BSP_MAX_QUEUE_SIZE", "2048"))
        self.batch = int(env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"))
        self.sink = sink
        self.buffer: deque[tuple[Any, ...]] = deque()
        self.dropped = 0
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="inferplane-traces", daemon=True)
        self._thread.start()

    def add(self, record: tuple[Any, ...]) -> None:
        buffer = self.buffer
        if len(buffer) >= self.max_queue or self._stopped:
            self.dropped += 1
            return
        buffer.append(record)
        if len(buffer) == self.batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        buffer = self.buffer
        while buffer:
            records = [buffer.popleft() for _ in range(min(len(buffer), self.batch))]
            try:
                self.sink.send(records)
            except Exception:  # the exporter's trouble must never reach a request
                log.warning("dropped %d spans: the exporter failed", len(records), exc_info=True)

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(10)
        self._drain()
        if self.dropped:
            log.warning("dropped %d spans: the trace buffer was full", self.dropped)
        self.sink.close()


class Tracing:
    """inferplane's span shapes, recorded here and exported with the OpenTelemetry SDK's OTLP
    exporter in a child process (observability/span_export.py), so that encoding and sending
    spans never holds this process's GIL."""

    INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = range(5)  # the SDK's SpanKind values

    def __init__(self, settings: TraceSettings, exporter: Any = None) -> None:
        from inferplane.observability import span_export

        sample = DEFAULT_SAMPLE if settings.sample is None else settings.sample
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"the trace sample must be within [0, 1], got {sample}")
        self.sample = sample
        self.settings = settings
        # `exporter`: an SDK SpanExporter used in this process (tests, embedders); by default
        # the OTLP exporter runs in a child process fed through a pipe.
        sink = (
            span_export.LocalSink(settings, exporter)
            if exporter is not None
            else span_export.ChildSink(settings)
        )
        self.recorder = Recorder(sink)
        self._random = random.Random()

    # the sampling decision -------------------------------------------------------------------
    def sampled(self, parent: Parent | None) -> bool:
        if parent is not None:
            return parent.sampled
        return self.sample >= 1.0 or (self.sample > 0.0 and self._random.random() < self.sample)

    def _id(self) -> int:
        return self._random.getrandbits(64) or 1

    # spans -----------------------------------------------------------------------------------
    def start_request(
        self,
        name: str,
        traceparent: str | None,
        attributes: Attributes | None = None,
        kind: int | None = None,
        start_ns: int | None = None,
    ) -> Span | None:
        """The root span of one request (or event, or fragment) continuing `traceparent`; None
        when not sampled: then nothing below it is traced either."""
        parent = parse_traceparent(traceparent)
        if not self.sampled(parent):
            return None
        if parent is None:
            trace_id, parent_id = self._random.getrandbits(128) or 1, 0
        else:
            trace_id, parent_id = parent.trace_id, parent.span_id
        return Span(
            self.recorder,
            name,
            trace_id,
            self._id(),
            parent_id,
            self.SERVER if kind is None else kind,
            attributes,
            (),
            start_ns,
        )

    def child(
        self,
        parent: Span | Ctx,
        name: str,
        attributes: Attributes | None = None,
        *,
        links: Sequence[Ctx] = (),
        start_ns: int | None = None,
        kind: int | None = None,
    ) -> Span:
        """A span under `parent` (a span or a span context). `links`: span contexts."""
        return Span(
            self.recorder,
            name,
            parent.trace_id,
            self._id(),
            parent.span_id,
            self.INTERNAL if kind is None else kind,
            attributes,
            links,
            start_ns,
        )

    def root(
        self,
        name: str,
        attributes: Attributes | None = None,
        *,
        links: Sequence[Ctx] = (),
        start_ns: int | None = None,
        kind: int | None = None,
    ) -> Span:
        """A span that starts a trace of its own (always recorded: its caller decided)."""
        return Span(
            self.recorder,
            name,
            self._random.getrandbits(128) or 1,
            self._id(),
            0,
            self.INTERNAL if kind is None else kind,
            attributes,
            links,
            start_ns,
        )

    def record_execution(
        self,
        model: str,
        version: str,
        runtime: str,
        works: Sequence[tuple[Any, int]],
        rows: int,
        started_ns: int,
        infer_start_ns: int,
        infer_end_ns: int,
        error: str | None = None,
    ) -> None:
        """One batch execution after the fact (perf_counter ns): its span, linked to every
        sampled request it served (`works`: (the request's infer span context, enqueued ns)),
        the runtime call under it, and each request's queue span linked back to it. Called
        from the thread that ran the model, after the answers went out."""
        ended = epoch_ns(time.perf_counter_ns())
        contexts = [ctx for ctx, _ in works]
        attrs: dict[str, str | int | float | bool] = {
            "inferplane.model": model,
            "inferplane.model_version": version,
            "inferplane.batch.requests": len(works),
            "inferplane.batch.rows": rows,
        }
        execution = self.child(
            contexts[0],
            f"execute {model}:{version}",
            attrs,
            links=contexts,
            start_ns=epoch_ns(started_ns),
        )
        runtime_span = self.child(
            execution, f"runtime {runtime}", start_ns=epoch_ns(infer_start_ns)
        )
        if error is not None:
            fail(runtime_span, error)
            fail(execution, error)
        runtime_span.end(end_time=epoch_ns(infer_end_ns))
        execution.end(end_time=ended)
        link = [execution.get_span_context()]
        start = epoch_ns(started_ns)
        for ctx, enqueued_ns in works:
            queue = self.child(ctx, "queue", links=link, start_ns=epoch_ns(enqueued_ns))
            queue.end(end_time=start)

    def shutdown(self) -> None:
        """Export what is buffered and stop (at the end of serve, a stream worker or a job)."""
        try:
            self.recorder.close()
        except Exception:  # a dead collector must not turn a clean exit into a crash
            log.warning("exporting the last traces failed", exc_info=True)


def end_request(
    span: Any,
    status: int,
    model: str,
    version: str,
    request_id: str | None,
    error: str | None = None,
) -> None:
    """Close a request's root span with what answered and how (HTTP-style status)."""
    span.set_attribute("inferplane.status", status)
    if model:
        span.set_attribute("inferplane.model", model)
        span.set_attribute("inferplane.model_version", version)
    if request_id:
        span.set_attribute("inferplane.request_id", request_id)
    if status >= 500:  # server spans are errors for 5xx only (a 4xx is the caller's)
        fail(span, error or str(status))
    span.end()


def fail(span: Span, message: str) -> None:
    span.status = message


def configure(settings: TraceSettings | None, exporter: Any = None) -> Tracing | None:
    """Make `settings` the process's tracing (None: off), replacing any before."""
    global ACTIVE
    previous = ACTIVE
    ACTIVE = None if settings is None else Tracing(settings, exporter)
    if previous is not None:
        previous.shutdown()
    if ACTIVE is not None and settings is not None:
        log.info(
            "traces: OTLP %s to %s, sampling %g%% of root requests",
            settings.protocol or "http/protobuf",
            settings.endpoint,
            ACTIVE.sample * 100,
        )
    return ACTIVE


def shutdown() -> None:
    global ACTIVE
    if ACTIVE is not None:
        ACTIVE.shutdown()
        ACTIVE = None
