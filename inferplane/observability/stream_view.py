"""Where the stream workers stand, for the console: each worker's lag, throughput and dead
letters, read from the workers' own `/metrics` pages (`serve --stream-metrics URL`) or from a
Prometheus that scrapes them (`serve --prometheus URL`). The server never holds these figures:
it reads them when asked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from inferplane.errors import Unavailable
from inferplane.observability.prom_read import Sample, instant_query, scrape

# series -> the field of WorkerFigures it fills (counters summed over their labels)
_FIELDS = {
    "inferplane_stream_consumer_lag": "lag",
    "inferplane_stream_consumer_lag_seconds": "lag_seconds",
    "inferplane_stream_events_in_total": "events_in",
    "inferplane_stream_events_out_total": "events_out",
    "inferplane_stream_events_dlq_total": "events_dlq",
    "inferplane_stream_in_flight_batches": "in_flight",
}
INFO = "inferplane_stream_info"  # labels source, group, consumer, target
_TIMEOUT_S = 2.0  # a dead worker must not hold the console's poll


@dataclass(slots=True)
class WorkerFigures:
    instance: str  # the /metrics URL, or Prometheus' instance label
    up: bool = True
    error: str | None = None
    source: str | None = None
    group: str | None = None
    consumer: str | None = None
    target: str | None = None
    lag: float | None = None
    lag_seconds: float | None = None
    events_in: float | None = None
    events_out: float | None = None
    events_dlq: float | None = None
    in_flight: float | None = None

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        if name == INFO:
            self.source, self.group = labels.get("source"), labels.get("group")
            self.consumer, self.target = labels.get("consumer"), labels.get("target")
            return
        field = _FIELDS.get(name)
        if field is not None:
            before = getattr(self, field)
            setattr(self, field, value if before is None else before + value)

    def settle(self) -> None:
        # Dead letters are counted by reason: a worker that never had one has no series yet.
        if self.events_dlq is None and self.events_in is not None:
            self.events_dlq = 0.0


class StreamView:
    def __init__(self, urls: list[str], prometheus: str | None = None, selector: str = "") -> None:
        self.urls = list(urls)
        self.prometheus = prometheus.rstrip("/") if prometheus else None
        self.selector = selector

    @property
    def configured(self) -> bool:
        return bool(self.urls or self.prometheus)

    def read(self) -> dict[str, Any]:
        """{"from": where, "workers": [...]} with every worker's figures; a worker that could
        not be read is listed with up false and the reason."""
        workers: list[WorkerFigures] = []
        error = None
        where: str | None
        if self.prometheus:
            try:
                workers = self._from_prometheus()
            except Unavailable as exc:
                error = exc.message
            where = f"Prometheus at {self.prometheus}"
        else:
            workers = self._from_pages()
            where = "the workers' /metrics pages" if self.urls else None
        return {"from": where, "error": error, "workers": [asdict(w) for w in workers]}

    def _from_pages(self) -> list[WorkerFigures]:
        def one(url: str) -> WorkerFigures:
            figures = WorkerFigures(url)
            try:
                with httpx.Client(timeout=_TIMEOUT_S) as client:
                    samples = scrape(client, url)
            except Unavailable as exc:
                figures.up, figures.error = False, exc.message
                return figures
            _fill(figures, samples)
            return figures

        if not self.urls:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(self.urls))) as pool:
            return list(pool.map(one, self.urls))

    def _from_prometheus(self) -> list[WorkerFigures]:
        assert self.prometheus is not None
        names = "|".join([INFO, *_FIELDS])
        extra = f",{self.selector}" if self.selector else ""
        with httpx.Client(timeout=_TIMEOUT_S) as client:
            samples = instant_query(client, self.prometheus, f'{{__name__=~"{names}"{extra}}}')
        by_instance: dict[str, WorkerFigures] = {}
        for name, labels, value in samples:
            instance = labels.get("instance", "?")
            by_instance.setdefault(instance, WorkerFigures(instance)).add(name, dict(labels), value)
        for figures in by_instance.values():
            figures.settle()
        return [by_instance[k] for k in sorted(by_instance)]


def _fill(figures: WorkerFigures, samples: list[Sample]) -> None:
    for name, labels, value in samples:
        figures.add(name, dict(labels), value)
    figures.settle()
