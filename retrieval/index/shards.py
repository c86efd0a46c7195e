"""``ShardSet``: the FAISS shards of an opened index, per encoder — fan-out and merge.

As faiss contrib's ``ClientIndex``: ``search(encoder, q, k, params, masks)`` searches every shard with a
``faiss.SearchParameters`` built for the call (``nprobe``/``efSearch`` and the filter's id selector) and
merges the per-shard top-k with ``faiss.ResultHeap``. With exact (flat) shards the answer equals one
``IndexFlatIP`` over all vectors. Shards are memory-mapped where the index type allows; the shared
indexes are never mutated by a query (an IVF index gets its direct map once, at first reconstruction).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index import store
from retrieval.index.params import SearchConfig, index_kind, make_params, merge_topk, search_index
from retrieval.types import Hit

PARALLEL_MIN_VECTORS = 200_000   # below this, searching shards one after another is faster


class ShardSet:
    """Every encoder's shards of one index, with the global row numbering (``offsets``) they share."""

    def __init__(self, index_dir: Path, manifest: store.Manifest, ids: Sequence[Sequence[str]], *,
                 mmap: bool = True):
        self.manifest = manifest
        self.ids = ids                                     # per shard: image ids in row order
        counts = [len(x) for x in ids]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) if counts else np.zeros(1, np.int64)
        self.indexes: dict[str, list] = {}
        for name, entry in manifest.encoders.items():
            shards = []
            for i, shard in enumerate(s.name for s in manifest.shards):
                index = store.read_vectors(index_dir, name, shard, mmap=mmap, binary=entry.index_type == "binary")
                if index.ntotal != counts[i]:
                    raise IndexFormatError(f"{name}/{shard}: {index.ntotal} vectors for {counts[i]} metadata rows; "
                                           "rerun `loupe index` to repair the index")
                shards.append(index)
            self.indexes[name] = shards
        self._kinds = {name: [index_kind(ix) for ix in shards] for name, shards in self.indexes.items()}
        self._direct_map_done: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        workers = min(len(counts), os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="loupe-shard") if workers > 1 else None

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def split(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row numbers → (shard numbers, rows within the shard)."""
        shards = np.searchsorted(self.offsets, global_rows, side="right") - 1
        return shards, global_rows - self.offsets[shards]

    # -- search ------------------------------------------------------------------------------------
    def search(self, encoder: str, query: np.ndarray, k: int, params: SearchConfig,
               masks: list[np.ndarray] | None = None) -> list[Hit]:
        """Global top-``k`` of one query vector ``[d]`` over every shard of ``encoder``; ``masks`` (one
        boolean array per shard, from a filter) restrict the candidates exactly (FAISS id selectors)."""
        import faiss

        indexes, kinds = self.indexes[encoder], self._kinds[encoder]
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        jobs = [i for i, index in enumerate(indexes)
                if index.ntotal and (masks is None or masks[i].any())]

        def run(i: int):
            sel = bitmap = None
            if masks is not None and not masks[i].all():
                bitmap = np.packbits(masks[i], bitorder="little")
                sel = faiss.IDSelectorBitmap(len(masks[i]), faiss.swig_ptr(bitmap))
            scores, rows = search_index(indexes[i], q, k, make_params(indexes[i], params, sel, k, kind=kinds[i]))
            if masks is not None and rows.size:   # defence in depth: selectors are exact, check anyway
                valid = rows >= 0
                valid[valid] = masks[i][rows[valid]]
                rows = np.where(valid, rows, -1)
            del bitmap, sel
            return scores, rows

        if not jobs:
            return []
        if len(jobs) > 1 and self._pool is not None and sum(indexes[i].ntotal for i in jobs) >= PARALLEL_MIN_VECTORS:
            parts = list(self._pool.map(run, jobs))     # FAISS releases the GIL: shards in parallel
        else:
            parts = [run(i) for i in jobs]
        if len(parts) == 1:
            rows = parts[0][1][0]
            scores, labels = parts[0][0][0], np.where(rows >= 0, rows + self.offsets[jobs[0]], -1)
        else:
            d, lab = merge_topk(parts, [self.offsets[i] for i in jobs], 1, k)
            scores, labels = d[0], lab[0]
        keep = (labels >= 0) & np.isfinite(scores)
        shards, rows = self.split(labels[keep])
        return [Hit(self.ids[sh][r], s, sh, r)
                for s, sh, r in zip(scores[keep].tolist(), shards.tolist(), rows.tolist())]

    # -- stored vectors ----------------------------------------------------------------------------
    def reconstruct(self, encoder: str, shard: int, row: int) -> np.ndarray:
        """The stored vector of one image (binary codes as ±1/sqrt(bits) vectors)."""
        import faiss

        index = self.indexes[encoder][shard]
        if self.manifest.encoders[encoder].index_type == "binary":
            return _unpack(index.reconstruct(int(row))[None])[0]
        try:
            return np.asarray(index.reconstruct(int(row)), dtype=np.float32)
        except RuntimeError:
            with self._lock:
                if (encoder, shard) not in self._direct_map_done:
                    ivf = faiss.try_extract_index_ivf(index)
                    if ivf is None:
                        raise
                    ivf.make_direct_map()   # once, at first use; never per request
                    self._direct_map_done.add((encoder, shard))
            return np.asarray(index.reconstruct(int(row)), dtype=np.float32)

    def vectors(self, encoder: str, hits: Sequence[Hit]) -> np.ndarray:
        """Stored vectors of ``hits``, ``[n, d]`` float32."""
        if not hits:
            return np.zeros((0, self.manifest.encoders[encoder].dim), dtype=np.float32)
        return np.stack([self.reconstruct(encoder, h.shard, h.row) for h in hits]).astype(np.float32)

    def all_vectors(self, encoder: str) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        """Every shard's vectors: ``(shard number, [n, d] float32, ids)``."""
        binary = self.manifest.encoders[encoder].index_type == "binary"
        for i, index in enumerate(self.indexes[encoder]):
            if binary:
                codes = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d // 8), np.uint8)
                vecs = _unpack(codes)
            else:
                vecs = store.reconstruct_all(index)
            yield i, vecs, list(self.ids[i])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.indexes.clear()


def _unpack(codes: np.ndarray) -> np.ndarray:
    """Packed binary codes ``[n, bits/8]`` → ``[n, bits]`` float32 rows of ±1/sqrt(bits)."""
    bits = np.unpackbits(codes, axis=1)
    return (np.where(bits > 0, 1.0, -1.0) / np.sqrt(max(bits.shape[1], 1))).astype(np.float32)
