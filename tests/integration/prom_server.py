"""A real Prometheus server (Debian's `prometheus` package, installed by scripts/system_deps.sh)
scraping servers on loopback ports, for tests that read figures through PromQL."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.integration.brokers import stop_process


@dataclass
class Prometheus:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, promql: str) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])


@contextmanager
def prometheus(targets: list[str], folder: Path, interval: str = "500ms") -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port, /metrics) every `interval`, until the block
    ends; ready when every target has been scraped once."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "this test needs the Prometheus server: apt-get install prometheus "
            "(scripts/system_deps.sh does)",
            pytrace=False,
        )
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": interval, "scrape_timeout": interval},
                "scrape_configs": [
                    {"job_name": "inferplane", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    port = free_port()
    log_path = folder / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{server.log()}")
            try:
                up = server.query('up{job="inferplane"} == 1')
                if len(up) == len(targets):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus never scraped {targets}:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        stop_process(proc)
