"""Rollouts without a server: the spec's checks, the statistics behind a verdict, the windows of
cumulative counters, and the controller's phases driven by scripted figures (the same figures a
server's metrics give; tests/integration/test_rollouts*.py runs them on real servers)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml

from inferplane.control.rollout.analysis import decide, quantile, step_checks, wilson, z_value
from inferplane.control.rollout.controller import RolloutController
from inferplane.control.rollout.figures import ArmCounts, Arms, Counts, Window, counts_from_samples
from inferplane.control.rollout.state import StateStore
from inferplane.durations import parse_duration
from inferplane.errors import BadRequest
from inferplane.observability.metrics import ARM_BUCKETS
from inferplane.routing.policy import Analysis, parse_policy
from tests.integration.rollout_models import build_reco

Z95 = z_value(0.95)


# -- the spec --------------------------------------------------------------------------------


def _service(rollout: str) -> str:
    return (
        f"services:\n  s:\n    routes: [{{target: 'm:1', weight: 100}}]\n    rollout: {rollout}\n"
    )


def test_a_rollout_block_parses_with_durations_and_defaults() -> None:
    policy = parse_policy(
        _service("{candidate: 'm:3', shadow_first: 1m, steps: [{weight: 5, hold: 2m}, "
                 "{weight: 25, hold: 90}], analysis: {max_wait: 1h30m}}")
    )  # fmt: skip
    rollout = policy.services["s"].rollout
    assert rollout is not None
    assert (rollout.candidate.model, rollout.candidate.version) == ("m", "3")
    assert rollout.shadow_first == 60 and [s.hold for s in rollout.steps] == [120, 90]
    assert rollout.analysis.max_wait == 5400
    assert rollout.analysis.min_requests == 200 and rollout.analysis.max_error_rate == 0.01
    assert (rollout.on_success, rollout.on_failure) == ("promote", "rollback")


@pytest.mark.parametrize(
    ("rollout", "problem"),
    [
        ("{candidate: 'm:3', steps: [{weight: 50, hold: 1s}, {weight: 50, hold: 1s}]}",
         "services.s.rollout.steps: step 1 weight 50 does not rise above step 0's 50"),
        ("{candidate: 'm:3', steps: [{weight: 5, hold: 1s}], colour: red}",
         "services.s.rollout.colour"),
        ("{candidate: 'm', steps: [{weight: 5, hold: 1s}]}", "candidate is 'model:version'"),
        ("{candidate: 'm:3', steps: []}", "services.s.rollout.steps"),
        ("{candidate: 'm:3', steps: [{weight: 120, hold: 1s}]}", "weight"),
        ("{candidate: 'm:3', steps: [{weight: 5, hold: soon}]}", "'soon' is not a duration"),
        ("{candidate: 'm:3', steps: [{weight: 5, hold: 1s}], on_failure: shrug}", "on_failure"),
        ("{candidate: 'm:3', steps: [{weight: 5, hold: 1s}], analysis: {max_error_rate: 2}}",
         "max_error_rate"),
    ],
)  # fmt: skip
def test_a_bad_rollout_block_is_refused_naming_the_field(rollout: str, problem: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_policy(_service(rollout))
    assert problem in caught.value.message


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("500ms") == 0.5
    assert parse_duration(12) == 12 and parse_duration("2.5s") == 2.5
    for bad in ("-1", "1d", "nan", True):
        with pytest.raises(ValueError):
            parse_duration(bad)  # type: ignore[arg-type]


# -- statistics ------------------------------------------------------------------------------


def test_the_wilson_interval_holds_its_confidence_and_stays_in_0_1() -> None:
    assert wilson(0, 0, Z95) == wilson(0, 0, Z95).__class__(0.0, 0.0, 1.0)
    zero, every = wilson(0, 50, Z95), wilson(50, 50, Z95)
    assert zero.low == 0 and 0 < zero.high < 0.08 and every.high == 1 and every.low > 0.92
    # Coverage: the interval contains the true rate in about 95% of samples.
    rng = random.Random(7)
    hits = 0
    for _ in range(2000):
        errors = sum(rng.random() < 0.05 for _ in range(200))
        i = wilson(errors, 200, Z95)
        hits += i.low <= 0.05 <= i.high
    assert 0.92 < hits / 2000 < 0.98


def test_a_few_unlucky_errors_do_not_break_a_limit_but_a_real_rate_does() -> None:
    a = Analysis(min_requests=60, max_error_rate=0.01, max_error_rate_delta=None)
    lucky = Counts(primary=_arm(600, 0), candidate=_arm(60, 1))  # 1.7 % on 60 calls
    (check,) = step_checks(lucky, a)
    assert check.state == "unclear"  # over as measured, not confidently
    bad = Counts(primary=_arm(2000, 0), candidate=_arm(200, 10))  # 5 %
    (check,) = step_checks(bad, a)
    assert check.state == "over" and check.bound is not None and check.bound > 0.01
    few = Counts(primary=_arm(600, 0), candidate=_arm(20, 10))  # terrible, but too few calls
    (check,) = step_checks(few, a)
    assert check.state == "short"


def _arm(requests: int, errors: int, latencies: list[float] | None = None) -> ArmCounts:
    arm = ArmCounts(float(requests), float(errors))
    for seconds in latencies or []:
        for i, upper in enumerate([*ARM_BUCKETS, math.inf]):
            if seconds <= upper:
                arm.buckets[i] += 1
    return arm


def test_the_p95_from_buckets_and_its_interval_hold_the_true_quantile() -> None:
    rng = random.Random(3)
    samples = sorted(rng.lognormvariate(math.log(0.01), 0.5) for _ in range(5000))
    true_p95 = samples[int(0.95 * len(samples))]
    q = quantile(_arm(5000, 0, samples).buckets, 0.95, Z95)
    assert q is not None
    assert q.low <= true_p95 <= q.high
    assert abs(q.value - true_p95) / true_p95 < 0.15  # buckets are 26% wide
    assert quantile(_arm(0, 0).buckets, 0.95, Z95) is None


def test_a_3x_slower_candidate_breaks_the_latency_ratio_and_a_similar_one_does_not() -> None:
    rng = random.Random(5)
    a = Analysis(min_requests=100, max_error_rate=None, max_latency_p95_ratio=1.25)

    def arm(scale: float, n: int) -> ArmCounts:
        return _arm(n, 0, [scale * rng.uniform(0.9, 1.3) for _ in range(n)])

    (slow,) = step_checks(Counts(primary=arm(0.01, 1000), candidate=arm(0.03, 150)), a)
    assert slow.state == "over" and slow.value is not None and slow.value > 2.5
    (same,) = step_checks(Counts(primary=arm(0.01, 1000), candidate=arm(0.01, 150)), a)
    assert same.state == "ok"


def test_the_label_disagreement_uses_the_worst_output() -> None:
    a = Analysis(min_requests=100, max_error_rate=None, max_label_disagreement=0.02)
    counts = Counts()
    counts.shadow.copies = 500
    counts.shadow.rows = {"label": 500.0, "class": 500.0}
    counts.shadow.disagreeing = {"label": 2.0, "class": 100.0}
    (check,) = step_checks(counts, a)
    assert check.name == "label disagreement (class)" and check.state == "over"


def test_decide_waits_for_the_hold_fails_at_once_and_gives_up_when_inconclusive() -> None:
    a = Analysis(min_requests=60, max_error_rate=0.01)
    good = step_checks(Counts(primary=_arm(600, 0), candidate=_arm(100, 0)), a)
    bad = step_checks(Counts(primary=_arm(600, 0), candidate=_arm(200, 20)), a)
    short = step_checks(Counts(primary=_arm(600, 0), candidate=_arm(10, 0)), a)
    assert decide(good, held_s=5, hold_s=10, max_wait_s=20).outcome == "wait"
    assert decide(good, held_s=10, hold_s=10, max_wait_s=20).outcome == "pass"
    assert decide(bad, held_s=1, hold_s=10, max_wait_s=20).outcome == "fail"  # before the hold
    assert decide(short, held_s=15, hold_s=10, max_wait_s=20).outcome == "wait"
    verdict = decide(short, held_s=30, hold_s=10, max_wait_s=20)
    assert verdict.outcome == "fail" and verdict.reason.startswith("inconclusive after 30 s")


# -- counters into windows -------------------------------------------------------------------

ARMS = Arms("svc", ("m", "1"), ("m", "2"))


def _reading(primary: float, candidate: float, errors: float = 0, start: float = 1.0) -> Counts:
    samples = [
        ("inferplane_start_time_seconds", {}, start),
        ("inferplane_service_requests_total",
         {"service": "svc", "arm": "primary", "model": "m", "version": "1", "outcome": "ok"}, primary),
        ("inferplane_service_requests_total",
         {"service": "svc", "arm": "canary", "model": "m", "version": "2", "outcome": "ok"},
         candidate - errors),
        ("inferplane_service_requests_total",
         {"service": "svc", "arm": "canary", "model": "m", "version": "2", "outcome": "error"},
         errors),
        ("inferplane_service_requests_total",  # the caller's fault: not the arm's
         {"service": "svc", "arm": "canary", "model": "m", "version": "2", "outcome": "rejected"},
         99),
        ("inferplane_service_requests_total",  # another service
         {"service": "other", "arm": "canary", "model": "m", "version": "2", "outcome": "error"},
         99),
    ]  # fmt: skip
    return counts_from_samples(samples, ARMS, "a")["a"]


def test_a_window_counts_from_its_baseline_and_survives_a_restart() -> None:
    w = Window()
    w.update({"a": _reading(100, 10, 1)})  # the baseline: what came before the phase
    assert (w.total.primary.requests, w.total.candidate.requests) == (0, 0)
    w.update({"a": _reading(150, 20, 2)})
    assert (w.total.primary.requests, w.total.candidate.requests) == (50, 10)
    assert w.total.candidate.errors == 1
    # The instance restarted (another start time): all it counted since is new.
    w.update({"a": _reading(5, 3, 0, start=2.0)})
    assert (w.total.primary.requests, w.total.candidate.requests) == (55, 13)
    # A replica that joins after the baseline counts whole; one that vanishes keeps its share.
    w.update({"b": _reading(7, 1)})
    assert w.total.primary.requests == 62
    w.update({"b": _reading(9, 1)})
    assert w.total.primary.requests == 64
    assert Window.from_data(yaml.safe_load(yaml.safe_dump(w.to_data()))).total == w.total


# -- the controller on scripted figures ------------------------------------------------------


class Scripted:
    """Figures a test sets: cumulative counts of one instance, as a server's metrics give."""

    description = "scripted"

    def __init__(self) -> None:
        self.now = Counts()

    def read(self, arms: Arms) -> dict[str, Counts]:
        return {"local": self.now}

    def add(self, primary: int, candidate: int, errors: int = 0, ms: float = 10.0) -> None:
        self.now = self.now.plus(
            Counts(_arm(primary, 0, [ms / 1000] * primary),
                   _arm(candidate, errors, [ms / 1000] * (candidate - errors)))
        )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


STEPS = """
services:
  svc:
    routes: [{target: "reco:production", weight: 100}]
    rollout:
      candidate: "reco:%s"
      steps: [{weight: 10, hold: 60s}, {weight: 50, hold: 60s}]
      analysis: {min_requests: 100, max_error_rate: 0.01}
      interval: 1s
"""


def _controller(tmp_path: Path, candidate: int) -> tuple[RolloutController, Scripted, Clock]:
    repo = tmp_path / "models"
    if not repo.exists():
        repo.mkdir()
        build_reco(repo)
    services = tmp_path / "services.yaml"
    if not services.exists():
        services.write_text(STEPS % candidate)
    source, clock = Scripted(), Clock()
    return RolloutController(str(repo), str(services), source, clock=clock), source, clock


def _routes(tmp_path: Path) -> list[dict]:
    return list(
        yaml.safe_load((tmp_path / "services.yaml").read_text())["services"]["svc"]["routes"]
    )


def test_the_controller_steps_through_and_promotes_by_moving_the_alias(tmp_path: Path) -> None:
    ctl, figures, clock = _controller(tmp_path, 2)
    (state,) = ctl.tick()
    assert (state.status, state.step, state.weight) == ("running", 0, 10)
    assert _routes(tmp_path) == [
        {"target": "reco:production", "weight": 90.0},
        {"model": "reco", "version": "2", "weight": 10, "name": "canary"},
    ]
    figures.add(900, 100)
    clock.t += 30
    (state,) = ctl.tick()
    assert state.step == 0 and state.reason.startswith("holding")  # enough calls, not held
    clock.t += 31
    (state,) = ctl.tick()
    assert (state.step, state.weight) == (1, 50) and state.history[0]["verdict"] == "pass"
    figures.add(100, 100)  # the new step counts from its own start
    clock.t += 61
    (state,) = ctl.tick()
    assert state.status == "promoted" and state.phase == "done"
    assert ctl.repository.aliases("reco")["production"] == 2
    assert _routes(tmp_path) == [{"target": "reco:production", "weight": 100}]
    # Finished: the file is its owners' again; later passes write nothing.
    (tmp_path / "services.yaml").write_text((STEPS % 2).replace("weight: 100}]", "weight: 100.0}]"))
    clock.t += 5
    ctl.tick()
    assert _routes(tmp_path) == [{"target": "reco:production", "weight": 100.0}]


def test_errors_roll_back_at_once_and_a_new_controller_resumes_a_running_one(
    tmp_path: Path,
) -> None:
    ctl, figures, clock = _controller(tmp_path, 3)
    ctl.tick()
    figures.add(900, 100)
    clock.t += 61
    (state,) = ctl.tick()
    assert state.step == 1
    # A restarted controller (a new process) carries on from rollouts/svc.yaml: same step,
    # and the figures it reads now are compared with the baseline the state holds.
    ctl2 = RolloutController(ctl.repository.url, ctl.services_url, figures, clock=clock)
    figures.add(200, 200, errors=20)  # 10 % errors
    clock.t += 2
    (state,) = ctl2.tick()
    assert state.status == "rolled_back" and "error rate" in state.reason
    assert [h["verdict"] for h in state.history] == ["pass", "fail"]
    assert _routes(tmp_path) == [{"target": "reco:production", "weight": 100}]
    assert ctl.repository.aliases("reco")["production"] == 1  # untouched


def test_commands_pause_resume_abort_and_start_again(tmp_path: Path) -> None:
    ctl, figures, clock = _controller(tmp_path, 2)
    store = StateStore(ctl.repository.url)
    ctl.tick()
    figures.add(900, 100)
    clock.t += 30
    store.send("svc", "pause", "ops")
    (state,) = ctl.tick()
    assert state.status == "paused" and state.step == 0
    clock.t += 500
    (state,) = ctl.tick()
    assert state.status == "paused" and state.step == 0  # nothing is decided while paused
    store.send("svc", "resume", "ops")
    (state,) = ctl.tick()
    # Paused time is not holding time: 30 s of the 60 s hold are done, not 530.
    assert state.status == "running" and state.step == 0 and "holding (30 of 60" in state.reason
    clock.t += 31
    (state,) = ctl.tick()
    assert state.step == 1
    store.send("svc", "abort", "ops")
    clock.t += 1
    (state,) = ctl.tick()
    assert state.status == "aborted" and _routes(tmp_path) == [
        {"target": "reco:production", "weight": 100}
    ]
    store.send("svc", "start", "ops")
    clock.t += 1
    (state,) = ctl.tick()
    assert (state.status, state.step, state.weight) == ("running", 0, 10)
    assert len(_routes(tmp_path)) == 2


def test_an_unreadable_state_stops_that_rollout_only_and_says_which_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctl, _, clock = _controller(tmp_path, 2)
    services = tmp_path / "services.yaml"
    services.write_text(
        services.read_text() + "  other:\n    routes: [{target: 'reco:1', weight: 100}]\n"
        "    rollout: {candidate: 'reco:2', steps: [{weight: 10, hold: 60s}]}\n"
    )
    ctl.tick()
    state_file = tmp_path / "models" / "rollouts" / "svc.yaml"
    state_file.write_text("service: svc\nstatus: [not, closed\n")  # truncated by hand
    clock.t += 5
    with caplog.at_level("ERROR", logger="inferplane.rollout"):
        states = ctl.tick()
    assert [s.service for s in states] == ["other"]  # the other rollout goes on
    assert f"{state_file} is not valid YAML" in caplog.text
    state_file.write_text("service: svc\n")  # YAML, but not a state
    with pytest.raises(BadRequest, match="is not a rollout state"):
        StateStore(ctl.repository.url).load("svc")
