"""Sharded FAISS search as plain functions: per-call parameters, per-shard top-k, heap merge.

Search parameters (``nprobe`` for IVF, ``efSearch`` for HNSW) and id selectors (filters) travel in a
``faiss.SearchParameters`` object built for each call; the shared, memory-mapped shard indexes are
never mutated, so concurrent requests are safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 256  # 1M random 512-d, efConstruction 80: recall@10 0.834 at 256 vs 0.673 at 128


@dataclass(frozen=True)
class SearchConfig:
    """Per-call search parameters. ``None`` = the engine default."""

    nprobe: int | None = None
    ef_search: int | None = None

    @classmethod
    def from_any(cls, params) -> "SearchConfig":
        if params is None:
            return cls()
        if isinstance(params, SearchConfig):
            return params
        if isinstance(params, dict):
            return cls(nprobe=params.get("nprobe"), ef_search=params.get("efSearch", params.get("ef_search")))
        raise TypeError(f"params must be a dict or SearchConfig, not {type(params).__name__}")


def is_binary(index) -> bool:
    import faiss

    return isinstance(index, faiss.IndexBinary)


def index_kind(index) -> str:
    """``binary``, ``ivf``, ``hnsw``, ``pretransform`` or ``flat`` (what parameters a search takes)."""
    import faiss

    if isinstance(index, faiss.IndexBinary):
        return "binary"
    if isinstance(index, faiss.IndexPreTransform):
        return "pretransform"
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    return "flat"


def make_params(index, config: SearchConfig | None = None, sel=None, k: int = 10, *, kind: str | None = None):
    """A ``faiss.SearchParameters`` for ``index`` (or None when nothing is to be set)."""
    import faiss

    kind = kind or index_kind(index)
    config = config or SearchConfig()
    if kind in ("binary", "flat"):
        return faiss.SearchParameters(sel=sel) if sel is not None else None
    if kind == "pretransform":
        inner = faiss.downcast_index(index.index)
        params = make_params(inner, config, sel, k)
        if params is None:
            return None
        wrapped = faiss.SearchParametersPreTransform(index_params=params)
        if sel is not None:
            wrapped.sel = sel
        wrapped._keep = params  # keep the inner object alive
        return wrapped
    if kind == "ivf":
        ivf = faiss.try_extract_index_ivf(index)
        nprobe = int(config.nprobe or DEFAULT_NPROBE)
        params = faiss.SearchParametersIVF(nprobe=max(1, min(nprobe, ivf.nlist)))
    else:
        params = faiss.SearchParametersHNSW(efSearch=int(config.ef_search or max(DEFAULT_EF_SEARCH, 2 * k)))
    if sel is not None:
        params.sel = sel
    return params


def to_binary_codes(queries: np.ndarray) -> np.ndarray:
    """±x float vectors → packed bits (the layout ``np.packbits`` gives, as PDQ's ``hash_bits``)."""
    return np.packbits(np.asarray(queries) > 0, axis=1)


def search_index(index, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """Search one shard: returns (scores [nq, k] float32 inner products, rows [nq, k] int64, -1 = none).

    Binary (Hamming) shards report ``1 - 2 * hamming / bits`` so scores compare with cosine ones."""
    k = int(min(k, max(index.ntotal, 1)))
    if is_binary(index):
        codes = to_binary_codes(queries)
        dist, rows = index.search(codes, k, params=params) if params is not None else index.search(codes, k)
        scores = 1.0 - 2.0 * dist.astype(np.float32) / float(index.d)
        scores[rows < 0] = -np.inf
        return scores.astype(np.float32), rows
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if params is not None:
        return index.search(q, k, params=params)
    return index.search(q, k)


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], offsets: Sequence[int], nq: int, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, rows) into global top-k (scores, global row) with ``faiss.ResultHeap``.

    ``offsets[i]`` is shard i's first global row; missing results are row -1, score -inf."""
    import faiss

    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for (scores, rows), off in zip(parts, offsets):
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        labels = np.where(rows >= 0, rows + int(off), -1).astype(np.int64)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        heap.add_result(scores, labels)
    heap.finalize()
    return heap.D, heap.I
