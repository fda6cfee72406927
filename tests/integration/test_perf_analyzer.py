"""Triton's perf_analyzer (from tritonclient[all]) drives the server without errors.

perf_analyzer is the strictest reference client: it needs server metadata, the model config
extension, the request id echoed, and equal compute counts in the statistics.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.servers import ServerProcess

BIN = Path(sys.executable).parent / "perf_analyzer"


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
    if not BIN.exists() or not libs:
        pytest.fail(
            "perf_analyzer is missing: pip install 'tritonclient[all]==2.51.0' "
            "nvidia-cuda-runtime-cu12 (make test installs them)"
        )
    env = dict(os.environ, LD_LIBRARY_PATH=":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]))
    probe = subprocess.run([str(BIN), "--version"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(
            f"perf_analyzer does not start ({probe.stderr.strip()[:200]}); it links libb64.so.0d: "
            "apt-get install libb64-0d (scripts/system_deps.sh does it)"
        )
    return env


@pytest.mark.parametrize(
    ("model", "protocol", "extra"),
    [
        ("tabular", "http", []),
        ("tabular", "http", ["--input-tensor-format", "json", "--output-tensor-format", "json"]),
        ("tabular", "grpc", []),
        ("mlp", "grpc", ["--streaming"]),
        ("text_stats", "http", ["--shape", "text:1"]),
    ],
    ids=[
        "tabular-http-binary",
        "tabular-http-json",
        "tabular-grpc",
        "mlp-grpc-stream",
        "bytes-http",
    ],
)
def test_perf_analyzer_runs_cleanly(
    server: ServerProcess, model: str, protocol: str, extra: list[str]
) -> None:
    port = server.http_port if protocol == "http" else server.grpc_port
    cmd = [
        str(BIN), "-m", model, "-u", f"127.0.0.1:{port}", "-i", protocol, "-a",
        "--concurrency-range", "4:4", "--measurement-mode", "count_windows",
        "--measurement-request-count", "100", "--max-trials", "5", "--stability-percentage", "100",
        *extra,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=perf_env(), capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in output.lower(), output
    match = re.search(r"Concurrency: 4, throughput: ([\d.]+) infer/sec", output)
    assert match and float(match.group(1)) > 0, output
    counts = re.search(r"Inference count: (\d+)\s+Execution count: (\d+)", output)
    assert counts and int(counts.group(1)) >= 100, output
