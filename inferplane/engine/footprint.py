"""How much memory a loaded model version holds: measured, not guessed.

A version's footprint is the growth of this process's resident set across its load and warm-up,
plus the proportional set size (PSS) of its worker processes when it runs in processes. The
artifact's size on disk is the floor: a runtime keeps at least its weights in memory, while
the resident set may not grow at all when the load reuses memory freed by an eviction.
Loads are measured one at a time (the manager serializes them), so that two loads never count
each other's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from functools import cache

log = logging.getLogger("inferplane.engine")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (default: this one), or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of a process: shared pages (libraries) split among their users, so
    that N worker processes of one model are not each charged the whole of numpy."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_bytes(pid)


def children_bytes(pids: list[int]) -> int:
    return sum(pss_bytes(pid) or 0 for pid in pids)


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_TRIM_EVERY_S = 1.0
_last_trim = [0.0]


def return_free_memory(force: bool = False) -> None:
    """Hand the heap memory freed by an unload back to the system (glibc keeps it otherwise), so
    that the process's resident set follows what is loaded, not what once was. At most once a
    second: malloc_trim walks and locks every arena, stalling other threads' allocations, and
    a busy catalogue evicts many times a second. `force`: now, whatever the last time was (a
    load about to be measured: heap freed earlier would be reused by it and hide its growth)."""
    now = time.monotonic()
    if not force and now - _last_trim[0] < _TRIM_EVERY_S:
        return
    _last_trim[0] = now
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        try:
            trim(0)
        except Exception:  # not glibc, or a libc without it: nothing to return
            log.debug("malloc_trim failed", exc_info=True)
