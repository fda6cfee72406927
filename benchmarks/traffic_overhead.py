"""What auditing and service routing cost on the hot path, measured with perf_analyzer.

One server at a time on the example `tabular` forest (HTTP/JSON, concurrency 32 by default), in
three configurations, each run `--rounds` times in alternation so that drift on a shared machine
hits all of them alike:
  - plain:   the model called by name, audit off (`--audit-sink none`);
  - audit:   the same, audit on (SQLite sink, the default);
  - service: called through a 90/10 service with a sticky key, audit on.
Prints throughput and p50/p99 per configuration and the ratios to plain (issue 5's target:
auditing costs <= 5% throughput), and writes a CSV under benchmarks/results/.

    .venv/bin/python benchmarks/traffic_overhead.py [--seconds 10] [--rounds 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import host  # sibling module (benchmarks/ is not a package)
import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LOCK = os.environ.get("BENCH_LOCK", "/tmp/inferplane-bench.lock")  # shared by every load test
SERVICES = """
services:
  reco:
    routes:
      - {model: tabular, version: production, weight: 90}
      - {model: tabular, version: canary, weight: 10}
    sticky: {header: x-user}
"""


def perf_env() -> dict[str, str]:
    libs = glob.glob(
        str(
            Path(sys.prefix)
            / "lib"
            / "python3*"
            / "site-packages"
            / "nvidia"
            / "cuda_runtime"
            / "lib"
        )
    )
    return dict(
        os.environ, LD_LIBRARY_PATH=":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")])
    )


def serve(repo: Path, workdir: Path, audit: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = host.free_port()
    cmd = [
        str(VENV_BIN / "inferplane"), "serve", "--repository", str(repo), "--model", "tabular",
        "--http-port", str(port), "--grpc-port", "0", "--log-level", "warning",
        "--services", str(workdir / "services.yaml"),
        "--audit-sink", str(workdir / f"audit-{port}.db") if audit else "none",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            doc = httpx.get(f"http://127.0.0.1:{port}/inferplane/services", timeout=1).json()
            if "reco" in doc["services"]:
                return proc, port
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def drive(
    port: int,
    model: str,
    seconds: float,
    concurrency: int,
    extra: tuple[str, ...] = (),
    url: str | None = None,
    cpus: str | None = None,
) -> tuple[float, float, float]:
    """(infer/s, p50 ms, p99 ms); `extra` perf_analyzer options (headers, TLS), `url` instead of
    plain HTTP on 127.0.0.1:port; `cpus`: run perf_analyzer on these cores only (taskset)."""
    cmd = [*(["taskset", "-c", cpus] if cpus else []),
        str(VENV_BIN / "perf_analyzer"), "-m", model, "-u", url or f"127.0.0.1:{port}", "-i", "http",
        "--concurrency-range", f"{concurrency}:{concurrency}", "--input-tensor-format", "json",
        "--output-tensor-format", "json", "-a", "--percentile", "99",
        # Three fixed windows, no stability demand (as ../shared/bench does for its fast mode):
        # on a shared machine a stability rule fails runs instead of reporting them.
        "-p", str(int(seconds * 1000 / 3)), "-s", "1000", "-r", "3",
        "-H", "x-user:bench-user", *extra,
    ]  # fmt: skip
    out = subprocess.run(
        cmd, env=perf_env(), capture_output=True, text=True, timeout=seconds * 10 + 60
    )
    text = out.stdout + out.stderr
    tput = re.search(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", text)
    p50 = re.search(r"p50 latency: (\d+) usec", text)
    p99 = re.search(r"p99 latency: (\d+) usec", text)
    if out.returncode != 0 or not (tput and p50 and p99):
        raise SystemExit(f"perf_analyzer failed:\n{text[-2000:]}")
    return float(tput.group(1)), int(p50.group(1)) / 1000, int(p99.group(1)) / 1000


def report(
    results: dict[str, list[tuple[float, float, float]]],
    reference: str,
    kind: str,
    a: argparse.Namespace,
) -> None:
    """Print the medians per configuration with their ratio to `reference` and write them to
    benchmarks/results/<stamp>-<kind>.csv (also used by edge_overhead.py)."""
    base = statistics.median(x[0] for x in results[reference])
    rows = []
    print(
        f"\nforest (tabular), HTTP/JSON, concurrency {a.concurrency}, median of {a.rounds} rounds"
    )
    width = max(10, *(len(name) for name in results))
    vs = f"vs {reference}"
    print(f"{'config':{width}s} {'infer/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {vs:>9s}")
    for name, runs in results.items():
        tput = statistics.median(x[0] for x in runs)
        p50 = statistics.median(x[1] for x in runs)
        p99 = statistics.median(x[2] for x in runs)
        rows.append({"config": name, "infer_per_s": round(tput, 1), "p50_ms": p50, "p99_ms": p99,
                     f"ratio_to_{reference}": round(tput / base, 4)})  # fmt: skip
        print(f"{name:{width}s} {tput:9.0f} {p50:7.2f} {p99:7.2f} {tput / base:9.3f}")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d-%H%M")
    out = ROOT / "benchmarks" / "results" / f"{stamp}-{kind}.csv"
    machine = f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    with out.open("w", newline="") as f:
        f.write(f"# {machine}; concurrency {a.concurrency}; {a.seconds}s x {a.rounds} rounds\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwritten {out.relative_to(ROOT)}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repository", default=str(ROOT / "examples" / "models"))
    a = ap.parse_args()
    repo = Path(a.repository)
    if not (repo / "tabular").exists():
        raise SystemExit(f"no example models in {repo}: run `make models` first")
    configs = {"plain": (False, "tabular"), "audit": (True, "tabular"), "service": (True, "reco")}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in configs}
    workdir = Path(tempfile.mkdtemp(prefix="inferplane-traffic-bench-"))
    (workdir / "services.yaml").write_text(SERVICES)
    try:
        for r in range(a.rounds):
            for name, (audit, model) in configs.items():
                proc, port = serve(repo, workdir, audit)
                try:
                    drive(port, model, 2, a.concurrency)  # warm the server and the client
                    figures = drive(port, model, a.seconds, a.concurrency)
                finally:
                    proc.send_signal(signal.SIGINT)  # the quick stop: SIGTERM drains first
                    proc.wait(30)
                results[name].append(figures)
                print(f"round {r + 1}/{a.rounds} {name:8s} {figures[0]:9.0f} infer/s  "
                      f"p50 {figures[1]:.2f} ms  p99 {figures[2]:.2f} ms", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, "plain", "traffic-overhead", a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
