"""Prometheus metrics of one streaming worker, on a registry of its own served at `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class StreamMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "inferplane_stream_events_in", "Events read from the source.", registry=r
        )
        self.events_out = Counter(
            "inferplane_stream_events_out", "Output events accepted by the sink.", registry=r
        )
        self.events_dlq = Counter(
            "inferplane_stream_events_dlq",
            "Events sent to the dead-letter queue, by kind of failure.",
            ["reason"],
            registry=r,
        )
        self.redelivered = Counter(
            "inferplane_stream_events_redelivered",
            "Events handed out again (claimed from a dead consumer or re-read).",
            registry=r,
        )
        self.retries = Counter(
            "inferplane_stream_retries", "Predictor calls retried after a transient error.",
            registry=r,
        )  # fmt: skip
        self.consumer_lag = Gauge(
            "inferplane_stream_consumer_lag",
            "Events in the source the group has not finished (Redis: lag + pending; Kafka: high "
            "watermark - committed offset, over this worker's partitions).",
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "inferplane_stream_consumer_lag_seconds",
            "How far behind the group is in time: 0 when caught up, else the age of the newest "
            "event this worker has finished (the oldest unfinished one is at most that old).",
            registry=r,
        )
        self.in_flight = Gauge(
            "inferplane_stream_in_flight_batches", "Batches read and not yet acknowledged.",
            registry=r,
        )  # fmt: skip
        self.end_to_end = Histogram(
            "inferplane_stream_end_to_end_lag_seconds",
            "Event time to output written.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.info = Gauge(
            "inferplane_stream_info",
            "1, labelled with what this worker consumes: the source (broker:stream), group, "
            "consumer name and target (the console's stream view names workers by it).",
            ["source", "group", "consumer", "target"],
            registry=r,
        )
        self.batch_size = Histogram(
            "inferplane_stream_batch_size",
            "Events per micro-batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
