"""An example python-runtime model: simple text features, the escape hatch for custom code.

inferplane instantiates `Model()`, calls `load(path)` once with this folder, then `predict` with a
dict of numpy arrays (BYTES arrive as an object array of `bytes`).
"""

from __future__ import annotations

import numpy as np


class Model:
    def load(self, path: str) -> None:
        self.vowels = set(b"aeiouAEIOU")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = inputs["text"].reshape(-1)
        length = np.array([len(t) for t in texts], dtype=np.int64)
        words = np.array([len(t.split()) for t in texts], dtype=np.int64)
        vowels = np.array(
            [sum(c in self.vowels for c in t) / max(len(t), 1) for t in texts], dtype=np.float32
        )
        upper = np.empty(len(texts), dtype=object)
        upper[:] = [t.upper() for t in texts]
        return {"length": length, "words": words, "vowel_ratio": vowels, "upper": upper}
