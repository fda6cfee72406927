"""A fleet on this machine (issue 15): replicas of `inferplane serve` behind a real HAProxy, a
shared S3 (moto) repository and a Kafka (Tansu) audit topic. Used by tests/integration/test_fleet.py
and benchmarks/fleet_lb_bench.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.integration.servers import ROOT, ServerProcess

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
MODEL = "tab"
SERVICE = "reco"
N_FEATURES = 4


def write_biased_model(path: Path, bias: float) -> str:
    """`input` FP32 [N, 4] -> `output` FP32 [N, 1] = sum + bias (versions answer differently)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1),
        helper.make_node("Add", ["total", "bias"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "biased_sum",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("bias", TensorProto.FLOAT, [1], [bias]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def services_yaml(weight_v1: int) -> str:
    return (
        "services:\n"
        f"  {SERVICE}:\n"
        "    routes:\n"
        f"      - {{model: {MODEL}, version: 1, weight: {weight_v1}}}\n"
        f"      - {{model: {MODEL}, version: 2, weight: {100 - weight_v1}}}\n"
        "    sticky: {header: x-user}\n"
    )


def build_repository(url: str, work: Path) -> None:
    """Two versions of `tab` (bias 0 and 1000), aliases production=1 canary=2, a 50/50 sticky
    service `reco` in `<url>/services.yaml`."""
    import fsspec

    from inferplane.repository.register import register
    from inferplane.repository.store import Repository

    repo = Repository(url)
    for version, bias in ((1, 0.0), (2, 1000.0)):
        artifact = write_biased_model(work / f"v{version}" / "model.onnx", bias)
        register(repo, MODEL, artifact, version=version)
    repo.set_alias(MODEL, "production", 1)
    repo.set_alias(MODEL, "canary", 2)
    write_policy(url, 50)
    del fsspec


def write_policy(url: str, weight_v1: int) -> None:
    import fsspec

    with fsspec.open(f"{url}/services.yaml", "w") as out:
        out.write(services_yaml(weight_v1))


def set_alias(url: str, alias: str, version: int) -> None:
    from inferplane.repository.store import Repository

    Repository(url).set_alias(MODEL, alias, version)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/<pid>/stat (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Replica:
    repo_url: str
    http_port: int
    log_dir: Path
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    audit: str = ""  # --audit-sink value
    process: subprocess.Popen[bytes] | None = None
    cpu_done: float = 0.0  # CPU seconds of earlier (restarted) processes on this port
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"replica-{self.http_port}-{self.starts}.log"

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        cmd = [
            sys.executable, "-m", "inferplane", "serve", "--repository", self.repo_url,
            "--host", "127.0.0.1", "--http-port", str(self.http_port), "--grpc-port", "0",
            *self.args,
        ]  # fmt: skip
        if self.audit:
            cmd += ["--audit-sink", self.audit]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **self.env}
            )
        if wait:
            self.wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.process is not None
        ServerProcess(self.process, self.http_port, 0, self.log_path).wait(timeout=timeout)

    def cpu(self) -> float:
        return self.cpu_done + (cpu_seconds(self.process.pid) if self.process else 0.0)

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if it outlived `timeout`, seconds it took)."""
        assert self.process is not None
        cpu = cpu_seconds(self.process.pid)
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
            self.process.kill()
            self.process.wait(5)
        self.cpu_done += cpu
        return code, time.monotonic() - start

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout
frontend fleet
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance {balance}
    option httpchk GET /v2/health/ready
    http-check expect status 200
    http-reuse always
{servers}
"""


def haproxy_config(port: int, replicas: list[Replica], balance: str = "roundrobin") -> str:
    servers = "\n".join(
        f"    server r{i} 127.0.0.1:{r.http_port} check inter 500ms fall 1 rise 2"
        for i, r in enumerate(replicas)
    )
    return HAPROXY_CFG.format(port=port, balance=balance, servers=servers)


def start_haproxy(cfg: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(cfg.with_suffix(".log"), "wb")  # noqa: SIM115 - kept open for the process
    proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited: {cfg.with_suffix('.log').read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1.0)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError("haproxy did not listen")


def body(user: int, request_id: str | None = None) -> dict[str, Any]:
    return {
        "id": request_id or uuid.uuid4().hex,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [user, 1, 2, 3]}],
    }


class Load:
    """`concurrency` threads, each with its own keep-alive httpx client, posting to `url` until
    stopped; counts answers by status and remembers request ids of 200s."""

    def __init__(self, url: str, concurrency: int, users: int = 50) -> None:
        self.url, self.concurrency, self.users = url, concurrency, users
        self.statuses: Counter[Any] = Counter()
        self.errors: list[str] = []
        self.request_ids: set[str] = set()
        self.arms: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)
        ]
        self.started = self.stopped = 0.0

    def _run(self, index: int) -> None:
        n = index
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set():
                user = n % self.users
                n += self.concurrency
                try:
                    answer = client.post(
                        f"/v2/models/{SERVICE}/infer",
                        json=body(user),
                        headers={"x-user": f"u{user}"},
                    )
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.statuses[type(exc).__name__] += 1
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.statuses[answer.status_code] += 1
                    if answer.status_code == 200:
                        data = answer.json()
                        rid = answer.headers.get("x-request-id") or data.get("id")
                        if rid:
                            self.request_ids.add(rid)
                        self.arms.setdefault(user, set()).add(str(data.get("model_version")))
                    elif len(self.errors) < 20:
                        self.errors.append(f"{answer.status_code}: {answer.text[:200]}")

    def start(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(35)
        self.stopped = time.monotonic()

    @property
    def answered(self) -> int:
        return self.statuses[200]

    @property
    def failed(self) -> int:
        return sum(v for k, v in self.statuses.items() if k != 200)


def arm_of(url: str, user: int) -> str:
    answer = httpx.post(
        f"{url}/v2/models/{SERVICE}/infer",
        json=body(user),
        headers={"x-user": f"u{user}"},
        timeout=10,
    )
    answer.raise_for_status()
    return str(answer.json()["model_version"])


def create_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    for future in futures.values():
        future.result(30)


def count_audit_ids(bootstrap: str, topic: str) -> Counter[str]:
    """Request ids of every record in `topic`, read as `inferplane audit --sink kafka://` does
    (from the start to the high watermarks of now)."""
    from inferplane.observability.audit_kafka import read_kafka

    return Counter(str(row.get("request_id")) for row in read_kafka(f"kafka://{bootstrap}/{topic}"))
