"""Traces from a real server to a real OTLP receiver (HTTP and gRPC transports), decoded with
opentelemetry-proto: the spans of a request, their parents, links and attributes."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.integration.otlp import Receiver, Span, by_name, otlp  # noqa: F401 - fixture
from tests.integration.servers import ServerProcess, start_server

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER = 2  # SpanKind.SERVER in the protocol's numbering
ROWS = np.random.default_rng(0).random((2, 32), dtype=np.float32)

MIRROR = """
services:
  mirror:
    routes: [{model: tabular, version: 1, weight: 100}]
    shadow: {model: tabular, version: 2, percent: 100}
"""


def _body(request_id: str) -> dict[str, object]:
    return {
        "id": request_id,
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, 32], "data": ROWS.ravel().tolist()}
        ],
    }


@pytest.fixture
def traced(
    example_build: tuple[Path, Path],
    tmp_path: Path,
    otlp: Receiver,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ServerProcess]:
    """A server sending every trace (sample 1) over OTLP/HTTP, exported every 100 ms."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "inferplane-test")
    services = tmp_path / "services.yaml"
    services.write_text(MIRROR)
    srv = start_server(
        example_build[0], tmp_path, "--services", str(services),
        "--otlp-endpoint", otlp.http_endpoint, "--trace-sample", "1",
    )  # fmt: skip
    yield srv
    srv.stop()


def _one(spans: list[Span], **attrs: object) -> Span:
    found = [s for s in spans if all(s.attributes.get(k) == v for k, v in attrs.items())]
    assert len(found) == 1, (attrs, [(s.name, s.attributes) for s in spans])
    return found[0]


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent == parent.span_id and s.trace_id == parent.trace_id]


def test_rest_request_continues_the_callers_trace_down_to_the_runtime(
    traced: ServerProcess,
    otlp: Receiver,  # noqa: F811
) -> None:
    r = httpx.post(
        f"{traced.url}/v2/models/mirror/infer",
        json=_body("traced-1"),
        headers={"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"},
    )
    assert r.status_code == 200, r.text
    spans = otlp.wait_for(
        lambda ss: (
            any(s.name.startswith("shadow") for s in ss)
            and any(s.name == "queue" and s.trace_id == TRACE for s in ss)
            and len(by_name(ss, "execute")) >= 2
        )
    )
    server = _one([s for s in spans if s.trace_id == TRACE and s.kind == SERVER])
    assert server.name == "POST /v2/models/{model}/infer"
    assert server.parent == CALLER_SPAN  # the caller's span is the parent
    assert server.service == "inferplane-test"  # OTEL_SERVICE_NAME is read
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["inferplane.request_id"] == "traced-1"
    assert server.attributes["inferplane.model"] == "tabular"

    [route] = _children(spans, server)
    assert route.name == "route mirror"
    assert route.attributes["inferplane.service"] == "mirror"
    assert route.attributes["inferplane.route"] == "primary"
    assert (route.attributes["inferplane.model"], route.attributes["inferplane.model_version"]) == (
        "tabular",
        "1",
    )
    [infer] = _children(spans, route)
    assert infer.name == "infer tabular:1"
    # the execution's span sits under the first request it served, linked to all of them
    [queue] = [s for s in _children(spans, infer) if s.name == "queue"]
    assert queue.start_ns <= queue.end_ns
    # the queue span links to the shared execution; the execution links back to the request
    [(exec_trace, exec_id)] = queue.links
    [execution] = [s for s in spans if s.span_id == exec_id and s.trace_id == exec_trace]
    assert execution.name == "execute tabular:1"
    assert (infer.trace_id, infer.span_id) in execution.links
    assert execution.attributes["inferplane.batch.requests"] >= 1
    assert execution.attributes["inferplane.batch.rows"] >= 2
    [runtime] = _children(spans, execution)
    assert runtime.name == "runtime onnx"
    assert execution.start_ns <= runtime.start_ns <= runtime.end_ns <= execution.end_ns

    # the shadow: a trace of its own, linked to the primary's route span
    [shadow] = by_name(spans, "shadow tabular:2")
    assert shadow.trace_id != TRACE and shadow.parent == ""
    assert (route.trace_id, route.span_id) in shadow.links
    [shadow_infer] = _children(spans, shadow)
    assert shadow_infer.name == "infer tabular:2"

    # the audit record carries the trace id
    assert _audit_trace_id(traced, "traced-1") == TRACE


def test_grpc_request_is_a_server_span_under_the_callers_trace(
    traced: ServerProcess,
    otlp: Receiver,  # noqa: F811
) -> None:
    client = grpcclient.InferenceServerClient(traced.grpc_target)
    inp = grpcclient.InferInput("input", [2, 32], "FP32")
    inp.set_data_from_numpy(ROWS)
    trace = "0af7651916cd43dd8448eb211c80319c"
    client.infer(
        "tabular",
        [inp],
        request_id="grpc-1",
        headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"},
    )
    spans = otlp.wait_for(lambda ss: any(s.name == "queue" and s.trace_id == trace for s in ss))
    server = _one([s for s in spans if s.trace_id == trace and s.kind == SERVER])
    assert server.name == "inference.GRPCInferenceService/ModelInfer"
    assert server.parent == "b7ad6b7169203331"
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["inferplane.request_id"] == "grpc-1"
    [route] = _children(spans, server)
    assert route.name == "route tabular" and route.attributes["inferplane.route"] == "production"
    answered = route.attributes["inferplane.model_version"]
    assert [s.name for s in _children(spans, route)] == [f"infer tabular:{answered}"]


def test_concurrent_requests_link_to_one_shared_execution(
    traced: ServerProcess,
    otlp: Receiver,  # noqa: F811
) -> None:
    def call(i: int) -> int:
        r = httpx.post(f"{traced.url}/v2/models/tabular/infer", json=_body(f"batch-{i}"))
        return r.status_code

    shared: list[Span] = []
    for _ in range(10):  # batches form under concurrency; a few rounds make one certain
        with ThreadPoolExecutor(32) as pool:
            assert set(pool.map(call, range(64))) == {200}
        time.sleep(0.3)
        shared = [
            s
            for s in by_name(otlp.wait_for(lambda ss: bool(ss)), "execute")
            if s.attributes["inferplane.batch.requests"] > 1
        ]
        if shared:
            break
    assert shared, "no execution served more than one request in 10 rounds of 64 calls"
    execution = shared[0]
    spans = otlp.wait_for(
        lambda ss: (
            sum((s.trace_id, s.span_id) in execution.links for s in ss) == len(execution.links)
        )
    )
    assert len(execution.links) == execution.attributes["inferplane.batch.requests"]
    for trace_id, span_id in execution.links:
        [infer] = [s for s in spans if s.span_id == span_id and s.trace_id == trace_id]
        assert infer.name.startswith("infer tabular:")
        [queue] = [s for s in _children(spans, infer) if s.name == "queue"]
        assert queue.links == [(execution.trace_id, execution.span_id)]


def test_sampling_follows_the_caller_and_otlp_grpc_exports(
    example_build: tuple[Path, Path],
    tmp_path: Path,
    otlp: Receiver,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sample 0: only a caller's sampled trace is recorded; a caller's unsampled trace id
    still reaches the audit; OTLP over gRPC."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.grpc_endpoint)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    srv = start_server(example_build[0], tmp_path)
    try:
        for i in range(20):
            r = httpx.post(f"{srv.url}/v2/models/tabular/infer", json=_body(f"plain-{i}"))
            assert r.status_code == 200
        unsampled = "11111111111111111111111111111111"
        r = httpx.post(
            f"{srv.url}/v2/models/tabular/infer",
            json=_body("unsampled"),
            headers={"traceparent": f"00-{unsampled}-2222222222222222-00"},
        )
        assert r.status_code == 200
        r = httpx.post(
            f"{srv.url}/v2/models/tabular/infer",
            json=_body("sampled"),
            headers={"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"},
        )
        assert r.status_code == 200
        spans = otlp.wait_for(lambda ss: any(s.name == "queue" for s in ss))
        time.sleep(0.5)  # anything else would have come in the same export
        assert {s.trace_id for s in otlp.spans} == {TRACE}
        assert otlp.requests["grpc"] >= 1 and otlp.requests["http"] == 0
        assert {"route tabular", "queue"} <= {s.name for s in spans}
        assert _audit_trace_id(srv, "sampled") == TRACE
        assert _audit_trace_id(srv, "unsampled") == unsampled
        assert _audit_trace_id(srv, "plain-0") is None
    finally:
        srv.stop()


def test_tracing_off_by_default_makes_no_exporter(
    server: ServerProcess,
) -> None:
    """Without an endpoint anywhere the server starts no exporter: its log says nothing of
    traces and requests still carry the caller's trace id into the audit."""
    assert not any(k.startswith("OTEL_EXPORTER_OTLP") for k in os.environ)
    r = httpx.post(
        f"{server.url}/v2/models/tabular/infer",
        json=_body("off-1"),
        headers={"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"},
    )
    assert r.status_code == 200
    assert "traces: OTLP" not in server.log()
    assert _audit_trace_id(server, "off-1") == TRACE


def _audit_trace_id(srv: ServerProcess, request_id: str, timeout: float = 10.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.audit_db.exists():
            with sqlite3.connect(srv.audit_db) as conn:
                row = conn.execute(
                    "SELECT trace_id FROM audit WHERE request_id = ?", (request_id,)
                ).fetchone()
            if row is not None:
                return row[0]  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"no audit record for {request_id} in {srv.audit_db}")
