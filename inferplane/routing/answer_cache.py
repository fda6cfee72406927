"""Recent answers by input, the last resort of a fallback chain (bounded size, TTL)."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np


def input_key(inputs: Mapping[str, np.ndarray]) -> bytes:
    """Identical inputs (names, dtypes, shapes, values) give the same key."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        array = inputs[name]
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        if array.dtype == object:
            for item in array.reshape(-1):
                h.update(item if isinstance(item, bytes) else str(item).encode())
                h.update(b"\x00")
        else:
            h.update(np.ascontiguousarray(array).tobytes())
    return h.digest()


class AnswerCache:
    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        # key -> (stored at, model, version, outputs)
        self._items: OrderedDict[bytes, tuple[float, str, str, dict[str, np.ndarray]]] = (
            OrderedDict()
        )

    def put(self, key: bytes, model: str, version: str, outputs: dict[str, np.ndarray]) -> None:
        self._items[key] = (time.monotonic(), model, version, outputs)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, key: bytes) -> tuple[str, str, dict[str, np.ndarray]] | None:
        item = self._items.get(key)
        if item is None:
            return None
        stored, model, version, outputs = item
        if time.monotonic() - stored > self.ttl_s:
            del self._items[key]
            return None
        return model, version, outputs

    def __len__(self) -> int:
        return len(self._items)
