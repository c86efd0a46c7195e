"""Local descriptors of an index (re-ranking): the PCA reducer, per-shard files, and their checks.

Part of the on-disk format (:mod:`retrieval.index.store` has the layout and the manifest):
``DIR/<encoder>/shard-NNNNN.local.npy`` (float16 [tokens, c]), ``.local-pos.npy`` (int16 grid positions),
``.local-off.npy`` (int64 offsets: image i owns tokens off[i]:off[i+1]) and ``local-pca.npz``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index.store import REPAIR_HINT, Manifest, atomic_write_with, check_size, local_paths

LOCAL_NORM_TOLERANCE = 2e-2    # the same for float16 local descriptors


@dataclass
class LocalReducer:
    """PCA reduction of local descriptors (learned on a sample), then L2 normalisation."""

    mean: np.ndarray        # [C]
    components: np.ndarray  # [c, C]

    @classmethod
    def fit(cls, sample: np.ndarray, dim: int = 128, seed: int = 0) -> "LocalReducer":
        sample = np.asarray(sample, dtype=np.float32)
        if sample.shape[1] <= dim:
            return cls(np.zeros(sample.shape[1], np.float32), np.eye(sample.shape[1], dtype=np.float32))
        rng = np.random.default_rng(seed)
        if len(sample) > 50_000:
            sample = sample[rng.choice(len(sample), 50_000, replace=False)]
        mean = sample.mean(axis=0)
        _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
        k = min(dim, vt.shape[0])
        return cls(mean.astype(np.float32), vt[:k].astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        out = (np.asarray(tokens, dtype=np.float32) - self.mean) @ self.components.T
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def save(self, path) -> dict[str, Any]:
        """Write the reduction (atomically); returns the file's record."""
        def _w(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, mean=self.mean, components=self.components)
        return atomic_write_with(path, _w)

    @classmethod
    def load(cls, path) -> "LocalReducer":
        try:
            with np.load(path) as z:
                mean, components = z["mean"], z["components"]
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise IndexFormatError(f"local-feature PCA {path} is unreadable ({exc}); {REPAIR_HINT}") from exc
        if components.ndim != 2 or mean.shape != (components.shape[1],):
            raise IndexFormatError(f"local-feature PCA {path} has mean {mean.shape} and components "
                                   f"{components.shape}; the file is damaged — {REPAIR_HINT}")
        return cls(mean, components)


def write_local(index_dir, encoder: str, shard: str,
                per_image: list[tuple[np.ndarray, np.ndarray]]) -> dict[Path, dict[str, Any]]:
    """Write one shard's local features: per image ``(descriptors [p, c], positions [p, 2])``; returns
    ``{path: record}`` of its three files."""
    desc_p, pos_p, off_p = local_paths(index_dir, encoder, shard)
    counts = [len(d) for d, _ in per_image]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dim = per_image[0][0].shape[1] if per_image and counts[0] else 0
    desc = (np.concatenate([d for d, _ in per_image]) if sum(counts) else np.zeros((0, dim))).astype(np.float16)
    pos = (np.concatenate([p for _, p in per_image]) if sum(counts) else np.zeros((0, 2))).astype(np.int16)
    return {path: atomic_write_with(path, lambda tmp, a=arr: np.save(tmp, a))
            for path, arr in ((desc_p, desc), (pos_p, pos), (off_p, offsets))}


class LocalShard:
    """Memory-mapped local features of one shard.

    Opening checks the files' recorded sizes (with the ``manifest``), their shapes and the offsets
    (``check_local``); each ``get`` checks that the descriptors file still has its size (a file truncated in
    place under a memory map would kill the process with SIGBUS when read) and that the row's descriptors
    are unit vectors (damaged bytes are not). Both raise ``IndexFormatError``."""

    def __init__(self, index_dir, encoder: str, shard: str, manifest: Manifest | None = None):
        desc_p, pos_p, off_p = local_paths(index_dir, encoder, shard)
        self.name = f"{encoder}/{shard}"
        for path in (desc_p, pos_p, off_p):
            check_size(index_dir, manifest, path)
        try:
            self._fh = open(desc_p, "rb")
            self.desc = np.load(desc_p, mmap_mode="r")
            self.pos = np.load(pos_p, mmap_mode="r")
            self.off = np.load(off_p)
            self._size = os.fstat(self._fh.fileno()).st_size
        except (OSError, ValueError, EOFError) as exc:
            raise IndexFormatError(f"local features of {self.name} are unreadable: {exc}; {REPAIR_HINT}") from exc
        entry = manifest.encoders.get(encoder) if manifest is not None else None
        count = next((s.count for s in manifest.shards if s.name == shard), None) if manifest is not None else None
        dim = (entry.local_features or {}).get("dim") if entry is not None else None
        grid = (entry.local_features or {}).get("grid") if entry is not None else None
        self.grid = (int(grid[0]), int(grid[1])) if grid and len(grid) == 2 and min(grid) > 0 else None
        check_local(self.desc, self.pos, self.off, self.name, count=count, dim=dim)

    def get(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        if os.fstat(self._fh.fileno()).st_size != self._size:
            raise IndexFormatError(f"local features of {self.name} changed size while open (truncated in place?); "
                                   f"{REPAIR_HINT}")
        a, b = int(self.off[row]), int(self.off[row + 1])
        desc = np.asarray(self.desc[a:b], dtype=np.float32)
        pos = np.asarray(self.pos[a:b], dtype=np.int64)
        if bad_local_rows(desc).any():
            raise IndexFormatError(f"local features of {self.name} (image {row}) are not unit descriptors: the file "
                                   f"was damaged after indexing — {REPAIR_HINT}")
        if self.grid is not None and len(pos) and ((pos < 0).any() or (pos[:, 0] >= self.grid[0]).any()
                                                   or (pos[:, 1] >= self.grid[1]).any()):
            raise IndexFormatError(f"local features of {self.name} (image {row}) have positions off the "
                                   f"{self.grid[0]}x{self.grid[1]} grid: the file was damaged after indexing — "
                                   f"{REPAIR_HINT}")
        return desc, pos


def bad_local_rows(desc: np.ndarray) -> np.ndarray:
    """Rows of local descriptors that are neither unit vectors nor zero (the reduction's output) — NaN included."""
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", desc, desc, dtype=np.float64)) if desc.size else np.zeros(len(desc))
    return ~((np.abs(norms - 1.0) <= LOCAL_NORM_TOLERANCE) | (norms <= LOCAL_NORM_TOLERANCE))


def check_local(desc, pos, off, name: str, *, count: int | None = None, dim: int | None = None) -> None:
    """Shapes and offsets of a shard's local features: ``off`` starts at 0, never decreases and ends at the
    number of descriptors; one position per descriptor; ``count + 1`` offsets; descriptors of ``dim``."""
    problem = None
    if desc.ndim != 2 or pos.ndim != 2 or pos.shape[1:] != (2,) or off.ndim != 1:
        problem = f"arrays of shapes {desc.shape}, {pos.shape}, {off.shape}"
    elif len(pos) != len(desc):
        problem = f"{len(desc)} descriptors but {len(pos)} positions"
    elif len(off) == 0 or off[0] != 0 or (np.diff(off) < 0).any() or off[-1] != len(desc):
        problem = "offsets that do not run from 0 up to the number of descriptors"
    elif count is not None and len(off) != count + 1:
        problem = f"{len(off) - 1} images, the manifest says {count}"
    elif dim and len(desc) and desc.shape[1] != dim:
        problem = f"{desc.shape[1]}-d descriptors, the manifest says {dim}"
    if problem:
        raise IndexFormatError(f"local features of {name} have {problem}; the files are damaged — {REPAIR_HINT}")
