"""A repository for rollout tests: model `reco` (python, tabular's input shape) whose versions
behave differently on purpose, and a load generator that records what each caller got.

    1  the primary: label = x[:, 0] > 0.5, 10 ms a call (long beside the noise of a busy
       2-core machine, so that 3x is plain in the p95)
    2  the same, a healthy candidate
    3  the same, but every 20th call raises (5 %)
    4  the same labels, 3x slower (30 ms)
    5  the labels flipped
"""

from __future__ import annotations

import random
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from inferplane.repository.register import register
from inferplane.repository.store import Repository
from inferplane.tensors import TensorSpec

MODEL = textwrap.dedent(
    """
    import itertools, time
    import numpy as np

    MODE = {mode!r}
    CALLS = itertools.count(1)  # every 20th call fails: 5 %, not 5 % on average (a 5 % coin
    # gives 0 or 1 failures in 100 calls 4 times in 100, and a rollout test would flake on it)


    class Model:
        def predict(self, inputs):
            x = inputs["input"]
            warm_up = not x.any()  # the server warms models up on zeros
            time.sleep(0.03 if MODE == "slow" else 0.01)
            if MODE == "errors" and not warm_up and next(CALLS) % 20 == 0:
                raise RuntimeError("failing 5% of calls on purpose")
            label = (x[:, 0] > 0.5).astype(np.int64)
            if MODE == "labels":
                label = 1 - label
            return {{"label": label}}
    """
)
MODES = {1: "good", 2: "good", 3: "errors", 4: "slow", 5: "labels"}
MIN_REQUESTS = 60
# The gates of the rollout tests. max_wait: their callers reach min_requests at a 10 % step in
# seconds, not in the default two holds (3 s) on a busy 2-core machine.
ANALYSIS = (
    f"{{min_requests: {MIN_REQUESTS}, max_error_rate: 0.01, max_error_rate_delta: 0.01, "
    "max_latency_p95_ratio: 1.5, max_wait: 30s}"
)


def rollout_block(candidate: int, hold: str = "1.5s", interval: str = "0.3s") -> str:
    """A two-step (10 %, 50 %) rollout of reco:<candidate> with ANALYSIS, as YAML under a
    service (six spaces in)."""
    return (
        f'    rollout:\n      candidate: "reco:{candidate}"\n'
        f"      steps: [{{weight: 10, hold: {hold}}}, {{weight: 50, hold: {hold}}}]\n"
        f"      analysis: {ANALYSIS}\n      interval: {interval}\n"
    )


def build_reco(repo: Path) -> Repository:
    store = Repository(str(repo))
    for version, mode in MODES.items():
        folder = repo.parent / f"reco-src-{version}"
        folder.mkdir(exist_ok=True)
        (folder / "model.py").write_text(MODEL.format(mode=mode))
        register(
            store,
            "reco",
            str(folder),
            inputs=[TensorSpec("input", "FP32", [-1, 32])],
            outputs=[TensorSpec("label", "INT64", [-1])],
            version=version,
            # Several services share version 1 as their primary: with fewer instances than the
            # tests have callers, its calls would queue behind each other and hide the
            # candidates' own latency.
            instances=8,
            instance_kind="thread",  # the models sleep: threads run them side by side
        )
    store.set_alias("reco", "production", 1)
    return store


@dataclass
class Answer:
    at: float
    status: int
    version: str | None
    route: str | None


@dataclass
class Load:
    answers: dict[str, list[Answer]] = field(default_factory=dict)

    def of(self, service: str) -> list[Answer]:
        return list(self.answers.get(service, []))


def _body() -> dict[str, object]:
    row = [random.random() for _ in range(32)]
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": row}]}


@contextmanager
def load(url: str | list[str], services: list[str], threads: int = 4) -> Iterator[Load]:
    """Callers calling each of `services` in turn until the block ends; with several URLs
    (replicas), the callers are spread over them as a load balancer would."""
    urls = [url] if isinstance(url, str) else url
    found = Load({s: [] for s in services})
    stop = threading.Event()

    def caller(offset: int) -> None:
        with httpx.Client(base_url=urls[offset % len(urls)], timeout=10) as client:
            i = offset
            while not stop.is_set():
                service = services[i % len(services)]
                i += 1
                try:
                    r = client.post(f"/v2/models/{service}/infer", json=_body())
                except httpx.HTTPError:
                    found.answers[service].append(Answer(time.monotonic(), 0, None, None))
                    continue
                version = r.json().get("model_version") if r.status_code == 200 else None
                found.answers[service].append(
                    Answer(
                        time.monotonic(),
                        r.status_code,
                        version,
                        r.headers.get("x-inferplane-route"),
                    )
                )

    workers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    try:
        yield found
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=15)


def wait_rollout(
    url: str, service: str, until: set[str], timeout: float = 60.0, **match: object
) -> dict:
    """GET /inferplane/rollouts/<service> until its status is in `until` (and `match` holds)."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/inferplane/rollouts/{service}")
        if r.status_code == 200:
            last = r.json()
            if last["status"] in until and all(last.get(k) == v for k, v in match.items()):
                return last
        time.sleep(0.2)
    raise AssertionError(f"rollout of {service} never reached {until} {match}; last: {last}")
