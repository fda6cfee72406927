"""Real inferplane servers on loopback ports for the integration tests, and the echo model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

ECHO_MODEL = textwrap.dedent(
    """
    import numpy as np


    class Model:
        def predict(self, inputs):
            return {f"{name}_out": np.asarray(value) for name, value in inputs.items()}
    """
)
# Every V2 datatype, echoed back unchanged: the wire-format round trip for each type.
ECHO_TYPES = {
    "b": "BOOL", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64",
    "i8": "INT8", "i16": "INT16", "i32": "INT32", "i64": "INT64",
    "f16": "FP16", "f32": "FP32", "f64": "FP64", "s": "BYTES",
}  # fmt: skip


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def audit_db(self) -> Path:
        return self.log_path.parent / f"audit-{self.http_port}.db"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, path: str = "/v2/health/ready", timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready on {path} after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGINT: the quick stop (SIGTERM drains for --drain-seconds first; test_drain.py)
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(
    repo: Path | str, log_dir: Path, *args: str, wait: bool = True, grpc: bool = True
) -> ServerProcess:
    """A server over `repo`; its audit trail goes to `<log_dir>/audit-<port>.db` unless `args`
    name another `--audit-sink`."""
    http_port, grpc_port = free_port(), (free_port() if grpc else 0)
    while (
        grpc_port == http_port
    ):  # each call's socket is closed again: the same port can come twice
        grpc_port = free_port()
    log_path = log_dir / f"server-{http_port}.log"
    cmd = [
        sys.executable, "-m", "inferplane", "serve", "--repository", str(repo),
        "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "INFERPLANE_AUDIT": str(log_dir / f"audit-{http_port}.db")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = ServerProcess(proc, http_port, grpc_port, log_path)
    if wait:
        try:
            server.wait()
        except Exception:
            server.stop()
            raise
    return server
