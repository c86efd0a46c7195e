"""Local descriptors while indexing (``--local-features``): which tokens of an image are kept, and the
PCA reduction fitted on the first images of the first run, then fixed (``LocalFeatures``). The writer
(:mod:`indexer.writer`) stores them with :mod:`retrieval.index.descriptors`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index import descriptors

LOCAL_MAX_TOKENS = 256          # local descriptors kept per image (evenly spaced over the grid if more)
LOCAL_DIM = 128                 # PCA output dimension (at most)
PCA_SAMPLE_IMAGES = 256         # images whose tokens fit the PCA (the first ones of the first run)


def select_tokens(n_tokens: int, cap: int = LOCAL_MAX_TOKENS) -> np.ndarray:
    if n_tokens <= cap:
        return np.arange(n_tokens)
    return np.unique(np.linspace(0, n_tokens - 1, cap).round().astype(np.int64))


class LocalFeatures:
    """Per encoder: cap tokens per image, fit the PCA on the first images, reduce, keep fp16."""

    def __init__(self, reducer: descriptors.LocalReducer | None = None, grid: tuple[int, int] | None = None,
                 layer: str = "final"):
        self.reducer = reducer
        self.grid = grid
        self.layer = layer
        self.raw: list[np.ndarray] = []        # capped raw tokens waiting for the PCA fit
        self.per_image = 0
        self.pca_record: dict[str, Any] | None = None   # the PCA file's record, once fitted and saved

    def add(self, tokens: np.ndarray, grid: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """tokens [n, p, C] -> reduced per image, or None while the PCA still collects its sample."""
        self.grid = (int(grid[0]), int(grid[1]))
        keep = select_tokens(tokens.shape[1])
        self.per_image = len(keep)
        tokens = np.asarray(tokens[:, keep], dtype=np.float32)
        if self.reducer is None:
            self.raw.extend(tokens)
            return None
        return self.reduce(tokens)

    def positions(self) -> np.ndarray:
        keep = select_tokens(self.grid[0] * self.grid[1])
        return np.stack([keep // self.grid[1], keep % self.grid[1]], axis=1).astype(np.int16)

    def reduce(self, tokens) -> list[tuple[np.ndarray, np.ndarray]]:
        pos = self.positions()
        return [(self.reducer.transform(t).astype(np.float16), pos) for t in tokens]

    def ready_to_fit(self) -> bool:
        return self.reducer is None and len(self.raw) >= PCA_SAMPLE_IMAGES

    def fit(self, pca_file: Path) -> list[tuple[np.ndarray, np.ndarray]]:
        """Fit on the buffered images, save the PCA, return their reduced features."""
        sample = np.concatenate(self.raw) if self.raw else np.zeros((0, 1), np.float32)
        self.reducer = descriptors.LocalReducer.fit(sample, dim=LOCAL_DIM)
        self.pca_record = self.reducer.save(pca_file)
        out = self.reduce(self.raw)
        self.raw = []
        return out

    def describe(self) -> dict[str, Any]:
        return {"dim": self.reducer.dim, "grid": list(self.grid), "per_image": self.per_image, "dtype": "float16",
                "layer": self.layer}
