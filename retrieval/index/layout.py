"""An optimized layout as recorded in the manifest, and searching it (:class:`LayoutSearcher`).

Building one is :mod:`retrieval.index.optimize`. Reading: shards of the manifest that the layout covers
(same name and count) are searched through the layout; shards written after it (a new indexing run) are
a small delta searched alongside; rows of covered shards that are gone (``--prune``, a re-opened shard)
are masked by id until the next ``optimize``.

Row order. A layout's rows are its shards' rows in order (``shards``), except the ``held_out`` rows of an
HNSW layout: ``optimize`` measured recall with them as queries before inserting them, so they were added
last. ``open_layout`` maps layout rows to the current manifest's global rows (``to_global``) with that order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index import store, vector_files
from retrieval.index.ondisk import data_file_of, read_ondisk

LAYOUT_KEY = "search_layout"
RESCORE_ROWS = 1 << 16        # candidates re-scored per step (64k x 512-d float32 = 128 MB gathered)
LAYOUT_FILE = re.compile(r"search-[0-9]{5,9}\.faiss")

@dataclass
class LayoutEntry:
    """One encoder's searchable layout, as recorded in the manifest."""

    file: str                                  # search-NNNNN.faiss under DIR/<encoder>/
    index_type: str                            # optimize.LAYOUT_TYPES but auto
    factory: str
    shards: list[list[Any]]                    # [[shard name, count], ...] in row order
    count: int
    tuned: dict[str, Any] | None = None        # tuning.Tuned.to_json()
    built: str = field(default_factory=store.now_iso)
    build_seconds: float = 0.0
    rescore: bool = False                      # RESCORED layouts: candidates re-scored from write shards
    data_file: str | None = None               # ON_DISK layouts: their inverted lists, search-NNNNN.ivfdata (mapped)
    held_out: list[int] | None = None          # hnsw(-pca): rows (of ``shards``) inserted last: ``layout_order``

    @property
    def params(self) -> dict[str, int]:
        return dict((self.tuned or {}).get("params") or {})

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "LayoutEntry":
        try:
            entry = cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})
        except TypeError as exc:
            raise IndexFormatError(f"manifest.json: unreadable search layout: {exc}") from exc
        if not isinstance(entry.file, str) or not LAYOUT_FILE.fullmatch(entry.file):
            raise IndexFormatError(f"manifest.json names a search layout file {entry.file!r}: layout files are "
                                   "'search-NNNNN.faiss'; the manifest is damaged or was not written by Loupe")
        if entry.data_file is not None and entry.data_file != data_file_of(entry.file):
            raise IndexFormatError(f"manifest.json names a search layout data file {entry.data_file!r}, not "
                                   f"{data_file_of(entry.file)!r}; the manifest is damaged")
        for item in entry.shards:
            if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                    or not store.SHARD_NAME.fullmatch(item[0]) or not isinstance(item[1], int) or item[1] < 0):
                raise IndexFormatError(f"manifest.json: search layout lists a shard {item!r}; the manifest is damaged")
        if sum(count for _, count in entry.shards) != entry.count:
            raise IndexFormatError(f"manifest.json: a search layout's shards hold {sum(c for _, c in entry.shards)} "
                                   f"rows, not its count {entry.count}; the manifest is damaged")
        if entry.held_out is not None:
            rows = entry.held_out
            if (not isinstance(rows, list) or not all(type(r) is int for r in rows)
                    or any(b <= a for a, b in zip(rows, rows[1:]))
                    or (rows and not 0 <= rows[0] <= rows[-1] < entry.count)):
                raise IndexFormatError("manifest.json: a search layout's 'held_out' must list increasing row numbers "
                                       f"below its count ({entry.count}); the manifest is damaged")
        return entry


def layout_order(n: int, held_out: Sequence[int] | np.ndarray) -> np.ndarray:
    """Row (of the layout's shards, in order) of each layout row: the rows not held out, then the held-out
    ones (``optimize`` inserts those last into an HNSW graph, after measuring recall with them)."""
    held = np.asarray(held_out, dtype=np.int64)
    if not len(held):
        return np.arange(n, dtype=np.int64)
    rest = np.ones(n, dtype=bool)
    rest[held] = False
    return np.concatenate([np.flatnonzero(rest), held]).astype(np.int64)


def layouts_of(manifest: store.Manifest) -> dict[str, LayoutEntry]:
    """The manifest's layouts by encoder (only for encoders the index has)."""
    raw = manifest.extra.get(LAYOUT_KEY) or {}
    if not isinstance(raw, dict):
        raise IndexFormatError("manifest.json: 'search_layout' must be an object")
    return {name: LayoutEntry.from_json(obj) for name, obj in raw.items() if name in manifest.encoders}


def layout_path(index_dir, encoder: str, entry: LayoutEntry) -> Path:
    return Path(index_dir) / encoder / entry.file


def layout_files(index_dir, encoder: str, entry: LayoutEntry) -> list[Path]:
    """The layout's files: the index, and (on-disk IVF) its data file."""
    folder = Path(index_dir) / encoder
    return [folder / entry.file] + ([folder / entry.data_file] if entry.data_file else [])


def read_layout(index_dir, encoder: str, entry: LayoutEntry, *, mmap: bool = True):
    """The layout's faiss index (an on-disk IVF's data file mapped); raises ``IndexFormatError``."""
    path = layout_path(index_dir, encoder, entry)
    if entry.data_file:
        return read_ondisk(path, path.with_name(entry.data_file))
    return _read_index(path, mmap=mmap)

# -- searching -----------------------------------------------------------------------------------
class LayoutSearcher:
    """An opened layout: the faiss index, its rows' global row numbers in the current manifest (-1: gone)."""

    def __init__(self, index, entry: LayoutEntry, to_global: np.ndarray, covered: set[int],
                 exact_vectors: Callable[[np.ndarray], np.ndarray] | None = None, data_path: Path | None = None,
                 mapped_paths: Sequence[Path] = ()):
        self.index = index
        # memory-mapped files (an on-disk IVF's data file; a flat/HNSW layout read with IO_FLAG_MMAP_IFC):
        # (open file, its size, path), sizes checked per search: a page past a truncated end is SIGBUS
        self._watched = []
        for path in ([data_path] if data_path is not None else []) + list(mapped_paths):
            fh = open(path, "rb")
            self._watched.append((fh, os.fstat(fh.fileno()).st_size, path))
        self.entry = entry
        self.to_global = to_global
        self.covered = covered                     # shard numbers (current manifest) searched through the layout
        self.exact_vectors = exact_vectors         # global rows -> float32 vectors (re-scoring)
        self.all_live = bool((to_global >= 0).all())
        self._live = None if self.all_live else (to_global >= 0)
        self.gpu = None                            # a faiss GPU copy (``faiss_gpu.layout_to_gpu``), set by ShardSet

    def _mask(self, global_mask: np.ndarray | None) -> np.ndarray | None:
        if global_mask is None:
            return self._live
        mask = np.zeros(len(self.to_global), dtype=bool)
        live = self.to_global >= 0
        mask[live] = global_mask[self.to_global[live]]
        return mask

    def search(self, queries: np.ndarray, k: int, params: dict[str, int] | None = None,
               global_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [nq, k], global rows [nq, k]; -1 = none) with ``params`` (``None``/missing keys: the tuned ones)."""
        import faiss

        from retrieval.index.shards import DEFAULT_NPROBE, SearchConfig, make_params, search_index

        for fh, size, path in self._watched:
            if os.fstat(fh.fileno()).st_size != size:
                raise IndexFormatError(f"search layout {path} changed size while it was served "
                                       "(truncated in place?); run `loupe optimize` again")
        tuned = self.entry.params
        params = {**tuned, **{key: v for key, v in (params or {}).items() if v}}
        mask = self._mask(global_mask)
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nq = len(q)
        if mask is not None and not mask.any():
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        sel = bitmap = None
        if mask is not None and not mask.all():
            bitmap = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        rescore = self.entry.rescore and self.exact_vectors is not None
        fetch = k * max(1, int(params.get("k_factor", 1))) if rescore else k
        config = SearchConfig(nprobe=params.get("nprobe"), ef_search=params.get("efSearch"))
        found = None
        fetch = int(min(fetch, max(self.index.ntotal, 1)))
        if self.gpu is not None and self.gpu.usable(fetch, config.nprobe or DEFAULT_NPROBE, sel):
            found = self.gpu.search(q, fetch, config.nprobe or DEFAULT_NPROBE)      # None: it failed, CPU below
        scores, rows = found or search_index(self.index, q, fetch, make_params(self.index, config, sel, fetch))
        del bitmap, sel
        rows = np.where(rows >= 0, self.to_global[np.maximum(rows, 0)], -1)
        if mask is not None:
            scores = np.where(rows >= 0, scores, -np.inf)
        if rescore:                                # exact scores of the candidates, from the stored vectors
            scores = np.full(rows.shape, -np.inf, dtype=np.float32)
            # a block of queries at a time: the tuner's 1,000 queries x 2,560 candidates x 512-d gathered at
            # once took 5.2 GB of vectors (and as much again for the repeated queries)
            per = max(1, RESCORE_ROWS // max(1, rows.shape[1]))
            for a in range(0, nq, per):
                ok = rows[a:a + per] >= 0
                if ok.any():
                    vecs = self.exact_vectors(rows[a:a + per][ok])
                    scores[a:a + per][ok] = np.einsum("ij,ij->i", vecs, np.repeat(q[a:a + per], ok.sum(axis=1), axis=0))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, order, 1).astype(np.float32)
        rows = np.take_along_axis(rows, order, 1)
        rows[~np.isfinite(scores)] = -1
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return scores, rows

    def close(self) -> None:
        for fh, _, _ in self._watched:
            fh.close()
        self._watched = []


def covered_shards(manifest: store.Manifest, encoder: str) -> set[int]:
    """Numbers of the manifest's shards that ``encoder``'s layout covers (same name and count): searched
    through the layout, their write shards are read only to re-score or reconstruct (so ``ShardSet``
    memory-maps them instead of reading them into RAM)."""
    entry = layouts_of(manifest).get(encoder)
    if entry is None:
        return set()
    listed = {(name, count) for name, count in entry.shards}
    return {i for i, s in enumerate(manifest.shards) if (s.name, s.count) in listed}


def open_layout(index_dir, manifest: store.Manifest, encoder: str, offsets: Sequence[int], *, mmap: bool = True,
                exact_vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> LayoutSearcher | None:
    """The layout of ``encoder`` mapped onto the current manifest's shards (``offsets``: each shard's first
    global row), or ``None`` when there is none or it covers none of the current shards."""
    entry = layouts_of(manifest).get(encoder)
    if entry is None:
        return None
    current = {s.name: (i, s.count) for i, s in enumerate(manifest.shards)}
    parts, covered = [], set()
    for name, count in entry.shards:
        hit = current.get(name)
        if hit is not None and hit[1] == count:
            parts.append(np.arange(count, dtype=np.int64) + int(offsets[hit[0]]))
            covered.add(hit[0])
        else:
            parts.append(np.full(count, -1, dtype=np.int64))
    if not covered:
        return None
    to_global = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if entry.held_out:
        to_global = to_global[layout_order(len(to_global), entry.held_out)]
    path = layout_path(index_dir, encoder, entry)
    for file in layout_files(index_dir, encoder, entry):
        if not file.is_file():
            raise IndexFormatError(f"missing search layout {file}; run `loupe optimize {index_dir}` again")
        store.check_size(index_dir, manifest, file)
    index = read_layout(index_dir, encoder, entry, mmap=mmap)
    try:
        vector_files.check_vectors(index, manifest.encoders[encoder], len(to_global), path,
                            norms=entry.index_type in ("flat", "hnsw"))
    except IndexFormatError as exc:
        raise IndexFormatError(f"{exc}; or run `loupe optimize {index_dir}` again to rebuild the layout") from None
    return LayoutSearcher(index, entry, to_global, covered, exact_vectors,
                          data_path=path.with_name(entry.data_file) if entry.data_file else None,
                          mapped_paths=[path] if mmap and not entry.data_file else [])


def _read_index(path: Path, *, mmap: bool = True):
    import faiss

    try:
        if mmap:
            try:
                return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                pass
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexFormatError(f"search layout {path} is unreadable: {exc}; run `loupe optimize` again") from exc
