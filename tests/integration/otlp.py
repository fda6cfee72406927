"""A real OTLP trace receiver on loopback ports (HTTP /v1/traces and gRPC TraceService) that
decodes what exporters send with opentelemetry-proto, for the trace tests."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from tests.conftest import free_port

try:
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )
except ImportError as exc:  # pragma: no cover - the dev extra installs it
    raise ImportError(
        "the trace tests need opentelemetry-proto: pip install -e '.[dev]' (make setup)"
    ) from exc


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    status: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int
    service: str  # the resource's service.name


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Receiver:
    http_port: int
    grpc_port: int
    spans: list[Span] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=lambda: {"http": 0, "grpc": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def take(self, request: Any, transport: str) -> None:
        got = []
        for rs in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                            status=s.status.code,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            service=str(attrs.get("service.name", "")),
                        )
                    )
        with self.lock:
            self.spans.extend(got)
            self.requests[transport] += 1

    def wait_for(
        self, predicate: Callable[[list[Span]], bool], timeout: float = 20.0
    ) -> list[Span]:
        """The spans received, once `predicate` holds for them."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise AssertionError(f"spans never matched after {timeout}s; got {names}")
            time.sleep(0.05)

    def clear(self) -> None:
        with self.lock:
            self.spans.clear()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver.take(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or "protobuf" not in self.headers.get("content-type", ""):
                self.send_response(404)
                self.end_headers()
                return
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            receiver.take(request, "http")
            out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def otlp() -> Iterator[Receiver]:
    receiver = Receiver(free_port(), free_port())
    http = ThreadingHTTPServer(("127.0.0.1", receiver.http_port), _http_handler(receiver))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)
    server.add_insecure_port(receiver.grpc_endpoint)
    server.start()
    try:
        yield receiver
    finally:
        server.stop(0)
        http.shutdown()
        http.server_close()


def by_name(spans: list[Span], prefix: str) -> list[Span]:
    return [s for s in spans if s.name.startswith(prefix)]
