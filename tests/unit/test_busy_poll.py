"""The event loop polls instead of sleeping for the window after each answer, and only then."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Counter

from inferplane.protocols.busy_poll import BusyPoll


def _counter() -> Counter:
    return Counter("spin_seconds", "test", registry=CollectorRegistry())


async def _cpu_while_waiting(seconds: float) -> float:
    """CPU time the loop's thread burns while the loop has nothing to do for `seconds`."""
    start = time.thread_time()
    await asyncio.sleep(seconds)
    return time.thread_time() - start


async def test_the_loop_polls_through_the_window_then_sleeps() -> None:
    counter = _counter()
    poll = BusyPoll(30_000, counter)  # 30 ms, long enough to measure on a loaded machine
    poll.kick()
    assert poll.spinning
    busy = await _cpu_while_waiting(0.02)
    assert poll.spinning
    assert busy > 0.01, f"the loop slept through the window ({busy * 1e3:.1f} ms of CPU in 20 ms)"
    await asyncio.sleep(0.03)
    assert not poll.spinning
    spent = counter._value.get()
    assert 0.025 <= spent < 0.2, spent
    idle = await _cpu_while_waiting(0.02)
    assert idle < 0.005, f"the loop kept polling after the window ({idle * 1e3:.1f} ms of CPU)"


async def test_each_answer_extends_the_window() -> None:
    poll = BusyPoll(15_000)
    poll.kick()
    for _ in range(4):
        await asyncio.sleep(0.01)
        assert poll.spinning
        poll.kick()
    await asyncio.sleep(0.03)
    assert not poll.spinning


async def test_a_zero_window_never_polls() -> None:
    counter = _counter()
    poll = BusyPoll(0, counter)
    poll.kick()
    assert not poll.spinning
    assert await _cpu_while_waiting(0.02) < 0.005
    assert counter._value.get() == 0


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        BusyPoll(-1)
