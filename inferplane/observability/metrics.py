"""Prometheus metrics. Each server owns its registry so that several can live in one process."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets from 100 µs to 10 s: online models answer in well under a millisecond up to
# seconds for large batches; the default buckets start at 5 ms and hide everything fast.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Ten buckets a decade (x1.26) from 100 µs to 10 s, for the arms of a service: a rollout compares
# two arms' p95 to a ratio such as 1.25, which the 1-2.5-5 buckets above cannot resolve.
ARM_BUCKETS = tuple(float(f"{10 ** (k / 10):.3g}") for k in range(-40, 11))
UNKNOWN = "_unknown"  # the model label of requests for models we do not serve (bounded cardinality)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "inferplane_requests_total",
            "Inference requests by model, version, protocol and status code.",
            ["model", "version", "protocol", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "inferplane_request_duration_seconds",
            "Wall time of an inference request inside the server, decode to encode.",
            ["model", "version", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            "inferplane_queue_duration_seconds",
            "Time a request waited before its model started running it.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_latency = Histogram(
            "inferplane_compute_duration_seconds",
            "Time the model ran for one execution.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "inferplane_batch_size",
            "Rows per model execution.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.busy_poll_seconds = Counter(
            "inferplane_busy_poll_seconds",
            "Wall time the event loop polled instead of sleeping after answers (--busy-poll-us).",
            registry=r,
        )
        self.start_time = Gauge(
            "inferplane_start_time_seconds",
            "When this server's metrics began (Unix time): a reader of its counters tells a "
            "restart by it.",
            registry=r,
        )
        self.start_time.set(time.time())
        self.inflight = Gauge(
            "inferplane_inflight_requests",
            "Inference requests being handled now (an autoscaling signal).",
            registry=r,
        )
        self.model_ready = Gauge(
            "inferplane_model_ready",
            "1 when a model version is loaded and warmed up, else 0.",
            ["model", "version"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "inferplane_model_load_seconds",
            "Seconds a model version's load took (fetch, verify, load, warm-up), by where its "
            "files came from: local (a repository on disk), cache (the local artifact cache) or "
            "remote (downloaded).",
            ["source"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_loads = Counter(
            "inferplane_model_loads_total",
            "Successful loads of a model version, by why: startup, first_use, after_eviction, "
            "after_idle, after_unload, after_failure, explicit (the repository API).",
            ["model", "version", "reason"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "inferplane_model_load_failures_total",
            "Failed loads of a model version (fetch, sha256, runtime load, warm-up or memory "
            "budget); the server log names each reason.",
            ["model", "version"],
            registry=r,
        )
        self.model_evictions = Counter(
            "inferplane_model_evictions_total",
            "Model versions unloaded by the server: memory (to fit another under the budget) or "
            "idle (unused past idle_unload_s).",
            ["reason"],
            registry=r,
        )
        self.models_resident = Gauge(
            "inferplane_models_resident",
            "Model versions loaded now.",
            registry=r,
        )
        self.resident_bytes = Gauge(
            "inferplane_resident_bytes",
            "Memory the loaded and loading model versions take: measured footprints, or the "
            "estimate a loading version was admitted with.",
            registry=r,
        )
        self.memory_budget = Gauge(
            "inferplane_memory_budget_bytes",
            "The server's memory budget for models (serve --memory-budget); absent without one.",
            registry=r,
        )

        # Traffic policies (services): what answered, what the shadow saw, what failed over.
        self.route_decisions = Counter(
            "inferplane_route_decisions_total",
            "Service calls by the route that answered them (primary, canary, ab:<rule>, "
            "fallback, cache) and the model version behind it.",
            ["service", "route", "model", "version"],
            registry=r,
        )
        self.service_requests = Counter(
            "inferplane_service_requests_total",
            "Service calls by the arm the policy chose (primary, canary, ab:<rule>, ...), the "
            "model version behind it and the outcome: ok, error (the caller got an error), "
            "recovered (the arm failed, a fallback or cached answer was served) or rejected "
            "(the caller's input was at fault). The rollout controller and SLO alerts read it.",
            ["service", "arm", "model", "version", "outcome"],
            registry=r,
        )
        self.service_latency = Histogram(
            "inferplane_service_request_duration_seconds",
            "Time a service call's chosen arm took to answer (routing, queue and model; "
            "successful calls only).",
            ["service", "arm", "model", "version"],
            buckets=ARM_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "inferplane_fallbacks_total",
            "Service calls whose chosen route failed, by what answered instead (fallback, cache, "
            "none) and why the route failed (the error's status code).",
            ["service", "answered_by", "reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "inferplane_circuit_breaker_state",
            "Circuit breaker of a model version: 0 closed, 1 open, 2 half-open.",
            ["model", "version"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "inferplane_shadow_requests_total",
            "Copies of service traffic sent to a shadow version, by outcome (ok, error, skipped).",
            ["service", "model", "version", "outcome"],
            registry=r,
        )
        self.shadow_latency = Histogram(
            "inferplane_shadow_duration_seconds",
            "Time a shadow version took to answer its copy of a request.",
            ["service", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_rows = Counter(
            "inferplane_shadow_compared_rows_total",
            "Rows of an output compared between the primary and its shadow.",
            ["service", "model", "version", "output"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "inferplane_shadow_disagreeing_rows_total",
            "Rows of an integer/label output where the shadow answered differently from the "
            "primary; divide by inferplane_shadow_compared_rows_total for the disagreement rate.",
            ["service", "model", "version", "output"],
            registry=r,
        )
        self.shadow_abs_diff = Histogram(
            "inferplane_shadow_abs_difference",
            "Mean absolute difference between the primary's and the shadow's float output, one "
            "observation per request (sum/count gives the mean).",
            ["service", "model", "version", "output"],
            buckets=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 1, 10),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class VersionMetrics:
    """The label children of one model version, resolved once instead of on every request."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.queue = metrics.queue_latency.labels(model, version)
        self.compute = metrics.compute_latency.labels(model, version)
        self.batch = metrics.batch_size.labels(model, version)

    def execution(self, timing: Any) -> None:
        """`timing`: an engine ExecutionTiming (rows, queue_ns per request, infer_ns)."""
        for q in timing.queue_ns:
            self.queue.observe(q / 1e9)
        self.compute.observe(timing.infer_ns / 1e9)
        self.batch.observe(timing.rows)
