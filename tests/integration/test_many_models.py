"""Many models (issue 14, docs/serving.md "Many models") on real servers over a real S3.

A 50-model repository on `moto_server`, real `inferplane serve` processes on loopback ports, real
clients (httpx, tritonclient, the `inferplane models list --server` CLI):

- start-up with `--load on-demand` is ready without loading anything;
- concurrent cold requests share one load;
- traffic over all 50 models under a budget that fits about 5: correct answers, evictions, no 5xx,
  resident bytes under the budget, reloads from the artifact cache, evictions in the log;
- a budget held entirely by versions that cannot be evicted answers 503 at once;
- `--idle-unload-s` unloads an unused version and the next request brings it back;
- a tampered artifact fails its load once, answers 503 with the reason and Retry-After, and is
  not retried in a loop;
- a scikit-learn model in worker processes is budgeted with its workers' memory.

Every model answers something only it would: model i takes i + 1 features and adds 1000 * i to
their sum, so an answer from the wrong model (or a stale one) never passes.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.servers import ServerProcess, start_server
from tests.integration.test_cli import cli, ok, table_row

pytestmark = pytest.mark.s3

N_MODELS = 50
MIB = 2**20
# Each artifact carries 4 MiB of weights (zeros that add nothing to the answer), so that a
# version's footprint is megabytes that stand out of the server's RSS noise, not the few KiB of
# a bare graph. What a version counts against the budget is what the server measures: its RSS
# growth across the load, at least the artifact's size. For these models that is 1-5 times the
# artifact (about 8 MiB in a server that evicts nothing: heap the load used and freed stays with
# the process), so the budget comes from a measurement: `fleet_budget` starts a server without a
# budget, loads a few models and takes SLOTS times their median footprint. The first load of a
# process also carries ONNX Runtime's one-time start-up (10-25 MiB) and is left out.
PAD_BYTES = 4 * MIB
SLOTS = 5.5


def _need(module: str, install: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        pytest.fail(f"needs {install}: pip install '{install}' ({exc})", pytrace=False)


def write_fleet_model(path: Path, index: int, pad_bytes: int = PAD_BYTES) -> str:
    """Model `index`: `input` FP32 [N, index + 1] -> `output` FP32 [N, 1] = the sum of the
    features + 1000 * index, with `pad_bytes` of weights that add nothing (their sum times 0)."""
    onnx = _need("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1),
        helper.make_node("Add", ["total", "bias"], ["biased"]),
        helper.make_node("ReduceSum", ["pad"], ["pad_sum"], keepdims=0),
        helper.make_node("Mul", ["pad_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["biased", "nothing"], ["output"]),
    ]
    initializers = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("bias", TensorProto.FLOAT, [1], [1000.0 * index]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        numpy_helper.from_array(np.zeros(pad_bytes // 4, np.float32), "pad"),
    ]
    graph = helper.make_graph(
        nodes,
        f"fleet_{index}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", index + 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def name(index: int) -> str:
    return f"m{index:02d}"


@dataclass
class Fleet:
    url: str  # s3://bucket/models
    artifact_bytes: int  # every model's artifact weighs this


def register_all(url: str, artifacts: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Register (name, artifact, options) into `url`, a few at a time."""
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    def one(job: tuple[str, str, dict[str, Any]]) -> None:
        register(Repository(url), job[0], job[1], **job[2])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, artifacts))


@pytest.fixture(scope="module")
def fleet(moto_s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The 50 models in a bucket of their own, emptied afterwards (moto keeps objects in
    memory for the whole session)."""
    import s3fs

    base = tmp_path_factory.mktemp("fleet")
    bucket = moto_s3.new_bucket("fleet")
    paths = [write_fleet_model(base / name(i) / "model.onnx", i) for i in range(N_MODELS)]
    register_all(f"s3://{bucket}/models", [(name(i), p, {}) for i, p in enumerate(paths)])
    yield Fleet(f"s3://{bucket}/models", os.path.getsize(paths[0]))
    s3fs.S3FileSystem(skip_instance_cache=True).rm(f"{bucket}/models", recursive=True)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Servers a test started, stopped after it whatever happens."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def serve(servers: list[ServerProcess], url: str, tmp_path: Path, *args: str) -> ServerProcess:
    """A server over `url` (its artifact cache in `tmp_path`), stopped after the test."""
    server = start_server(url, tmp_path, "--cache-dir", str(tmp_path / "cache"), *args, grpc=False)
    servers.append(server)
    return server


# --- requests and what the server reports -------------------------------------------------------


def request(index: int, rows: int = 1, seed: int = 0) -> tuple[dict[str, Any], list[float]]:
    """An infer body for model `index` and the answer only that model gives."""
    rnd = random.Random(seed)
    data = [[float(rnd.randint(-50, 50)) for _ in range(index + 1)] for _ in range(rows)]
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, index + 1], "data": data}]
    }
    return body, [sum(row) + 1000.0 * index for row in data]


def infer(client: httpx.Client, index: int, rows: int = 1, seed: int = 0) -> httpx.Response:
    body, _ = request(index, rows, seed)
    return client.post(f"/v2/models/{name(index)}/infer", json=body, timeout=60)


def correct(answer: httpx.Response, index: int, rows: int = 1, seed: int = 0) -> bool:
    if answer.status_code != 200:
        return False
    _, expected = request(index, rows, seed)
    body = answer.json()
    return body["model_name"] == name(index) and body["outputs"][0]["data"] == expected


def metric(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples called `sample` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def residency(server: ServerProcess) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/inferplane/models", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def rows_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Version 1 of each model (every model here has one version)."""
    return {row["name"]: row for row in report["versions"]}


def index_states(server: ServerProcess) -> dict[str, tuple[str, str]]:
    answer = httpx.post(f"{server.url}/v2/repository/index", timeout=10)
    assert answer.status_code == 200, answer.text
    return {row["name"]: (row["state"], row.get("reason", "")) for row in answer.json()}


def log_lines(server: ServerProcess, pattern: str) -> list[str]:
    return [line for line in server.log().splitlines() if re.search(pattern, line)]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


@pytest.fixture(scope="module")
def fleet_budget(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> int:
    """SLOTS times the median footprint a server measures for the fleet's models (bytes)."""
    base = tmp_path_factory.mktemp("probe")
    server = start_server(
        fleet.url, base, "--load", "on-demand", "--cache-dir", str(base / "cache"), grpc=False
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for i in range(7):  # m00 first: it takes ONNX Runtime's one-time start-up
                answer = infer(client, i)
                assert correct(answer, i), answer.text
        rows = rows_by_name(residency(server))
    finally:
        server.stop()
    measured = [rows[name(i)]["footprint_bytes"] for i in range(1, 7)]
    assert all(m >= fleet.artifact_bytes for m in measured), measured  # the documented floor
    return int(SLOTS * statistics.median(measured))


# --- 4. start-up --------------------------------------------------------------------------------


@dataclass
class StartUp:
    server: ServerProcess
    cache: Path
    model_ready: httpx.Response  # GET /v2/models/m07/ready as soon as /v2/health/ready was 200


@pytest.fixture(scope="module")
def started(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartUp]:
    """An on-demand server that nothing asks to infer: its tests only read."""
    base = tmp_path_factory.mktemp("startup")
    server = start_server(
        fleet.url, base, "--load", "on-demand", "--cache-dir", str(base / "cache"), grpc=False
    )  # returns once /v2/health/ready is 200
    try:
        yield StartUp(server, base / "cache", httpx.get(f"{server.url}/v2/models/m07/ready"))
    finally:
        server.stop()


def test_on_demand_start_up_is_ready_without_loading_anything(started: StartUp) -> None:
    server = started.server
    text = metrics(server)
    assert metric(text, "inferplane_model_loads_total") == 0
    assert metric(text, "inferplane_models_resident") == 0
    states = index_states(server)
    assert sorted(states) == [name(i) for i in range(N_MODELS)]
    assert {state for state, _ in states.values()} == {"UNLOADED"}, Counter(states.values())
    report = residency(server)
    assert report["load"] == "on-demand" and report["resident_bytes"] == 0
    assert len(report["versions"]) == N_MODELS
    assert {row["state"] for row in report["versions"]} == {"UNLOADED"}

    # metadata and config come from model.yaml alone; a loadable version is ready
    meta = httpx.get(f"{server.url}/v2/models/m08")
    assert meta.status_code == 200, meta.text
    assert meta.json()["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 9]}]
    config = httpx.get(f"{server.url}/v2/models/m09/config")
    assert config.status_code == 200, config.text
    assert config.json()["input"][0]["dims"] == [-1, 10]
    ready = httpx.get(f"{server.url}/v2/models/m08/versions/1/ready")  # (see the next test)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert metric(metrics(server), "inferplane_model_loads_total") == 0
    assert {state for state, _ in index_states(server).values()} == {"UNLOADED"}
    assert not list(started.cache.rglob("*.onnx")), "an artifact was fetched without a request"


def test_a_listed_model_is_ready_as_soon_as_the_server_is(started: StartUp) -> None:
    answer = started.model_ready
    assert answer.status_code == 200 and answer.json() == {"name": "m07", "ready": True}, (
        answer.status_code,
        answer.text,
    )


# --- 5. cold requests share one load ------------------------------------------------------------


def test_concurrent_cold_requests_share_one_load(
    fleet: Fleet, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    http = _need("tritonclient.http", "tritonclient[http]")
    server = serve(servers, fleet.url, tmp_path, "--load", "on-demand")
    index, concurrency = 13, 16
    client = http.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=concurrency)
    try:
        pending = []
        for k in range(concurrency):
            body, expected = request(index, rows=1, seed=k)
            tensor = http.InferInput("input", [1, index + 1], "FP32")
            tensor.set_data_from_numpy(np.asarray(body["inputs"][0]["data"], np.float32))
            pending.append((client.async_infer(name(index), [tensor]), expected))
        for future, expected in pending:
            result = future.get_result(timeout=60)
            assert result.as_numpy("output").ravel().tolist() == expected
    finally:
        client.close()

    text = metrics(server)
    assert metric(text, "inferplane_model_loads_total", model=name(index)) == 1
    assert metric(text, "inferplane_model_loads_total") == 1
    assert metric(text, "inferplane_model_loads_total", reason="first_use") == 1
    assert rows_by_name(residency(server))[name(index)]["loads"] == 1
    assert len(log_lines(server, rf"model {name(index)} version 1 ready in")) == 1


# --- 1. traffic over 50 models under a budget that fits about 5 ---------------------------------

THREADS = 4  # fewer than the slots: see fleet_traffic
REQUESTS_PER_THREAD = 100
EXHAUSTED = "memory budget exhausted"


@dataclass
class TrafficRun:
    budget: int
    first_pass: list[tuple[int, int, bool, str]]  # (model, status, correct, body if not)
    outcomes: list[tuple[int, int, bool, str]]
    samples: list[dict[str, Any]]  # resident bytes (report and metric) and states, every ~20 ms
    metrics: str
    log: str
    report: dict[str, Any]
    cache_entries: int


@pytest.fixture(scope="module")
def fleet_traffic(
    fleet: Fleet, fleet_budget: int, tmp_path_factory: pytest.TempPathFactory
) -> TrafficRun:
    """Random traffic over all 50 models from THREADS threads under a budget of SLOTS
    footprints, with /inferplane/models and /metrics sampled throughout.

    First every model is asked once, one request at a time: each artifact comes from S3 once
    and every later load is a reload from the artifact cache. Then THREADS threads send
    REQUESTS_PER_THREAD requests each, to random models with 1-3 rows.

    Why fewer threads than slots: a version that is loading, or has a request waiting or
    running, is never evicted, and a cold request that finds no room among the others gets 503
    at once (docs/serving.md). Each thread has one request in flight, so with fewer threads than
    slots every cold request can find room; with 8 threads and 5 slots 503s are the documented
    answer.
    """
    base = tmp_path_factory.mktemp("traffic")
    server = start_server(
        fleet.url,
        base,
        "--load",
        "on-demand",
        "--memory-budget",
        str(fleet_budget),
        "--cache-dir",
        str(base / "cache"),
        grpc=False,
    )
    try:
        first_pass = []
        with httpx.Client(base_url=server.url) as client:
            for i in range(N_MODELS):
                answer = infer(client, i)
                good = correct(answer, i)
                first_pass.append((i, answer.status_code, good, "" if good else answer.text))

        samples: list[dict[str, Any]] = []
        stop = threading.Event()

        def sample() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not stop.is_set():
                    report = client.get("/inferplane/models").json()
                    text = client.get("/metrics").text
                    samples.append(
                        {
                            "resident": report["resident_bytes"],
                            "metric": metric(text, "inferplane_resident_bytes"),
                            "states": Counter(r["state"] for r in report["versions"]),
                        }
                    )
                    time.sleep(0.02)

        outcomes: list[tuple[int, int, bool, str]] = []
        lock = threading.Lock()

        def traffic(seed: int) -> None:
            rnd = random.Random(seed)
            with httpx.Client(base_url=server.url) as client:
                for k in range(REQUESTS_PER_THREAD):
                    index, rows, tag = rnd.randrange(N_MODELS), rnd.randint(1, 3), seed * 1000 + k
                    answer = infer(client, index, rows, seed=tag)
                    good = correct(answer, index, rows, seed=tag)
                    with lock:
                        outcomes.append(
                            (index, answer.status_code, good, "" if good else answer.text[:300])
                        )

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(traffic, range(THREADS)))
        finally:
            stop.set()
            sampler.join(10)
        return TrafficRun(
            budget=fleet_budget,
            first_pass=first_pass,
            outcomes=outcomes,
            samples=samples,
            metrics=metrics(server),
            log=server.log(),
            report=residency(server),
            cache_entries=len(list((base / "cache").rglob("model.onnx"))),
        )
    finally:
        server.stop()


def test_traffic_over_50_models_under_a_budget_that_fits_5(fleet_traffic: TrafficRun) -> None:
    run = fleet_traffic
    everything = run.first_pass + run.outcomes
    assert len(run.outcomes) == THREADS * REQUESTS_PER_THREAD
    # every answer is the right model's; a refusal is only ever the budget's documented 503
    wrong = [o for o in everything if o[1] == 200 and not o[2]]
    assert not wrong, wrong[:5]
    other = [o for o in everything if o[1] != 200 and not (o[1] == 503 and EXHAUSTED in o[3])]
    assert not other, other[:5]
    asked = {index for index, *_ in run.outcomes}
    answered = {index for index, status, *_ in run.outcomes if status == 200}
    assert len(asked) >= 45, f"the traffic asked {len(asked)} models"  # ~always all 50
    assert len(answered) > N_MODELS // 2, f"{len(answered)} models answered"

    # resident bytes never above the budget, as the report and the metric say
    assert len(run.samples) > 5
    worst = max(max(s["resident"], s["metric"]) for s in run.samples)
    assert worst <= run.budget, (worst, run.budget)
    assert run.report["resident_bytes"] <= run.budget
    assert any(s["states"]["EVICTED"] for s in run.samples)
    assert metric(run.metrics, "inferplane_memory_budget_bytes") == run.budget

    evictions = metric(run.metrics, "inferplane_model_evictions_total", reason="memory")
    assert evictions > 0
    evicted = re.findall(r"evicting model m\d\d version 1 \(memory budget;", run.log)
    assert len(evicted) == evictions
    # each artifact came from S3 at most once (into the cache); the reloads read the cache
    assert run.cache_entries == N_MODELS
    assert metric(run.metrics, "inferplane_model_load_seconds_count", source="remote") <= N_MODELS
    assert metric(run.metrics, "inferplane_model_load_seconds_count", source="cache") > 0
    assert metric(run.metrics, "inferplane_model_loads_total", reason="after_eviction") > 0


def test_traffic_under_a_budget_that_fits_5_gets_no_5xx(fleet_traffic: TrafficRun) -> None:
    run = fleet_traffic
    refused = [o for o in run.first_pass + run.outcomes if o[1] >= 500]
    assert not refused, (
        f"{len(refused)} of {len(run.first_pass) + len(run.outcomes)} requests refused, budget "
        f"{run.budget / MIB:.1f} MiB; first: {refused[:3]}"
    )


# --- 2. a budget nothing can be evicted from ----------------------------------------------------


def test_a_budget_held_by_unevictable_versions_answers_503_at_once(
    fleet: Fleet, fleet_budget: int, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """Versions loaded through the repository API are never evicted: once they hold the budget,
    a model that needs more than what is left is refused at once, and they keep serving."""
    server = serve(
        servers, fleet.url, tmp_path, "--load", "on-demand", "--memory-budget", str(fleet_budget)
    )
    held: list[int] = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # hold versions until the budget refuses one: that one needs more than is left, and
        # everything in memory is held
        for i in range(N_MODELS):
            answer = client.post(f"/v2/repository/models/{name(i)}/load")
            if answer.status_code == 200:
                held.append(i)
                continue
            assert answer.status_code == 400 and EXHAUSTED in answer.json()["error"], answer.text
            target = i
            break
        else:
            pytest.fail(f"the budget ({fleet_budget / MIB:.1f} MiB) held all {N_MODELS} models")
        report = residency(server)
        assert held, report
        loaded = [r for r in report["versions"] if r["state"] == "READY"]
        assert sorted(r["name"] for r in loaded) == [name(i) for i in held]
        assert all(r["held"] for r in loaded)

        for _ in range(2):
            started = time.perf_counter()
            refused = infer(client, target)
            took = time.perf_counter() - started
            assert refused.status_code == 503, refused.text
            assert EXHAUSTED in refused.json()["error"]
            assert took < 0.5, f"the refusal took {took:.2f} s"
        for i in held:  # the held versions keep serving
            assert correct(infer(client, i, seed=i), i, seed=i)
        assert metric(metrics(server), "inferplane_model_evictions_total") == 0
        assert rows_by_name(residency(server))[name(target)]["state"] != "FAILED"
        assert httpx.get(f"{server.url}/v2/models/{name(target)}/ready").status_code == 200
        # not a failure: once room frees up the version loads
        for i in held:
            assert client.post(f"/v2/repository/models/{name(i)}/unload").status_code == 200
        assert residency(server)["resident_bytes"] == 0
        answer = infer(client, target)
        assert correct(answer, target), answer.text


def test_a_refused_repository_load_does_not_hold_the_version_later(
    fleet: Fleet, fleet_budget: int, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    budget = int(fleet_budget / SLOTS * 3)  # three footprints, as the probe measured them
    server = serve(
        servers, fleet.url, tmp_path, "--load", "on-demand", "--memory-budget", str(budget)
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        infer(client, 0)  # the process's one-time ONNX Runtime start-up goes to m00, not held
        held = []
        for i in range(1, N_MODELS):
            answer = client.post(f"/v2/repository/models/{name(i)}/load")
            if answer.status_code != 200:
                break
            held.append(i)
        else:
            pytest.fail("the budget held every model")
        assert answer.status_code == 400 and EXHAUSTED in answer.json()["error"], answer.text
        for k in held:
            assert client.post(f"/v2/repository/models/{name(k)}/unload").status_code == 200
        served = infer(client, i)  # a plain request, after the refused load
        assert correct(served, i), served.text
        row = rows_by_name(residency(server))[name(i)]
        assert row["state"] == "READY"
        assert not row["held"], row


# --- 3. idle unload -----------------------------------------------------------------------------


def test_idle_unload_and_reload_on_the_next_request(
    fleet: Fleet, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    server = serve(servers, fleet.url, tmp_path, "--load", "on-demand", "--idle-unload-s", "1")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        asked = time.monotonic()  # the server's last use of m05 is after this
        assert correct(infer(client, 5), 5)

        def evicted() -> dict[str, Any] | None:
            row = rows_by_name(residency(server))["m05"]
            return row if row["state"] == "EVICTED" else None

        row = wait_for(evicted, 10, "m05 unloaded after 1 s idle")
        assert time.monotonic() - asked >= 1.0
        assert row["reason"] == "evicted: idle" and row["reserved_bytes"] == 0
        assert index_states(server)["m05"] == ("EVICTED", "evicted: idle")
        text = metrics(server)
        assert metric(text, "inferplane_model_evictions_total", reason="idle") == 1
        assert metric(text, "inferplane_models_resident") == 0
        assert len(log_lines(server, r"evicting model m05 version 1 \(idle past 1 s")) == 1

        # 8. the CLI prints the states
        listed = ok(cli("models", "list", "--server", server.url))
        assert table_row(listed, "m05")[1:3] == ["1", "EVICTED"]
        assert table_row(listed, "m06")[1:3] == ["1", "UNLOADED"]
        assert "0 versions loaded" in listed and "load: on-demand" in listed

        assert correct(infer(client, 5, rows=2, seed=7), 5, rows=2, seed=7)
    text = metrics(server)
    assert metric(text, "inferplane_model_loads_total", model="m05", reason="after_idle") == 1
    assert metric(text, "inferplane_model_load_seconds_count", source="cache") == 1
    row = rows_by_name(residency(server))["m05"]
    assert row["state"] == "READY" and row["loads"] == 2 and row["last_load_source"] == "cache"


# --- 6. a failed load ---------------------------------------------------------------------------


def test_a_tampered_artifact_fails_once_with_the_reason_and_others_keep_serving(
    moto_s3: Any, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    import s3fs

    url = f"s3://{moto_s3.new_bucket('tampered')}/models"
    paths = {
        i: write_fleet_model(tmp_path / "src" / name(i) / "model.onnx", i, 1024) for i in (1, 2, 3)
    }
    register_all(url, [(name(i), p, {}) for i, p in paths.items()])
    # someone rewrites m02's artifact in the bucket after registration: the sha256 in model.yaml
    # no longer matches
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(
        f"{url}/m02/1/model.onnx", Path(paths[1]).read_bytes()
    )
    server = serve(servers, url, tmp_path, "--load", "on-demand")

    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert correct(infer(client, 1), 1)
        failed = infer(client, 2)
        assert failed.status_code == 503, failed.text
        error = failed.json()["error"]
        assert "model 'm02' version 1 failed to load" in error and "sha256" in error, error
        assert "tampered" in error
        assert int(failed.headers["retry-after"]) >= 1
        started = time.perf_counter()
        again = infer(client, 2)
        assert time.perf_counter() - started < 0.5
        assert again.status_code == 503 and "sha256" in again.json()["error"]
        assert int(again.headers["retry-after"]) >= 1
        assert correct(infer(client, 3), 3)  # the others keep serving
        assert correct(infer(client, 1, seed=2), 1, seed=2)
    assert len(log_lines(server, r"model m02 version 1 failed to load")) == 1
    state, reason = index_states(server)["m02"]
    assert state == "FAILED" and "sha256" in reason
    assert httpx.get(f"{server.url}/v2/models/m02/ready").status_code == 503
    assert metric(metrics(server), "inferplane_model_loads_total", model="m02") == 0

    # 8. the CLI prints the states, the reason with them
    listed = ok(cli("models", "list", "--server", server.url))
    assert table_row(listed, "m01")[1:3] == ["1", "READY"]
    assert table_row(listed, "m02")[1:3] == ["1", "FAILED"]
    assert "sha256" in table_row(listed, "m02")[-1]
    assert "2 versions loaded" in listed


# --- 7. worker processes count ------------------------------------------------------------------


def _children_pss(pid: int) -> dict[int, int]:
    """The server's spawned worker processes: pid -> proportional set size (bytes)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" not in cmdline:
                continue  # e.g. multiprocessing's resource tracker
            for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    found[int(child)] = int(line.split()[1]) * 1024
    return found


def test_a_process_instance_model_is_budgeted_with_its_workers(
    moto_s3: Any, tmp_path: Path, servers: list[ServerProcess]
) -> None:
    joblib = _need("joblib", "joblib")
    linear = _need("sklearn.linear_model", "scikit-learn")
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("needs /proc/<pid>/smaps_rollup (Linux)")
    model = linear.LinearRegression().fit([[0, 0, 0, 0], [1, 2, 3, 4], [2, 1, 0, 1]], [0, 10, 4])
    joblib.dump(model, tmp_path / "linear.joblib")
    url = f"s3://{moto_s3.new_bucket('workers')}/models"
    artifact = str(tmp_path / "linear.joblib")
    register_all(
        url,
        [
            ("inproc", artifact, {"instance_kind": "thread", "instances": 1}),
            ("workers", artifact, {"instance_kind": "process", "instances": 2}),
        ],
    )
    server = serve(
        servers,
        url,
        tmp_path,
        "--load",
        "on-demand",
        "--pickles",
        "allow",
        "--memory-budget",
        "2GiB",
    )
    feed = {"name": "input", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for model_name in ("inproc", "workers"):  # in-process first: it pays sklearn's import
            answer = client.post(f"/v2/models/{model_name}/infer", json={"inputs": [feed]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"][0]["data"] == pytest.approx([10.0])
    rows = rows_by_name(residency(server))
    workers = _children_pss(server.process.pid)
    assert len(workers) == 2, workers
    assert rows["workers"]["footprint_bytes"] > rows["inproc"]["footprint_bytes"], rows
    # at least what the two workers hold now (PSS moves a little as pages are shared or touched)
    assert rows["workers"]["footprint_bytes"] >= 0.9 * sum(workers.values()), (rows, workers)
    assert rows["workers"]["reserved_bytes"] == rows["workers"]["footprint_bytes"]
    assert residency(server)["resident_bytes"] == sum(r["reserved_bytes"] for r in rows.values())
    assert log_lines(
        server, r"model workers version 1 ready in .* executions on 2 worker processes"
    )
