"""Durations as people write them in YAML (`90s`, `2m`, `1h30m`, `500ms`, or plain seconds)."""

from __future__ import annotations

import math
import re

_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+\Z")


def parse_duration(value: str | float | int) -> float:
    """Seconds in `value`; ValueError saying what is accepted otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().replace(" ", "")
        if _WHOLE.match(text):
            seconds = sum(float(n) * _UNIT_S[u] for n, u in _PART.findall(text))
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a duration: write seconds (90) or units ms, s, m, h "
                    "(90s, 2m, 1h30m)"
                ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration: it must be finite and not negative")
    return seconds
