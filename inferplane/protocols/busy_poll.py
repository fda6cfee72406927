"""Busy-polling the event loop for a moment after each answer, instead of sleeping at once.

On a virtual machine an idle core sleeps, and waking the event loop from `epoll_wait` when the
next request lands costs tens of microseconds (an interrupt routed through the hypervisor): on the
order of everything the server does for a small request. A caller at low concurrency sends its next
request a few hundred microseconds after each answer, so after every answer the loop keeps polling
(zero-timeout polls, the GIL released inside each) for a short window, and sleeps only once the
window passes with nothing to do. Under load the loop never idles and this costs nothing; an idle
server never spins; in between it trades CPU for latency. `inferplane serve --busy-poll-us 0`
turns it off; `inferplane_busy_poll_seconds_total` shows what it costs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

DEFAULT_WINDOW_US = 300


class BusyPoll:
    __slots__ = ("_counter", "_loop", "_since", "_spinning", "_until", "window_s")

    def __init__(self, window_us: int = DEFAULT_WINDOW_US, counter: Any = None) -> None:
        if window_us < 0:
            raise ValueError("the busy-poll window must be >= 0 microseconds")
        self.window_s = window_us / 1e6
        self._counter = counter  # a prometheus Counter of seconds spent polling, or None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._until = 0.0
        self._since = 0.0
        self._spinning = False

    def kick(self) -> None:
        """Something was answered: keep the loop awake for the window from now."""
        if not self.window_s:
            return
        now = time.monotonic()
        self._until = now + self.window_s
        if not self._spinning:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._spinning = True
            self._since = now
            self._loop.call_soon(self._spin)

    @property
    def spinning(self) -> bool:
        return self._spinning

    def _spin(self) -> None:
        # A ready callback makes the loop poll with a zero timeout instead of blocking.
        now = time.monotonic()
        if now < self._until:
            assert self._loop is not None
            self._loop.call_soon(self._spin)
            return
        self._spinning = False
        if self._counter is not None:
            self._counter.inc(now - self._since)
