"""OTLP/HTTP with the JSON encoding (`http/json`, the OTLP specification's third protocol),
sent from the recorder's thread in this process.

Why it exists beside the SDK's exporters (span_export.py): in Python, building OTLP protobuf
messages costs about 9-11 us per span even with the SDK's encoder bypassed, while the JSON form
of the same request is built and serialised (orjson) in about 3 us, about a quarter of the CPU;
on a server with one core that decides whether tracing 10 % of requests costs 5 % of its
throughput or 15 % (benchmarks/trace_overhead.py). Every OTLP/HTTP receiver (the OpenTelemetry
Collector, Jaeger, Tempo) accepts `application/json` on `/v1/traces`.

It follows the exporter variables the SDK's HTTP exporter reads: OTEL_EXPORTER_OTLP_[TRACES_]
HEADERS, _TIMEOUT, _COMPRESSION (gzip), _CERTIFICATE, _CLIENT_CERTIFICATE/_CLIENT_KEY; it
retries 429/502/503/504 and connection failures with exponential back-off, as the SDK does.
"""

from __future__ import annotations

import gzip
import logging
import os
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import orjson

from inferplane.observability.tracing import TraceSettings

log = logging.getLogger("inferplane.tracing")
_RETRIED = {429, 502, 503, 504}
_MAX_TRIES = 4
_UNIQUE = frozenset(
    {
        "inferplane.request_id",
        "inferplane.event_id",
        "messaging.message.id",
        "inferplane.batch.input",
    }
)


def _env(name: str) -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>."""
    return os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{name}"
    )


def parse_headers(text: str | None) -> dict[str, str]:
    """`k1=v1,k2=v2` with URL-encoded values (the OTEL_EXPORTER_OTLP_HEADERS format)."""
    headers: dict[str, str] = {}
    for item in (text or "").split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            headers[urllib.parse.unquote(name.strip()).lower()] = urllib.parse.unquote(
                value.strip()
            )
    return headers


def _value(v: Any) -> dict[str, Any]:
    if v is True or v is False:
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}  # int64 is a string in the protobuf JSON mapping
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": str(v)}


class JsonEncoder:
    """Span tuples (tracing.Span.end) to one ExportTraceServiceRequest in its JSON form."""

    def __init__(self, resource: dict[str, Any]) -> None:
        from inferplane import __version__

        self.resource = {
            "attributes": [{"key": k, "value": _value(v)} for k, v in resource.items()]
        }
        self.scope = {"name": "inferplane", "version": __version__}
        self._kvs: dict[tuple[str, Any, type], dict[str, Any]] = {}

    def _attributes(self, attrs: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        cache = self._kvs
        for k, v in attrs.items():
            if k in _UNIQUE:
                out.append({"key": k, "value": _value(v)})
                continue
            key = (k, v, type(v))
            kv = cache.get(key)
            if kv is None:
                if len(cache) > 10_000:
                    cache.clear()
                kv = cache[key] = {"key": k, "value": _value(v)}
            out.append(kv)
        return out

    def encode(self, records: Sequence[tuple[Any, ...]]) -> bytes:
        spans = []
        attributes = self._attributes
        for name, trace_id, span_id, parent_id, kind, start, end, attrs, links, status in records:
            span: dict[str, Any] = {
                "traceId": f"{trace_id:032x}",
                "spanId": f"{span_id:016x}",
                "name": name,
                "kind": kind + 1,  # the protocol counts from UNSPECIFIED = 0
                "startTimeUnixNano": str(start),
                "endTimeUnixNano": str(end),
            }
            if parent_id:
                span["parentSpanId"] = f"{parent_id:016x}"
            if attrs:
                span["attributes"] = attributes(attrs)
            if links:
                span["links"] = [{"traceId": f"{t:032x}", "spanId": f"{s:016x}"} for t, s in links]
            if status is not None:
                span["status"] = {"code": 2, "message": status}  # STATUS_CODE_ERROR
            spans.append(span)
        return orjson.dumps(
            {
                "resourceSpans": [
                    {
                        "resource": self.resource,
                        "scopeSpans": [{"scope": self.scope, "spans": spans}],
                    }
                ]
            }
        )


class JsonSink:
    """POSTs each batch from the recorder's thread (network waits release the GIL)."""

    def __init__(self, settings: TraceSettings, resource: dict[str, Any]) -> None:
        import requests  # the OTLP HTTP exporter's own client, installed with inferplane[otel]

        endpoint = (settings.endpoint or "").rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"  # the variables' convention: a base URL gets the path
        if "://" not in endpoint:
            endpoint = "http://" + endpoint
        self.url = endpoint
        self.encoder = JsonEncoder(resource)
        self.timeout = float(_env("TIMEOUT") or 10_000) / 1000  # the spec's unit: milliseconds
        self.gzip = (_env("COMPRESSION") or "").lower() == "gzip"
        self.session = requests.Session()
        self.session.headers.update(parse_headers(_env("HEADERS")))
        self.session.headers["content-type"] = "application/json"
        if self.gzip:
            self.session.headers["content-encoding"] = "gzip"
        certificate = _env("CERTIFICATE")
        if certificate:
            self.session.verify = certificate
        client_cert, client_key = _env("CLIENT_CERTIFICATE"), _env("CLIENT_KEY")
        if client_cert:
            self.session.cert = (client_cert, client_key) if client_key else client_cert
        self.failed = 0
        self._last_said = -1e9

    def send(self, records: list[tuple[Any, ...]]) -> None:
        body = self.encoder.encode(records)
        if self.gzip:
            body = gzip.compress(body, compresslevel=1)
        problem = ""
        for attempt in range(_MAX_TRIES):
            try:
                response = self.session.post(self.url, data=body, timeout=self.timeout)
            except OSError as exc:  # requests' ConnectionError and timeouts are OSErrors
                problem = str(exc)[:200]
            else:
                if response.ok:
                    return
                problem = f"{response.status_code} {response.text[:200]}"
                if response.status_code not in _RETRIED:
                    break
            if attempt + 1 < _MAX_TRIES:
                time.sleep(0.5 * 2**attempt)
        self.failed += len(records)
        if time.monotonic() - self._last_said > 10:  # a dead collector: now and then, not per batch
            log.warning("%d spans not exported so far (%s): %s", self.failed, self.url, problem)
            self._last_said = time.monotonic()

    def close(self) -> None:
        self.session.close()
