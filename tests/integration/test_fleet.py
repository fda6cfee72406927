"""A fleet on this machine (issue 15): three `inferplane serve` replicas behind a real HAProxy
(health checks on /v2/health/ready), a shared S3 repository (moto) and a Kafka audit topic (Tansu).

Under constant load (16 clients through HAProxy) each replica in turn gets SIGTERM, drains, exits 0
and is started again on its port (a rolling update). Then: no failed request, one audit record per
answered request, sticky users keep their arm across replicas, and a policy change and an alias move
written to S3 reach every replica within the watch interval.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration import fleet_harness as fh

pytestmark = pytest.mark.s3

DRAIN_S = 3.0
WATCH_S = 1.0
# 25 s in the suite; the 60 s run: INFERPLANE_FLEET_LOAD_S=60 pytest tests/integration/test_fleet.py
LOAD_S = float(os.environ.get("INFERPLANE_FLEET_LOAD_S", "25"))
USERS = 50


@pytest.fixture
def fleet(moto_s3, tansu, tmp_path: Path, free_port) -> Iterator[dict]:  # type: ignore[no-untyped-def]
    if not Path(fh.HAPROXY).exists():
        pytest.fail(
            "the fleet test needs HAProxy: apt-get install haproxy (scripts/system_deps.sh)"
        )
    for module, install in (
        ("onnx", "onnx"),
        ("confluent_kafka", "confluent-kafka"),
        ("s3fs", "s3fs"),
    ):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"the fleet test needs {install}: pip install {install}", pytrace=False)
    url = f"s3://{moto_s3.new_bucket('fleet')}/models"
    fh.build_repository(url, tmp_path)
    topic = f"audit-{uuid.uuid4().hex[:8]}"
    fh.create_topic(tansu.bootstrap, topic)
    bootstrap = tansu.bootstrap
    args = ("--watch", "--watch-interval", str(WATCH_S), "--drain-seconds", str(DRAIN_S))
    audit = f"kafka://{bootstrap}/{topic}"
    env = {"AWS_ENDPOINT_URL": moto_s3.endpoint_url}  # the moto_s3 fixture sets the keys
    replicas = [fh.Replica(url, free_port(), tmp_path, args, env, audit) for _ in range(3)]
    port = free_port()
    haproxy = None
    try:
        for replica in replicas:
            replica.start(wait=False)
        for replica in replicas:
            replica.wait_ready()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(fh.haproxy_config(port, replicas))
        haproxy = fh.start_haproxy(cfg, port)
        time.sleep(1.5)  # rise 2 at inter 500ms
        yield {"url": url, "lb": f"http://127.0.0.1:{port}", "replicas": replicas,
               "bootstrap": bootstrap, "topic": topic, "dir": tmp_path}  # fmt: skip
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        for replica in replicas:
            replica.stop()


def test_rolling_update_sticky_watch_audit(fleet: dict) -> None:
    lb, replicas = fleet["lb"], fleet["replicas"]
    before = {user: fh.arm_of(replicas[user % 3].url, user) for user in range(USERS)}
    assert set(before.values()) == {"1", "2"}, f"a 50/50 split should use both arms: {before}"

    load = fh.Load(lb, concurrency=16, users=USERS).start()
    exits = []
    try:
        time.sleep(2)
        for replica in replicas:
            code, took = replica.terminate(DRAIN_S + 7)
            exits.append((replica.http_port, code, round(took, 1)))
            replica.start()
            time.sleep(max(0.0, LOAD_S / 3 - took - 2))
    finally:
        load.stop()
    assert all(code == 0 and took <= DRAIN_S + 5 for _, code, took in exits), (
        f"each replica exits 0 within drain + 5 s after SIGTERM: (port, code, s) {exits}"
    )
    assert load.answered > 0
    assert load.failed == 0, (
        f"{load.failed} failed of {load.answered + load.failed}: {dict(load.statuses)} "
        f"{load.errors[:5]}"
    )

    # sticky: every replica gives each user the arm it had before the rolling update, and the
    # load through HAProxy never saw a user on two arms
    after = {user: fh.arm_of(replicas[(user + 1) % 3].url, user) for user in range(USERS)}
    assert after == before
    assert all(len(arms) == 1 for arms in load.arms.values()), load.arms

    # audit: one record per answered request, keyed by request id
    ids = fh.count_audit_ids(fleet["bootstrap"], fleet["topic"])
    missing = load.request_ids - set(ids)
    assert not missing, f"{len(missing)} of {len(load.request_ids)} answered requests not audited"
    dupes = {k: n for k, n in ids.items() if n > 1 and k in load.request_ids}
    assert not dupes, f"{len(dupes)} request ids audited more than once"
    print(f"\nfleet: {LOAD_S:g} s, {load.answered} answered, {load.failed} failed, "
          f"{len(load.request_ids)} audited once each; (port, exit, s): {exits}")  # fmt: skip

    # policy watch: weights moved to 100/0 on S3 reach all three replicas
    fh.write_policy(fleet["url"], 100)
    _until_all(replicas, lambda r: all(fh.arm_of(r.url, u) == "1" for u in range(USERS)),
               WATCH_S + 4, "the 100/0 policy")  # fmt: skip

    # alias watch: production 1 -> 2 reaches all three
    fh.set_alias(fleet["url"], "production", 2)
    _until_all(replicas, lambda r: _model_version(r.url) == "2", WATCH_S + 4, "production -> 2")


def _model_version(url: str) -> str:
    answer = httpx.post(f"{url}/v2/models/{fh.MODEL}/infer", json=fh.body(0), timeout=10)
    answer.raise_for_status()
    return str(answer.json()["model_version"])


def _until_all(replicas, check, within: float, what: str) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    pending = list(replicas)
    while pending and time.monotonic() - start < within:
        pending = [r for r in pending if not check(r)]
        if pending:
            time.sleep(0.2)
    assert not pending, (
        f"{what} did not reach replicas {[r.http_port for r in pending]} within {within} s"
    )
