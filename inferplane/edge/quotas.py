"""Per-tenant (and per tenant x target) quotas: token buckets for requests and rows, in-flight caps.

All in-process, on the event loop: a check is a few float operations, so admitting a request
costs well under a microsecond and needs no lock or external store. A fleet shares a global
limit by giving each replica its share (`share`: the number of replicas, e.g. from
`INFERPLANE_QUOTA_SHARE`), which is exact while the load balancer spreads tenants evenly;
docs/security.md says when that is not enough.

Buckets may go into debt by one request's rows: a request of more rows than the burst is still
served once the bucket is full, and the tenant then waits until the debt is paid, so no request
size is refused for ever.
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass

from inferplane.edge.access import Quota
from inferplane.errors import TooManyRequests

_MAX_STATES = 100_000  # distinct (quota, tenant, target) buckets kept; idle ones go past it


class Bucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def _refill(self, now: float) -> float:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.tokens, self.stamp = tokens, now
        return tokens

    def wait_for(self, now: float, need: float) -> float:
        """0 if `need` tokens (or, past the burst, a full bucket) are there; else seconds."""
        tokens = self._refill(now)
        want = min(need, self.burst)
        return 0.0 if tokens >= want else (want - tokens) / self.rate

    def take(self, amount: float) -> None:
        self.tokens -= amount


@dataclass(slots=True)
class QuotaState:
    quota: Quota
    label: str  # "tenant" or "tenant/target", for messages
    requests: Bucket | None
    rows: Bucket | None
    max_inflight: int | None
    inflight: int = 0


class Lease:
    """One admitted request's hold on its quotas: rows are charged once decoded, the in-flight
    count is released when the answer is written."""

    __slots__ = ("released", "states")

    def __init__(self, states: list[QuotaState]) -> None:
        self.states = states
        self.released = False

    def charge_rows(self, rows: int) -> None:
        now = time.monotonic()
        for state in self.states:
            bucket = state.rows
            if bucket is None:
                continue
            wait = bucket.wait_for(now, rows)
            if wait > 0:
                raise TooManyRequests(
                    f"rows quota of {state.label} exceeded ({state.quota.rows_per_s:g} rows/s); "
                    f"retry in {wait:.2f} s",
                    wait,
                )
        for state in self.states:
            if state.rows is not None:
                state.rows.take(rows)

    def release(self) -> None:
        if not self.released:
            self.released = True
            for state in self.states:
                state.inflight -= 1


NO_LEASE = Lease([])


class Quotas:
    def __init__(self, quotas: list[Quota], share: float = 1.0) -> None:
        if share < 1:
            raise ValueError("the quota share (replicas) must be >= 1")
        self.quotas = quotas
        self.share = share
        self._states: dict[tuple[int, str, str | None], QuotaState] = {}
        self._matching: dict[tuple[str, str], list[tuple[int, Quota]]] = {}
        # (tenant, target) -> its states: the look-up every request makes
        self._resolved: dict[tuple[str, str], list[QuotaState]] = {}

    def _rules(self, tenant: str, target: str) -> list[tuple[int, Quota]]:
        key = (tenant, target)
        rules = self._matching.get(key)
        if rules is None:
            rules = [
                (i, q)
                for i, q in enumerate(self.quotas)
                if fnmatch.fnmatchcase(tenant, q.tenant)
                and (q.target is None or fnmatch.fnmatchcase(target, q.target))
            ]
            if len(self._matching) >= _MAX_STATES:
                self._matching.clear()
            self._matching[key] = rules
        return rules

    def _state(self, index: int, quota: Quota, tenant: str, target: str) -> QuotaState:
        scope = target if quota.target is not None else None
        key = (index, tenant, scope)
        state = self._states.get(key)
        if state is None:
            if len(self._states) >= _MAX_STATES:
                self._states = {k: s for k, s in self._states.items() if s.inflight}
                self._resolved.clear()  # it may hold states dropped just now
            share = self.share
            requests = rows = None
            if quota.requests_per_s is not None:
                burst = quota.burst if quota.burst is not None else max(quota.requests_per_s, 1)
                requests = Bucket(quota.requests_per_s / share, max(burst / share, 1.0))
            if quota.rows_per_s is not None:
                burst = quota.rows_burst if quota.rows_burst is not None else quota.rows_per_s
                rows = Bucket(quota.rows_per_s / share, max(burst / share, 1.0))
            inflight = None
            if quota.max_inflight is not None:
                inflight = max(1, math.ceil(quota.max_inflight / share))
            label = f"tenant '{tenant}'" + (f" on '{target}'" if scope is not None else "")
            state = QuotaState(quota, label, requests, rows, inflight)
            self._states[key] = state
        return state

    def admit(self, tenant: str, target: str) -> Lease:
        """A lease on every quota that applies, or TooManyRequests (nothing taken then)."""
        key = (tenant, target)
        states = self._resolved.get(key)
        if states is None:
            states = [self._state(i, q, tenant, target) for i, q in self._rules(tenant, target)]
            if len(self._resolved) >= _MAX_STATES:
                self._resolved.clear()
            self._resolved[key] = states
        if not states:
            return NO_LEASE
        now = time.monotonic()
        for state in states:
            if state.max_inflight is not None and state.inflight >= state.max_inflight:
                raise TooManyRequests(
                    f"{state.label} has {state.inflight} requests in flight, its limit",
                    0.1,  # in-flight slots free up in about a request's time
                )
            if state.requests is not None:
                wait = state.requests.wait_for(now, 1.0)
                if wait > 0:
                    raise TooManyRequests(
                        f"rate limit of {state.label} exceeded "
                        f"({state.quota.requests_per_s:g} requests/s); retry in {wait:.2f} s",
                        wait,
                    )
        for state in states:
            state.inflight += 1
            if state.requests is not None:
                state.requests.take(1.0)
        return Lease(states)
