"""The tracing core: traceparent parsing, the sampling decision, settings from flags and the
OTEL_* variables, the bounded recorder, and spans as the SDK's exporter receives them (its
in-memory exporter here; tests/integration/test_traces.py exports to a real OTLP receiver)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from inferplane.observability import tracing
from inferplane.observability.tracing import TraceSettings, parse_traceparent, settings_from_env

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_traceparent_parsing_follows_the_w3c_rules() -> None:
    p = parse_traceparent(f"00-{TRACE}-{PARENT}-01")
    assert p is not None and (f"{p.trace_id:032x}", f"{p.span_id:016x}", p.sampled) == (
        TRACE,
        PARENT,
        True,
    )
    unsampled = parse_traceparent(f"00-{TRACE}-{PARENT}-00")
    assert unsampled is not None and not unsampled.sampled
    assert parse_traceparent(f" 00-{TRACE.upper()}-{PARENT}-01 ") is not None  # case, spaces
    for bad in (None, "", "garbage", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01",
                f"01-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}"):  # fmt: skip
        assert parse_traceparent(bad) is None, bad
    assert tracing.trace_id_from(f"00-{TRACE}-{PARENT}-00") == TRACE
    assert tracing.trace_id_from("nonsense") is None


def test_settings_come_from_flags_over_the_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert settings_from_env() is None  # no endpoint anywhere: off
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    s = settings_from_env()
    assert s == TraceSettings("http://collector:4318", 0.25, "grpc", "inferplane")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318")
    assert settings_from_env("http://flag:4318", 0.5, "svc") == TraceSettings(
        "http://flag:4318", 0.5, "grpc", "svc"
    )
    env = settings_from_env()
    assert env is not None and env.endpoint == "http://traces:4318"  # the signal's own wins
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert settings_from_env("http://flag:4318") is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert settings_from_env("http://flag:4318") is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "lots")
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG='lots' is not a number"):
        settings_from_env()


@pytest.fixture
def memory() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    yield exporter
    tracing.shutdown()


def _tracing(exporter: InMemorySpanExporter, sample: float) -> tracing.Tracing:
    active = tracing.configure(TraceSettings("http://unused", sample), exporter=exporter)
    assert active is not None
    return active


def test_sampling_is_decided_before_any_span_exists(memory: InMemorySpanExporter) -> None:
    never = _tracing(memory, 0.0)
    assert never.start_request("r", None) is None
    assert never.start_request("r", f"00-{TRACE}-{PARENT}-00") is None  # caller said no
    followed = never.start_request("r", f"00-{TRACE}-{PARENT}-01")  # caller said yes
    assert followed is not None
    always = _tracing(memory, 1.0)
    assert always.start_request("r", None) is not None
    assert always.start_request("r", f"00-{TRACE}-{PARENT}-00") is None
    some = _tracing(memory, 0.3)
    kept = sum(some.start_request("r", None) is not None for _ in range(4000))
    assert 1000 < kept < 1400  # 30% of 4000, well within chance
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        tracing.Tracing(TraceSettings("http://x", 1.5), exporter=memory)


def test_spans_reach_the_sdk_exporter_with_parents_links_kinds_and_status(
    memory: InMemorySpanExporter,
) -> None:
    t = _tracing(memory, 1.0)
    root = t.start_request("POST /v2/models/{model}/infer", f"00-{TRACE}-{PARENT}-01", {"a": 1})
    assert root is not None
    assert tracing.traceparent_of(root) == f"00-{TRACE}-{root.span_id:016x}-01"
    child = t.child(root, "route reco", {"inferplane.service": "reco"})
    other = t.root("shadow tabular:2", links=[child.get_span_context()])
    tracing.fail(other, "shadow failed")
    other.end()
    child.end()
    tracing.end_request(root, 503, "tabular", "2", "req-1", "overloaded")
    tracing.shutdown()  # drains the recorder into the exporter
    spans = {s.name: s for s in memory.get_finished_spans()}
    server, route, shadow = (
        spans["POST /v2/models/{model}/infer"],
        spans["route reco"],
        spans["shadow tabular:2"],
    )
    assert f"{server.context.trace_id:032x}" == TRACE
    assert f"{server.parent.span_id:016x}" == PARENT and server.kind is SpanKind.SERVER
    assert server.attributes["inferplane.status"] == 503 and server.attributes["a"] == 1
    assert server.status.status_code is StatusCode.ERROR  # 5xx
    assert route.parent.span_id == server.context.span_id and route.kind is SpanKind.INTERNAL
    assert shadow.parent is None and shadow.context.trace_id != server.context.trace_id
    assert [link.context.span_id for link in shadow.links] == [route.context.span_id]
    assert shadow.status.status_code is StatusCode.ERROR
    assert shadow.status.description == "shadow failed"
    assert server.start_time <= route.start_time <= route.end_time <= server.end_time
    assert server.resource.attributes["service.name"] == "inferplane"


def test_a_4xx_is_not_an_error_span(memory: InMemorySpanExporter) -> None:
    t = _tracing(memory, 1.0)
    root = t.start_request("r", None)
    assert root is not None
    tracing.end_request(root, 404, "", "", None, "unknown model")
    tracing.shutdown()
    [span] = memory.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert "inferplane.model" not in span.attributes


def test_a_full_buffer_drops_and_counts_instead_of_growing(
    memory: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing drains meanwhile
    t = _tracing(memory, 1.0)
    for _ in range(25):
        span = t.start_request("r", None)
        assert span is not None
        span.end()
    assert len(t.recorder.buffer) == 10 and t.recorder.dropped == 15
    tracing.shutdown()
    assert len(memory.get_finished_spans()) == 10


def test_execution_spans_link_requests_and_queue_spans_link_back(
    memory: InMemorySpanExporter,
) -> None:
    t = _tracing(memory, 1.0)
    a, b = t.root("infer m:1"), t.root("infer m:1")
    t.record_execution(
        "m", "1", "onnx", [(a.get_span_context(), 1000), (b.get_span_context(), 2000)],
        rows=6, started_ns=3000, infer_start_ns=3500, infer_end_ns=4000, error="boom",
    )  # fmt: skip
    a.end()
    b.end()
    tracing.shutdown()
    spans = memory.get_finished_spans()
    [execution] = [s for s in spans if s.name == "execute m:1"]
    [runtime] = [s for s in spans if s.name == "runtime onnx"]
    queues = [s for s in spans if s.name == "queue"]
    assert execution.attributes["inferplane.batch.requests"] == 2
    assert execution.attributes["inferplane.batch.rows"] == 6
    assert {lk.context.span_id for lk in execution.links} == {a.span_id, b.span_id}
    assert execution.parent.span_id == a.span_id  # under the first request it served
    assert runtime.parent.span_id == execution.context.span_id
    assert runtime.status.status_code is StatusCode.ERROR
    assert runtime.end_time - runtime.start_time == 500
    assert {q.parent.span_id for q in queues} == {a.span_id, b.span_id}
    for q in queues:
        assert [lk.context.span_id for lk in q.links] == [execution.context.span_id]
        assert q.end_time == execution.start_time
