#!/usr/bin/env python3
"""A large catalogue under a memory budget (issue 14): 1,000 small ONNX models in S3, served on demand.

    .venv/bin/python benchmarks/fleet_bench.py [--models 1000] [--seconds 60] [--concurrency 16]

1. catalogue: N MLPs (FP32 [N, 32] -> 16384 relu -> 4, one seed each: same signature, ~2.3 MB
   per file), built once into .bench/fleet/ and reused;
2. repository: a real `moto_server` on loopback (the test fixture's way: AWS_ENDPOINT_URL and test
   credentials in the environment of every process); the first model is registered with
   `inferplane models register ... --repository s3://fleet/models`, the others with the Python
   API (`inferplane.repository.register.register`) in a process pool;
3. budget: `--resident` models' worth (default N/10, at least 2 x concurrency): one model's worth is the median of the
   footprints the server measured for 9 models it loaded eagerly (GET /inferplane/models);
4. start-up: `inferplane serve --repository s3://... --load on-demand --memory-budget B
   --cache-dir <empty>`; seconds from the process start to /v2/health/ready 200 and to
   POST /v2/repository/index listing all N; then its idle RSS/PSS (with child processes);
5. traffic: Zipf(s) over the N models (rank 1 = model 0) at concurrency C for --seconds after a
   --warmup, HTTP/JSON V2 infer with an httpx async client; /metrics and the server's RSS are
   sampled every second. The same client drives a reference server holding only model 0 (the
   hottest): closed loop at the same concurrency before, and after paced at the catalogue run's
   request rate (the same traffic without the catalogue: the warm-latency ratio);
6. peer: MLServer 1.7.1 (the shared harness's venv, repository writer and ONNX runtime) with
   --compare-models models of the same kind, which it loads at start; inferplane eager with the
   same files beside it. Start-up time and idle memory.

Cold or warm: the server does not say per request. /metrics is sampled every second; when the
load counter of a model (`inferplane_model_loads_total`, summed per model) rose by k between two
samples, k loads happened in that interval and each had a request of that model waiting for it:
of the answered requests to that model overlapping the interval (widened by --slack seconds each
side), the k slowest are *cold*, and so is any other one slower than the p99 of the requests that
no load overlapped (warm for certain; with fewer than 100 of them, the 1-model server's p99). The
rest of those overlapping requests were warm but are counted apart ("load overlapped, fast"). A
cold request came from S3 when its model had never been loaded before (the cache folder starts
empty and is never trimmed), from the cache otherwise; the server's own
`inferplane_model_load_seconds{source}` histogram is reported beside it. Hit ratio = answered
requests not cold / all requests (a failed one is a miss), with the bounds warm-for-certain /
requests and 1 - loads / requests.

Writes benchmarks/results/fleet-<date>.{json,md,png}; raw per-request rows and the server logs
stay in .bench/fleet/out/<date>/. See benchmarks/README.md ("Many models").
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import contextlib
import datetime
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import batch_bench  # sibling modules (benchmarks/ is not a package)
import host
import report
import run as peer_bench
import stream_bench

if TYPE_CHECKING:
    import httpx

log = peer_bench.log  # progress lines with the elapsed time, and bench.log
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".bench" / "fleet"
VENV_BIN = Path(sys.executable).parent
FEATURES, HIDDEN, OUTPUTS = 32, 16384, 4  # 2.3 MB of weights per model
BUCKET = "fleet"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
RSS_HEADROOM = 250 * 2**20  # issue 14: server RSS <= budget + 250 MiB
WARM_RATIO_TARGET = 1.2
CALIBRATION = 9  # models a server loads eagerly to measure one model's footprint
METRIC_PREFIXES = (
    "inferplane_model_load",
    "inferplane_model_evictions",
    "inferplane_models_",
    "inferplane_resident",
    "inferplane_memory_budget",
    "inferplane_model_ready",
)
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def model_name(i: int) -> str:
    return f"fleet-{i:04d}"


# --- the catalogue ------------------------------------------------------------------------------


def write_mlp(path: Path, seed: int) -> None:
    """input FP32 [N, FEATURES] -> MatMul -> Relu -> MatMul -> output FP32 [N, OUTPUTS]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "w0": rng.standard_normal((FEATURES, HIDDEN), dtype=np.float32) * np.sqrt(2 / FEATURES),
        "w1": rng.standard_normal((HIDDEN, OUTPUTS), dtype=np.float32) * np.sqrt(2 / HIDDEN),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w0"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w1"], ["output"]),
        ],
        f"fleet_{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, OUTPUTS])],
        [numpy_helper.from_array(w.astype(np.float32), k) for k, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def build_catalogue(n: int) -> list[Path]:
    """N model files under .bench/fleet/models-<shape>/ (kept: the seeds make them identical)."""
    folder = WORK / f"models-{FEATURES}x{HIDDEN}x{OUTPUTS}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{model_name(i)}.onnx" for i in range(n)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    for k, i in enumerate(todo, 1):
        write_mlp(paths[i], seed=20261203 + i)
        if k % 100 == 0 or k == len(todo):
            log(f"catalogue: built {k}/{len(todo)} model files in {folder}")
    return paths


def _register_one(job: tuple[str, str, str]) -> str:
    """Process-pool worker: one version through the Python API (what the CLI calls)."""
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    url, name, path = job
    register(Repository(url), name, path)
    return name


def register_catalogue(url: str, paths: list[Path], workers: int) -> dict[str, Any]:
    """Model 0 with the CLI (the user's path), the rest with the API in a process pool."""
    t0 = time.monotonic()
    cli = [
        str(VENV_BIN / "inferplane"),
        "models",
        "register",
        model_name(0),
        str(paths[0]),
        "--repository",
        url,
    ]
    done = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cli)}` failed:\n{done.stdout}{done.stderr}")
    cli_s = time.monotonic() - t0
    jobs = [(url, model_name(i), str(p)) for i, p in enumerate(paths) if i > 0]
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        for k, _ in enumerate(pool.map(_register_one, jobs, chunksize=4), 2):
            if k % 100 == 0 or k == len(paths):
                log(f"registered {k}/{len(paths)} in {url} ({time.monotonic() - t0:.0f} s)")
    return {
        "cli": " ".join(cli[1:]),
        "cli_s": round(cli_s, 2),
        "api_workers": workers,
        "total_s": round(time.monotonic() - t0, 1),
    }


@contextlib.contextmanager
def moto_s3(logs: Path) -> Iterator[str]:
    """A moto_server on loopback with a bucket; the environment points fsspec/s3fs (here and in
    every child process) at it while it runs."""
    port = host.free_port()
    exe = VENV_BIN / "moto_server"
    cmd = (
        [str(exe), "-H", "127.0.0.1", "-p", str(port)]
        if exe.exists()
        else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    )
    with stream_bench.process(cmd, logs / "moto_server.log") as proc:
        stream_bench.wait_port(port, proc, "moto_server")
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        yield f"s3://{BUCKET}/models"


# --- servers, metrics, memory ---------------------------------------------------------------------


def scrape(client: httpx.Client, base: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The /metrics samples whose names start with METRIC_PREFIXES: name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in client.get(f"{base}/metrics", timeout=10).text.splitlines():
        if not line.startswith(METRIC_PREFIXES):
            continue
        m = _SAMPLE.match(line)
        if m:
            labels = dict(_LABEL.findall(m.group(2) or ""))
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def metric_sum(metrics: dict[str, Any], name: str, **match: str) -> float | None:
    rows = [
        v
        for labels, v in metrics.get(name, [])
        if all(labels.get(k) == w for k, w in match.items())
    ]
    return sum(rows) if rows else None


def per_model(metrics: dict[str, Any], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in metrics.get(name, []):
        if "model" in labels:
            out[labels["model"]] = out.get(labels["model"], 0.0) + v
    return out


def load_buckets(metrics: dict[str, Any]) -> dict[str, dict[float, float]]:
    """inferplane_model_load_seconds histogram: source -> {upper bound: cumulative count}."""
    out: dict[str, dict[float, float]] = {}
    for labels, v in metrics.get("inferplane_model_load_seconds_bucket", []):
        by_le = out.setdefault(labels.get("source", "?"), {})
        le = float(labels["le"])
        by_le[le] = by_le.get(le, 0.0) + v
    return out


def hist_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets (linear within a bucket)."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return None
    rank, prev_le, prev_n = q * buckets[les[-1]], 0.0, 0.0
    for le in les:
        n = buckets[le]
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-12)
        prev_le, prev_n = le, n
    return prev_le


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of `pid` and all its descendants, read once."""
    mem = batch_bench.TreeMemory(pid)
    pids = mem._tree()
    rss = sum(mem._field(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(mem._field(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return rss * 1024, pss * 1024


@dataclass
class Sample:
    t: float  # seconds since the fleet server was started
    rss: int
    pss: int
    resident_bytes: float | None = None
    models_resident: float | None = None
    models_ready: float | None = None
    budget: float | None = None
    loads: dict[str, float] = field(default_factory=dict)  # per model, all versions and reasons


class Sampler(threading.Thread):
    """Every `interval` s: the server tree's memory and its residency metrics."""

    def __init__(self, pid: int, base: str, origin: float, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.base, self.origin, self.interval = pid, base, origin, interval
        self.samples: list[Sample] = []
        self.stop = threading.Event()

    def take(self, client: httpx.Client) -> Sample:
        import httpx

        t = time.monotonic() - self.origin
        s = Sample(t, *tree_memory(self.pid))
        try:
            m = scrape(client, self.base)
        except httpx.HTTPError:
            return s
        s.resident_bytes = metric_sum(m, "inferplane_resident_bytes")
        s.models_resident = metric_sum(m, "inferplane_models_resident")
        s.models_ready = metric_sum(m, "inferplane_model_ready")
        s.budget = metric_sum(m, "inferplane_memory_budget_bytes")
        s.loads = per_model(m, "inferplane_model_loads_total")
        return s

    def run(self) -> None:
        import httpx

        with httpx.Client() as client:
            while not self.stop.is_set():
                self.samples.append(self.take(client))
                self.stop.wait(self.interval)


def inferplane_cmd(repo: str, port: int, *extra: str) -> list[str]:
    return [
        str(VENV_BIN / "inferplane"),
        "serve",
        "--repository",
        repo,
        "--http-port",
        str(port),
        "--grpc-port",
        "0",
        "--log-level",
        "warning",
        "--audit-sink",
        "none",
        *extra,
    ]


def start_up(
    proc: subprocess.Popen[bytes], base: str, names: set[str], t0: float, timeout: float
) -> dict[str, Any]:
    """Seconds from `t0` (just before the process started) to ready and to an index listing every
    name in `names`, then the idle memory of the process tree."""
    import httpx

    ready_s = index_s = None
    states: Counter[str] = Counter()
    with httpx.Client(timeout=30) as client:
        while index_s is None or ready_s is None:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode} during start-up")
            if time.monotonic() - t0 > timeout:
                raise SystemExit(
                    f"the server was not ready with all {len(names)} models "
                    f"listed within {timeout:.0f} s"
                )
            try:
                if ready_s is None and client.get(f"{base}/v2/health/ready").status_code == 200:
                    ready_s = time.monotonic() - t0
                if index_s is None:
                    rows = client.post(f"{base}/v2/repository/index", json={}).json()
                    listed = (
                        {r["name"]: r.get("state", "") for r in rows}
                        if isinstance(rows, list)
                        else {}
                    )
                    if names <= set(listed):
                        index_s = time.monotonic() - t0
                        states = Counter(listed[n] for n in names)
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.05)
    time.sleep(2)  # settle: what is left once start-up work is done
    rss, pss = tree_memory(proc.pid)
    return {
        "ready_s": round(ready_s, 2),
        "index_s": round(index_s, 2),
        "index_states": dict(states),
        "idle_rss_bytes": rss,
        "idle_pss_bytes": pss,
    }


# --- traffic --------------------------------------------------------------------------------------


def infer_body(seed: int = 7) -> bytes:
    data = [round(random.Random(seed).uniform(-1, 1), 4) for _ in range(FEATURES)]
    return json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, FEATURES], "data": data}]}
    ).encode()


def zipf_cdf(n: int, s: float) -> list[float]:
    weights = [k**-s for k in range(1, n + 1)]
    total = sum(weights)
    return [c / total for c in itertools.accumulate(weights)]


Row = tuple[
    int, float, float, int, str
]  # model index, start (s since origin), latency s, status, error


@dataclass(frozen=True)
class Load:
    """Who is driven and how: `cdf` picks the model (None: model 0 only), `concurrency` workers;
    closed loop, or paced at `rate` requests/s in all (a late answer is not caught up on)."""

    base: str
    n_models: int
    cdf: list[float] | None
    concurrency: int
    rate: float | None = None


async def _drive(load: Load, seconds: float, seed: int, origin: float, rows: list[Row]) -> None:
    import httpx

    urls = [f"{load.base}/v2/models/{model_name(i)}/infer" for i in range(load.n_models)]
    body, headers = infer_body(), {"content-type": "application/json"}
    c = load.concurrency
    begin = time.monotonic()
    deadline, slots = begin + seconds, itertools.count()
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def worker(w: int) -> None:
            rng = random.Random(seed * 1009 + w)
            cdf, last = load.cdf, load.n_models - 1
            while time.monotonic() < deadline:
                if load.rate:
                    await asyncio.sleep(
                        max(0.0, begin + next(slots) / load.rate - time.monotonic())
                    )
                i = min(bisect.bisect(cdf, rng.random()), last) if cdf else 0
                t = time.monotonic()
                status, error = 0, ""
                try:
                    status = (await client.post(urls[i], content=body, headers=headers)).status_code
                except httpx.HTTPError as exc:
                    error = type(exc).__name__
                rows.append((i, t - origin, time.monotonic() - t, status, error))

        await asyncio.gather(*(worker(w) for w in range(c)))


def drive(
    load: Load, seconds: float, seed: int, origin: float = 0.0, rows: list[Row] | None = None
) -> list[Row]:
    """Closed-loop traffic for `seconds`; the rows are appended to `rows` as they complete."""
    rows = [] if rows is None else rows
    try:
        import uvloop

        uvloop.run(_drive(load, seconds, seed, origin, rows))
    except ImportError:
        asyncio.run(_drive(load, seconds, seed, origin, rows))
    return rows


def progress(rows: list[Row], sampler: Sampler, seconds: float, stop: threading.Event) -> None:
    """A line every 5 s while the traffic runs."""
    t0 = time.monotonic()
    while not stop.wait(5):
        s = sampler.samples[-1] if sampler.samples else None
        done = list(rows)
        errors = sum(1 for r in done if r[3] != 200)
        resident = "-" if s is None or s.models_resident is None else f"{s.models_resident:.0f}"
        rb = "-" if s is None or s.resident_bytes is None else f"{s.resident_bytes / 2**20:.0f} MiB"
        rss = "-" if s is None else f"{s.rss / 2**20:.0f} MiB"
        el = time.monotonic() - t0
        log(
            f"  traffic {el:4.0f}/{seconds:.0f} s: {len(done):,} requests "
            f"({len(done) / max(el, 1e-9):,.0f}/s), {errors} errors, resident {resident} "
            f"models / {rb}, RSS {rss}"
        )


# --- analysis -------------------------------------------------------------------------------------


def classify(
    rows: list[Row], samples: list[Sample], slack: float, reference_p99: float
) -> tuple[list[str], dict[str, Any]]:
    """Per request: warm | possible (a load of its model overlapped it, but it was not slow) |
    cold-cache | cold-remote | failed; and what the classification rested on.

    Each rise of a model's load counter by k between two samples is a set of k loads, each waited
    for by at least one request of that model overlapping the interval (widened by `slack`): the
    k slowest such requests are cold, and so is any other one slower than "slow" (the p99 of the
    requests no load overlapped; with fewer than 100 of those, the 1-model server's p99)."""
    have = [s for s in samples if s.loads or s.models_ready is not None]
    rises: list[tuple[int, float, float, float, int]] = []  # model, from, to, count before, loads
    index = {model_name(i): i for i in range(max((r[0] for r in rows), default=0) + 1)}
    for a, b in itertools.pairwise(have):
        for name, count in b.loads.items():
            before = a.loads.get(name, 0.0)
            if count > before and name in index:
                rises.append((index[name], a.t - slack, b.t + slack, before, round(count - before)))
    by_model: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        if r[3] == 200:
            by_model.setdefault(r[0], []).append(j)

    def overlapping(m: int, lo: float, hi: float) -> list[int]:
        return [j for j in by_model.get(m, ()) if rows[j][1] < hi and rows[j][1] + rows[j][2] > lo]

    kinds = ["warm" if r[3] == 200 else "failed" for r in rows]
    for m, lo, hi, _before, _k in rises:
        for j in overlapping(m, lo, hi):
            kinds[j] = "possible"
    sure_warm = [rows[j][2] for j, k in enumerate(kinds) if k == "warm"]
    own = len(sure_warm) >= 100
    threshold = stream_bench.percentile(sure_warm, 99) if own else reference_p99
    for m, lo, hi, before, k in sorted(rises, key=lambda x: x[1]):
        source = "cold-remote" if before == 0 else "cold-cache"
        free = [j for j in overlapping(m, lo, hi) if kinds[j] == "possible"]
        for n, j in enumerate(sorted(free, key=lambda j: -rows[j][2])):
            if n < k or rows[j][2] > threshold:
                kinds[j] = source
    return kinds, {
        "loads_counter_exported": any(s.loads for s in have),
        "slow_threshold_ms": round(threshold * 1e3, 3),
        "slow_threshold_from": "no-load-overlapped p99" if own else "1-model server p99",
        "slack_s": slack,
    }


def stats_ms(lat_s: list[float]) -> dict[str, Any]:
    if not lat_s:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {
        "n": len(lat_s),
        "p50_ms": round(stream_bench.percentile(lat_s, 50) * 1e3, 3),
        "p99_ms": round(stream_bench.percentile(lat_s, 99) * 1e3, 3),
    }


def cdf_ms(lat_s: list[float], points: int = 101) -> list[float]:
    """Latency (ms) at quantiles 0, 1/(points-1), ..., 1: the figure's distribution, compact."""
    if not lat_s:
        return []
    import numpy as np

    return [
        round(float(x) * 1e3, 4) for x in np.quantile(np.asarray(lat_s), np.linspace(0, 1, points))
    ]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def analyse(
    rows: list[Row],
    references: tuple[list[Row], list[Row]],
    samples: list[Sample],
    before: dict[str, Any],
    after: dict[str, Any],
    t_traffic: float,
    slack: float,
) -> dict[str, Any]:
    ref, closed = ([r[2] for r in got if r[3] == 200] for got in references)
    kinds, basis = classify(rows, samples, slack, stream_bench.percentile(ref, 99))
    ok = [(r, k) for r, k in zip(rows, kinds, strict=True) if r[3] == 200]
    by_kind = {
        k: [r[2] for r, kk in ok if kk == k]
        for k in ("warm", "possible", "cold-cache", "cold-remote")
    }
    warm_all = by_kind["warm"] + by_kind["possible"]
    warm_top = [r[2] for r, k in ok if k in ("warm", "possible") and r[0] == 0]
    n = len(rows)
    loads = (metric_sum(after, "inferplane_model_loads_total") or 0) - (
        metric_sum(before, "inferplane_model_loads_total") or 0
    )
    evictions = {}
    for labels, v in after.get("inferplane_model_evictions_total", []):
        reason = labels.get("reason", "?")
        was = metric_sum(before, "inferplane_model_evictions_total", reason=reason) or 0.0
        evictions[reason] = v - was
    server_load = {}
    b0, b1 = load_buckets(before), load_buckets(after)
    for src, buckets in b1.items():
        delta = {le: c - b0.get(src, {}).get(le, 0.0) for le, c in buckets.items()}
        p50, p99 = hist_quantile(delta, 0.5), hist_quantile(delta, 0.99)
        server_load[src] = {
            "loads": delta.get(float("inf"), 0.0),
            "p50_ms": None if p50 is None else round(p50 * 1e3, 2),
            "p99_ms": None if p99 is None else round(p99 * 1e3, 2),
        }
    errors = Counter(f"HTTP {r[3]}" if r[3] else r[4] for r in rows if r[3] != 200)
    during = [s for s in samples if s.t >= t_traffic]
    rss_max = max((s.rss for s in during), default=None)
    resident = [s.resident_bytes for s in during if s.resident_bytes is not None]
    held = [s.models_resident for s in during if s.models_resident is not None]
    span = max((r[1] + r[2] for r in rows), default=0) - min((r[1] for r in rows), default=0)
    fleet_warm, fleet_top, reference = stats_ms(warm_all), stats_ms(warm_top), stats_ms(ref)
    return {
        "requests": n,
        "throughput_rps": round(n / span, 1) if span else None,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "classification": basis,
        "requests_by_kind": {k: len(v) for k, v in by_kind.items()},
        # hits: answered requests that found the model loaded; a failed request is a miss
        "hit_ratio": round(len(warm_all) / n, 4) if n else None,
        "hit_ratio_low": round(len(by_kind["warm"]) / n, 4) if n else None,
        "hit_ratio_high": round(1 - min(loads, n) / n, 4)
        if n and basis["loads_counter_exported"]
        else None,
        "loads_during_traffic": loads if basis["loads_counter_exported"] else None,
        "evictions_during_traffic": evictions,
        "warm": fleet_warm,
        "warm_model0": fleet_top,
        "reference_model0": reference,
        "reference_model0_closed_loop": stats_ms(closed),
        "warm_p50_ratio": ratio(fleet_warm["p50_ms"], reference["p50_ms"]),
        "warm_p99_ratio": ratio(fleet_warm["p99_ms"], reference["p99_ms"]),
        "warm_model0_p50_ratio": ratio(fleet_top["p50_ms"], reference["p50_ms"]),
        "warm_model0_p99_ratio": ratio(fleet_top["p99_ms"], reference["p99_ms"]),
        "cold_cache": stats_ms(by_kind["cold-cache"]),
        "cold_remote": stats_ms(by_kind["cold-remote"]),
        "server_load_seconds": server_load,
        "resident_bytes_max": max(resident) if resident else None,
        "models_resident_mean": round(sum(held) / len(held), 1) if held else None,
        "models_resident_max": max(held) if held else None,
        "rss_max_bytes": rss_max,
        "distinct_models_requested": len({r[0] for r in rows}),
        "cdf_ms": {
            "warm": cdf_ms(warm_all),
            "cold_cache": cdf_ms(by_kind["cold-cache"]),
            "cold_remote": cdf_ms(by_kind["cold-remote"]),
            "reference": cdf_ms(ref),
            "reference_closed": cdf_ms(closed),
        },
    }


# --- the budget and the peer ------------------------------------------------------------------------


def mlserver_repo(folder: Path, paths: list[Path], http: int, grpc: int, metrics: int) -> None:
    """The harness's writer (settings.json and its `mlp` entry as the template), one entry per model."""
    py = peer_bench.VENVS / "peers" / "bin" / "python"
    subprocess.run(
        [
            str(py),
            str(peer_bench.HARNESS / "peers" / "mlserver_repo.py"),
            "--out",
            str(folder),
            "--models",
            str(folder),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--only",
            "mlp",
        ],
        check=True,
        capture_output=True,
    )
    template = json.loads((folder / "mlp" / "model-settings.json").read_text())
    shutil.rmtree(folder / "mlp")
    shape = {"input": [-1, FEATURES], "output": [-1, OUTPUTS]}
    for i, p in enumerate(paths):
        spec = {
            **template,
            "name": model_name(i),
            "parameters": {**template["parameters"], "uri": str(p)},
            "inputs": [{**t, "shape": shape["input"]} for t in template["inputs"]],
            "outputs": [{**t, "shape": shape["output"]} for t in template["outputs"]],
        }
        (folder / model_name(i)).mkdir()
        (folder / model_name(i) / "model-settings.json").write_text(json.dumps(spec, indent=2))


def mlserver_startup(paths: list[Path], out: Path, timeout: float) -> dict[str, Any]:
    """MLServer 1.7.1 with these models (it loads every one at start): start-up and idle memory."""
    py = peer_bench.VENVS / "mlserver" / "bin" / "python"
    repo = out / "mlserver_repo"
    shutil.rmtree(repo, ignore_errors=True)
    http = host.free_port()
    mlserver_repo(repo, paths, http, host.free_port(), host.free_port())
    version = subprocess.run(
        [str(py), "-c", "import mlserver; print(mlserver.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    cmd = [str(py), str(peer_bench.HARNESS / "peers" / "mlserver_launch.py"), "start", str(repo)]
    env_path = str(peer_bench.HARNESS / "peers")
    os.environ["PYTHONPATH"] = env_path  # the harness's runtimes and shim, for this child only
    try:
        t0 = time.monotonic()
        with stream_bench.process(cmd, out / "mlserver.log") as proc:
            os.environ.pop("PYTHONPATH", None)
            figures = start_up(
                proc,
                f"http://127.0.0.1:{http}",
                {model_name(i) for i in range(len(paths))},
                t0,
                timeout,
            )
    finally:
        os.environ.pop("PYTHONPATH", None)
    return {"server": f"MLServer {version}", "models": len(paths), **figures}


def ensure_peers(session: Path) -> bool:
    """The harness's venvs (run.py's install: setup_peers.sh, once); False when that fails."""
    bench = peer_bench.Bench(peer_bench.parse_args([]), [])
    bench.session = session
    try:
        bench.sync_harness()
        bench.setup_peers()
    except SystemExit as exc:
        log(f"MLServer: the peers' venvs could not be installed ({exc}); no MLServer comparison")
        return False
    return True


# --- the run ------------------------------------------------------------------------------------


def serve(cmd: list[str], out: Path, name: str) -> Any:
    return stream_bench.process(cmd, out / f"{name}.log")


def measure(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Catalogue, S3, registration; the reference server (budget, then half its traffic), the
    fleet server, the reference's second half; then the start-up comparison."""
    from audit_bench import bench_lock  # imports inferplane: not at the top (see --plot)

    result: dict[str, Any] = {"settings": {k: v for k, v in vars(a).items() if k != "plot"}}
    paths = build_catalogue(a.models)
    result["catalogue"] = {
        "models": a.models,
        "file_bytes": paths[0].stat().st_size,
        "shape": f"FP32 [N,{FEATURES}] -> {HIDDEN} relu -> {OUTPUTS}",
    }
    with moto_s3(out) as url:
        log(f"moto_server at {os.environ['AWS_ENDPOINT_URL']}: registering {a.models} in {url}")
        result["registration"] = register_catalogue(url, paths, a.register_workers)
        result["budget"] = budget(a, url, out)
        port = host.free_port()
        base = f"http://127.0.0.1:{port}"
        with serve(inferplane_cmd(url, port, "--model", model_name(0)), out, "reference") as ref:
            start_up(ref, base, {model_name(0)}, time.monotonic(), a.startup_timeout)
            one = Load(base, 1, None, a.concurrency)
            drive(one, a.reference_warmup, 1)
            with bench_lock(True):
                closed = drive(one, a.reference_seconds / 2, 2)
            log(f"1-model server, closed loop: {stats_ms([r[2] for r in closed])}")
            rows, samples, fleet = fleet_run(a, url, result["budget"]["bytes"], out)
            before, after = fleet.pop("metrics_before"), fleet.pop("metrics_after")
            result.update(fleet)
            rate = len(rows) / a.seconds  # the fleet's request rate, offered to the 1-model server
            with bench_lock(True):
                paced = drive(replace(one, rate=rate), a.reference_seconds / 2, 5)
            log(f"1-model server, paced at {rate:.0f}/s: {stats_ms([r[2] for r in paced])}")
    t_traffic = result["phases"]["traffic_from_s"]
    result["traffic"] = analyse(rows, (paced, closed), samples, before, after, t_traffic, a.slack)
    result["traffic"]["reference_rate_rps"] = round(rate, 1)
    result["samples"] = [
        {k: v for k, v in vars(s).items() if k != "loads"} | {"t": round(s.t, 2)} for s in samples
    ]
    with open(out / "requests.csv", "w") as fh:
        fh.write("model,start_s,latency_s,status,error\n")
        fh.writelines(f"{model_name(r[0])},{r[1]:.6f},{r[2]:.6f},{r[3]},{r[4]}\n" for r in rows)
    result["peers"] = compare_startup(paths[: a.compare_models], out, a) if a.compare_models else []
    return result


def budget(a: argparse.Namespace, url: str, out: Path) -> dict[str, Any]:
    """The memory budget: given, or --resident models' worth. One model's worth is the median of
    the footprints the server itself measured (GET /inferplane/models) over CALIBRATION models
    loaded eagerly: the first load in a process also carries one-time costs (ONNX Runtime's
    thread pools and allocator), which the median leaves out."""
    import httpx

    if a.memory_budget:
        log(f"budget {a.memory_budget / 2**20:.0f} MiB (given)")
        return {"bytes": a.memory_budget, "given": True}
    names = [model_name(i) for i in range(min(CALIBRATION, a.models))]
    port = host.free_port()
    flags = [f for n in names for f in ("--model", n)]
    cmd = inferplane_cmd(url, port, *flags, "--cache-dir", str(out / "calibration-cache"))
    with serve(cmd, out, "calibration") as proc:
        base = f"http://127.0.0.1:{port}"
        start_up(proc, base, set(names), time.monotonic(), a.startup_timeout)
        try:
            versions = httpx.get(f"{base}/inferplane/models", timeout=30).json()["versions"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise SystemExit(f"no footprints from GET /inferplane/models ({exc}): pass --memory-budget") from None  # fmt: skip
    sizes = sorted(v["footprint_bytes"] for v in versions if v.get("footprint_bytes"))
    if not sizes:
        raise SystemExit("GET /inferplane/models reports no footprint: pass --memory-budget")
    per_model = int(stream_bench.percentile(sizes, 50))
    total = per_model * a.resident
    how = f"median of {len(sizes)} footprints measured by the server, {mib(sizes[0])} to {mib(sizes[-1])}"  # fmt: skip
    log(f"budget {mib(total)}: {a.resident} x {per_model / 2**20:.1f} MiB ({how})")
    return {"bytes": total, "per_model_bytes": per_model, "per_model_from": how,
            "footprints_bytes": sizes, "resident_models": a.resident, "given": False}  # fmt: skip


def fleet_run(
    a: argparse.Namespace, url: str, budget_bytes: int, out: Path
) -> tuple[list[Row], list[Sample], dict[str, Any]]:
    """The catalogue server: start-up, idle, warm-up, the measured Zipf traffic, sampled."""
    import httpx
    from audit_bench import bench_lock

    port = host.free_port()
    base = f"http://127.0.0.1:{port}"
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = inferplane_cmd(url, port, "--load", "on-demand", "--memory-budget", str(budget_bytes),
                         "--cache-dir", str(cache))  # fmt: skip
    log(f"fleet server: {' '.join(cmd[1:])}")
    client = httpx.Client(timeout=30)
    t0 = time.monotonic()
    with client, serve(cmd, out, "fleet") as proc:
        sampler = Sampler(proc.pid, base, t0)
        sampler.start()
        startup = start_up(proc, base, {model_name(i) for i in range(a.models)}, t0, a.startup_timeout)  # fmt: skip
        idle = scrape(client, base)
        loaded = metric_sum(idle, "inferplane_models_resident")
        startup["models_loaded_at_idle"] = (
            loaded if loaded is not None else metric_sum(idle, "inferplane_model_ready")
        )
        startup["resident_bytes_at_idle"] = metric_sum(idle, "inferplane_resident_bytes")
        startup["budget_metric_bytes"] = metric_sum(idle, "inferplane_memory_budget_bytes")
        log(f"fleet server: ready after {startup['ready_s']} s, index lists all {a.models} after "
            f"{startup['index_s']} s; idle RSS {mib(startup['idle_rss_bytes'])}, models loaded "
            f"when idle: {startup['models_loaded_at_idle']}")  # fmt: skip
        log(f"warm-up: {a.warmup} s of Zipf({a.zipf}) traffic, not counted")
        load = Load(base, a.models, zipf_cdf(a.models, a.zipf), a.concurrency)
        t_warm = time.monotonic() - t0
        warm = drive(load, a.warmup, 3, t0)
        answered = [r[1] + r[2] - t_warm for r in warm if r[3] == 200]
        # the first requests after start-up, 16 at once: how long until one is answered
        startup["first_answer_s"] = round(min(answered), 2) if answered else None
        startup["warmup_requests"] = len(warm)
        startup["warmup_errors"] = sum(1 for r in warm if r[3] != 200)
        log(f"warm-up: first answer {startup['first_answer_s']} s after the first requests, "
            f"{len(warm)} requests, {startup['warmup_errors']} errors")  # fmt: skip
        before = scrape(client, base)
        t_traffic = time.monotonic() - t0
        log(f"traffic: Zipf({a.zipf}), {a.models} models, c={a.concurrency}, {a.seconds} s")
        rows: list[Row] = []
        stop = threading.Event()
        threading.Thread(
            target=progress, args=(rows, sampler, a.seconds, stop), daemon=True
        ).start()
        with bench_lock(True):
            drive(load, a.seconds, 4, t0, rows)
        stop.set()
        after = scrape(client, base)
        time.sleep(1.0)  # one more sample after the traffic
        sampler.stop.set()
        sampler.join()
    return rows, sampler.samples, {
        "command": " ".join(cmd[1:]),
        "startup": {"server": "inferplane on-demand", "models": a.models, **startup},
        "metrics_before": before,
        "metrics_after": after,
        "phases": {"ready_s": startup["ready_s"], "traffic_from_s": round(t_traffic, 2),
                   "traffic_to_s": round(t_traffic + a.seconds, 2)},
    }  # fmt: skip


def compare_startup(paths: list[Path], out: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """inferplane eager and MLServer on the same local files, each loading all at start."""
    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    rows: list[dict[str, Any]] = []
    local = out / "local_repo"
    shutil.rmtree(local, ignore_errors=True)
    for i, p in enumerate(paths):
        register(Repository(str(local)), model_name(i), str(p))
    names = {model_name(i) for i in range(len(paths))}
    port = host.free_port()
    t0 = time.monotonic()
    with serve(inferplane_cmd(str(local), port), out, "eager") as proc:
        rows.append(
            {
                "server": "inferplane eager, local files",
                "models": len(paths),
                **start_up(proc, f"http://127.0.0.1:{port}", names, t0, a.startup_timeout),
            }
        )
    log(f"inferplane eager, {len(paths)} local models: {rows[-1]['ready_s']} s to ready")
    if a.no_mlserver:
        rows.append({"server": "MLServer", "models": len(paths), "skipped": "--no-mlserver"})
    elif not ensure_peers(out):
        rows.append(
            {
                "server": "MLServer",
                "models": len(paths),
                "skipped": "its venv could not be installed (see bench.log)",
            }
        )
    else:
        rows.append(mlserver_startup(paths, out, a.startup_timeout))
        log(f"{rows[-1]['server']}, {len(paths)} local models: {rows[-1]['ready_s']} s to ready")
    return rows


# --- report -------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def targets(r: dict[str, Any]) -> list[report.Target]:
    t, b = r["traffic"], r["budget"]["bytes"]
    out = [
        report.Target(
            "errors", f"{t['errors']} of {t['requests']:,}", "0", verdict(t["errors"] == 0)
        )
    ]
    for key, what in (
        ("warm", "warm requests, all models"),
        ("warm_model0", "warm requests, model 0"),
    ):
        for q in ("p50", "p99"):
            x = t[f"{key}_{q}_ratio"]
            value = (
                "not measured"
                if x is None
                else (
                    f"{x:.2f}x ({report.fmt_ms(t[key][f'{q}_ms'])} / "
                    f"{report.fmt_ms(t['reference_model0'][f'{q}_ms'])} ms)"
                )
            )
            out.append(
                report.Target(
                    f"{what}: {q} / 1-model server's at the same rate",
                    value,
                    f"<= {WARM_RATIO_TARGET}x",
                    verdict(None if x is None else x <= WARM_RATIO_TARGET),
                )
            )
    res = t["resident_bytes_max"]
    out.append(
        report.Target(
            "max inferplane_resident_bytes (1 s samples)",
            "not exported" if res is None else f"{mib(res)} of {mib(b)} budget",
            "<= budget",
            verdict(None if res is None else res <= b),
        )
    )
    rss = t["rss_max_bytes"]
    out.append(
        report.Target(
            "max server RSS with children (1 s samples)",
            f"{mib(rss)} (budget {mib(b)} + 250 MiB = {mib(b + RSS_HEADROOM)})",
            "<= budget + 250 MiB",
            verdict(None if rss is None else rss <= b + RSS_HEADROOM),
        )
    )
    return out


def caveats(r: dict[str, Any]) -> list[str]:
    """What in this run is not yet what issue 14 describes, read off the server's answers."""
    s, t, n = r["startup"], r["traffic"], r["catalogue"]["models"]
    notes = []
    loaded = s.get("models_loaded_at_idle")
    if loaded is not None and loaded >= n:
        notes.append(
            f"the server had all {n} models loaded once idle: it loaded eagerly "
            "(--load on-demand not in effect), so start-up and idle memory are an "
            "eager server's and the traffic found every model loaded"
        )
    if s.get("budget_metric_bytes") is None:
        notes.append(
            "inferplane_memory_budget_bytes is not exported: nothing shows that the "
            "--memory-budget is enforced"
        )
    if not t["classification"]["loads_counter_exported"]:
        notes.append(
            "inferplane_model_loads_total is not exported: no request can be told cold, "
            "so every request counts as warm and the hit ratio is 1 by construction"
        )
    if not t["server_load_seconds"]:
        notes.append(
            "inferplane_model_load_seconds is not a histogram with a source label: no "
            "server-side cold-load figures by source"
        )
    if t["resident_bytes_max"] is None:
        notes.append("inferplane_resident_bytes is not exported: only the RSS is checked")
    return notes


def startup_rows(r: dict[str, Any]) -> list[list[str]]:
    ml = next(
        (p for p in r["peers"] if p.get("server", "").startswith("MLServer") and "ready_s" in p),
        None,
    )
    rows = []
    for p in [r["startup"], *r["peers"]]:
        if "skipped" in p:
            rows.append([p["server"], str(p["models"]), *["-"] * 6, f"skipped: {p['skipped']}"])
            continue
        vs = (
            ""
            if ml is None or p is ml
            else (
                f"ready {p['ready_s'] / ml['ready_s']:.2f}x, RSS {p['idle_rss_bytes'] / ml['idle_rss_bytes']:.2f}x"
            )
        )
        rows.append(
            [
                p["server"],
                str(p["models"]),
                f"{p['ready_s']:.2f}",
                f"{p['index_s']:.2f}",
                "-" if p.get("first_answer_s") is None else f"{p['first_answer_s']:.2f}",
                mib(p["idle_rss_bytes"]),
                mib(p["idle_pss_bytes"]),
                ", ".join(f"{k} {v}" for k, v in p["index_states"].items()),
                vs,
            ]
        )
    return rows


STARTUP_HEAD = [
    "server",
    "models",
    "ready s",
    "index s",
    "1st answer s",
    "idle RSS",
    "idle PSS",
    "index states",
    "vs MLServer",
]


def traffic_lines(r: dict[str, Any]) -> list[tuple[str, str]]:
    t, b = r["traffic"], r["budget"]
    kinds = t["requests_by_kind"]
    loads = t["loads_during_traffic"]
    lines = [
        (
            "requests",
            f"{t['requests']:,} in {r['settings']['seconds']} s ({t['throughput_rps']} /s), "
            f"{t['distinct_models_requested']} distinct models, {t['errors']} errors "
            f"{t['error_kinds'] or ''}",
        ),
        (
            "hit ratio",
            f"{t['hit_ratio']} (bounds {t['hit_ratio_low']} .. {t['hit_ratio_high']}); "
            f"warm {kinds['warm']:,}, load overlapped but fast {kinds['possible']:,}, "
            f"cold from cache {kinds['cold-cache']:,}, cold from S3 {kinds['cold-remote']:,}",
        ),
        (
            "loads / evictions",
            f"{'not exported' if loads is None else f'{loads:.0f}'} loads; evictions: "
            + (", ".join(f"{k} {v:.0f}" for k, v in t["evictions_during_traffic"].items()) or "-"),
        ),
        (
            "warm p50 / p99 ms",
            f"{report.fmt_ms(t['warm']['p50_ms'])} / {report.fmt_ms(t['warm']['p99_ms'])} "
            f"(model 0: {report.fmt_ms(t['warm_model0']['p50_ms'])} / "
            f"{report.fmt_ms(t['warm_model0']['p99_ms'])})",
        ),
        (
            f"1-model server p50 / p99 ms, at {t['reference_rate_rps']}/s",
            f"{report.fmt_ms(t['reference_model0']['p50_ms'])} / "
            f"{report.fmt_ms(t['reference_model0']['p99_ms'])} "
            f"({t['reference_model0']['n']:,} requests; closed loop at c="
            f"{r['settings']['concurrency']}: {report.fmt_ms(t['reference_model0_closed_loop']['p50_ms'])}"
            f" / {report.fmt_ms(t['reference_model0_closed_loop']['p99_ms'])})",
        ),
        (
            "cold from cache p50 / p99 ms",
            f"{report.fmt_ms(t['cold_cache']['p50_ms'])} / "
            f"{report.fmt_ms(t['cold_cache']['p99_ms'])} (n {t['cold_cache']['n']})",
        ),
        (
            "cold from S3 p50 / p99 ms",
            f"{report.fmt_ms(t['cold_remote']['p50_ms'])} / "
            f"{report.fmt_ms(t['cold_remote']['p99_ms'])} (n {t['cold_remote']['n']})",
        ),
        (
            "server load seconds by source",
            ", ".join(
                f"{k}: {v['loads']:.0f} loads, p50 {report.fmt_ms(v['p50_ms'])} p99 {report.fmt_ms(v['p99_ms'])} ms"
                for k, v in t["server_load_seconds"].items()
            )
            or "no histogram with a source label",
        ),
        (
            "budget",
            f"{mib(b['bytes'])} = {b['resident_models']} x {mib(b['per_model_bytes'])} "
            f"({b['per_model_from']})"
            if not b["given"]
            else f"{mib(b['bytes'])} (given)",
        ),
        ("max resident bytes / RSS", f"{mib(t['resident_bytes_max'])} / {mib(t['rss_max_bytes'])}"),
        (
            "models resident during traffic",
            f"mean {t['models_resident_mean']}, max {t['models_resident_max']}",
        ),
    ]
    return lines


def markdown(r: dict[str, Any], figure: str) -> str:
    m, s = r["machine"], r["settings"]
    out = [
        f"# Many models: {r['catalogue']['models']} models under a memory budget ({r['stamp']})",
        "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('mem_gib')} GiB, {m.get('os')}, "
        f"Python {m.get('python')}, load {m.get('loadavg_1m_at_start')} at start; inferplane "
        f"{m.get('inferplane_git_at_start')}.",
        "",
        f"Catalogue: {r['catalogue']['models']} ONNX MLPs ({r['catalogue']['shape']}, "
        f"{r['catalogue']['file_bytes'] / 1e6:.2f} MB each, one seed each) in S3 on a local "
        f"moto_server; `{r['registration']['cli']}` for model 0 ({r['registration']['cli_s']} s), "
        f"the Python API `register()` in {r['registration']['api_workers']} processes for the rest "
        f"({r['registration']['total_s']} s in all).",
        "",
        f"Server: `{r['command']}`.",
        "",
        f"Traffic: Zipf(s={s['zipf']}) over the models (model 0 the most requested), HTTP/JSON V2 "
        f"infer, one row, httpx async client at concurrency {s['concurrency']}, {s['seconds']} s "
        f"after {s['warmup']} s of warm-up. The 1-model server (model 0 only, the same client): "
        f"{s['reference_seconds'] / 2:g} s closed loop at the same concurrency before, and "
        f"{s['reference_seconds'] / 2:g} s after paced at the catalogue run's request rate "
        f"({r['traffic']['reference_rate_rps']}/s); the warm-latency ratios use the paced run (the "
        "same traffic, minus the catalogue).",
        "",
        "## Start-up and idle memory",
        "",
        "| " + " | ".join(STARTUP_HEAD) + " |",
        "|" + "---|" * len(STARTUP_HEAD),
        *("| " + " | ".join(row) + " |" for row in startup_rows(r)),
        "",
        "ready s / index s: from the process start to `/v2/health/ready` 200 / to "
        "`POST /v2/repository/index` listing every model; idle RSS/PSS 2 s after both, server and "
        "children; 1st answer s: the first infer requests (the warm-up's, "
        f"{s['concurrency']} at once) to the first answer.",
        "",
        "## Traffic",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {v.replace('|', '/')} |" for k, v in traffic_lines(r)),
        "",
        "## Targets",
        "",
        report.targets_markdown(targets(r)),
        "",
    ]
    notes = caveats(r)
    if notes:
        out += ["## Not yet what the issue describes", "", *(f"* {n}" for n in notes), ""]
    c = r["traffic"]["classification"]
    out += [
        "## How requests are told cold",
        "",
        "The server does not say per request. When a model's `inferplane_model_loads_total` rose "
        "by k between two 1 s samples, the k slowest of its answered requests overlapping that "
        f"interval (widened by {c['slack_s']} s) are cold, and so is any other overlapping one "
        f"slower than {c['slow_threshold_ms']} ms ({c['slow_threshold_from']}); the other "
        'overlapping ones are counted apart as "load overlapped, fast" (hits). From S3 when '
        "the model had not been loaded before (empty cache folder), else from the cache. The "
        "start-up rows: the catalogue server reads S3, the other two the same files on local "
        "disk. See the docstring of benchmarks/fleet_bench.py.",
        "",
    ]
    if figure:
        out += [
            f"![RSS and resident bytes over time; latency distributions]({Path(figure).name})",
            "",
        ]
    return "\n".join(out)


def print_summary(r: dict[str, Any]) -> None:
    print()
    rows = [STARTUP_HEAD, *startup_rows(r)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STARTUP_HEAD))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()
    lines = traffic_lines(r)
    w = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{w}}  {v}")
    print()
    print(report.targets_text(targets(r)))
    for n in caveats(r):
        print(f"NOTE: {n}")


def figure(json_path: Path, png: Path) -> str:
    """The PNG, drawn by this file's --plot in the peers' venv (matplotlib, as run.py does)."""
    py = peer_bench.VENVS / "peers" / "bin" / "python"
    if not py.exists():
        log("figure: skipped (no peers' venv with matplotlib: run with MLServer once)")
        return ""
    done = subprocess.run(
        [str(py), __file__, "--plot", str(json_path), "--out", str(png)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not png.exists():
        log(f"figure: skipped ({done.stderr.strip()[-300:]})")
        return ""
    return str(png)


def plot(json_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(json_path.read_text())
    samples, budget = r["samples"], r["budget"]["bytes"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 9))
    t = [s["t"] for s in samples]
    top.plot(t, [s["rss"] / 2**20 for s in samples], label="server RSS (with children)")
    res = [
        (s["t"], s["resident_bytes"] / 2**20) for s in samples if s["resident_bytes"] is not None
    ]
    if res:
        top.plot(*zip(*res, strict=True), label="inferplane_resident_bytes")
    top.axhline(budget / 2**20, color="red", ls="--", lw=1, label="memory budget")
    top.axhline(
        (budget + RSS_HEADROOM) / 2**20, color="red", ls=":", lw=1, label="budget + 250 MiB"
    )
    ph = r["phases"]
    top.axvspan(
        ph["traffic_from_s"], ph["traffic_to_s"], color="grey", alpha=0.12, label="measured traffic"
    )
    top.axvline(ph["ready_s"], color="grey", lw=1)
    top.set_xlabel("seconds since the server started")
    top.set_ylabel("MiB")
    top.set_title(f"{r['catalogue']['models']} models, budget {budget / 2**20:.0f} MiB")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    labels = {
        "reference": "1-model server, same request rate",
        "reference_closed": "1-model server, closed loop",
        "warm": "warm",
        "cold_cache": "cold, from cache",
        "cold_remote": "cold, from S3",
    }
    for key, label in labels.items():
        q = r["traffic"]["cdf_ms"][key]
        if q:
            bottom.plot(q, [i / (len(q) - 1) for i in range(len(q))], label=label)
    bottom.set_xscale("log")
    bottom.set_xlabel("latency, ms (client)")
    bottom.set_ylabel("share of requests at or below")
    bottom.set_title(
        f"latency, Zipf({r['settings']['zipf']}) traffic at concurrency {r['settings']['concurrency']}"
    )
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", type=int, default=1000, help="catalogue size")
    ap.add_argument(
        "--resident",
        type=int,
        help="models the budget holds (default: models / 10, at least twice the concurrency)",
    )
    ap.add_argument(
        "--memory-budget", help="bytes or e.g. 300MiB (default: --resident models' footprint)"
    )
    ap.add_argument("--seconds", type=float, default=60, help="measured traffic")
    ap.add_argument("--warmup", type=float, default=5, help="traffic before, not counted")
    ap.add_argument(
        "--reference-seconds", type=float, default=20, help="1-model server, in two halves"
    )
    ap.add_argument("--reference-warmup", type=float, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s")
    ap.add_argument("--slack", type=float, default=1.0, help="s around a load's sampling interval")
    ap.add_argument(
        "--compare-models", type=int, default=100, help="models for MLServer and eager (0: skip)"
    )
    ap.add_argument("--no-mlserver", action="store_true", help="skip MLServer (and its install)")
    ap.add_argument("--register-workers", type=int, default=4)
    ap.add_argument("--startup-timeout", type=float, default=1800)
    ap.add_argument(
        "--fast", action="store_true", help="15 s of traffic, 3 s warm-up, 10 s reference"
    )
    ap.add_argument("--plot", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.fast:
        a.seconds, a.warmup, a.reference_seconds = (
            min(a.seconds, 15),
            min(a.warmup, 3),
            min(a.reference_seconds, 10),
        )
    # below the concurrency's worth of models the budget refuses loads (503) by design
    a.resident = a.resident or min(a.models, max(a.models // 10, 2 * a.concurrency))
    a.compare_models = min(a.compare_models, a.models)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.plot:
        plot(a.plot, a.out)
        return 0
    from inferplane.sizes import parse_size

    a.memory_budget = parse_size(a.memory_budget) if a.memory_budget else None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d-%H%M")
    out = WORK / "out" / stamp
    out.mkdir(parents=True, exist_ok=True)
    log.open(out / "bench.log")
    machine = peer_bench.collect_machine(
        peer_bench.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
        host.read_text("/proc/loadavg").split(" ")[0],
    )
    log(
        f"fleet bench: {a.models} models, {a.seconds} s at concurrency {a.concurrency}; work in {out}"
    )
    r = measure(a, out)
    r.update(stamp=stamp, machine=machine)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"fleet-{stamp}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(r, indent=1) + "\n")
    png = figure(json_path, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(markdown(r, png))
    print_summary(r)
    print(
        f"\nresults: {json_path.relative_to(ROOT)} (.md"
        + (", .png)" if png else ")")
        + f"; raw: {out} (requests.csv, server logs, bench.log)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
