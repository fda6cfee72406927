"""Reading figures that live elsewhere: a process's `/metrics` page, or a Prometheus server's
instant queries. The rollout controller judges arms this way and the console's stream view
reads workers' lag this way."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

from inferplane.errors import Unavailable

# (metric sample name, labels, value)
Sample = tuple[str, Mapping[str, str], float]


def page_samples(text: str) -> Iterator[Sample]:
    """The samples of a Prometheus text page."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, s.value


def scrape(client: httpx.Client, url: str) -> list[Sample]:
    """The samples of the page at `url`; Unavailable naming the URL when it cannot be read."""
    try:
        response = client.get(url)
        response.raise_for_status()
        return list(page_samples(response.text))
    except (httpx.HTTPError, ValueError) as exc:
        raise Unavailable(f"{url}: {exc}") from None


def instant_query(client: httpx.Client, base_url: str, promql: str) -> list[Sample]:
    """One instant query against the Prometheus at `base_url`: a sample per series (named by its
    `__name__` when the query keeps it, else by the query)."""
    try:
        response = client.get(f"{base_url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise Unavailable(f"Prometheus at {base_url}: {exc}") from None
    if body.get("status") != "success":
        raise Unavailable(f"Prometheus at {base_url}: {body.get('error', body)}")
    found: list[Sample] = []
    for item in body["data"]["result"]:
        labels = dict(item["metric"])
        found.append((labels.pop("__name__", promql), labels, float(item["value"][1])))
    return found


def quote(value: str) -> str:
    """`value` inside a PromQL string literal."""
    return value.replace("\\", "\\\\").replace('"', '\\"')
