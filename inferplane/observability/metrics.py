"""Prometheus metrics. Each server owns its registry so that several can live in one process."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets from 100 µs to 10 s: online models answer in well under a millisecond up to
# seconds for large batches; the default buckets start at 5 ms and hide everything fast.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
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
        self.model_load_seconds = Gauge(
            "inferplane_model_load_seconds",
            "Seconds the last load of a model version took (fetch, verify, load, warm-up).",
            ["model", "version"],
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
