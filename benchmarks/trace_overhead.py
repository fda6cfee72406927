"""What tracing costs on the hot path, measured with perf_analyzer in one run.

One server at a time on the example `tabular` forest (HTTP/JSON, concurrency 32, audit off so
that only tracing differs), in alternation over `--rounds`:
  - off:    no OTLP endpoint (the reference; tracing code reduced to one test per request);
  - on-10:  --otlp-endpoint to a local OTLP/HTTP receiver, --trace-sample 0.1;
  - on-100: the same, every request traced (6 spans each: server, route, infer, queue,
            execute, runtime).
The receiver (in this process) accepts and counts the export requests and the bytes, so the
cost measured includes encoding and sending the spans. Prints throughput and p50/p99 with the
ratios to `off` (issue 16's target: on at 10% <= 5% throughput) and writes a CSV under
benchmarks/results/.

    .venv/bin/python benchmarks/trace_overhead.py [--seconds 10] [--rounds 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import host  # sibling modules (benchmarks/ is not a package)
import httpx
from traffic_overhead import VENV_BIN, drive, report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"off": None, "on-10": "0.1", "on-100": "1"}


class Sink:
    """An OTLP/HTTP endpoint that answers 200 and counts what it got."""

    def __init__(self) -> None:
        self.requests = self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", "0"))
                self.rfile.read(n)
                sink.requests += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = host.free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def serve(
    repo: Path, sample: str | None, sink: Sink, cpus: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = host.free_port()
    cmd = [*(["taskset", "-c", cpus] if cpus else []),
        str(VENV_BIN / "inferplane"), "serve", "--repository", str(repo), "--model", "tabular",
        "--http-port", str(port), "--grpc-port", "0", "--log-level", "warning",
        "--audit-sink", "none",
    ]  # fmt: skip
    if sample is not None:
        cmd += ["--otlp-endpoint", f"http://127.0.0.1:{sink.port}", "--trace-sample", sample]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repository", default=str(ROOT / "examples" / "models"))
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the server (and its trace export process) on core 0, perf_analyzer on the others: "
        "what tracing costs a server with one core of its own",
    )
    a = ap.parse_args()
    server_cpus = "0" if a.pin else None
    client_cpus = f"1-{(os.cpu_count() or 2) - 1}" if a.pin else None
    repo = Path(a.repository)
    if not (repo / "tabular").exists():
        raise SystemExit(f"no example models in {repo}: run `make models` first")
    sink = Sink()
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in CONFIGS}
    for r in range(a.rounds):
        for name, sample in CONFIGS.items():
            proc, port = serve(repo, sample, sink, server_cpus)
            before = sink.bytes
            try:
                drive(port, "tabular", 2, a.concurrency, cpus=client_cpus)  # warm both ends
                figures = drive(port, "tabular", a.seconds, a.concurrency, cpus=client_cpus)
            finally:
                proc.send_signal(signal.SIGINT)  # the quick stop: SIGTERM drains first
                proc.wait(30)
            results[name].append(figures)
            sent = (sink.bytes - before) / 1e6
            print(f"round {r + 1}/{a.rounds} {name:7s} {figures[0]:9.0f} infer/s  "
                  f"p50 {figures[1]:.2f} ms  p99 {figures[2]:.2f} ms  "
                  f"{sent:.1f} MB of spans exported", flush=True)  # fmt: skip
    if not sink.requests:
        raise SystemExit("the traced servers exported nothing: tracing is not working")
    report(results, "off", "trace-overhead-pinned" if a.pin else "trace-overhead", a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
