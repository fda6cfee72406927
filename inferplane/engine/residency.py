"""Which model versions stay in memory: the residency policy, the memory budget and LRU eviction.

The manager asks two questions here: may this version be loaded now, and if it does not fit,
which resident versions go first. The answer uses only what the manager records per version
(footprint, pinned, busy, last use), so the policy is tested without loading a model.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inferplane.sizes import format_size

K = TypeVar("K", bound=Hashable)

EAGER, ON_DEMAND = "eager", "on-demand"
LOAD_MODES = (EAGER, ON_DEMAND)


@dataclass(frozen=True)
class ResidencyOptions:
    """The server's residency settings (`inferplane serve --load/--pin-aliases/--memory-budget/
    --idle-unload-s`)."""

    load: str = EAGER  # eager: every version at start; on-demand: a version on its first request
    pin_aliases: tuple[str, ...] = ()  # versions these aliases name are pinned
    memory_budget: int | None = None  # bytes the resident versions may take; None: no budget
    idle_unload_s: float | None = None  # default for versions whose model.yaml sets none
    failure_backoff_s: float = 5.0  # first wait before a failed load is tried again (doubles)
    failure_backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.load not in LOAD_MODES:
            raise ValueError(f"load is one of {', '.join(LOAD_MODES)}, not {self.load!r}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError("the memory budget is a positive number of bytes")
        if self.idle_unload_s is not None and self.idle_unload_s <= 0:
            raise ValueError("idle_unload_s is a positive number of seconds")


@dataclass
class Resident(Generic[K]):
    """What the policy needs to know of one loaded (or loading) version; `key` names it to the
    caller (the manager passes the version itself, so a plan's victims need no lookup)."""

    key: K
    footprint: int  # bytes: measured once loaded, else the estimate it was admitted with
    pinned: bool = False
    busy: bool = False  # requests queued, running or waiting for its load
    last_used: float = 0.0  # time.monotonic() of its last request
    loading: bool = False


@dataclass
class Admission(Generic[K]):
    """The plan for loading one version: evict `victims` (LRU first), then load."""

    victims: list[K] = field(default_factory=list)


class BudgetExhausted(Exception):
    """Nothing evictable frees enough memory for the version."""

    def __init__(
        self, need: int, free: int, evictable: int, budget: int, held: int, pinned: int
    ) -> None:
        self.need, self.free, self.evictable, self.budget, self.held = (
            need, free, evictable, budget, held
        )  # fmt: skip
        self.pinned = pinned  # of `held`: bytes of pinned versions, which never free up
        super().__init__(
            f"memory budget exhausted: needs {format_size(need)}, {format_size(max(free, 0))} "
            f"free of {format_size(budget)} and {format_size(evictable)} evictable; "
            f"{format_size(held)} held by pinned, busy or loading versions "
            f"({format_size(pinned)} pinned)"
        )

    @property
    def lasting(self) -> bool:
        """Even with every busy or loading version idle again, it would not fit: only pinned
        versions (and the budget) stand in the way, so waiting cannot help."""
        return self.need > self.budget - self.pinned


def plan_admission(
    residents: list[Resident[K]], need: int, budget: int | None, exclude: K | None = None
) -> Admission[K]:
    """Which residents to evict so that `need` more bytes fit under `budget`.

    Only idle, unpinned, fully loaded versions are candidates, least recently used first; a
    version being loaded, pinned or with requests is never chosen. Raises BudgetExhausted when
    even evicting every candidate leaves too little (nothing is evicted then)."""
    if budget is None:
        return Admission()
    used = sum(r.footprint for r in residents if r.key != exclude)
    free = budget - used
    if need <= free:
        return Admission()
    candidates = sorted(
        (r for r in residents if r.key != exclude and not (r.pinned or r.busy or r.loading)),
        key=lambda r: r.last_used,
    )
    victims: list[K] = []
    for r in candidates:
        victims.append(r.key)
        free += r.footprint
        if need <= free:
            return Admission(victims)
    evictable = sum(r.footprint for r in candidates)
    pinned = sum(r.footprint for r in residents if r.key != exclude and r.pinned)
    raise BudgetExhausted(need, budget - used, evictable, budget, used - evictable, pinned)


def next_backoff(failures: int, options: ResidencyOptions) -> float:
    """Seconds before a version that failed `failures` times in a row is tried again."""
    return min(options.failure_backoff_s * 2 ** max(failures - 1, 0), options.failure_backoff_max_s)
