"""OTLP/HTTP JSON export (observability/otlp_json.py): the encoding, the exporter variables, and
retries against a small real HTTP receiver."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from inferplane.observability.otlp_json import JsonEncoder, JsonSink, parse_headers
from inferplane.observability.tracing import TraceSettings

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def _record(name: str = "infer m:1", **over: Any) -> tuple[Any, ...]:
    fields = {
        "name": name, "trace_id": TRACE, "span_id": 0x1, "parent_id": 0x2, "kind": 1,
        "start": 1_000, "end": 2_000, "attrs": {"inferplane.model": "m", "n": 3, "ok": True,
                                                "x": 0.5},
        "links": [(TRACE, 0x3)], "status": None,
    }  # fmt: skip
    fields.update(over)
    return tuple(fields.values())


def test_headers_are_read_as_the_otel_variable_format() -> None:
    assert parse_headers("Api-Key=a%3Db,x-tenant = acme , broken,=v") == {
        "api-key": "a=b",
        "x-tenant": "acme",
    }
    assert parse_headers(None) == {}


def test_the_json_form_follows_otlp() -> None:
    doc = orjson.loads(
        JsonEncoder({"service.name": "svc"}).encode(
            [_record(), _record("root", parent_id=0, links=(), attrs={}, status="boom")]
        )
    )
    [rs] = doc["resourceSpans"]
    assert rs["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "svc"}}
    ]
    [ss] = rs["scopeSpans"]
    assert ss["scope"]["name"] == "inferplane"
    span, root = ss["spans"]
    assert span["traceId"] == f"{TRACE:032x}" and span["spanId"] == "0000000000000001"
    assert span["parentSpanId"] == "0000000000000002"
    assert span["kind"] == 2  # SERVER: the SDK's 1 plus one (UNSPECIFIED is 0 on the wire)
    assert (span["startTimeUnixNano"], span["endTimeUnixNano"]) == ("1000", "2000")
    assert span["attributes"] == [
        {"key": "inferplane.model", "value": {"stringValue": "m"}},
        {"key": "n", "value": {"intValue": "3"}},  # int64 as a string, as protobuf JSON has it
        {"key": "ok", "value": {"boolValue": True}},
        {"key": "x", "value": {"doubleValue": 0.5}},
    ]
    assert span["links"] == [{"traceId": f"{TRACE:032x}", "spanId": "0000000000000003"}]
    assert "status" not in span
    assert "parentSpanId" not in root and "attributes" not in root and "links" not in root
    assert root["status"] == {"code": 2, "message": "boom"}


@pytest.fixture
def receiver() -> Iterator[dict[str, Any]]:
    """Answers 503 to the first POST, then 200; keeps what it got."""
    got: dict[str, Any] = {"posts": 0, "bodies": [], "headers": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            got["posts"] += 1
            got["headers"].append(dict(self.headers))
            got["bodies"].append(body)
            self.send_response(503 if got["posts"] == 1 else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    got["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield got
    server.shutdown()
    server.server_close()


def test_the_sink_retries_a_503_and_sends_the_variables_headers_gzipped(
    receiver: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t0ken")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    sink = JsonSink(TraceSettings(receiver["url"]), {"service.name": "svc"})
    try:
        sink.send([_record()])
    finally:
        sink.close()
    assert receiver["posts"] == 2 and sink.failed == 0  # the 503 was retried
    headers = {k.lower(): v for k, v in receiver["headers"][-1].items()}
    assert headers["authorization"] == "Bearer t0ken"
    assert headers["content-type"] == "application/json"
    assert headers["content-encoding"] == "gzip"
    doc = orjson.loads(gzip.decompress(receiver["bodies"][-1]))
    assert doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["name"] == "infer m:1"


def test_a_dead_collector_counts_the_spans_it_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    import inferplane.observability.otlp_json as otlp_json

    monkeypatch.setattr(otlp_json, "_MAX_TRIES", 2)
    monkeypatch.setattr(otlp_json.time, "sleep", lambda _: None)
    sink = JsonSink(TraceSettings("http://127.0.0.1:9"), {})  # nothing listens on port 9
    sink.send([_record(), _record()])
    assert sink.failed == 2
    sink.close()
