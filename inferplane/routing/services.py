"""Services: a name callers address, and the traffic policy that picks the version answering it.

`Services.predict` chooses a route (A/B match rules first, then weights, hashed on the sticky key
when one is present), runs it with the route's timeout, retries and circuit breaker, falls back to
another service/version or to a cached answer when it fails, and copies a share of the traffic to
a shadow after the primary has answered. Model code runs through `run`, handed in by the
predictor, so validation, statistics and error mapping stay in one place.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferplane.context import RequestContext
from inferplane.engine.manager import LoadedVersion
from inferplane.errors import (
    BadRequest,
    DeadlineExceeded,
    InferplaneError,
    InternalError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
)
from inferplane.observability import tracing
from inferplane.observability.metrics import Metrics
from inferplane.routing.answer_cache import AnswerCache, input_key
from inferplane.routing.breaker import BreakerState, CircuitBreaker
from inferplane.routing.policy import Policy, Service, Target, check_references
from inferplane.routing.router import Router

log = logging.getLogger("inferplane.routing")

# (version, inputs, outputs, deadline, context) -> outputs; raises InferplaneError
RunVersion = Callable[
    [LoadedVersion, Mapping[str, np.ndarray], Sequence[str] | None, float | None, RequestContext],
    Awaitable[dict[str, np.ndarray]],
]

_CALLER_FAULTS = (BadRequest, PayloadTooLarge)  # the input is at fault: no version would do better


@dataclass(slots=True)
class Routed:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    route: str


class CompiledService:
    """A service's policy with what it needs at request time precomputed."""

    def __init__(self, name: str, spec: Service) -> None:
        self.name = name
        self.spec = spec
        self.names = spec.route_names()
        total = 0.0
        self.bounds: list[float] = []  # cumulative weights: route i owns [bounds[i-1], bounds[i])
        for route in spec.routes:
            total += route.weight
            self.bounds.append(total)
        self.match_values = [frozenset(m.values) for m in spec.match]
        self.cache = AnswerCache(spec.cache.size, spec.cache.ttl_s) if spec.cache else None

    def choose(self, ctx: RequestContext) -> tuple[Target, str, float | None]:
        """(target, route decision, timeout in ms)."""
        spec = self.spec
        for rule, values in zip(spec.match, self.match_values, strict=True):
            if rule.header is not None:
                value = ctx.headers.get(rule.header.lower())
            elif rule.tenant:
                value = ctx.tenant
            else:
                raw = ctx.parameters.get(rule.parameter or "")
                value = None if raw is None else str(raw)
            if value is not None and value in values:
                return rule.route, f"ab:{rule.name}", spec.timeout_ms
        i = min(bisect.bisect_right(self.bounds, self._point(ctx)), len(self.bounds) - 1)
        route = spec.routes[i]
        return route, self.names[i], route.timeout_ms or spec.timeout_ms

    def _point(self, ctx: RequestContext) -> float:
        """Where in [0, 100) this request falls: the sticky key's hash, else chance."""
        sticky = self.spec.sticky
        key: object = None
        if sticky is not None:
            if sticky.header is not None:
                key = ctx.headers.get(sticky.header.lower())
            else:
                key = ctx.parameters.get(sticky.parameter or "")
        if key is None:
            return random.random() * 100
        digest = hashlib.blake2b(f"{self.name}\x00{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 * 100


class Services:
    def __init__(self, router: Router, run: RunVersion, metrics: Metrics | None = None) -> None:
        self.router = router
        self.run = run
        self.metrics = metrics
        self.policy = Policy()
        self.compiled: dict[str, CompiledService] = {}
        self.breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._shadow_inflight: dict[str, int] = {}
        # (service, arm, model, version) -> (ok counter, latency histogram): the hot path's
        # children, looked up once instead of through labels() on every call
        self._arm_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    # policy ------------------------------------------------------------------------------
    def apply(self, policy: Policy, source: str = "services file") -> None:
        """Check `policy` against the models this server knows, then switch to it at once.

        Requests already routed keep the service object they hold, so nothing in flight is
        dropped; a policy that fails the check changes nothing.
        """
        manager = self.router.manager

        def versions_of(model: str) -> Mapping[str, int] | None:
            entry = manager.models.get(model)
            if entry is None or entry.unloaded:
                return None
            known: dict[str, int] = {str(v): v for v in entry.versions}
            known.update(entry.aliases)
            return known

        check_references(policy, versions_of, set(manager.models), source)
        self.compiled = {
            name: CompiledService(name, spec) for name, spec in policy.services.items()
        }
        self.policy = policy
        self.router.service_defaults = {
            name: (spec.routes[0].model, spec.routes[0].version)
            for name, spec in policy.services.items()
        }

    def __contains__(self, name: str) -> bool:
        return name in self.compiled

    # prediction --------------------------------------------------------------------------
    async def predict(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        ctx: RequestContext,
        depth: int = 0,
    ) -> Routed:
        service = self.compiled[name]
        target, decision, timeout_ms = service.choose(ctx)
        key = input_key(inputs) if service.cache is not None else None
        started = time.perf_counter()
        lv: LoadedVersion | None = None
        try:
            lv, _ = self.router.resolve(target.model, target.version)
            routed = await self._attempt(service, lv, decision, timeout_ms, inputs, outputs, ctx)
        except InferplaneError as exc:
            if isinstance(exc, _CALLER_FAULTS):
                self._arm_outcome(service, decision, lv, target, "rejected")
                raise
            try:
                routed = await self._recover(service, key, inputs, outputs, ctx, exc, depth)
            except InferplaneError:
                self._arm_outcome(service, decision, lv, target, "error")
                raise
            self._arm_outcome(service, decision, lv, target, "recovered")
            self._count(service, routed)
            return routed
        self._arm_ok(service, decision, lv, time.perf_counter() - started)
        if key is not None and service.cache is not None:
            service.cache.put(key, routed.model, routed.version, routed.outputs)
        self._count(service, routed)
        shadow = service.spec.shadow
        if shadow is not None and random.random() * 100 < shadow.percent:
            self._start_shadow(service, inputs, routed, ctx)
        return routed

    async def _attempt(
        self,
        service: CompiledService,
        lv: LoadedVersion,
        decision: str,
        timeout_ms: float | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        ctx: RequestContext,
    ) -> Routed:
        spec = service.spec
        breaker = self._breaker(lv, service) if spec.breaker is not None else None
        retries = spec.retries
        tries = 1 + retries.attempts
        for attempt in range(tries):
            if breaker is not None and not breaker.allow():
                raise Unavailable(
                    f"circuit breaker of model '{lv.name}' version {lv.version} is open"
                )
            deadline = ctx.deadline
            if timeout_ms is not None:
                mine = time.monotonic() + timeout_ms / 1000
                deadline = mine if deadline is None else min(deadline, mine)
            try:
                result = await self.run(lv, inputs, outputs, deadline, ctx)
            except _CALLER_FAULTS:
                if breaker is not None:
                    breaker.success()  # the version worked; the input was wrong
                raise
            except InferplaneError as exc:
                if breaker is not None:
                    breaker.failure()
                    self._breaker_metric(lv, breaker)
                caller_expired = ctx.deadline is not None and time.monotonic() >= ctx.deadline
                if attempt + 1 < tries and _kind(exc) in retries.retry_on and not caller_expired:
                    await asyncio.sleep(retries.backoff_ms / 1000 * 2**attempt)
                    continue
                raise
            if breaker is not None:
                breaker.success()
                self._breaker_metric(lv, breaker)
            return Routed(result, lv.name, lv.version, decision)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _recover(
        self,
        service: CompiledService,
        key: bytes | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        ctx: RequestContext,
        error: InferplaneError,
        depth: int,
    ) -> Routed:
        """The chosen route failed: the fallback, else a cached answer, else the error."""
        reason = str(error.status)
        fallback = service.spec.fallback
        if fallback is not None:
            try:
                if fallback.service is not None:
                    routed = await self.predict(fallback.service, inputs, outputs, ctx, depth + 1)
                    routed.route = "fallback"
                else:
                    target = fallback.target()
                    assert target is not None
                    lv, _ = self.router.resolve(target.model, target.version)
                    routed = await self._attempt(
                        service, lv, "fallback", None, inputs, outputs, ctx
                    )
                self._fallback_metric(service, "fallback", reason)
                return routed
            except InferplaneError as exc:
                if isinstance(exc, _CALLER_FAULTS):
                    raise
                log.warning("service %s: fallback failed too: %s", service.name, exc.message)
        if key is not None and service.cache is not None:
            hit = service.cache.get(key)
            if hit is not None:
                model, version, cached = hit
                if outputs:
                    cached = {k: v for k, v in cached.items() if k in outputs}
                self._fallback_metric(service, "cache", reason)
                return Routed(cached, model, version, "cache")
        self._fallback_metric(service, "none", reason)
        raise error

    # shadow ------------------------------------------------------------------------------
    def _start_shadow(
        self,
        service: CompiledService,
        inputs: Mapping[str, np.ndarray],
        primary: Routed,
        ctx: RequestContext,
    ) -> None:
        shadow = service.spec.shadow
        assert shadow is not None
        busy = self._shadow_inflight.get(service.name, 0)
        if busy >= shadow.max_inflight:
            # A slow shadow must never queue work without bound or take CPU from the primary.
            if self.metrics is not None:
                self.metrics.shadow_requests.labels(
                    service.name, shadow.model, shadow.version or "", "skipped"
                ).inc()
            return
        self._shadow_inflight[service.name] = busy + 1
        task = asyncio.get_running_loop().create_task(
            self._run_shadow(
                service, shadow, inputs, primary, ctx.request_id, ctx.pattern, ctx.span
            )
        )
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _run_shadow(
        self,
        service: CompiledService,
        shadow: Target,
        inputs: Mapping[str, np.ndarray],
        primary: Routed,
        primary_id: str,
        pattern: str,
        primary_span: Any = None,
    ) -> None:
        model, version = shadow.model, shadow.version or ""
        shadow_ctx = RequestContext(request_id=f"{primary_id}:shadow", pattern=pattern)
        tracer = tracing.ACTIVE
        if primary_span is not None and tracer is not None:
            # A trace of its own, linked to the primary's route: the shadow runs after the
            # answer went out and must not stretch the caller's trace.
            shadow_ctx.span = tracer.root(
                f"shadow {shadow.model}:{shadow.version or ''}".rstrip(":"),
                {"inferplane.service": service.name, "inferplane.request_id": primary_id},
                links=[primary_span.get_span_context()],
            )
        try:
            lv, _ = self.router.resolve(shadow.model, shadow.version)
            model, version = lv.name, lv.version
            if (model, version) == (primary.model, primary.version):
                # The caller was answered by the shadow's own version (a rollout's canary arm
                # while the shadow mirrors the rest): comparing it with itself says nothing.
                return
            if shadow_ctx.span is not None:
                shadow_ctx.span.set_attribute("inferplane.model", model)
                shadow_ctx.span.set_attribute("inferplane.model_version", version)
            started = time.perf_counter()
            result = await self.run(lv, inputs, None, None, shadow_ctx)
            elapsed = time.perf_counter() - started
        except Exception as exc:  # a shadow's failure is a metric, never the caller's problem
            log.debug("service %s: shadow %s:%s failed: %s", service.name, model, version, exc)
            if shadow_ctx.span is not None:
                tracing.fail(shadow_ctx.span, str(exc))
            if self.metrics is not None:
                self.metrics.shadow_requests.labels(service.name, model, version, "error").inc()
            return
        finally:
            self._shadow_inflight[service.name] -= 1
            if shadow_ctx.span is not None:
                shadow_ctx.span.end()
        m = self.metrics
        if m is None:
            return
        m.shadow_requests.labels(service.name, model, version, "ok").inc()
        m.shadow_latency.labels(service.name, model, version).observe(elapsed)
        for out_name, mine in result.items():
            theirs = primary.outputs.get(out_name)
            if theirs is None or theirs.shape != mine.shape or mine.size == 0:
                continue
            rows = mine.shape[0] if mine.ndim else 1
            labels = (service.name, model, version, out_name)
            if mine.dtype.kind in "iub" or mine.dtype == object:
                differ = mine != theirs
                if differ.ndim > 1:
                    differ = differ.reshape(rows, -1).any(axis=1)
                m.shadow_rows.labels(*labels).inc(rows)
                m.shadow_disagreements.labels(*labels).inc(int(np.count_nonzero(differ)))
            elif mine.dtype.kind == "f":
                diff = np.abs(mine.astype(np.float64) - theirs.astype(np.float64)).mean()
                m.shadow_rows.labels(*labels).inc(rows)
                m.shadow_abs_diff.labels(*labels).observe(float(diff))

    async def drain_shadows(self, timeout_s: float = 5.0) -> None:
        if self._shadow_tasks:
            await asyncio.wait(list(self._shadow_tasks), timeout=timeout_s)

    # bookkeeping -------------------------------------------------------------------------
    def _breaker(self, lv: LoadedVersion, service: CompiledService) -> CircuitBreaker:
        key = (lv.name, lv.version)
        breaker = self.breakers.get(key)
        settings = service.spec.breaker
        assert settings is not None
        if breaker is None or breaker.settings != settings:
            breaker = self.breakers[key] = CircuitBreaker(settings)
        return breaker

    def _breaker_metric(self, lv: LoadedVersion, breaker: CircuitBreaker) -> None:
        if self.metrics is not None:
            self.metrics.breaker_state.labels(lv.name, lv.version).set(int(breaker.state))

    def breaker_state(self, model: str, version: str) -> BreakerState:
        breaker = self.breakers.get((model, version))
        return BreakerState.CLOSED if breaker is None else breaker.state

    def _arm_ok(
        self, service: CompiledService, arm: str, lv: LoadedVersion, seconds: float
    ) -> None:
        if self.metrics is None:
            return
        key = (service.name, arm, lv.name, lv.version)
        children = self._arm_children.get(key)
        if children is None:
            m = self.metrics
            children = self._arm_children[key] = (
                m.service_requests.labels(*key, "ok"),
                m.service_latency.labels(*key),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _arm_outcome(
        self,
        service: CompiledService,
        arm: str,
        lv: LoadedVersion | None,
        target: Target,
        outcome: str,
    ) -> None:
        if self.metrics is None:
            return
        # A version that could not even be resolved is named as the policy names it.
        model, version = (lv.name, lv.version) if lv is not None else (target.model, "")
        self.metrics.service_requests.labels(service.name, arm, model, version, outcome).inc()

    def _count(self, service: CompiledService, routed: Routed) -> None:
        if self.metrics is not None:
            self.metrics.route_decisions.labels(
                service.name, routed.route, routed.model, routed.version
            ).inc()

    def _fallback_metric(self, service: CompiledService, answered_by: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.fallbacks.labels(service.name, answered_by, reason).inc()


def _kind(exc: InferplaneError) -> str:
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, DeadlineExceeded):
        return "deadline"
    if isinstance(exc, Unavailable | NotFound):
        return "unavailable"
    if isinstance(exc, InternalError):
        return "internal"
    return "other"
