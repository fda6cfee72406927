"""What the edge costs on the hot path: API-key auth, quotas and TLS, measured with perf_analyzer.

One server at a time on the example `tabular` forest (HTTP/JSON, concurrency 32 by default, audit
off so that only the edge differs), in alternation over `--rounds` so that drift on a shared
machine hits every configuration alike:
  - plain:      no --access, plain HTTP (the reference);
  - key:        --access with one API key, every request carries `Authorization: Bearer ipk_...`;
  - key+quota:  the same plus a per-tenant quota that never trips (the token bucket's cost);
  - tls:        plain HTTP replaced by TLS 1.3 (keep-alive: the handshake is paid once per
                connection), no auth;
  - tls+key:    TLS and the API key.
Prints throughput and p50/p99 per configuration and the ratios to plain (issue 13's target: API-key
auth costs <= 5 % throughput at c=32; TLS is reported), and writes a CSV under benchmarks/results/.

    .venv/bin/python benchmarks/edge_overhead.py [--seconds 10] [--rounds 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import host  # sibling modules (benchmarks/ is not a package)
import httpx
from traffic_overhead import VENV_BIN, drive, report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.pki import make_ca, server_cert  # noqa: E402  (the test PKI: a throwaway CA)

CONFIGS = ("plain", "key", "key+quota", "tls", "tls+key")


def serve(repo: Path, workdir: Path, config: str) -> tuple[subprocess.Popen[bytes], int]:
    port = host.free_port()
    cmd = [
        str(VENV_BIN / "inferplane"), "serve", "--repository", str(repo), "--model", "tabular",
        "--http-port", str(port), "--grpc-port", "0", "--log-level", "warning",
        "--audit-sink", "none",
    ]  # fmt: skip
    if "key" in config:
        access = "access-quota.yaml" if "quota" in config else "access.yaml"
        cmd += ["--access", str(workdir / access)]
    if "tls" in config:
        cmd += ["--tls-cert", str(workdir / "server.pem"), "--tls-key", str(workdir / "server.key")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheme = "https" if "tls" in config else "http"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            url = f"{scheme}://127.0.0.1:{port}/v2/health/ready"
            if httpx.get(url, timeout=1, verify=str(workdir / "ca.pem")).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server ({config}) did not come up")


def client_args(config: str, workdir: Path, key: str) -> tuple[str, ...]:
    extra: list[str] = []
    if "key" in config:
        extra += ["-H", f"authorization:Bearer {key}"]
    if "tls" in config:
        extra += ["--ssl-https-ca-certificates-file", str(workdir / "ca.pem")]
    return tuple(extra)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repository", default=str(ROOT / "examples" / "models"))
    ap.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS)
    )
    a = ap.parse_args()
    repo = Path(a.repository)
    if not (repo / "tabular").exists():
        raise SystemExit(f"no example models in {repo}: run `make models` first")
    configs = [c for c in a.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    workdir = Path(tempfile.mkdtemp(prefix="inferplane-edge-bench-"))
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in configs}
    try:
        ca = make_ca(workdir)
        issued = server_cert(ca, workdir)
        shutil.copy(ca.cert_path, workdir / "ca.pem")
        shutil.copy(issued.cert_path, workdir / "server.pem")
        shutil.copy(issued.key_path, workdir / "server.key")
        (workdir / "access.yaml").write_text("keys: keys.yaml\n")
        (workdir / "access-quota.yaml").write_text(
            "keys: keys.yaml\nquotas:\n"
            "  - {tenant: '*', requests_per_s: 1000000, burst: 1000000, max_inflight: 10000}\n"
        )
        made = subprocess.run(
            [str(VENV_BIN / "inferplane"), "keys", "create", "--access", str(workdir / "access.yaml"),
             "--tenant", "bench", "--scopes", "infer,read"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        key = made.stdout.strip()
        for r in range(a.rounds):
            for name in configs:
                proc, port = serve(repo, workdir, name)
                extra = client_args(name, workdir, key)
                url = f"https://127.0.0.1:{port}" if "tls" in name else None
                try:
                    drive(port, "tabular", 2, a.concurrency, extra, url)  # warm both ends
                    figures = drive(port, "tabular", a.seconds, a.concurrency, extra, url)
                finally:
                    proc.send_signal(signal.SIGINT)  # the quick stop: SIGTERM drains first
                    proc.wait(30)
                results[name].append(figures)
                print(f"round {r + 1}/{a.rounds} {name:10s} {figures[0]:9.0f} infer/s  "
                      f"p50 {figures[1]:.2f} ms  p99 {figures[2]:.2f} ms", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, "plain" if "plain" in results else configs[0], "edge-overhead", a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
