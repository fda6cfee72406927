"""A circuit breaker per model version: stop sending traffic to a version that keeps failing.

Closed: calls pass, outcomes are counted. Open (after `consecutive_failures` in a row, or an error
rate above `error_rate` over the last `window` calls): calls are refused at once, so callers go to
their fallback instead of waiting on a broken version. After `cooldown_s` the breaker half-opens:
one probe call passes; its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import time
from collections import deque
from enum import IntEnum

from inferplane.routing.policy import Breaker as BreakerSettings


class BreakerState(IntEnum):  # the values are the metric's
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._now = time.monotonic
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._outcomes: deque[bool] = deque(maxlen=settings.window)  # True = failure
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May a call go to this version now? (In half-open, only one probe at a time.)"""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._now() - self._opened_at < self.settings.cooldown_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._reset()
            return
        self._consecutive = 0
        self._outcomes.append(False)

    def failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._open()
            return
        if self.state is BreakerState.OPEN:
            return
        self._consecutive += 1
        self._outcomes.append(True)
        s = self.settings
        if self._consecutive >= s.consecutive_failures or (
            s.error_rate is not None
            and len(self._outcomes) >= s.min_calls
            and sum(self._outcomes) / len(self._outcomes) >= s.error_rate
        ):
            self._open()

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = self._now()
        self._probing = False

    def _reset(self) -> None:
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._outcomes.clear()
        self._probing = False
