"""Small helpers shared by the re-ranking tests (test_rerank, test_rerank_verify, test_rerank_regions)."""

from __future__ import annotations

import numpy as np


def unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeSpec:
    """The parts of an encoder spec ``encoder_view`` reads: family, image_size and extra keys."""

    def __init__(self, family, **extra):
        self.family, self.image_size, self._extra = family, 224, extra

    def get(self, key, default=None):
        return self._extra.get(key, default)
