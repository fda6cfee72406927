"""Streaming over Redis Streams with real `inferplane stream` processes and a real redis-server."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from inferplane.predictor import RequestContext, open_predictor
from tests.integration.servers import ROOT, start_server
from tests.integration.streaming.harness import (
    RedisServer,
    redis_fill,
    redis_read,
    rows,
    run_until,
    start_worker,
    unique,
    wait_for,
)

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _args(redis_server: RedisServer, base: str, *extra: str, service: str = "tabular") -> list[str]:
    return [
        "--source", redis_server.url(f"{base}-in"), "--sink", redis_server.url(f"{base}-out"),
        "--dlq", redis_server.url(f"{base}-dlq"), "--group", "scorers", "--service", service,
        "--max-wait-ms", "5", *extra,
    ]  # fmt: skip


def _docs(client: object, stream: str) -> list[dict[str, object]]:
    return [orjson.loads(f["data"]) for _, f in redis_read(client, stream)]


async def _expected(repo: Path, features: list[list[float]]) -> dict[str, np.ndarray]:
    async with open_predictor(repository=str(repo), models=["tabular"]) as predictor:
        x = np.asarray(features, dtype=np.float32)
        parts = [
            (await predictor.predict("tabular", {"input": x[i : i + 32]}, context=RequestContext()))
            for i in range(0, len(x), 32)
        ]
        return {n: np.concatenate([p.outputs[n] for p in parts]) for n in parts[0].outputs}


async def test_scores_a_stream_in_process(
    redis_server: RedisServer, tabular_repo: Path, tmp_path: Path, free_port: object
) -> None:
    client, base = redis_server.client(), unique("e2e")
    features = rows(300, seed=1)
    entries: list[dict[str, object]] = []
    for i, row in enumerate(features):
        doc = {"id": f"tx-{i}", "features": row, "ts": 1_700_000_000 + i}
        entry: dict[str, object] = {"data": orjson.dumps(doc), "key": f"card-{i % 7}"}
        if i % 2 == 0:
            entry["traceparent"] = TRACE
        entries.append(entry)
    poison = {
        "bad-json": b"{not json",
        "bad-length": orjson.dumps({"id": "bad-length", "features": [1.0, 2.0]}),
        "bad-type": orjson.dumps({"id": "bad-type", "features": ["x"] * 32}),
        "no-field": orjson.dumps({"id": "no-field", "amount": 3}),
    }
    entries[10:10] = [{"data": payload} for payload in poison.values()]
    # A full V2 request as the event: two rows in one event.
    v2 = {"id": "v2-req", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 32],
                                      "data": features[0] + features[1]}]}  # fmt: skip
    entries.append({"data": orjson.dumps(v2)})
    ids = redis_fill(client, f"{base}-in", entries)
    metrics_port = free_port()  # type: ignore[operator]
    worker = start_worker(
        _args(redis_server, base, "--repository", str(tabular_repo), "-m", "tabular",
              "--time-field", "ts", "--metrics-port", str(metrics_port)),
        tmp_path,
    )  # fmt: skip
    try:
        total = len(entries)
        wait_for(
            lambda: client.xlen(f"{base}-out") + client.xlen(f"{base}-dlq") >= total,
            60, "every event scored or dead-lettered", worker,
        )  # fmt: skip
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    finally:
        assert worker.stop() == 0, worker.log()

    outputs = _docs(client, f"{base}-out")
    assert len(outputs) == 301
    by_id = {o["id"]: o for o in outputs}
    expected = await _expected(tabular_repo, features)
    for i in range(300):
        out = by_id[f"tx-{i}"]
        assert out["outputs"]["label"] == int(expected["label"][i])
        np.testing.assert_allclose(out["outputs"]["probabilities"], expected["probabilities"][i],
                                   rtol=1e-5)  # fmt: skip
        assert out["model_name"] == "tabular" and out["model_version"] == "1"
        assert out["route"] == "production"
        assert out["key"] == f"card-{i % 7}"
        assert out["event_time"] == (1_700_000_000 + i) * 1000
        assert out["scored_at"] >= out["event_time"]
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", out["traceparent"])
        if i % 2 == 0:  # the caller's trace continues; the span is ours
            assert out["traceparent"].split("-")[1] == TRACE.split("-")[1]
            assert out["traceparent"] != TRACE
    # output_id is the input's stream entry: stable across redeliveries, unique per input.
    assert {o["output_id"] for o in outputs} == {
        f"{base}-in:{i}"
        for i, e in zip(ids, entries, strict=True)
        if e["data"] not in poison.values()
    }
    assert np.asarray(by_id["v2-req"]["outputs"]["probabilities"]).shape == (2, 2)
    assert by_id["v2-req"]["outputs"]["label"] == [int(v) for v in expected["label"][:2]]
    # Entries on the output stream carry the key and the trace context as fields too.
    first_out = redis_read(client, f"{base}-out")[0][1]
    assert first_out["key"] == b"card-0" and first_out["traceparent"].startswith(b"00-4bf92f")

    dead = {d["payload"]: d for d in _docs(client, f"{base}-dlq")}
    assert set(dead) == {p.decode() for p in poison.values()}
    reasons = {name: dead[payload.decode()]["reason"] for name, payload in poison.items()}
    assert "not JSON" in reasons["bad-json"]
    assert "needs 32 values per event" in reasons["bad-length"]
    assert "must be numbers" in reasons["bad-type"]
    assert "no field for input 'input'" in reasons["no-field"]
    for record in dead.values():
        assert record["source"] == f"redis:{base}-in"
        assert record["position"]["stream"] == f"{base}-in"
        assert record["error"] == "BadRequest" and record["attempts"] == 0
    assert dead[poison["bad-length"].decode()]["id"] == "bad-length"

    group = client.xinfo_groups(f"{base}-in")[0]
    assert group["pending"] == 0 and group["entries-read"] == len(entries)
    assert "inferplane_stream_events_in_total 305.0" in metrics
    assert "inferplane_stream_events_out_total 301.0" in metrics
    assert 'inferplane_stream_events_dlq_total{reason="decode"} 4.0' in metrics
    assert "inferplane_stream_end_to_end_lag_seconds_count 301.0" in metrics
    assert "inferplane_stream_batch_size_count" in metrics
    assert "inferplane_stream_consumer_lag" in metrics


def test_service_routing_and_audit_in_process(
    redis_server: RedisServer, example_build: tuple[Path, Path], tmp_path: Path
) -> None:
    """The example repository's `reco` service (90/10 split of tabular versions 1 and 2)."""
    client, base = redis_server.client(), unique("reco")
    redis_fill(client, f"{base}-in", [{"data": orjson.dumps({"id": f"s{i}", "features": r})}
                                     for i, r in enumerate(rows(400, seed=8))])  # fmt: skip
    audit = tmp_path / "audit.jsonl"
    run_until(
        _args(redis_server, base, "--repository", str(example_build[0]), "-m", "tabular",
              "--audit-sink", f"jsonl:{audit}", "--batch-size", "8", service="reco"),
        tmp_path, lambda: client.xlen(f"{base}-out") >= 400, 60, "400 outputs",
    )  # fmt: skip
    outputs = _docs(client, f"{base}-out")
    routes = {(o["route"], o["model_version"]) for o in outputs}
    assert routes <= {("primary", "1"), ("canary", "2")}, routes
    assert ("primary", "1") in routes
    assert {o["model_name"] for o in outputs} == {"tabular"}
    records = [orjson.loads(line) for line in audit.read_text().splitlines()]
    assert records and {r["service"] for r in records} == {"reco"}
    assert all(r["request_id"].startswith(f"redis:{base}-in/") for r in records)
    assert {(r["route"], r["version"]) for r in records} == routes


def test_takes_over_a_dead_consumers_pending_entries(
    redis_server: RedisServer, tabular_repo: Path, tmp_path: Path
) -> None:
    client, base = redis_server.client(), unique("claim")
    redis_fill(client, f"{base}-in", [{"data": orjson.dumps({"id": f"c{i}", "features": r})}
                                     for i, r in enumerate(rows(100, seed=2))])  # fmt: skip
    client.xgroup_create(f"{base}-in", "scorers", id="0")
    # A consumer that read 60 entries and died before acknowledging any.
    taken = client.xreadgroup("scorers", "dead-worker", {f"{base}-in": ">"}, count=60)
    assert len(taken[0][1]) == 60
    worker = run_until(
        _args(redis_server, base, "--repository", str(tabular_repo), "-m", "tabular",
              "--claim-idle-ms", "500"),
        tmp_path, lambda: client.xlen(f"{base}-out") >= 100, 60, "all 100 outputs",
    )  # fmt: skip
    outputs = _docs(client, f"{base}-out")
    assert sorted(o["id"] for o in outputs) == sorted(f"c{i}" for i in range(100))
    pending = client.xpending(f"{base}-in", "scorers")
    assert pending["pending"] == 0
    assert "redelivered=60" in worker.log()


def test_sigterm_drains_what_it_read_and_exits_cleanly(
    redis_server: RedisServer, tabular_repo: Path, tmp_path: Path
) -> None:
    client, base = redis_server.client(), unique("drain")
    redis_fill(client, f"{base}-in", [{"data": orjson.dumps({"id": f"d{i}", "features": r})}
                                     for i, r in enumerate(rows(20_000, seed=3))])  # fmt: skip
    worker = start_worker(
        _args(redis_server, base, "--repository", str(tabular_repo), "-m", "tabular",
              "--batch-size", "32", "--max-in-flight", "8"),
        tmp_path,
    )  # fmt: skip
    wait_for(lambda: client.xlen(f"{base}-out") >= 500, 60, "500 outputs", worker)
    assert worker.stop() == 0, worker.log()
    assert "stopping; draining" in worker.log()
    group = client.xinfo_groups(f"{base}-in")[0]
    # Everything it read was scored, written and acknowledged; nothing is left pending.
    assert group["pending"] == 0
    outputs = _docs(client, f"{base}-out")
    assert 500 <= len(outputs) < 20_000, "SIGTERM should stop it mid-stream"
    assert len(outputs) == group["entries-read"]
    assert len({o["output_id"] for o in outputs}) == len(outputs)


def test_remote_predictor_and_transient_failures(
    redis_server: RedisServer, tabular_repo: Path, tmp_path: Path
) -> None:
    client, base = redis_server.client(), unique("remote")
    server = start_server(tabular_repo, tmp_path, "--model", "tabular", grpc=False)
    worker = start_worker(
        _args(redis_server, base, "--server", server.url, "--max-retries", "2",
              "--retry-backoff-ms", "50", "--timeout-ms", "2000"),
        tmp_path,
    )  # fmt: skip
    try:
        features = rows(50, seed=4)
        redis_fill(client, f"{base}-in", [{"data": orjson.dumps({"id": f"r{i}", "features": r})}
                                         for i, r in enumerate(features)])  # fmt: skip
        wait_for(lambda: client.xlen(f"{base}-out") >= 50, 60, "50 remote outputs", worker)
        outputs = _docs(client, f"{base}-out")
        assert {o["model_name"] for o in outputs} == {"tabular"}
        assert {o["model_version"] for o in outputs} == {"1"}
        # The server goes away: events retry with backoff, then go to the DLQ; none is lost.
        server.stop()
        redis_fill(client, f"{base}-in", [{"data": orjson.dumps({"id": f"late{i}", "features": r})}
                                         for i, r in enumerate(features[:5])])  # fmt: skip
        wait_for(lambda: client.xlen(f"{base}-dlq") >= 5, 60, "5 dead letters", worker)
    finally:
        server.stop()
        assert worker.stop() == 0, worker.log()
    dead = _docs(client, f"{base}-dlq")
    assert sorted(d["id"] for d in dead) == [f"late{i}" for i in range(5)]
    for record in dead:
        assert record["attempts"] == 3
        assert record["reason"].startswith("gave up after 3 attempts")
    assert "retries=" in worker.log() and "retries=0 " not in worker.log().splitlines()[-1]
    assert client.xinfo_groups(f"{base}-in")[0]["pending"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "foo://x/y", "--sink", "redis://h:1/0?stream=o", "--dlq",
          "redis://h:1/0?stream=d"], "--source 'foo://x/y': unknown scheme 'foo'"),
        (["--source", "redis://127.0.0.1:1/0", "--sink", "redis://h:1/0?stream=o", "--dlq",
          "redis://h:1/0?stream=d"], "needs ?stream=NAME"),
        (["--source", "redis://h:1/0?stream=i", "--sink", "kafka://h:1/", "--dlq",
          "redis://h:1/0?stream=d"], "needs exactly one topic"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "inferplane", "stream", *args, "--service", "tabular",
         "--repository", "/nonexistent"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_restart_under_the_same_name_resumes_its_own_pending_entries(
    redis_server: RedisServer, tabular_repo: Path, tmp_path: Path
) -> None:
    client, base = redis_server.client(), unique("restart")
    features = rows(120, seed=6)
    entries: list[dict[str, object]] = [
        {"data": orjson.dumps({"id": f"p{i}", "features": r})} for i, r in enumerate(features)
    ]
    entries.append({"data": b"\xff\xfe\x00 binary, not UTF-8"})  # read back byte for byte
    redis_fill(client, f"{base}-in", entries)
    client.xgroup_create(f"{base}-in", "scorers", id="0")
    # "scorer-1" read 70 entries, then crashed; it comes back under the same name.
    assert len(client.xreadgroup("scorers", "scorer-1", {f"{base}-in": ">"}, count=70)[0][1]) == 70
    worker = run_until(
        _args(redis_server, base, "--repository", str(tabular_repo), "-m", "tabular",
              "--consumer", "scorer-1", "--batch-size", "16"),
        tmp_path, lambda: client.xlen(f"{base}-out") + client.xlen(f"{base}-dlq") >= 121,
        60, "121 results",
    )  # fmt: skip
    outputs = _docs(client, f"{base}-out")
    # Each pending entry once (its own pending list is read forward, not from 0 every time).
    assert sorted(o["id"] for o in outputs) == sorted(f"p{i}" for i in range(120))
    assert "redelivered=70" in worker.log()
    (dead,) = _docs(client, f"{base}-dlq")
    assert dead["payload_encoding"] == "base64"
    assert base64.b64decode(dead["payload"]) == b"\xff\xfe\x00 binary, not UTF-8"
