"""The interface that online serving, streaming and batch all call, and its in-process form.

`InProcessPredictor` runs edge validation -> routing -> engine in this process;
`inferplane.remote.RemotePredictor` (a V2 HTTP client) satisfies the same protocol for
model-as-a-service deployments. `open_predictor` picks one from a command's options.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inferplane.context import RequestContext
from inferplane.edge.validation import validate_inputs
from inferplane.engine.manager import LoadedVersion, ModelManager, State
from inferplane.engine.residency import ResidencyOptions
from inferplane.errors import BadRequest, InferplaneError, InternalError
from inferplane.observability import tracing
from inferplane.observability.audit import AuditLog, AuditRecord, open_sink
from inferplane.observability.metrics import Metrics
from inferplane.observability.redaction import AuditRules, audit_salt
from inferplane.repository.store import Repository
from inferplane.routing.policy import Policy
from inferplane.routing.policy_source import PolicySource, default_services_url
from inferplane.routing.router import Router
from inferplane.routing.services import Services
from inferplane.tensors import TensorSpec


@dataclass(slots=True)
class Prediction:
    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    route: str = "direct"


@dataclass(slots=True)
class Signature:
    """What a target answers with today: the version a request without a version would reach."""

    model_name: str
    model_version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0


class Predictor(Protocol):
    async def signature(self, target: str, version: str | None = None) -> Signature: ...

    async def predict(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        context: RequestContext,
    ) -> Prediction: ...


class InProcessPredictor:
    """edge validation -> routing (services, or a model's version) -> engine, in this process.

    Every call, whatever its outcome, leaves one audit record when an `AuditLog` is attached.
    """

    def __init__(self, manager: ModelManager, audit: AuditLog | None = None) -> None:
        self.manager = manager
        self.router = Router(manager)
        self.services = Services(self.router, self._run, manager.metrics)
        self.audit = audit
        # The redaction rules of the policy in force, compiled when a sampled request first
        # meets that policy (a reload swaps the policy object, so identity says when).
        self._rules_of: Policy | None = None
        self._rules = AuditRules()

    async def aclose(self) -> None:
        """Let shadows finish, stop the models, flush the audit trail."""
        await self.services.drain_shadows()
        await self.manager.close()
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)

    def is_service(self, target: str) -> bool:
        return target in self.services.compiled

    async def signature(self, target: str, version: str | None = None) -> Signature:
        if self.manager.unread:
            await self.manager.read_now(target)
        lv, _ = self.router.resolve(target, version)
        cfg = lv.config
        return Signature(
            lv.name, lv.version, cfg.input_specs(), cfg.output_specs(), cfg.max_batch_size
        )

    async def predict(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        context: RequestContext,
    ) -> Prediction:
        if context.span is not None:
            return await self._traced(target, inputs, version, outputs, context)
        return await self._audited(target, inputs, version, outputs, context)

    async def _traced(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        version: str | None,
        outputs: Sequence[str] | None,
        context: RequestContext,
    ) -> Prediction:
        """The `route` span: what the target resolved to; the work below goes under it."""
        tracer, parent = tracing.ACTIVE, context.span
        if tracer is None:  # tracing was switched off while the request was on its way
            context.span = None
            return await self._audited(target, inputs, version, outputs, context)
        service = version is None and target in self.services.compiled
        span = tracer.child(
            parent,
            f"route {target}",
            {"inferplane.service" if service else "inferplane.target": target},
        )
        context.span = span
        try:
            prediction = await self._audited(target, inputs, version, outputs, context)
            span.set_attribute("inferplane.route", prediction.route)
            span.set_attribute("inferplane.model", prediction.model_name)
            span.set_attribute("inferplane.model_version", prediction.model_version)
            return prediction
        except InferplaneError as exc:
            if exc.status >= 500:
                tracing.fail(span, exc.message)
            span.set_attribute("inferplane.status", exc.status)
            raise
        finally:
            context.span = parent
            span.end()

    async def _audited(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        version: str | None,
        outputs: Sequence[str] | None,
        context: RequestContext,
    ) -> Prediction:
        audit = self.audit
        if audit is None:
            return await self._predict(target, inputs, version, outputs, context)
        arrived, started = time.time(), time.perf_counter()
        prediction: Prediction | None = None
        status, error = 500, None
        try:
            prediction = await self._predict(target, inputs, version, outputs, context)
            status = 200
            return prediction
        except InferplaneError as exc:
            status, error = exc.status, exc.message
            raise
        finally:
            record = AuditRecord(
                request_id=context.request_id,
                time=arrived,
                service=target,
                model=prediction.model_name if prediction else "",
                version=prediction.model_version if prediction else (version or ""),
                route=prediction.route if prediction else "",
                latency_ms=(time.perf_counter() - started) * 1000,
                status=status,
                tenant=context.tenant,
                error=error,
                pattern=context.pattern,
                principal=context.principal,
                trace_id=(
                    tracing.trace_id_of(context.span)
                    if context.span is not None
                    else tracing.trace_id_from(context.traceparent)
                ),
            )
            if audit.wants_payload():
                # Redacted here, before the record leaves the request: raw values of a
                # redacted field never reach the buffer or the sink.
                redactor = self._audit_rules().for_request(target, record.model)
                record.payload_hash, record.payload = redactor.capture(inputs)
            audit.record(record)

    def _audit_rules(self) -> AuditRules:
        policy = self.services.policy
        if policy is not self._rules_of:
            self._rules, self._rules_of = policy.audit_rules(), policy
        return self._rules

    async def _predict(
        self,
        target: str,
        inputs: Mapping[str, np.ndarray],
        version: str | None,
        outputs: Sequence[str] | None,
        context: RequestContext,
    ) -> Prediction:
        if version is None and target in self.services.compiled:
            routed = await self.services.predict(target, inputs, outputs, context)
            return Prediction(routed.outputs, routed.model, routed.version, routed.route)
        if self.manager.unread:  # an on-demand server's first seconds: read its model.yaml now
            await self.manager.read_now(target)
        lv, route = self.router.resolve(target, version)
        result = await self._run(lv, inputs, outputs, context.deadline, context)
        return Prediction(result, lv.name, lv.version, route)

    async def _run(
        self,
        lv: LoadedVersion,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None,
        context: RequestContext,
    ) -> dict[str, np.ndarray]:
        """One version, validated and counted; framework errors mapped to ours."""
        validate_inputs(lv.config, inputs, outputs)
        started = time.perf_counter_ns()
        ok = False
        span = trace = None
        if context.span is not None and tracing.ACTIVE is not None:
            span = tracing.ACTIVE.child(
                context.span,
                f"infer {lv.name}:{lv.version}",
                {"inferplane.model": lv.name, "inferplane.model_version": lv.version},
            )
            trace = span.get_span_context()
        try:
            if lv.state is not State.READY:
                # On demand, evicted or idle-unloaded: the request waits for its load.
                if span is not None:
                    span.set_attribute("inferplane.cold_start", True)
                await self.manager.activate(lv, deadline)
            result = await self.manager.infer(
                lv,
                dict(inputs),
                outputs,
                deadline,
                context.priority,
                # Offline scoring may hand the model more rows than an online execution takes:
                # it runs alone, in one execution, where large batches are cheapest per row.
                oversize=context.pattern == "batch",
                trace=trace,
            )
            ok = True
            return result
        except InferplaneError:
            raise
        except (ValueError, TypeError) as exc:
            # The framework refused this input (e.g. a value it cannot handle): the caller's problem.
            raise BadRequest(
                f"model '{lv.name}' version {lv.version} rejected the input: {exc}"
            ) from exc
        except Exception as exc:
            if _is_invalid_argument(exc):
                raise BadRequest(
                    f"model '{lv.name}' version {lv.version} rejected the input: {exc}"
                ) from exc
            raise InternalError(
                f"model '{lv.name}' version {lv.version} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            lv.stats.record_request(ok, time.perf_counter_ns() - started)
            if span is not None:
                if not ok:
                    tracing.fail(span, str(sys.exc_info()[1] or "cancelled"))
                span.end()


def build_in_process(
    repository: str,
    *,
    models: Sequence[str] = (),
    services: str | None = None,
    audit_sink: str | None = None,
    audit_payload_sample: float = 0.0,
    strict_readiness: bool = False,
    pickles: str = "warn",
    residency: ResidencyOptions | None = None,
    cache_dir: str | None = None,
    cache_size: int | None = None,
) -> tuple[InProcessPredictor, PolicySource]:
    """The server's and the commands' in-process stack: a manager over `repository` (models not
    loaded yet), its predictor with the audit trail (keeping the redacted payload of a share
    `audit_payload_sample` of requests), and where its traffic policy comes from (`services`,
    default `<repository>/services.yaml` when present). `residency`: eager or on-demand loading,
    the memory budget; `cache_dir`/`cache_size`: the local copies of a remote repository."""
    if not 0.0 <= audit_payload_sample <= 1.0:
        raise BadRequest(
            f"the audit payload sample must be within [0, 1], got {audit_payload_sample}"
        )
    metrics = Metrics()
    manager = ModelManager(
        Repository(repository, cache_dir=cache_dir, cache_size=cache_size),
        metrics,
        list(models) or None,
        strict_readiness=strict_readiness,
        pickles=pickles,  # warn | allow | refuse: see runtimes.base.check_pickles
        residency=residency,  # None: eager, no budget
    )
    audit = None
    if audit_sink:
        audit = AuditLog(
            open_sink(audit_sink),
            registry=metrics.registry,
            payload_sample_rate=audit_payload_sample,
        )
        if audit_payload_sample > 0:
            audit_salt()  # reads the salt now: a missing one is reported at startup
    predictor = InProcessPredictor(manager, audit)
    policy = PolicySource(
        services or default_services_url(repository), predictor.services, services is not None
    )
    return predictor, policy


@contextlib.asynccontextmanager
async def open_predictor(
    *,
    repository: str | None = None,
    server: str | None = None,
    models: Sequence[str] = (),
    services: str | None = None,
    audit_sink: str | None = None,
    audit_payload_sample: float = 0.0,
) -> AsyncIterator[Predictor]:
    """The predictor a streaming or batch command asked for: exactly one of the two options.

    In-process, the named models (default: all) are loaded and warmed before this yields, the
    traffic policy (`services`, default `<repository>/services.yaml` when present) applies as it
    does in the server, and `audit_sink` (see docs/audit.md) records every prediction, with the
    redacted payload of a share `audit_payload_sample` of them. Remote, the server applies its
    own policy and audit.
    """
    if (repository is None) == (server is None):
        raise BadRequest("give exactly one of --repository (in-process) and --server (remote)")
    if server is not None:
        from inferplane.remote import RemotePredictor

        remote = RemotePredictor(server)
        try:
            yield remote
        finally:
            await remote.aclose()
        return
    assert repository is not None
    predictor, policy = build_in_process(
        repository,
        models=models,
        services=services,
        audit_sink=audit_sink,
        audit_payload_sample=audit_payload_sample,
    )
    try:
        await predictor.manager.load_initial()
        await asyncio.to_thread(policy.load)
        yield predictor
    finally:
        await predictor.aclose()


def _is_invalid_argument(exc: Exception) -> bool:
    # ONNX Runtime reports bad inputs as InvalidArgument / Fail with an "INVALID_ARGUMENT" text.
    return type(exc).__name__ in {"InvalidArgument", "InvalidArgumentException"} or (
        "INVALID_ARGUMENT" in str(exc)
    )
