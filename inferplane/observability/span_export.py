"""Exporting recorded spans with the OpenTelemetry SDK's OTLP exporters.

`ChildSink` (the default) runs the exporter in a child process: the recorder's thread pickles
each batch of span tuples (a few microseconds per span, the GIL released while the pipe is
written) and the child builds the SDK's `ReadableSpan`s and exports them over OTLP/HTTP or gRPC,
with the exporter's own retries, compression, headers and TLS from the `OTEL_EXPORTER_OTLP_*`
variables it inherits. Encoding OTLP in the serving process cost about 40 us of GIL per span
(measured), which at 10% sampling took a quarter of the throughput. The child ends when its pipe
closes (the parent exited or shut tracing down), after exporting what it was sent.

`LocalSink` exports in this process through a given SDK exporter (tests, embedders).

    python -m inferplane.observability.span_export SETTINGS_JSON   # the child; stdin: batches
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from inferplane.observability.tracing import PROTOCOLS, TraceSettings

log = logging.getLogger("inferplane.tracing")
_FRAME = struct.Struct("!I")


def otlp_exporter(settings: TraceSettings) -> Any:
    """The SDK's OTLP span exporter for `settings` (http/protobuf unless grpc is asked), taught
    to send an `ExportTraceServiceRequest` built by `Encoder` as it is: the SDK's own encoding
    from ReadableSpans cost 33 us per span, building the message directly 13 (measured)."""
    protocol = (settings.protocol or "http/protobuf").lower()
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"OTLP protocol '{settings.protocol}' is not supported; use one of {', '.join(PROTOCOLS)}"
        )
    endpoint = settings.endpoint or ""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        class GrpcExporter(OTLPSpanExporter):
            prebuilt = hasattr(OTLPSpanExporter, "_translate_data")

            def _translate_data(self, data: Any) -> Any:
                if isinstance(data, _request_type()):
                    return data
                return super()._translate_data(data)

        return GrpcExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpBase,
    )

    class HttpExporter(HttpBase):
        prebuilt = hasattr(HttpBase, "_serialize_spans")

        def _serialize_spans(self, spans: Any) -> bytes:
            if isinstance(spans, _request_type()):
                return bytes(spans.SerializePartialToString())
            return bytes(super()._serialize_spans(spans))

    # The variables' convention: a base URL gets the signal's path; a full one is kept.
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


# Attributes whose value differs on every span: not worth keeping built.
_UNIQUE = frozenset(
    {
        "inferplane.request_id",
        "inferplane.event_id",
        "messaging.message.id",
        "inferplane.batch.input",
    }
)


def _request_type() -> Any:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    return ExportTraceServiceRequest


def _resource(settings: TraceSettings) -> Any:
    from opentelemetry.sdk.resources import Resource

    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES name the service when set; ours is only the
    # default (Resource.create lets given attributes win over the variables).
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    return Resource.create({} if named else {"service.name": settings.service_name})


class Encoder:
    """Span tuples (tracing.Span.end) straight to one OTLP ExportTraceServiceRequest."""

    def __init__(self, settings: TraceSettings) -> None:
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2

        from inferplane import __version__

        self._pb, self._common = trace_pb2, common_pb2
        resource = _resource(settings)
        self.resource = resource_pb2.Resource(
            attributes=[self._kv(k, v) for k, v in resource.attributes.items()]
        )
        self.scope = common_pb2.InstrumentationScope(name="inferplane", version=__version__)
        self._kvs: dict[tuple[str, Any, type], Any] = {}

    def _cached_kv(self, key: str, value: Any) -> Any:
        """Most attributes repeat (model, version, route, status): their messages are built once
        (6 us per span instead of 17, measured); per-request ids are not kept."""
        if key in _UNIQUE:
            return self._kv(key, value)
        kv = self._kvs.get((key, value, type(value)))
        if kv is None:
            if len(self._kvs) > 10_000:
                self._kvs.clear()
            kv = self._kvs[(key, value, type(value))] = self._kv(key, value)
        return kv

    def _kv(self, key: str, value: Any) -> Any:
        c = self._common
        if isinstance(value, bool):
            v = c.AnyValue(bool_value=value)
        elif isinstance(value, int):
            v = c.AnyValue(int_value=value)
        elif isinstance(value, float):
            v = c.AnyValue(double_value=value)
        else:
            v = c.AnyValue(string_value=str(value))
        return c.KeyValue(key=key, value=v)

    def request(self, records: Sequence[tuple[Any, ...]]) -> Any:
        pb, kv = self._pb, self._cached_kv
        span, link, status_error = pb.Span, pb.Span.Link, pb.Status.STATUS_CODE_ERROR
        spans = []
        for name, trace_id, span_id, parent_id, kind, start, end, attrs, links, status in records:
            spans.append(
                span(
                    trace_id=trace_id.to_bytes(16, "big"),
                    span_id=span_id.to_bytes(8, "big"),
                    parent_span_id=parent_id.to_bytes(8, "big") if parent_id else b"",
                    name=name,
                    kind=kind + 1,  # the protocol counts from UNSPECIFIED = 0
                    start_time_unix_nano=start,
                    end_time_unix_nano=end,
                    attributes=[kv(k, v) for k, v in attrs.items()],
                    links=[
                        link(trace_id=t.to_bytes(16, "big"), span_id=s.to_bytes(8, "big"))
                        for t, s in links
                    ],
                    status=None if status is None else pb.Status(code=status_error, message=status),
                )
            )
        return _request_type()(
            resource_spans=[
                pb.ResourceSpans(
                    resource=self.resource,
                    scope_spans=[pb.ScopeSpans(scope=self.scope, spans=spans)],
                )
            ]
        )


class Converter:
    """Span tuples (tracing.Span.end) to the SDK's ReadableSpan: for exporters given by the
    caller (LocalSink), and should an SDK release drop the hooks `otlp_exporter` uses."""

    def __init__(self, settings: TraceSettings) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

        from inferplane import __version__

        self.resource = _resource(settings)
        self.scope = InstrumentationScope("inferplane", __version__)
        self._ReadableSpan, self._Link, self._SpanContext = ReadableSpan, Link, SpanContext
        self._kinds = list(SpanKind)
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._ok = Status(StatusCode.UNSET)
        self._Status, self._ERROR = Status, StatusCode.ERROR

    def spans(self, records: Sequence[tuple[Any, ...]]) -> list[Any]:
        out = []
        ctx, flags = self._SpanContext, self._flags
        for name, trace_id, span_id, parent_id, kind, start, end, attrs, links, status in records:
            out.append(
                self._ReadableSpan(
                    name=name,
                    context=ctx(trace_id, span_id, False, flags),
                    parent=ctx(trace_id, parent_id, True, flags) if parent_id else None,
                    resource=self.resource,
                    attributes=attrs,
                    links=[self._Link(ctx(t, s, False, flags)) for t, s in links],
                    kind=self._kinds[kind],
                    status=self._ok if status is None else self._Status(self._ERROR, status),
                    start_time=start,
                    end_time=end,
                    instrumentation_scope=self.scope,
                )
            )
        return out


class LocalSink:
    """Exports on the recorder's thread, in this process."""

    def __init__(self, settings: TraceSettings, exporter: Any) -> None:
        self.converter = Converter(settings)
        self.exporter = exporter

    def send(self, records: list[tuple[Any, ...]]) -> None:
        self.exporter.export(self.converter.spans(records))

    def close(self) -> None:
        self.exporter.shutdown()


class ChildSink:
    """Hands batches to the exporter process through its standard input."""

    def __init__(self, settings: TraceSettings) -> None:
        config = json.dumps(
            {
                "endpoint": settings.endpoint,
                "protocol": settings.protocol,
                "service_name": settings.service_name,
            }
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "inferplane.observability.span_export", config],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # its complaints go to stderr, the server's log
        )
        self._broken = False

    def send(self, records: list[tuple[Any, ...]]) -> None:
        if self._broken:
            return
        data = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(_FRAME.pack(len(data)) + data)
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._broken = True
            log.warning(
                "the trace exporter process exited (code %s); traces are no longer exported",
                self.process.poll(),
            )

    def close(self) -> None:
        stdin = self.process.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        try:
            self.process.wait(15)  # it exports what it holds, then exits
        except subprocess.TimeoutExpired:
            log.warning("the trace exporter did not finish in 15 s; stopping it")
            self.process.kill()
            self.process.wait()


def _read(stream: Any, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main(argv: Sequence[str]) -> int:
    # The parent decides when this ends (its pipe closes): a Ctrl-C or SIGTERM to the process
    # group must not lose the spans the parent flushes as it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Exporting is background work: where CPU is short, requests go first.
    with contextlib.suppress(OSError):
        os.nice(10)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s trace exporter: %(message)s")
    config = json.loads(argv[0])
    settings = TraceSettings(config["endpoint"], None, config["protocol"], config["service_name"])
    exporter = otlp_exporter(settings)
    encode = (
        Encoder(settings).request
        if getattr(exporter, "prebuilt", False)
        else Converter(settings).spans
    )
    stdin = sys.stdin.buffer
    failed, last_said = 0, -1e9
    try:
        while (head := _read(stdin, _FRAME.size)) is not None:
            body = _read(stdin, _FRAME.unpack(head)[0])
            if body is None:
                break
            records = pickle.loads(body)
            try:
                exporter.export(encode(records))
            except Exception as exc:  # a dead collector: say so now and then, keep reading
                failed += len(records)
                if time.monotonic() - last_said > 10:
                    log.warning("%d spans not exported so far: %s", failed, str(exc)[:300])
                    last_said = time.monotonic()
    finally:
        exporter.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
