"""A searchable layout per encoder, separate from the write shards: ``loupe optimize DIR``.

``loupe index`` writes shards of at most ``--shard-size`` images: the unit of commit, crash safety and
resume. Searching them one by one makes a query's cost grow with the number of shards (each HNSW/IVF
shard costs its own fixed work: ~1.7 ms per 50k-vector HNSW shard at the old default). ``optimize``
builds, per encoder, **one** index over every shard's vectors:

* ``flat`` (exact) for small collections (``FLAT_LAYOUT_MAX``);
* ``hnsw`` (``HNSW32,Flat``) up to ``HNSW_LAYOUT_MAX`` vectors, when its bytes fit the memory budget;
* ``ivfpq`` (``IVF{nlist},PQ{m}x8``) beyond, with the top ``k * k_factor`` candidates re-scored exactly
  from the stored vectors of the write shards (memory-mapped; "refine" in faiss' terms). One coarse
  quantizer is trained, each write shard's vectors are encoded with it, and the shards' inverted lists are
  merged into one on-disk, memory-mapped file (``search-NNNNN.ivfdata``, :mod:`retrieval.index.ondisk`):
  the layout is never held whole in RAM.

Then it measures recall@10 of the new index on queries made from a sample of its own vectors (moved
away from themselves like unseen queries: :func:`retrieval.index.tuning.probe_queries`) against exact search and
records the cheapest ``efSearch`` / ``nprobe`` (/ ``k_factor``) that reach ``--target-recall``
(:mod:`retrieval.index.tuning`) with the layout in the manifest (``extra.search_layout[encoder]``):
its file (``DIR/<encoder>/search-NNNNN.faiss``), the shards (name, count) it covers, the parameters and
the measured recall. The manifest is replaced atomically, so readers switch at once and a crash during
``optimize`` leaves the previous layout in place.

Reading (:class:`LayoutSearcher`, used by ``ShardSet``): shards of the manifest that the layout covers
(same name and count) are searched through the layout; shards written after it (a new indexing run) are
a small delta searched alongside; rows of covered shards that are gone (``--prune``, a re-opened shard)
are masked by id until the next ``optimize``. Query cost no longer grows with the number of write shards.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from retrieval.errors import IndexFormatError, LoupeError
from retrieval.index import store, vector_files
from retrieval.index.ondisk import DATA_SUFFIX, build_ondisk, data_file_of, data_files, read_ondisk, remove_orphans
from retrieval.index.tuning import (
    DEFAULT_QUERIES,
    DEFAULT_TARGET_RECALL,
    check_target_recall,
    exact_neighbours,
    probe_queries,
    sample_rows,
    tune,
)

log = logging.getLogger("loupe.optimize")

LAYOUT_KEY = "search_layout"
LAYOUT_FILE = re.compile(r"search-[0-9]{5,9}\.faiss")
FLAT_LAYOUT_MAX = 50_000           # one exact index below this (a 50k x 512 scan: ~2 ms on one core)
HNSW_LAYOUT_MAX = 5_000_000
HNSW_EF_CONSTRUCTION = 80
AUTO_OPTIMIZE_MIN = 20_000         # `loupe index` optimizes by itself from this many images ...
AUTO_OPTIMIZE_DELTA = 2            # ... when at least this many shards are outside the layout
LAYOUT_TYPES = ("auto", "flat", "hnsw", "ivfpq")
TRAIN_SAMPLE = 100_000


@dataclass
class LayoutEntry:
    """One encoder's searchable layout, as recorded in the manifest."""

    file: str                                  # search-NNNNN.faiss under DIR/<encoder>/
    index_type: str                            # flat | hnsw | ivfpq
    factory: str
    shards: list[list[Any]]                    # [[shard name, count], ...] in row order
    count: int
    tuned: dict[str, Any] | None = None        # tuning.Tuned.to_json()
    built: str = field(default_factory=store.now_iso)
    build_seconds: float = 0.0
    rescore: bool = False                      # ivfpq: candidates re-scored from the write shards' vectors
    data_file: str | None = None               # ivfpq: its inverted lists, search-NNNNN.ivfdata (mapped)

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
        return entry


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


# -- choosing and building -----------------------------------------------------------------------
def choose_layout(n: int, dim: int, *, requested: str = "auto", max_memory: int | None = None) -> tuple[str, str]:
    """(index type, faiss factory) of the layout for ``n`` vectors of ``dim`` dimensions."""
    from indexer.index_types import default_memory_budget, estimate_bytes, ivf_nlist, pq_subquantizers

    if requested not in LAYOUT_TYPES:
        raise LoupeError(f"unknown layout {requested!r}: use one of {', '.join(LAYOUT_TYPES)}")
    budget = max_memory if max_memory is not None else default_memory_budget()
    if requested == "auto":
        if n <= FLAT_LAYOUT_MAX:
            requested = "flat"
        elif n <= HNSW_LAYOUT_MAX and estimate_bytes("hnsw", n, dim) <= budget:
            requested = "hnsw"
        else:
            requested = "ivfpq"
    if requested == "flat":
        return "flat", "Flat"
    if requested == "hnsw":
        return "hnsw", "HNSW32,Flat"
    return "ivfpq", f"IVF{ivf_nlist(n)},PQ{pq_subquantizers(dim, n, budget)}x8"


def train_index(factory: str, dim: int, chunks: Callable[[], Any], n: int, *, use_gpu: bool = False):
    """An empty faiss index of ``factory``, trained (IVF) on a sample of ``TRAIN_SAMPLE`` of the ``n``
    vectors of ``chunks()`` (an iterable of [m, dim] blocks); returns (index, the factory fitted to the sample)."""
    from indexer.index_types import fit_factory, new_index, train

    if factory.startswith("IVF"):
        rows = set(sample_rows(n, TRAIN_SAMPLE, seed=1).tolist())
        sample, offset = [], 0
        for chunk in chunks():
            take = [i - offset for i in range(offset, offset + len(chunk)) if i in rows]
            if take:
                sample.append(np.asarray(chunk)[take])
            offset += len(chunk)
        sample = np.concatenate(sample).astype(np.float32)
        factory = fit_factory(factory, len(sample))
        index = new_index(factory, dim)
        train(index, sample, use_gpu=use_gpu)
    else:
        index = new_index(factory, dim)
        hnsw = getattr(index, "hnsw", None)
        if hnsw is not None:
            hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index, factory


def build_index(factory: str, dim: int, chunks: Callable[[], Any], n: int, *, use_gpu: bool = False,
                progress: Callable[[int], None] | None = None):
    """A trained faiss index of ``factory`` with every vector of ``chunks()`` held in RAM (called twice for
    IVF: once for the training sample, once to add). ``optimize`` builds IVF layouts on disk instead."""
    index, factory = train_index(factory, dim, chunks, n, use_gpu=use_gpu)
    added = 0
    for chunk in chunks():
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        for a in range(0, len(chunk), 50_000):
            index.add(chunk[a:a + 50_000])
            added += len(chunk[a:a + 50_000])
            if progress is not None:
                progress(added)
    return index, factory


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

        from retrieval.index.shards import SearchConfig, make_params, search_index

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
        scores, rows = search_index(self.index, q, fetch, make_params(self.index, config, sel, fetch))
        del bitmap, sel
        rows = np.where(rows >= 0, self.to_global[np.maximum(rows, 0)], -1)
        if mask is not None:
            scores = np.where(rows >= 0, scores, -np.inf)
        if rescore:                                # exact scores of the candidates, from the stored vectors
            ok = rows >= 0
            scores = np.full(rows.shape, -np.inf, dtype=np.float32)
            if ok.any():
                vecs = self.exact_vectors(rows[ok])
                scores[ok] = np.einsum("ij,ij->i", vecs, np.repeat(q, ok.sum(axis=1), axis=0))
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
    path = layout_path(index_dir, encoder, entry)
    for file in layout_files(index_dir, encoder, entry):
        if not file.is_file():
            raise IndexFormatError(f"missing search layout {file}; run `loupe optimize {index_dir}` again")
        store.check_size(index_dir, manifest, file)
    index = read_layout(index_dir, encoder, entry, mmap=mmap)
    try:
        vector_files.check_vectors(index, manifest.encoders[encoder], len(to_global), path,
                            norms=entry.index_type != "ivfpq")
    except IndexFormatError as exc:
        raise IndexFormatError(f"{exc}; or run `loupe optimize {index_dir}` again to rebuild the layout") from None
    return LayoutSearcher(index, entry, to_global, covered, exact_vectors,
                          data_path=path.with_name(entry.data_file) if entry.data_file else None,
                          mapped_paths=[path] if mmap and not entry.data_file else [])


# -- the command -----------------------------------------------------------------------------------
@dataclass
class OptimizeSummary:
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def needs_optimize(manifest: store.Manifest, *, min_images: int = AUTO_OPTIMIZE_MIN,
                   min_delta_shards: int = AUTO_OPTIMIZE_DELTA) -> bool:
    """Whether optimizing pays off: enough images, and enough shards outside the current layouts."""
    if manifest.count < min_images:
        return False
    layouts = layouts_of(manifest)
    for name, enc in manifest.encoders.items():
        if enc.index_type == "binary":
            continue
        entry = layouts.get(name)
        covered = {(s, c) for s, c in entry.shards} if entry else set()
        outside = sum(1 for s in manifest.shards if (s.name, s.count) not in covered)
        if outside >= min_delta_shards or (entry is None and len(manifest.shards) >= min_delta_shards):
            return True
    return False


def _next_file(folder: Path, previous: LayoutEntry | None) -> str:
    numbers = [int(p.name[7:-6]) for p in folder.glob("search-*.faiss") if LAYOUT_FILE.fullmatch(p.name)]
    numbers += [int(p.name[7:-len(DATA_SUFFIX)]) for p in data_files(folder)
                if LAYOUT_FILE.fullmatch(p.name[:-len(DATA_SUFFIX)] + ".faiss")]
    if previous is not None:
        numbers.append(int(previous.file[7:-6]))
    return f"search-{(max(numbers) + 1) if numbers else 0:05d}.faiss"


def optimize(index_dir, *, encoders: Sequence[str] | None = None, target_recall: float = DEFAULT_TARGET_RECALL,
             layout: str = "auto", max_memory: int | None = None, queries: int = DEFAULT_QUERIES,
             wait: bool = False, use_gpu: bool = False, progress: Callable[[str, int, int], None] | None = None,
             locked: bool = False) -> OptimizeSummary:
    """Build (or rebuild) the searchable layout of each encoder of ``index_dir``; see the module docstring.

    Holds the index's writer lock (``IndexLock``): waits for, or (``wait=False``) refuses to run beside, a
    ``loupe index`` on the same folder (``locked``: the caller holds it, as ``loupe index`` does when it
    optimizes at the end of a run). ``progress(encoder, done, total)`` is called while vectors are added."""
    import contextlib

    from indexer.lock import IndexLock
    from retrieval.index.shards import ShardSet, index_kind

    target_recall = check_target_recall(target_recall)
    if layout not in LAYOUT_TYPES:
        raise LoupeError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUT_TYPES)}")
    if queries < 1:
        raise LoupeError("--queries must be at least 1")
    index_dir = Path(index_dir).expanduser()
    t_all = time.perf_counter()
    summary = OptimizeSummary()
    with contextlib.nullcontext() if locked else IndexLock(index_dir, wait=wait):
        manifest = store.read_manifest(index_dir)
        names = list(encoders or manifest.encoders)
        for name in names:
            manifest.entry(name)                       # unknown encoder: a clear error
        if not manifest.shards or manifest.count == 0:
            raise LoupeError(f"{index_dir} holds no images yet; run `loupe index` first")
        ids = [store.read_metadata(index_dir, s.name).column("id").to_pylist() for s in manifest.shards]
        shards = ShardSet(index_dir, manifest, ids)
        previous = layouts_of(manifest)
        new_layouts = dict(manifest.extra.get(LAYOUT_KEY) or {})
        old_files: list[Path] = []
        written: list[Path] = []               # removed again when optimize fails before its manifest is written
        try:
            for name in names:
                entry = manifest.encoders[name]
                if entry.index_type == "binary":
                    summary.skipped[name] = "binary (Hamming) codes are searched exactly per shard"
                    continue
                t0 = time.perf_counter()
                n = manifest.count

                def chunks(name=name):
                    for _, vecs, _ in shards.all_vectors(name):
                        yield vecs

                kind, factory = choose_layout(n, entry.dim, requested=layout, max_memory=max_memory)
                folder = index_dir / name
                before = previous.get(name)
                remove_orphans(folder, {f.name for f in layout_files(index_dir, name, before)} if before else set())
                file = _next_file(folder, before)
                report = None if progress is None else (lambda done, name=name, n=n: progress(name, done, n))
                if kind == "ivfpq":                # one trained quantizer, the shards' lists merged on disk
                    trained, factory = train_index(factory, entry.dim, chunks, n, use_gpu=use_gpu)
                    index, records = build_ondisk(trained, chunks(), folder / file, progress=report)
                    del trained
                else:
                    index, factory = build_index(factory, entry.dim, chunks, n, use_gpu=use_gpu, progress=report)
                    records = {folder / file: store.atomic_write_with(folder / file,
                                                                      lambda tmp, ix=index: _write_index(ix, tmp))}
                exact = all(k in ("flat", "hnsw") for k in shards._kinds[name])
                rescore = kind == "ivfpq" and exact
                layout_entry = LayoutEntry(file=file, index_type=kind, factory=factory,
                                           shards=[[s.name, s.count] for s in manifest.shards], count=n,
                                           rescore=rescore, data_file=data_file_of(file) if kind == "ivfpq" else None)
                written.extend(records)
                manifest.record_all(index_dir, records)
                searcher = LayoutSearcher(index, layout_entry, np.arange(n, dtype=np.int64), set(),
                                          exact_vectors=(lambda rows, name=name: shards.vectors_at(name, rows))
                                          if rescore else None)
                own = shards.vectors_at(name, sample_rows(n, queries, seed=7))
                sample, _ = probe_queries(own, chunks, seed=7)
                _, truth = exact_neighbours(chunks(), sample, 10)
                tuned = tune(lambda q, k, p, s=searcher: s.search(q, k, p)[1], index, sample, truth,
                             target=target_recall, k=10, refine=rescore)
                if index_kind(index) == "flat":
                    tuned.params = {}
                layout_entry.tuned = tuned.to_json()
                layout_entry.build_seconds = round(time.perf_counter() - t0, 3)
                new_layouts[name] = asdict(layout_entry)
                if name in previous:
                    old_files.extend(layout_files(index_dir, name, previous[name]))
                summary.encoders[name] = {"layout": kind, "factory": factory, "images": n,
                                          "file": str(folder / file), "params": tuned.params,
                                          "recall@10": round(tuned.recall, 4), "target_recall": target_recall,
                                          "reached": tuned.reached, "latency_ms": round(tuned.latency_ms, 4),
                                          "seconds": layout_entry.build_seconds}
                if not tuned.reached:
                    log.warning("%s: no parameter of %s reached recall@10 %.2f (best %.4f with %s)", name, factory,
                                target_recall, tuned.recall, tuned.params)
                del index, searcher
            shards.close()
            manifest.extra[LAYOUT_KEY] = new_layouts
            store.write_manifest(index_dir, manifest)
        except BaseException:
            shards.close()
            for path in written:               # the manifest still names the previous layout (or none)
                path.unlink(missing_ok=True)
            raise
        live = {f"{enc}/{e.get(key)}" for enc, e in new_layouts.items() for key in ("file", "data_file") if e.get(key)}
        for path in old_files:                 # readers that opened them keep their mapping (POSIX)
            if store.relative(index_dir, path) not in live:
                manifest.files.pop(store.relative(index_dir, path), None)
                path.unlink(missing_ok=True)
        if old_files:
            store.write_manifest(index_dir, manifest)
    summary.seconds = round(time.perf_counter() - t_all, 3)
    return summary


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


def _write_index(index, path) -> None:
    import faiss

    faiss.write_index(index, str(path))
