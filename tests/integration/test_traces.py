"""Traces from a real server to a real OTLP receiver (HTTP and gRPC transports), decoded with
opentelemetry-proto: the spans of a request, their parents, links and attributes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient

from tests.integration.brokers import RedisServer
from tests.integration.otlp import Receiver, Span, by_name, otlp  # noqa: F401 - fixture
from tests.integration.servers import ROOT, ServerProcess, start_server
from tests.integration.streaming.harness import (
    KafkaTail,
    Tansu,
    kafka_produce,
    redis_fill,
    redis_read,
    run_until,
    unique,
)
from tests.integration.streaming.harness import rows as stream_rows

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER, CONSUMER = 2, 5  # SpanKind in the protocol's numbering
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
        found = subprocess.run(
            [sys.executable, "-m", "inferplane", "audit", "--sink", str(srv.audit_db),
             "--trace-id", TRACE.upper(), "--json"],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        assert [orjson.loads(line)["request_id"] for line in found.stdout.splitlines()] == [
            "sampled"
        ]
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


def test_stream_events_continue_their_producers_traces_into_the_output(
    example_build: tuple[Path, Path],
    redis_server: RedisServer,
    tmp_path: Path,
    otlp: Receiver,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """consume -> predict -> produce: each event's span is a child of the producer's span (the
    Redis `traceparent` field) and the output entry names that span as its parent."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    client, base = redis_server.client(), unique("traced")
    producers = [f"{i + 1:016x}" for i in range(6)]
    entries: list[dict[str, object]] = [
        {"data": orjson.dumps({"id": f"ev-{i}", "features": row}),
         "traceparent": f"00-{TRACE}-{producers[i]}-01"}
        for i, row in enumerate(stream_rows(6, seed=3))
    ]  # fmt: skip
    entries.append({"data": b"{poison", "traceparent": f"00-{TRACE}-{'f' * 16}-01"})
    args = [
        "--source", redis_server.url(f"{base}-in"), "--sink", redis_server.url(f"{base}-out"),
        "--dlq", redis_server.url(f"{base}-dlq"), "--group", "g", "--service", "tabular",
        "--repository", str(example_build[0]), "-m", "tabular", "--max-wait-ms", "50",
        "--otlp-endpoint", otlp.http_endpoint, "--trace-sample", "0",
    ]  # fmt: skip
    redis_fill(client, f"{base}-in", entries)
    run_until(
        args, tmp_path, lambda: client.xlen(f"{base}-out") == 6 and client.xlen(f"{base}-dlq") == 1,
        60, "6 scored events and 1 dead letter",
    )  # fmt: skip
    spans = otlp.wait_for(
        lambda ss: len(by_name(ss, "process ")) == 6 and bool(by_name(ss, "predict"))
    )
    events = {s.parent: s for s in by_name(spans, "process ")}
    assert set(events) == set(producers)  # the undecodable event is not scored, so no span
    for s in events.values():
        assert s.trace_id == TRACE and s.kind == CONSUMER
        assert s.attributes["messaging.system"] == "redis"
        assert s.attributes["inferplane.stream.outcome"] == "scored"
    outputs = {
        o["id"]: o for _, f in redis_read(client, f"{base}-out") for o in [orjson.loads(f["data"])]
    }
    for i, producer in enumerate(producers):
        assert outputs[f"ev-{i}"]["traceparent"] == f"00-{TRACE}-{events[producer].span_id}-01"
    # one predictor call per chunk, under the first event and linked to every event in it
    predict = by_name(spans, "predict tabular")
    linked = {sid for p in predict for _, sid in p.links}
    assert linked == {s.span_id for s in events.values()}
    for p in predict:
        [route] = _children(spans, p)
        assert route.name == "route tabular"


def test_batch_job_and_fragment_spans_from_worker_processes(
    example_build: tuple[Path, Path],
    tmp_path: Path,
    otlp: Receiver,  # noqa: F811
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    x = np.random.default_rng(5).standard_normal((300, 32), dtype=np.float32)
    for f in range(3):
        part = x[f * 100 : (f + 1) * 100]
        pq.write_table(
            pa.table({"customer_id": np.arange(f * 100, (f + 1) * 100),
                      "input": pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), 32)}),
            src / f"part-{f}.parquet",
        )  # fmt: skip
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100",
           "TRACEPARENT": f"00-{TRACE}-{CALLER_SPAN}-01"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "inferplane", "batch", "-i", str(src), "-o", str(tmp_path / "out"),
         "-s", "tabular", "-r", str(example_build[0]), "--id-column", "customer_id",
         "--workers", "2", "--otlp-endpoint", otlp.http_endpoint],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    spans = otlp.wait_for(
        lambda ss: len(by_name(ss, "fragment ")) == 3 and bool(by_name(ss, "batch "))
    )
    [job] = by_name(spans, "batch tabular")
    assert job.trace_id == TRACE and job.parent == CALLER_SPAN
    assert job.attributes["inferplane.batch.rows"] == 300
    assert job.attributes["inferplane.batch.fragments_scored"] == 3
    fragments = by_name(spans, "fragment ")
    assert {f.attributes["inferplane.batch.input"] for f in fragments} == {
        f"part-{i}.parquet" for i in range(3)
    }
    for f in fragments:
        assert f.parent == job.span_id and f.trace_id == TRACE
        assert f.attributes["inferplane.batch.rows_in"] == 100
        assert f.attributes["inferplane.batch.rows_errored"] == 0
        assert f.attributes["inferplane.batch.output_bytes"] > 0
        assert f.attributes["inferplane.batch.input_bytes"] > 0


def test_kafka_events_continue_their_traces_from_headers_into_output_headers(
    example_build: tuple[Path, Path],
    tansu: Tansu,
    tmp_path: Path,
    otlp: Receiver,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    base = unique("traced-kafka")
    tansu.create_topics(f"{base}-in", f"{base}-out", f"{base}-dlq")
    producers = [f"{i + 1:016x}" for i in range(5)]
    kafka_produce(
        tansu.bootstrap, f"{base}-in",
        [(b"k", orjson.dumps({"id": f"ev-{i}", "features": row}),
          [("traceparent", f"00-{TRACE}-{producers[i]}-01".encode())])
         for i, row in enumerate(stream_rows(5, seed=4))],
    )  # fmt: skip
    tail = KafkaTail(tansu.bootstrap, f"{base}-out")
    try:
        run_until(
            ["--source", tansu.url(f"{base}-in", **{"session.timeout.ms": "6000",
                                                   "heartbeat.interval.ms": "500"}),
             "--sink", tansu.url(f"{base}-out"), "--dlq", tansu.url(f"{base}-dlq"),
             "--group", "g", "--service", "tabular", "--repository", str(example_build[0]),
             "-m", "tabular", "--max-wait-ms", "50", "--otlp-endpoint", otlp.http_endpoint],
            tmp_path, lambda: tail.poll() >= 5, 90, "5 outputs",
        )  # fmt: skip
        outputs = tail.read(5, 5)
    finally:
        tail.close()
    spans = otlp.wait_for(lambda ss: len(by_name(ss, "process ")) == 5)
    events = {s.parent: s for s in by_name(spans, "process ")}
    assert set(events) == set(producers)
    assert {s.attributes["messaging.system"] for s in events.values()} == {"kafka"}
    for msg in outputs:
        doc = orjson.loads(msg.value())
        header = dict(msg.headers())["traceparent"].decode()
        [event] = [s for s in events.values() if s.attributes["inferplane.event_id"] == doc["id"]]
        assert header == doc["traceparent"] == f"00-{TRACE}-{event.span_id}-01"


def test_v1_predict_is_traced_too(
    traced: ServerProcess,
    otlp: Receiver,  # noqa: F811
) -> None:
    r = httpx.post(
        f"{traced.url}/v1/models/tabular:predict",
        json={"instances": ROWS.tolist()},
        headers={"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"},
    )
    assert r.status_code == 200, r.text
    spans = otlp.wait_for(lambda ss: any(s.name == "queue" and s.trace_id == TRACE for s in ss))
    server = _one([s for s in spans if s.trace_id == TRACE and s.kind == SERVER])
    assert server.name == "POST /v1/models/{model}:predict" and server.parent == CALLER_SPAN
    assert server.attributes["http.response.status_code"] == 200
    assert [s.name for s in _children(spans, server)] == ["route tabular"]


def test_a_stream_worker_scoring_through_a_server_continues_its_trace_there(
    traced: ServerProcess,
    redis_server: RedisServer,
    tmp_path: Path,
    otlp: Receiver,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Model-as-a-service: the worker's predict span is the parent of the server's span."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.delenv("OTEL_SERVICE_NAME")  # the server's; the worker names itself
    client, base = redis_server.client(), unique("remote")
    redis_fill(client, f"{base}-in", [
        {"data": orjson.dumps({"id": "r-1", "features": stream_rows(1, seed=8)[0]}),
         "traceparent": f"00-{TRACE}-{'a' * 16}-01"},
    ])  # fmt: skip
    run_until(
        ["--source", redis_server.url(f"{base}-in"), "--sink", redis_server.url(f"{base}-out"),
         "--dlq", redis_server.url(f"{base}-dlq"), "--group", "g", "--service", "tabular",
         "--server", traced.url, "--max-wait-ms", "20", "--otlp-endpoint", otlp.http_endpoint],
        tmp_path, lambda: client.xlen(f"{base}-out") == 1, 60, "1 scored event",
    )  # fmt: skip
    spans = otlp.wait_for(
        lambda ss: (
            any(s.kind == SERVER and s.trace_id == TRACE for s in ss)
            and bool(by_name(ss, "predict tabular"))
        )
    )
    [predict] = by_name(spans, "predict tabular")
    server = _one([s for s in spans if s.trace_id == TRACE and s.kind == SERVER])
    assert server.parent == predict.span_id
    assert predict.service == "inferplane-stream" and server.service == "inferplane-test"
