"""Traffic policies: file checks, route choice (weights, A/B rules, sticky keys), breakers, cache."""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest

from inferplane.context import RequestContext
from inferplane.errors import BadRequest
from inferplane.routing.answer_cache import AnswerCache, input_key
from inferplane.routing.breaker import BreakerState, CircuitBreaker
from inferplane.routing.policy import Breaker, Policy, check_references, parse_policy
from inferplane.routing.services import CompiledService

GOOD = """
services:
  reco:
    routes:
      - {model: m, version: production, weight: 90}
      - {model: m, version: 2, weight: 10}
    match:
      - {name: b, header: X-Arm, values: [b], route: {model: m, version: 3}}
      - {name: gold, parameter: segment, values: [gold], route: {model: m, version: 3}}
      - {name: acme, tenant: true, values: [acme], route: {model: m, version: 1}}
    sticky: {header: x-user}
    shadow: {model: m, version: 3, percent: 5}
    fallback: {service: backup}
  backup:
    routes: [{model: m, version: 1, weight: 100}]
"""


def test_good_policy_parses_with_defaults() -> None:
    policy = parse_policy(GOOD)
    reco = policy.services["reco"]
    assert reco.route_names() == ["primary", "canary"]
    assert reco.routes[1].version == "2"  # numbers become version text
    assert reco.breaker is not None and reco.breaker.consecutive_failures == 5
    assert reco.retries.attempts == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "services: {s: {routes: [{model: m, weight: 90}]}}",
            "route weights add up to 90, not 100",
        ),
        ("services: {s: {routes: []}}", "routes"),
        ("services: {s: {routes: [{model: m, weight: 100}], colour: red}}", "colour"),
        ("services: [1, 2]", "services"),
        ("services: {s: {routes: [{model: m, weight: 100}]\n", "not valid YAML"),
        (
            "services: {s: {routes: [{model: m, weight: 100}], fallback: {service: nope}}}",
            "falls back to unknown service 'nope'",
        ),
        (
            "services:\n"
            "  a: {routes: [{model: m, weight: 100}], fallback: {service: b}}\n"
            "  b: {routes: [{model: m, weight: 100}], fallback: {service: c}}\n"
            "  c: {routes: [{model: m, weight: 100}], fallback: {service: a}}\n",
            "fallback cycle: a -> b -> c -> a",
        ),
        (
            "services: {s: {routes: [{model: m, weight: 100}],"
            " match: [{name: x, header: h, tenant: true, values: [v], route: {model: m}}]}}",
            "exactly one of header, tenant, parameter",
        ),
        (
            "services: {s: {routes: [{model: m, weight: 50, name: x}, {model: m, weight: 50,"
            " name: x}]}}",
            "names used twice: x",
        ),
        ("services: {s: {routes: [{model: m, weight: 101}]}}", "less than or equal to 100"),
    ],
)
def test_bad_policy_files_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(BadRequest, match="services file") as info:
        parse_policy(text)
    assert message in info.value.message


def test_references_are_checked_against_the_models() -> None:
    policy = parse_policy(GOOD)
    known = {"m": {"1": 1, "2": 2, "3": 3, "production": 1}}
    check_references(policy, known.get, {"m"})  # all fine
    with pytest.raises(BadRequest) as info:
        check_references(policy, {"m": {"1": 1, "production": 1}}.get, {"m"})
    assert "service 'reco' route 1: model 'm' has no version or alias '2'" in info.value.message
    assert "match 'b': model 'm' has no version or alias '3'" in info.value.message
    with pytest.raises(BadRequest, match="unknown model 'm'"):
        check_references(policy, {}.get, set())
    clash = Policy.model_validate({"services": {"m": {"routes": [{"model": "m", "weight": 100}]}}})
    with pytest.raises(BadRequest, match="service 'm' has the name of a model"):
        check_references(clash, known.get, {"m"})


def _service(text: str = GOOD, name: str = "reco") -> CompiledService:
    return CompiledService(name, parse_policy(text).services[name])


def test_weighted_split_of_10000_calls_is_within_one_and_a_half_points() -> None:
    service = _service()
    counts = collections.Counter(service.choose(RequestContext())[1] for _ in range(10_000))
    assert abs(counts["canary"] / 10_000 * 100 - 10) <= 1.5, counts
    assert counts["primary"] + counts["canary"] == 10_000


def test_sticky_key_keeps_each_user_in_one_arm_and_splits_users_by_weight() -> None:
    service = _service()
    arms = {}
    for user in range(3000):
        ctx = RequestContext(headers={"x-user": f"u{user}"})
        seen = {service.choose(ctx)[1] for _ in range(3)}
        assert len(seen) == 1, f"user {user} switched arms: {seen}"
        arms[user] = seen.pop()
    share = sum(a == "canary" for a in arms.values()) / len(arms) * 100
    assert abs(share - 10) <= 2.5, share
    # Raising the canary to 20% moves users from primary to canary only: none goes back.
    wider = _service(
        GOOD.replace("weight: 90}", "weight: 80}").replace("weight: 10}", "weight: 20}")
    )
    for user, arm in arms.items():
        now = wider.choose(RequestContext(headers={"x-user": f"u{user}"}))[1]
        if arm == "canary":
            assert now == "canary"


def test_ab_rules_win_over_weights_in_order() -> None:
    service = _service()
    for _ in range(50):
        target, decision, _ = service.choose(
            RequestContext(headers={"x-arm": "b", "x-user": "u1"}, tenant="acme")
        )
        assert (decision, target.version) == ("ab:b", "3")
    assert service.choose(RequestContext(parameters={"segment": "gold"}))[1] == "ab:gold"
    assert service.choose(RequestContext(tenant="acme"))[1] == "ab:acme"
    assert service.choose(RequestContext(headers={"x-arm": "c"}))[1] in {"primary", "canary"}


def test_breaker_opens_on_consecutive_failures_half_opens_and_recovers() -> None:
    now = [0.0]
    breaker = CircuitBreaker(Breaker(consecutive_failures=3, error_rate=None, cooldown_s=10))
    breaker._now = lambda: now[0]
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 10.5
    assert breaker.allow() and breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(), "only one probe at a time while half-open"
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 21.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()


def test_breaker_opens_on_error_rate_over_its_window() -> None:
    breaker = CircuitBreaker(
        Breaker(consecutive_failures=100, error_rate=0.5, window=10, min_calls=10)
    )
    for i in range(9):
        (breaker.failure if i % 2 else breaker.success)()
    assert breaker.state is BreakerState.CLOSED  # 9 calls: under min_calls
    breaker.failure()  # 5 of 10 failed
    assert breaker.state is BreakerState.OPEN


def test_answer_cache_is_bounded_and_expires() -> None:
    cache = AnswerCache(size=2, ttl_s=0.05)
    keys = [input_key({"x": np.array([i], dtype=np.float32)}) for i in range(3)]
    assert keys[0] == input_key({"x": np.array([0], dtype=np.float32)})
    assert keys[0] != input_key({"x": np.array([0], dtype=np.float64)})
    for i, key in enumerate(keys):
        cache.put(key, "m", "1", {"y": np.array([i])})
    assert len(cache) == 2 and cache.get(keys[0]) is None
    hit = cache.get(keys[2])
    assert hit is not None and hit[2]["y"][0] == 2
    time.sleep(0.06)
    assert cache.get(keys[2]) is None


def test_the_example_policy_parses() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "examples" / "services.yaml").read_text()
    reco = parse_policy(text).services["reco"]
    assert reco.retries.retry_on == ["unavailable", "internal"]
    assert reco.fallback is not None and reco.cache is not None
