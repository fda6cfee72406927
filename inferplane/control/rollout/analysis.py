"""The verdict on one phase of a rollout, from its counts and the service's analysis settings.

A limit is *broken* only when the whole confidence interval lies past it (Wilson score bounds
for rates, distribution-free order-statistic bounds for the p95): a handful of unlucky requests
never rolls a good candidate back. A phase *passes* when it has held long enough, has
`min_requests` on every arm it compares, and every figure is within its limit as measured. What
is neither (over the limit but not confidently so, or short of traffic) waits, and fails as
inconclusive once `max_wait` has passed too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

from inferplane.control.rollout.figures import ArmCounts, Counts, ShadowCounts
from inferplane.observability.metrics import ARM_BUCKETS
from inferplane.routing.policy import Analysis

Outcome = Literal["wait", "pass", "fail"]
_UPPER = [*ARM_BUCKETS, math.inf]


@dataclass(frozen=True, slots=True)
class Interval:
    value: float
    low: float
    high: float


def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(successes: float, n: float, z: float) -> Interval:
    """The Wilson score interval of a proportion (sound at small counts and at 0 or n)."""
    if n <= 0:
        return Interval(0.0, 0.0, 1.0)
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def _value_at_rank(buckets: list[float], rank: float) -> float:
    """The latency of the `rank`-th fastest call, interpolated in its bucket (as Prometheus'
    histogram_quantile does); ranks past the last finite bucket give its upper bound."""
    lower_count, lower_bound = 0.0, 0.0
    for count, upper in zip(buckets, _UPPER, strict=True):
        if count >= rank:
            if math.isinf(upper):
                return ARM_BUCKETS[-1]
            if count <= lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_count, lower_bound = count, upper
    return ARM_BUCKETS[-1]


def quantile(buckets: list[float], q: float, z: float) -> Interval | None:
    """The q-quantile of the calls in `buckets` with its order-statistic confidence interval:
    the ranks n*q -/+ z*sqrt(n*q*(1-q)), which bound the true quantile whatever the shape of
    the latency distribution. None without calls."""
    n = buckets[-1]
    if n <= 0:
        return None
    spread = z * math.sqrt(n * q * (1 - q))
    rank = n * q
    return Interval(
        _value_at_rank(buckets, rank),
        _value_at_rank(buckets, max(rank - spread, 1e-9)),
        _value_at_rank(buckets, min(rank + spread, n)),
    )


@dataclass(slots=True)
class Check:
    """One figure against its limit: ok, over (confidently past it), unclear (over as measured,
    not confidently) or short (too few requests to say)."""

    name: str
    value: float | None
    limit: float
    bound: float | None  # the side of the interval compared with the limit to call it broken
    state: Literal["ok", "over", "unclear", "short"]

    def describe(self) -> str:
        if self.value is None:
            return f"{self.name}: no data (limit {self.limit:g})"
        bound = "" if self.bound is None else f", bound {self.bound:.4g}"
        return f"{self.name} {self.value:.4g} (limit {self.limit:g}{bound}): {self.state}"

    def to_data(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "bound": self.bound,
            "state": self.state,
        }


@dataclass(slots=True)
class Verdict:
    outcome: Outcome
    reason: str
    checks: list[Check]


def _limit_check(
    name: str, interval: Interval | None, limit: float, enough: bool, bound: float | None = None
) -> Check:
    if interval is None:
        return Check(name, None, limit, None, "short")
    low = interval.low if bound is None else bound
    if enough and low > limit:
        return Check(name, interval.value, limit, low, "over")
    if not enough:
        return Check(name, interval.value, limit, low, "short")
    return Check(name, interval.value, limit, low, "ok" if interval.value <= limit else "unclear")


def step_checks(counts: Counts, a: Analysis) -> list[Check]:
    """The checks of a weighted step: the candidate's live traffic against the primary's."""
    z = z_value(a.confidence)
    cand, prim = counts.candidate, counts.primary
    enough = cand.requests >= a.min_requests and prim.requests >= a.min_requests
    checks: list[Check] = []
    c_err = wilson(cand.errors, cand.requests, z) if cand.requests else None
    if a.max_error_rate is not None:
        checks.append(
            _limit_check("error rate", c_err, a.max_error_rate, cand.requests >= a.min_requests)
        )
    if a.max_error_rate_delta is not None:
        p_err = wilson(prim.errors, prim.requests, z) if prim.requests else None
        if c_err is None or p_err is None:
            checks.append(Check("error rate delta", None, a.max_error_rate_delta, None, "short"))
        else:
            delta = Interval(c_err.value - p_err.value, c_err.low - p_err.high, 0.0)
            checks.append(_limit_check("error rate delta", delta, a.max_error_rate_delta, enough))
    if a.max_latency_p95_ratio is not None:
        checks.append(_latency_check(cand, prim, a, z, enough))
    if a.max_label_disagreement is not None:
        checks.append(_disagreement_check(counts.shadow, a, z))
    return checks


def shadow_checks(counts: Counts, a: Analysis) -> list[Check]:
    """The checks of the mirror-only phase: the candidate's answers to copies of the traffic.
    Latency is not judged here: a copy runs after the caller's answer, beside the live load."""
    z = z_value(a.confidence)
    shadow = counts.shadow
    checks: list[Check] = []
    if a.max_error_rate is not None:
        interval = wilson(shadow.errors, shadow.copies, z) if shadow.copies else None
        checks.append(
            _limit_check(
                "shadow error rate", interval, a.max_error_rate, shadow.copies >= a.min_requests
            )
        )
    if a.max_label_disagreement is not None:
        checks.append(_disagreement_check(shadow, a, z))
    if not checks:  # nothing to judge but the copies themselves: they must have happened
        enough = shadow.copies >= a.min_requests
        checks.append(
            Check("shadow copies", shadow.copies, a.min_requests, None, "ok" if enough else "short")
        )
    return checks


def _latency_check(cand: ArmCounts, prim: ArmCounts, a: Analysis, z: float, enough: bool) -> Check:
    assert a.max_latency_p95_ratio is not None
    c95, p95 = quantile(cand.buckets, 0.95, z), quantile(prim.buckets, 0.95, z)
    if c95 is None or p95 is None or p95.value <= 0 or p95.high <= 0:
        return Check("p95 latency ratio", None, a.max_latency_p95_ratio, None, "short")
    ratio = Interval(c95.value / p95.value, c95.low / p95.high, 0.0)
    return _limit_check("p95 latency ratio", ratio, a.max_latency_p95_ratio, enough)


def _disagreement_check(shadow: ShadowCounts, a: Analysis, z: float) -> Check:
    """The worst label output: rows where the candidate's label differs from the primary's on
    the same input (shadow copies)."""
    assert a.max_label_disagreement is not None
    worst: Check | None = None
    for output, rows in sorted(shadow.rows.items()):
        differ = shadow.disagreeing.get(output, 0.0)
        check = _limit_check(
            f"label disagreement ({output})",
            wilson(differ, rows, z) if rows else None,
            a.max_label_disagreement,
            rows >= a.min_requests,
        )
        if worst is None or _rank(check) > _rank(worst):
            worst = check
    if worst is None:
        return Check("label disagreement", None, a.max_label_disagreement, None, "short")
    return worst


def _rank(check: Check) -> tuple[int, float]:
    order = {"ok": 0, "short": 1, "unclear": 2, "over": 3}
    return order[check.state], check.value or 0.0


def decide(checks: list[Check], held_s: float, hold_s: float, max_wait_s: float) -> Verdict:
    """pass / fail / wait for a phase that has run `held_s` of its `hold_s`."""
    over = [c for c in checks if c.state == "over"]
    if over:
        return Verdict("fail", "; ".join(c.describe() for c in over), checks)
    if held_s < hold_s:
        return Verdict("wait", f"holding ({held_s:.0f} of {hold_s:.0f} s)", checks)
    pending = [c for c in checks if c.state != "ok"]
    if not pending:
        return Verdict("pass", "; ".join(c.describe() for c in checks), checks)
    why = "; ".join(c.describe() for c in pending)
    if held_s >= hold_s + max_wait_s:
        return Verdict("fail", f"inconclusive after {held_s:.0f} s: {why}", checks)
    return Verdict("wait", f"not decided yet: {why}", checks)
