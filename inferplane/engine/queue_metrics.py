"""`inferplane_queue_depth`: requests queued per loaded version, read at scrape time.

An autoscaling signal beside in-flight requests: in-flight counts what the server holds, the
queue depth says which model it waits for. Read from the schedulers when Prometheus scrapes,
so queueing pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inferplane.engine.scheduler import Scheduler

# (model, version, its scheduler) for every version holding one now
Queues = Callable[[], Iterable[tuple[str, str, Scheduler]]]


class QueueDepthCollector(Collector):
    def __init__(self, queues: Queues) -> None:
        self.queues = queues

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for model, version, scheduler in self.queues():
            family.add_metric([model, version], scheduler.depth)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "inferplane_queue_depth",
            "Requests queued for a loaded model version, not yet running (an autoscaling signal).",
            labels=["model", "version"],
        )
