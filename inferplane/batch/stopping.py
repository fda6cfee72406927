"""SIGTERM during a batch job: stop at a fragment boundary so that the next run resumes.

Kubernetes sends SIGTERM to a Job's pod when it is evicted, preempted or its node drains. The
fragments being scored finish and commit; no new one starts; the job then exits with
EXIT_RETRY (3) and no `_SUCCESS`, so a rerun (the Job's retry or the next CronJob run) scores
only what is left, as after a crash, without the lost work of one.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from inferplane.batch.spec import TransientFailure

log = logging.getLogger("inferplane.batch")


class JobStopped(TransientFailure):
    """SIGTERM came; the fragments committed so far stay (exit 3: rerun to resume)."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by the first SIGTERM while the block runs (main thread only; elsewhere the
    event is never set and signals keep their handlers). A second SIGTERM stops at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        if requested.is_set():
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
            return
        log.warning("SIGTERM: finishing the fragments being scored, then stopping")
        requested.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)
