"""OpenTelemetry traces: off unless configured, and then cheap for requests not sampled.

`configure()` sets up the SDK and the OTLP exporter once per process (`serve --otlp-endpoint`,
`--trace-sample`, or the standard `OTEL_*` variables) and makes `ACTIVE` a `Tracing`; while it
is None every call site costs one attribute test. The head-sampling decision is taken here
before the SDK is touched (parent-based: a caller's sampled flag is followed, a root request is
kept with probability `sample`), so that an unsampled request creates no span object at all;
only sampled requests get real spans, and their children are created only under a recording
parent.

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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("inferplane.tracing")

TRACEPARENT = "traceparent"
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
DEFAULT_SAMPLE = 0.1
PROTOCOLS = ("http/protobuf", "grpc")

Attributes = Mapping[str, str | int | float | bool]

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


class Tracing:
    """The SDK's tracer behind the few span shapes inferplane makes."""

    def __init__(self, settings: TraceSettings, exporter: Any = None) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON
            from opentelemetry.trace import (
                Link,
                NonRecordingSpan,
                SpanContext,
                SpanKind,
                TraceFlags,
                set_span_in_context,
            )
        except ImportError:
            from inferplane.errors import MissingExtra

            raise MissingExtra("opentelemetry-sdk", "otel") from None
        sample = DEFAULT_SAMPLE if settings.sample is None else settings.sample
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"the trace sample must be within [0, 1], got {sample}")
        self.sample = sample
        self.settings = settings
        self._Link, self._NonRecordingSpan, self._SpanContext = Link, NonRecordingSpan, SpanContext
        self._TraceFlags, self._set_span = TraceFlags, set_span_in_context
        self.SERVER, self.CONSUMER, self.INTERNAL = (
            SpanKind.SERVER,
            SpanKind.CONSUMER,
            SpanKind.INTERNAL,
        )
        self.PRODUCER = SpanKind.PRODUCER
        # Sampling is decided in `start_request`; whatever is started here is recorded.
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES name the service when set; ours is
        # only the default (Resource.create lets given attributes win over the variables).
        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        resource = Resource.create({} if named else {"service.name": settings.service_name})
        self.provider = TracerProvider(sampler=ALWAYS_ON, resource=resource)
        self.exporter = exporter if exporter is not None else _otlp_exporter(settings)
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        from inferplane import __version__

        self.tracer = self.provider.get_tracer("inferplane", __version__)
        self._random = random.Random()

    # the sampling decision -------------------------------------------------------------------
    def sampled(self, parent: Parent | None) -> bool:
        if parent is not None:
            return parent.sampled
        return self.sample >= 1.0 or (self.sample > 0.0 and self._random.random() < self.sample)

    # spans -----------------------------------------------------------------------------------
    def start_request(
        self,
        name: str,
        traceparent: str | None,
        attributes: Attributes | None = None,
        kind: Any = None,
        start_ns: int | None = None,
    ) -> Any:
        """The root span of one request (or event, or fragment) continuing `traceparent`; None
        when not sampled: then nothing below it is traced either."""
        parent = parse_traceparent(traceparent)
        if not self.sampled(parent):
            return None
        context = None
        if parent is not None:
            remote = self._SpanContext(parent.trace_id, parent.span_id, True, self._TraceFlags(1))
            context = self._set_span(self._NonRecordingSpan(remote))
        return self.tracer.start_span(
            name,
            context=context,
            kind=self.SERVER if kind is None else kind,
            attributes=attributes,
            start_time=start_ns,
        )

    def child(
        self,
        parent: Any,
        name: str,
        attributes: Attributes | None = None,
        *,
        links: Sequence[Any] = (),
        start_ns: int | None = None,
        kind: Any = None,
    ) -> Any:
        """A span under `parent` (a span or a span context). `links`: span contexts."""
        if not isinstance(parent, self._SpanContext):
            parent = parent.get_span_context()
        return self.tracer.start_span(
            name,
            context=self._set_span(self._NonRecordingSpan(parent)),
            kind=self.INTERNAL if kind is None else kind,
            attributes=attributes,
            links=[self._Link(c) for c in links],
            start_time=start_ns,
        )

    def root(
        self,
        name: str,
        attributes: Attributes | None = None,
        *,
        links: Sequence[Any] = (),
        start_ns: int | None = None,
        kind: Any = None,
    ) -> Any:
        """A span that starts a trace of its own (always recorded: its caller decided)."""
        return self.tracer.start_span(
            name,
            kind=self.INTERNAL if kind is None else kind,
            attributes=attributes,
            links=[self._Link(c) for c in links],
            start_time=start_ns,
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
            self.provider.shutdown()
        except Exception:  # a dead collector must not turn a clean exit into a crash
            log.warning("exporting the last traces failed", exc_info=True)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return bool(self.provider.force_flush(timeout_ms))


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


def fail(span: Any, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, message))


def _otlp_exporter(settings: TraceSettings) -> Any:
    protocol = (settings.protocol or "http/protobuf").lower()
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"OTLP protocol '{settings.protocol}' is not supported; use one of {', '.join(PROTOCOLS)}"
        )
    endpoint = settings.endpoint or ""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not endpoint.startswith("https://")
        return OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    # The variables' convention: a base URL gets the signal's path; a full one is kept.
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


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
