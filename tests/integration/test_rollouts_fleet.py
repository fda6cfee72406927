"""A rollout over a fleet: two replicas that follow the services file (--watch, no controller of
their own) and one `inferplane rollout run` judging them on figures from a real Prometheus that
scrapes both, or from their /metrics pages; the verdicts are those of the controller inside
serve (test_rollouts.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from inferplane.observability.audit import query
from tests.integration.prom_server import prometheus
from tests.integration.rollout_models import (
    MIN_REQUESTS,
    build_reco,
    load,
    rollout_block,
    wait_rollout,
)
from tests.integration.servers import ROOT, ServerProcess, start_server

POLICY = (
    "services:\n"
    "  healthy:\n"
    '    routes: [{target: "reco:production", weight: 100}]\n'
    + rollout_block(2, hold="2s", interval="0.5s")
    + "  erroring:\n"
    '    routes: [{target: "reco:1", weight: 100}]\n' + rollout_block(3, hold="2s", interval="0.5s")
)


@pytest.mark.parametrize("source", ["prometheus", "metrics"])
def test_a_fleet_controller_reaches_the_same_verdicts_from_prometheus_or_the_replicas(
    tmp_path: Path, source: str
) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    store = build_reco(repo)
    services = tmp_path / "services.yaml"
    services.write_text(POLICY)
    replicas: list[ServerProcess] = []
    controller: subprocess.Popen[bytes] | None = None
    controller_log = tmp_path / "controller.log"
    audit = tmp_path / "controller-audit.db"
    try:
        for _ in range(2):
            replicas.append(
                start_server(repo, tmp_path, "--services", str(services), "--watch",
                             "--watch-interval", "0.3", "--no-rollouts", grpc=False)
            )  # fmt: skip
        targets = [f"127.0.0.1:{r.http_port}" for r in replicas]
        with prometheus(targets, tmp_path / "prom") as prom:
            figures = (
                ["--prometheus", prom.url]
                if source == "prometheus"
                else [arg for r in replicas for arg in ("--metrics", f"{r.url}/metrics")]
            )
            with open(controller_log, "wb") as log:
                controller = subprocess.Popen(
                    [sys.executable, "-m", "inferplane", "rollout", "run", "-r", str(repo),
                     "--services", str(services), "--audit", str(audit), *figures],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            with load([r.url for r in replicas], ["healthy", "erroring"], threads=8) as seen:
                states = {
                    name: wait_rollout(replicas[0].url, name, {"promoted", "rolled_back"})
                    for name in ("healthy", "erroring")
                }
                time.sleep(1.5)  # both replicas have read the last write (--watch 0.3 s)
                cut = time.monotonic()
                time.sleep(1.0)
            if source == "prometheus":
                # The figures came through PromQL: Prometheus holds both replicas' arms.
                arms = prom.query('sum by (instance) (inferplane_service_requests_total{service="erroring",version="3"})')  # fmt: skip
                assert len(arms) == 2, arms

        healthy, erroring = states["healthy"], states["erroring"]
        assert healthy["status"] == "promoted", (healthy, controller_log.read_text())
        assert [h["verdict"] for h in healthy["history"]] == ["pass", "pass"]
        assert store.aliases("reco")["production"] == 2
        assert all(a.status == 200 for a in seen.of("healthy"))
        assert erroring["status"] == "rolled_back", (erroring, controller_log.read_text())
        assert "error rate" in erroring["reason"]
        assert erroring["history"][0]["requests"]["candidate"] >= MIN_REQUESTS
        # Both replicas follow what the controller wrote: after the verdicts every answer is
        # the version the service's route names again (production is 2 now for `healthy`).
        late = [a for a in seen.of("erroring") + seen.of("healthy") if a.at > cut]
        assert late, "no answers after the verdicts"
        assert {a.version for a in seen.of("erroring") if a.at > cut} == {"1"}
        assert {a.version for a in seen.of("healthy") if a.at > cut} == {"2"}
        policy = yaml.safe_load(services.read_text())["services"]
        assert policy["erroring"]["routes"] == [{"target": "reco:1", "weight": 100}]
        # The other replica reports the same state: it reads the repository's rollouts/ folder.
        assert (
            wait_rollout(replicas[1].url, "erroring", {"rolled_back"})["reason"]
            == (erroring["reason"])
        )
        controller.terminate()
        controller.wait(15)
        decisions = query(str(audit), kind="rollout", limit=100)
        assert {(d.service, d.route) for d in decisions} >= {
            ("healthy", "started"), ("healthy", "advanced"), ("healthy", "promoted"),
            ("erroring", "started"), ("erroring", "rolled_back"),
        }  # fmt: skip
        assert "rollout controller: services" in controller_log.read_text()
    finally:
        if controller is not None and controller.poll() is None:
            controller.kill()
            controller.wait(5)
        for r in replicas:
            r.stop()
