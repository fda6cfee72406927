"""Rollouts run by the controller inside a real server, on its own figures (docs/rollouts.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.rollout_models import (
    MIN_REQUESTS,
    build_reco,
    load,
    rollout_block,
    wait_rollout,
)
from tests.integration.servers import ROOT, start_server

POLICY = (
    "services:\n"
    "  healthy:\n"
    '    routes: [{target: "reco:production", weight: 100}]\n' + rollout_block(2) +
    "  erroring:\n"
    '    routes: [{target: "reco:1", weight: 100}]\n' + rollout_block(3) +
    "  slow:\n"
    '    routes: [{target: "reco:1", weight: 100}]\n' + rollout_block(4) +
    """  relabelled:
    routes: [{target: "reco:1", weight: 100}]
    rollout:
      candidate: "reco:5"
      shadow_first: 2s
      steps: [{weight: 10, hold: 1.5s}]
      analysis: {min_requests: 60, max_label_disagreement: 0.02}
      interval: 0.3s
"""
)  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferplane", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_candidates_are_promoted_or_stopped_on_the_servers_own_figures(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    store = build_reco(repo)
    services = tmp_path / "services.yaml"
    services.write_text(POLICY)
    srv = start_server(repo, tmp_path, "--services", str(services))
    try:
        names = ["healthy", "erroring", "slow", "relabelled"]
        with load(srv.url, names, threads=8) as seen:
            states = {
                "healthy": wait_rollout(srv.url, "healthy", {"promoted", "rolled_back"}),
                "erroring": wait_rollout(srv.url, "erroring", {"promoted", "rolled_back"}),
                "slow": wait_rollout(srv.url, "slow", {"promoted", "rolled_back"}),
                "relabelled": wait_rollout(srv.url, "relabelled", {"promoted", "rolled_back"}),
            }
            time.sleep(0.5)  # answers after the last decision
        log = srv.log()

        # A healthy candidate goes through every step and the alias moves; no caller failed.
        healthy = states["healthy"]
        assert healthy["status"] == "promoted", healthy
        assert [h["verdict"] for h in healthy["history"]] == ["pass", "pass"]
        assert store.aliases("reco")["production"] == 2
        answers = seen.of("healthy")
        assert answers and all(a.status == 200 for a in answers)
        assert {a.version for a in answers} == {"1", "2"}
        assert answers[-1].version == "2"  # production now answers with the candidate
        policy = yaml.safe_load(services.read_text())["services"]["healthy"]
        assert policy["routes"] == [{"target": "reco:production", "weight": 100}]

        # 5 % errors: rolled back at the first step, with the reason everywhere.
        erroring = states["erroring"]
        assert erroring["status"] == "rolled_back", erroring
        assert len(erroring["history"]) == 1 and erroring["history"][0]["verdict"] == "fail"
        assert "error rate" in erroring["reason"]
        failed = [a for a in seen.of("erroring") if a.status != 200]
        assert failed, "the candidate never failed a caller: the test shows nothing"
        assert all(a.status == 500 for a in failed)
        # Only the candidate's share saw errors, and the controller decided on min_requests
        # (plus the calls of one interval): the callers hurt are bounded by that.
        at_verdict = erroring["history"][0]["requests"]["candidate"]
        assert MIN_REQUESTS <= at_verdict <= 3 * MIN_REQUESTS, erroring["history"]
        assert len(failed) <= 0.2 * at_verdict + 5, (len(failed), at_verdict)
        assert store.aliases("reco").get("production") == 2  # untouched by the rollback
        last = [a for a in seen.of("erroring")][-20:]
        assert all(a.version == "1" for a in last)  # weight 0 again

        # 3x slower: rolled back on latency.
        slow = states["slow"]
        assert slow["status"] == "rolled_back", slow
        assert "p95 latency ratio" in slow["reason"], slow["reason"]

        # Different labels: stopped in the shadow phase, before any caller got its answer.
        relabelled = states["relabelled"]
        assert relabelled["status"] == "rolled_back", relabelled
        assert relabelled["history"][0]["phase"] == "shadow phase"
        assert "label disagreement" in relabelled["reason"]
        assert {a.version for a in seen.of("relabelled")} == {"1"}

        # Metrics, log and audit say the same.
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'inferplane_rollout_state{service="erroring",state="rolled_back"} 1.0' in metrics
        assert 'inferplane_rollout_state{service="healthy",state="promoted"} 1.0' in metrics
        assert "rollout of service erroring (reco:3): rolled_back: step 1 failed" in log
        srv.stop()
        out = _cli("audit", "--sink", str(tmp_path / f"audit-{srv.http_port}.db"), "--kind",
                   "rollout", "--json", "--limit", "1000")  # fmt: skip
        assert out.returncode == 0, out.stderr
        records = [json.loads(line) for line in out.stdout.splitlines()]
        events = {(r["service"], r["route"]) for r in records}
        assert ("erroring", "rolled_back") in events and ("healthy", "promoted") in events
        assert ("healthy", "advanced") in events
        assert all(r["kind"] == "rollout" for r in records)
        reason = next(
            r for r in records if r["route"] == "rolled_back" and r["service"] == "erroring"
        )
        assert "error rate" in reason["error"]
        # ...and the predictions are not in that list.
        out = _cli("audit", "--sink", str(tmp_path / f"audit-{srv.http_port}.db"), "--kind",
                   "prediction", "--json", "--limit", "5")  # fmt: skip
        assert out.returncode == 0 and all(
            json.loads(line)["kind"] is None for line in out.stdout.splitlines()
        )
    finally:
        srv.stop()


STEADY = """
services:
  steady:
    routes: [{target: "reco:1", weight: 100}]
    rollout:
      candidate: "reco:2"
      steps: [{weight: 10, hold: 1s}, {weight: 30, hold: 10m}, {weight: 60, hold: 10m}]
      analysis: {min_requests: 20}
      interval: 0.3s
"""


def test_a_restarted_server_resumes_and_a_person_can_pause_resume_and_abort(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    build_reco(repo)
    services = tmp_path / "services.yaml"
    services.write_text(STEADY)
    srv = start_server(repo, tmp_path, "--services", str(services))
    try:
        with load(srv.url, ["steady"], threads=2):
            at = wait_rollout(srv.url, "steady", {"running"}, step=1)
        assert at["weight"] == 30
        srv.stop()
        state = yaml.safe_load((repo / "rollouts" / "steady.yaml").read_text())
        assert (state["step"], state["status"]) == (1, "running")

        srv = start_server(repo, tmp_path, "--services", str(services))
        with load(srv.url, ["steady"], threads=2) as seen:
            time.sleep(2.0)
            resumed = wait_rollout(srv.url, "steady", {"running"})
            assert (resumed["step"], resumed["weight"]) == (1, 30)
            assert len(resumed["history"]) == 1  # the first step is not judged again
            shares = [a.version for a in seen.of("steady") if a.status == 200]
            assert 0.15 < shares.count("2") / len(shares) < 0.45, shares.count("2") / len(shares)

            out = _cli("rollout", "pause", "steady", "-r", str(repo), "--wait", "10")
            assert out.returncode == 0 and "paused" in out.stdout, out.stdout + out.stderr
            paused = wait_rollout(srv.url, "steady", {"paused"})
            assert paused["weight"] == 30
            out = _cli("rollout", "status", "steady", "-r", str(repo))
            assert out.returncode == 0 and "paused" in out.stdout and "30%" in out.stdout, (
                out.stdout
            )

            out = _cli("rollout", "resume", "steady", "-r", str(repo), "--wait", "10")
            assert out.returncode == 0 and "running" in out.stdout, out.stdout + out.stderr

            out = _cli("rollout", "abort", "steady", "-r", str(repo), "--wait", "10")
            assert out.returncode == 0 and "aborted" in out.stdout, out.stdout + out.stderr
            cut = time.monotonic()
            time.sleep(1.0)
        policy = yaml.safe_load(services.read_text())["services"]["steady"]
        assert policy["routes"] == [{"target": "reco:1", "weight": 100}]
        after = [a for a in seen.of("steady") if a.at > cut + 0.3]
        assert after and all(a.version == "1" for a in after)
        # A command for a rollout that is over changes nothing; the CLI says what it is.
        out = _cli("rollout", "status", "--json", "-r", str(repo))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["status"] == "aborted"
        # A state file broken by hand: named in the view, the CLI and the log; nothing guessed.
        (repo / "rollouts" / "steady.yaml").write_text("status: [unclosed\n")
        (view,) = httpx.get(f"{srv.url}/inferplane/rollouts").json()["rollouts"]
        assert view["status"] == "unreadable" and "steady.yaml is not valid YAML" in view["reason"]
        out = _cli("rollout", "status", "steady", "-r", str(repo))
        assert out.returncode != 0 and "steady.yaml is not valid YAML" in out.stdout + out.stderr
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("rollout", "problem"),
    [
        ("candidate: 'reco:9'\n      steps: [{weight: 5, hold: 1s}]", "no version or alias '9'"),
        ("candidate: 'reco:2'\n      steps: [{weight: 50, hold: 1s}, {weight: 5, hold: 1s}]",
         "does not rise"),
        ("candidate: 'reco:2'\n      steps: [{weight: 5, hold: 1s}]\n      colour: red",
         "rollout.colour"),
    ],
)  # fmt: skip
def test_a_bad_rollout_is_refused_naming_the_field_and_the_policy_in_force_stays(
    tmp_path: Path, rollout: str, problem: str
) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    build_reco(repo)
    services = tmp_path / "services.yaml"
    services.write_text("services:\n  reco_svc:\n    routes: [{target: 'reco:1', weight: 100}]\n")
    srv = start_server(repo, tmp_path, "--services", str(services), "--watch")
    try:
        assert httpx.post(f"{srv.url}/v2/models/reco_svc/infer", json=_one()).status_code == 200
        services.write_text(
            "services:\n  reco_svc:\n    routes: [{target: 'reco:2', weight: 100}]\n"
            f"    rollout:\n      {rollout}\n"
        )
        deadline = time.monotonic() + 10
        while problem not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert problem in srv.log(), srv.log()
        assert "the previous policy stays in force" in srv.log()
        r = httpx.post(f"{srv.url}/v2/models/reco_svc/infer", json=_one())
        assert r.status_code == 200 and r.json()["model_version"] == "1"
    finally:
        srv.stop()


def _one() -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0.7] * 32}]}
