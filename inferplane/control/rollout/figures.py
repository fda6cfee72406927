"""What a rollout decides on: per-arm counts of one service, read from wherever they live.

Three sources give the same `Counts` per instance: this process's own registry (the
controller inside `serve`), the `/metrics` pages of a list of servers, and a Prometheus server
(PromQL over the same metric names). They all read cumulative counters; a `Window` turns
successive readings into the counts of one phase, per instance, so that a replica (or this
server) restarting in the middle of a step costs only the requests it answered before it
stopped, never a negative count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from prometheus_client import CollectorRegistry

from inferplane.errors import Unavailable
from inferplane.observability.metrics import ARM_BUCKETS
from inferplane.observability.prom_read import Sample, instant_query, quote, scrape

_SERVICE = "inferplane_service_requests_total"
_LATENCY = "inferplane_service_request_duration_seconds_bucket"
_SHADOW = "inferplane_shadow_requests_total"
_ROWS = "inferplane_shadow_compared_rows_total"
_DISAGREE = "inferplane_shadow_disagreeing_rows_total"
_START = "inferplane_start_time_seconds"
_NAMES = (_SERVICE, _LATENCY, _SHADOW, _ROWS, _DISAGREE, _START)
_UPPER = [*ARM_BUCKETS, float("inf")]


@dataclass(slots=True)
class ArmCounts:
    """One arm (a model version behind a service): calls, failed calls, latency buckets."""

    requests: float = 0.0  # ok + error + recovered (rejected calls were the caller's fault)
    errors: float = 0.0  # error + recovered: the arm itself failed
    # cumulative counts of successful calls at or under each of ARM_BUCKETS, then +Inf
    buckets: list[float] = field(default_factory=lambda: [0.0] * len(_UPPER))

    def combine(self, other: ArmCounts, sign: float) -> ArmCounts:
        return ArmCounts(
            self.requests + sign * other.requests,
            self.errors + sign * other.errors,
            [a + sign * b for a, b in zip(self.buckets, other.buckets, strict=True)],
        )


@dataclass(slots=True)
class ShadowCounts:
    """Copies of the primary's traffic sent to the candidate, and how their labels compared."""

    copies: float = 0.0
    errors: float = 0.0
    rows: dict[str, float] = field(default_factory=dict)  # output -> rows compared
    disagreeing: dict[str, float] = field(default_factory=dict)  # output -> rows that differ

    def combine(self, other: ShadowCounts, sign: float) -> ShadowCounts:
        def merged(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return {k: a.get(k, 0.0) + sign * b.get(k, 0.0) for k in {*a, *b}}

        return ShadowCounts(
            self.copies + sign * other.copies,
            self.errors + sign * other.errors,
            merged(self.rows, other.rows),
            merged(self.disagreeing, other.disagreeing),
        )


@dataclass(slots=True)
class Counts:
    primary: ArmCounts = field(default_factory=ArmCounts)
    candidate: ArmCounts = field(default_factory=ArmCounts)
    shadow: ShadowCounts = field(default_factory=ShadowCounts)
    started_at: float = 0.0  # the instance's inferplane_start_time_seconds (0: unknown)

    def plus(self, other: Counts) -> Counts:
        return self._combine(other, 1.0)

    def minus(self, other: Counts) -> Counts:
        return self._combine(other, -1.0)

    def _combine(self, other: Counts, sign: float) -> Counts:
        return Counts(
            self.primary.combine(other.primary, sign),
            self.candidate.combine(other.candidate, sign),
            self.shadow.combine(other.shadow, sign),
            self.started_at,
        )

    def went_back(self, earlier: Counts) -> bool:
        """The instance restarted since `earlier`: another start time, or a counter below its
        earlier reading."""
        if self.started_at and earlier.started_at and self.started_at != earlier.started_at:
            return True
        pairs = [
            (self.primary.requests, earlier.primary.requests),
            (self.candidate.requests, earlier.candidate.requests),
            (self.shadow.copies, earlier.shadow.copies),
            *((self.shadow.rows.get(k, 0.0), v) for k, v in earlier.shadow.rows.items()),
        ]
        return any(now < before - 1e-9 for now, before in pairs)

    def to_data(self) -> dict[str, Any]:
        return {
            "primary": _arm_data(self.primary),
            "candidate": _arm_data(self.candidate),
            "shadow": {
                "copies": self.shadow.copies,
                "errors": self.shadow.errors,
                "rows": dict(self.shadow.rows),
                "disagreeing": dict(self.shadow.disagreeing),
            },
            "started_at": self.started_at,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Counts:
        shadow = data.get("shadow") or {}
        return cls(
            _arm_from(data.get("primary") or {}),
            _arm_from(data.get("candidate") or {}),
            ShadowCounts(
                float(shadow.get("copies", 0)),
                float(shadow.get("errors", 0)),
                {str(k): float(v) for k, v in (shadow.get("rows") or {}).items()},
                {str(k): float(v) for k, v in (shadow.get("disagreeing") or {}).items()},
            ),
            float(data.get("started_at", 0.0)),
        )


def _arm_data(arm: ArmCounts) -> dict[str, Any]:
    return {"requests": arm.requests, "errors": arm.errors, "buckets": list(arm.buckets)}


def _arm_from(data: Mapping[str, Any]) -> ArmCounts:
    buckets = [float(b) for b in data.get("buckets") or []]
    if len(buckets) != len(_UPPER):  # written with other buckets: latency starts over
        buckets = [0.0] * len(_UPPER)
    return ArmCounts(float(data.get("requests", 0)), float(data.get("errors", 0)), buckets)


@dataclass(frozen=True, slots=True)
class Arms:
    """Which series belong to the rollout: the service, and the two versions it compares."""

    service: str
    primary: tuple[str, str]  # (model, version number)
    candidate: tuple[str, str]


def counts_from_samples(samples: Iterable[Sample], arms: Arms, instance: str) -> dict[str, Counts]:
    """Counts per instance (the `instance` label where samples carry one, else `instance`)."""
    found: dict[str, Counts] = {}
    for name, labels, value in samples:
        if name == _START:
            found.setdefault(labels.get("instance", instance), Counts()).started_at = value
            continue
        if name not in _NAMES:
            continue
        if labels.get("service") != arms.service:
            continue
        key = (labels.get("model", ""), labels.get("version", ""))
        counts = found.setdefault(labels.get("instance", instance), Counts())
        if name in (_SERVICE, _LATENCY):
            if labels.get("arm") == "fallback":
                continue  # a fallback answer is not the arm the policy chose
            if key == arms.candidate:
                arm = counts.candidate
            elif key == arms.primary:
                arm = counts.primary
            else:
                continue
            if name == _SERVICE:
                outcome = labels.get("outcome")
                if outcome in ("ok", "error", "recovered"):
                    arm.requests += value
                if outcome in ("error", "recovered"):
                    arm.errors += value
            else:
                index = _bucket_index(labels.get("le", ""))
                if index is not None:
                    arm.buckets[index] += value
            continue
        if key != arms.candidate:
            continue
        shadow = counts.shadow
        if name == _SHADOW:
            outcome = labels.get("outcome")
            if outcome in ("ok", "error"):
                shadow.copies += value
            if outcome == "error":
                shadow.errors += value
        else:
            output = labels.get("output", "")
            table = shadow.rows if name == _ROWS else shadow.disagreeing
            table[output] = table.get(output, 0.0) + value
    return found


def _bucket_index(le: str) -> int | None:
    try:
        bound = float(le)
    except ValueError:
        return None
    for i, upper in enumerate(_UPPER):
        if abs(upper - bound) <= 1e-9 * max(1.0, upper) or upper == bound:
            return i
    return None


class Source(Protocol):
    description: str

    def read(self, arms: Arms) -> dict[str, Counts]:
        """Cumulative counts per instance now; Unavailable when nothing could be read."""
        ...


class RegistrySource:
    """This process's own metrics: the controller inside `serve`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.description = "this server's metrics"

    def read(self, arms: Arms) -> dict[str, Counts]:
        # Only the series a rollout reads, not every model's histograms.
        wanted = self.registry.restricted_registry(list(_NAMES))
        samples = (
            (s.name, s.labels, s.value) for family in wanted.collect() for s in family.samples
        )
        return counts_from_samples(samples, arms, "local")


class ScrapeSource:
    """The `/metrics` pages of servers (each URL is one instance)."""

    def __init__(self, urls: list[str], headers: Mapping[str, str] | None = None) -> None:
        self.urls = urls
        self.headers = dict(headers or {})
        self.description = ", ".join(urls)

    def read(self, arms: Arms) -> dict[str, Counts]:
        found: dict[str, Counts] = {}
        problems: list[str] = []
        with httpx.Client(timeout=5.0, headers=self.headers) as client:
            for url in self.urls:
                try:
                    samples = scrape(client, url)
                except Unavailable as exc:
                    problems.append(exc.message)
                    continue
                found[url] = counts_from_samples(samples, arms, url).get(url, Counts())
        if problems and not found:
            raise Unavailable("no metrics could be read: " + "; ".join(problems))
        return found


class PrometheusSource:
    """A Prometheus server holding the servers' metrics (instant queries, one per metric)."""

    def __init__(self, url: str, selector: str = "") -> None:
        self.url = url.rstrip("/")
        self.selector = selector  # extra label matchers, e.g. job="inferplane"
        self.description = f"Prometheus at {self.url}"

    def read(self, arms: Arms) -> dict[str, Counts]:
        extra = f",{self.selector}" if self.selector else ""
        service = f'service="{quote(arms.service)}"'
        queries = [
            (_SERVICE, f"sum by (instance, model, version, outcome, arm) ({_SERVICE}{{{service}{extra}}})"),
            (_LATENCY, f"sum by (instance, model, version, le, arm) ({_LATENCY}{{{service}{extra}}})"),
            (_SHADOW, f"sum by (instance, model, version, outcome) ({_SHADOW}{{{service}{extra}}})"),
            (_ROWS, f"sum by (instance, model, version, output) ({_ROWS}{{{service}{extra}}})"),
            (_DISAGREE, f"sum by (instance, model, version, output) ({_DISAGREE}{{{service}{extra}}})"),
            (_START, f"max by (instance) ({_START}{{{self.selector}}})"),
        ]  # fmt: skip
        samples: list[Sample] = []
        with httpx.Client(timeout=10.0) as client:
            for name, promql in queries:
                for _, labels, value in instant_query(client, self.url, promql):
                    labels = dict(labels)
                    if name != _START:
                        labels["service"] = arms.service
                    samples.append((name, labels, value))  # sum by () drops the name
        return counts_from_samples(samples, arms, self.url)


@dataclass(slots=True)
class Window:
    """The counts of one phase, summed over instances from successive cumulative readings."""

    total: Counts = field(default_factory=Counts)
    last: dict[str, Counts] = field(default_factory=dict)
    started: bool = False  # a first reading was taken (the baseline)

    def update(self, now: Mapping[str, Counts]) -> None:
        for instance, counts in now.items():
            before = self.last.get(instance)
            if before is None:
                # An instance seen for the first time after the baseline started with the phase
                # (a replica added, this server restarted under another name): all of it counts.
                delta = counts if self.started else None
            elif counts.went_back(before):
                delta = counts  # restarted: everything it counted is new since then
            else:
                delta = counts.minus(before)
            if delta is not None:
                self.total = self.total.plus(delta)
            self.last[instance] = counts
        self.started = True

    def to_data(self) -> dict[str, Any]:
        return {
            "total": self.total.to_data(),
            "last": {k: v.to_data() for k, v in self.last.items()},
            "started": self.started,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any] | None) -> Window:
        if not data:
            return cls()
        return cls(
            Counts.from_data(data.get("total") or {}),
            {str(k): Counts.from_data(v) for k, v in (data.get("last") or {}).items()},
            bool(data.get("started")),
        )
