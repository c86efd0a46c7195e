"""``ShardSet``: the FAISS shards of an opened index, per encoder — fan-out and merge.

As faiss contrib's ``ClientIndex``: ``search(encoder, q, k, params, masks)`` searches every shard with a
``faiss.SearchParameters`` built for the call (``nprobe``/``efSearch`` and the filter's id selector) and
merges the per-shard top-k with ``faiss.ResultHeap``. With exact (flat) shards the answer equals one
``IndexFlatIP`` over all vectors. The shared indexes are never mutated by a query (an IVF index gets
its direct map once, at first reconstruction).

Opening checks every shard against the manifest (``vector_files.read_vectors``/``check_vectors``): recorded file
sizes, the encoder's dimension, one vector per image, unit norms of flat float vectors, ids unique across
shards — a damaged index fails to open with ``IndexFormatError`` instead of answering garbage.

Memory. A shard file smaller than ``MMAP_MIN_BYTES`` is read into RAM; larger ones, and every shard an
optimized layout covers (queries go through the layout; the shard is read only to re-score or reconstruct a
few rows: read, they were 4·d B/vector of the process's own memory for nothing), are memory-mapped (when ``mmap``, the
default, and the index type allows). A file read into RAM is immune to what happens on disk afterwards (the
writer replaces files by renaming, but a tool that truncates a shard in place would make the next read of a
mapped page kill the process with SIGBUS); the price is resident memory equal to the shard files' size. A
mapped shard's size is checked (``fstat``) before each search, re-scoring and reconstruction — truncated, it
answers ``IndexFormatError`` (the server's 503). The norms of a large mapped shard are left to ``loupe
verify`` (checking them would read it whole at open); a covered one is checked at open like a read one, then
its pages are unmapped again (``vector_files.release_pages``). When the shard files together exceed
``MAP_ALL_SHARE`` of the machine's memory (or ``map_all``, as ``loupe optimize`` asks), every shard is mapped and
checked that way: 10M x 512-d flat shards (20 GB) read into RAM killed a 24 GB box (out of memory) during
``optimize``.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index import store, vector_files
from retrieval.types import Hit

log = logging.getLogger("loupe.index")

MMAP_MIN_BYTES = 512 * 2**20    # shard files at least this large are memory-mapped (when allowed), smaller read
MAP_ALL_SHARE = 0.5              # ... and all of them when together they exceed this share of physical memory
PARALLEL_MIN_VECTORS = 200_000   # below this, searching shards one after another is faster
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 256  # 1M random 512-d, efConstruction 80: recall@10 0.834 at 256 vs 0.673 at 128


@dataclass(frozen=True)
class SearchConfig:
    """Per-call search parameters. ``None`` = the engine default."""

    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None        # optimized IVF-PQ layouts: candidates re-scored exactly = k * k_factor

    @classmethod
    def from_any(cls, params) -> "SearchConfig":
        if params is None:
            return cls()
        if isinstance(params, SearchConfig):
            return params
        if isinstance(params, dict):
            return cls(nprobe=params.get("nprobe"), ef_search=params.get("efSearch", params.get("ef_search")),
                       k_factor=params.get("k_factor"))
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
    split_lists(index, len(q))
    if params is not None:
        return index.search(q, k, params=params)
    return index.search(q, k)


def split_lists(index, nq: int) -> None:
    """Spread an IVF search of fewer queries than threads over its probed lists.

    faiss splits an IVF search over the queries (``parallel_mode`` 0), so one query ran on one core however
    many faiss had; ``parallel_mode`` 1 gives each thread a share of the query's lists (the same answers).
    10M x 512-d on 2 cores, nprobe 4096, k_factor 64: 63.6 -> 35.2 ms a query (RESULTS.md, issue 14 part 7).
    With one thread (``loupe serve``: one query per request thread) nothing changes. Fast-scan IVF
    (``ivfpq-fastscan``) ignores ``parallel_mode``. On the 2-core dev box neither split paid for it: one
    query's lists dealt to two threads by hand (``search_preassigned`` each) took 22.828 ms where faiss'
    default took 19.847 on two threads and 18.062 on one (10M x 512-d), and faiss' own split (``implem`` 15)
    7.972 vs 2.774 ms (1M; RESULTS.md, issue 14 part 11), so it is left as faiss runs it."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    mode = 1 if nq < faiss.omp_get_max_threads() else 0
    if ivf.parallel_mode != mode:              # both give the same answers: a race between threads is harmless
        ivf.parallel_mode = mode


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



class ShardSet:
    """Every encoder's shards of one index, with the global row numbering (``offsets``) they share."""

    def __init__(self, index_dir: Path, manifest: store.Manifest, ids: Sequence[Sequence[str]], *,
                 mmap: bool = True, search_device: str | None = None, map_all: bool | None = None,
                 streamed: bool = False):
        self.manifest = manifest
        self.ids = ids                                     # per shard: image ids in row order
        counts = [len(x) for x in ids]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) if counts else np.zeros(1, np.int64)
        self.indexes: dict[str, list] = {}
        self._mapped: dict[tuple[str, int], tuple[object, int, Path]] = {}   # mapped shard -> (file, size, path)
        check_sizes(index_dir, manifest)
        check_unique_ids(ids)
        from retrieval.index.layout import covered_shards

        if map_all is None:
            map_all = too_big_for_ram(index_dir, manifest)
        # rows of these shards are checked where they are read (``_read_check``), not whole at open
        self._unchecked: set[tuple[str, int]] = set()
        for name, entry in manifest.encoders.items():
            shards = []
            covered = under_layout = set()
            if mmap and entry.index_type != "binary":
                under_layout = covered_shards(manifest, name)
                covered = set(range(len(manifest.shards))) if map_all else under_layout
            for i, shard in enumerate(s.name for s in manifest.shards):
                path = store.vectors_path(index_dir, name, shard)
                mapped = mmap and (_file_size(path) >= MMAP_MIN_BYTES or i in covered)
                index = vector_files.read_vectors(index_dir, name, shard, mmap=mapped,
                                                  binary=entry.index_type == "binary")
                # a covered shard is checked whole (as one read into RAM is), then its pages are let go; in
                # an index too big for RAM, a shard under the layout (read only to re-score) is checked
                # row by row where it is read: checking them all at open read 20 GB at 10M x 512-d
                # (``streamed``: the caller, ``optimize``, reads every shard whole anyway: checked then)
                later = (mapped and map_all and (streamed or i in under_layout) and entry.normalized
                         and entry.metric == "ip" and vector_files.flat_vectors(index) is not None)
                vector_files.check_vectors(index, entry, counts[i], path,
                                           norms=not mapped or (i in covered and not later))
                if later:
                    self._unchecked.add((name, i))
                elif mapped and i in covered:
                    vector_files.release_pages(index)
                if mapped:
                    fh = open(path, "rb")
                    self._mapped[(name, i)] = (fh, os.fstat(fh.fileno()).st_size, path)
                shards.append(index)
            self.indexes[name] = shards
        self._kinds = {name: [index_kind(ix) for ix in shards] for name, shards in self.indexes.items()}
        self.layouts = self._open_layouts(index_dir, mmap)
        self._closing = threading.Event()
        if self._unchecked and not streamed:
            paths = [self._mapped[k][2] for k in sorted(self._unchecked)]
            threading.Thread(target=vector_files.read_ahead, args=(paths, self._closing), daemon=True,
                             name="loupe-read-ahead").start()
        self.accelerated = self._accelerate(search_device)
        self._direct_map_done: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        workers = min(len(counts), os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="loupe-shard") if workers > 1 else None

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def check_mapped(self, encoder: str, shard: int) -> None:
        """A memory-mapped shard file still has the size it was opened with (reading a page past the end
        of a file truncated in place is SIGBUS: the process would die); raises ``IndexFormatError``."""
        mapped = self._mapped.get((encoder, shard))
        if mapped is not None and os.fstat(mapped[0].fileno()).st_size != mapped[1]:
            raise IndexFormatError(f"vector shard {mapped[2]} changed size while it was served (truncated in "
                                   f"place?); {store.REPAIR_HINT}")

    def split(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row numbers → (shard numbers, rows within the shard)."""
        shards = np.searchsorted(self.offsets, global_rows, side="right") - 1
        return shards, global_rows - self.offsets[shards]

    # -- search ------------------------------------------------------------------------------------
    def _open_layouts(self, index_dir: Path, mmap: bool) -> dict:
        """Each encoder's searchable layout (``loupe optimize``), mapped onto this manifest's shards."""
        from retrieval.index.layout import open_layout

        layouts = {}
        for name in self.manifest.encoders:
            layout = open_layout(index_dir, self.manifest, name, self.offsets, mmap=mmap,
                                 exact_vectors=lambda rows, name=name: self.vectors_at(name, rows))
            if layout is not None:
                layouts[name] = layout
        return layouts

    def _accelerate(self, search_device: str | None) -> dict:
        """Encoders whose shards are all exact (flat) searched on ``search_device`` with torch
        (:mod:`retrieval.index.torch_search`): ``cuda``/``cuda:N``/``mps``, or ``torch-cpu`` (tests). The
        others' IVF-PQ layouts go to the GPU with faiss where it can (:mod:`retrieval.index.faiss_gpu`)."""
        if not search_device or search_device == "cpu":
            return {}
        out = self._accelerate_exact(search_device)
        if str(search_device).startswith("cuda"):
            from retrieval.device import faiss_gpu_available
            from retrieval.index.faiss_gpu import layout_to_gpu

            gpu_ok = faiss_gpu_available()
            for name, layout in self.layouts.items():
                if name not in out and gpu_ok:
                    layout.gpu = layout_to_gpu(layout, search_device)
                    if layout.gpu is not None:
                        log.info("%s: the %s layout is searched on %s with faiss", name,
                                 layout.entry.index_type, search_device)
        return out

    def _accelerate_exact(self, search_device: str) -> dict:
        from retrieval.index.torch_search import TorchFlatSearcher, torch_device_available

        device = "cpu" if search_device == "torch-cpu" else search_device
        if not torch_device_available(device):
            log.warning("search device %s is not available to torch; exact searches run on the CPU with faiss",
                        search_device)
            return {}
        out = {}
        for name, kinds in self._kinds.items():
            if kinds and all(k == "flat" for k in kinds) and self.manifest.encoders[name].index_type != "binary":
                try:
                    out[name] = TorchFlatSearcher([vecs for _, vecs, _ in self.all_vectors(name)], device,
                                                  exact_vectors=lambda rows, name=name: self.vectors_at(name, rows))
                except RuntimeError as exc:          # torch.OutOfMemoryError is one: this encoder stays on the CPU
                    log.warning("%s: the vectors do not fit on %s (%s); searching them on the CPU with faiss",
                                name, device, str(exc).splitlines()[0][:200])
                    continue
                log.info("%s: %d vectors searched on %s (%.0f MB)", name, out[name].count, device,
                         out[name].nbytes / 2**20)
        return out

    def search(self, encoder: str, query: np.ndarray, k: int, params: SearchConfig,
               masks: list[np.ndarray] | None = None) -> list[Hit]:
        """Global top-``k`` of one query vector ``[d]`` over every shard of ``encoder``; ``masks`` (one
        boolean array per shard, from a filter) restrict the candidates exactly (FAISS id selectors).

        Shards covered by the encoder's optimized layout are searched through it (one index), the others
        (indexed since) beside it; on an accelerator, an all-flat encoder is one matrix product."""
        import faiss

        indexes, kinds = self.indexes[encoder], self._kinds[encoder]
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        accelerated = self.accelerated.get(encoder)
        if accelerated is not None:
            gmask = np.concatenate(masks) if masks is not None else None
            return self._hits(*(x[0] for x in accelerated.search(q, k, gmask)))
        layout = self.layouts.get(encoder)
        # the layout test first: reading ``ntotal`` through SWIG costs ~10 µs a shard (1 ms at 100 shards)
        jobs = [i for i, index in enumerate(indexes)
                if (layout is None or i not in layout.covered) and index.ntotal and (masks is None or masks[i].any())]

        for i in jobs:
            self.check_mapped(encoder, i)

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

        if not jobs and layout is None:
            return []
        if len(jobs) > 1 and self._pool is not None and sum(indexes[i].ntotal for i in jobs) >= PARALLEL_MIN_VECTORS:
            parts = list(self._pool.map(run, jobs))     # FAISS releases the GIL: shards in parallel
        else:
            parts = [run(i) for i in jobs]
        offsets = [self.offsets[i] for i in jobs]
        if layout is not None:                          # rows come back as global rows already
            gmask = np.concatenate(masks) if masks is not None else None
            parts.append(layout.search(q, k, {"efSearch": params.ef_search, "nprobe": params.nprobe,
                                              "k_factor": params.k_factor}, gmask))
            offsets.append(0)
        if len(parts) == 1:
            rows = parts[0][1][0]
            scores, labels = parts[0][0][0], np.where(rows >= 0, rows + offsets[0], -1)
        else:
            d, lab = merge_topk(parts, offsets, 1, k)
            scores, labels = d[0], lab[0]
        return self._hits(scores, labels)

    def _hits(self, scores: np.ndarray, labels: np.ndarray) -> list[Hit]:
        """Hits of one query's (scores, global rows); rows -1 or scores -inf are dropped."""
        keep = (labels >= 0) & np.isfinite(scores)
        shards, rows = self.split(labels[keep])
        return [Hit(self.ids[sh][r], s, sh, r)
                for s, sh, r in zip(scores[keep].tolist(), shards.tolist(), rows.tolist())]

    # -- stored vectors ----------------------------------------------------------------------------
    def reconstruct(self, encoder: str, shard: int, row: int) -> np.ndarray:
        """The stored vector of one image (binary codes as ±1/sqrt(bits) vectors)."""
        import faiss

        index = self.indexes[encoder][shard]
        self.check_mapped(encoder, shard)
        if self.manifest.encoders[encoder].index_type == "binary":
            return _unpack(index.reconstruct(int(row))[None])[0]
        try:
            return self._read_check(encoder, shard, [row], np.asarray(index.reconstruct(int(row)), np.float32))
        except RuntimeError:
            with self._lock:
                if (encoder, shard) not in self._direct_map_done:
                    ivf = faiss.try_extract_index_ivf(index)
                    if ivf is None:
                        raise
                    ivf.make_direct_map()   # once, at first use; never per request
                    self._direct_map_done.add((encoder, shard))
            return np.asarray(index.reconstruct(int(row)), dtype=np.float32)

    def vectors_at(self, encoder: str, global_rows: np.ndarray) -> np.ndarray:
        """Stored float32 vectors of global rows (exact for flat/HNSW shards), one batch per shard."""
        global_rows = np.asarray(global_rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(global_rows), self.manifest.encoders[encoder].dim), dtype=np.float32)
        if self.manifest.encoders[encoder].index_type == "binary":
            for j, g in enumerate(global_rows):
                sh, row = self.split(np.array([g]))
                out[j] = self.reconstruct(encoder, int(sh[0]), int(row[0]))
            return out
        sh, rows = self.split(global_rows)
        for s in np.unique(sh):
            at = np.flatnonzero(sh == s)
            self.check_mapped(encoder, int(s))
            try:
                out[at] = self.indexes[encoder][int(s)].reconstruct_batch(np.ascontiguousarray(rows[at]))
            except RuntimeError:                        # IVF without a direct map: one by one (builds it once)
                out[at] = np.stack([self.reconstruct(encoder, int(s), int(r)) for r in rows[at]])
            self._read_check(encoder, int(s), rows[at], out[at])
        return out

    def _read_check(self, encoder: str, shard: int, rows, vecs: np.ndarray) -> np.ndarray:
        """``vecs`` as read from ``rows``, checked for unit norms when the shard was not checked at open."""
        if (encoder, shard) in self._unchecked:
            vector_files.check_rows(vecs, rows, self._mapped[(encoder, shard)][2])
        return vecs

    def vectors(self, encoder: str, hits: Sequence[Hit]) -> np.ndarray:
        """Stored vectors of ``hits``, ``[n, d]`` float32."""
        if not hits:
            return np.zeros((0, self.manifest.encoders[encoder].dim), dtype=np.float32)
        return np.stack([self.reconstruct(encoder, h.shard, h.row) for h in hits]).astype(np.float32)

    def all_vectors(self, encoder: str) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        """Every shard's vectors: ``(shard number, [n, d] float32, ids)``."""
        binary = self.manifest.encoders[encoder].index_type == "binary"
        for i, index in enumerate(self.indexes[encoder]):
            self.check_mapped(encoder, i)
            if binary:
                codes = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d // 8), np.uint8)
                vecs = _unpack(codes)
            else:
                vecs = self._read_check(encoder, i, np.arange(index.ntotal), vector_files.reconstruct_all(index))
                self._unchecked.discard((encoder, i))      # checked whole now
            yield i, vecs, list(self.ids[i])

    def close(self) -> None:
        self._closing.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.indexes.clear()
        for fh, _, _ in self._mapped.values():
            fh.close()
        self._mapped.clear()


def too_big_for_ram(index_dir: Path, manifest: store.Manifest, share: float | None = None) -> bool:
    """Whether the index's vector shards together exceed ``share`` (``MAP_ALL_SHARE``) of physical memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    total = sum(_file_size(store.vectors_path(index_dir, name, s.name))
                for name in manifest.encoders for s in manifest.shards)
    return total > (MAP_ALL_SHARE if share is None else share) * ram


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0        # read_vectors says it is missing


def check_sizes(index_dir: Path, manifest: store.Manifest) -> None:
    """Every file of the index the manifest records has its recorded size (a ``stat`` each)."""
    for rel, required in store.index_files(manifest):
        path = Path(index_dir) / rel
        if required or path.exists():
            store.check_size(index_dir, manifest, path)


def check_unique_ids(ids: Sequence[Sequence[str]]) -> None:
    """Log a warning when an image id is listed twice (Loupe's indexer never writes one; the second row
    is unreachable by id; ``loupe verify`` reports it as a problem)."""
    total = sum(len(x) for x in ids)
    if total and len({i for shard_ids in ids for i in shard_ids}) != total:
        log.warning("an image id is listed twice in the index; `loupe verify` names it")


def _unpack(codes: np.ndarray) -> np.ndarray:
    """Packed binary codes ``[n, bits/8]`` → ``[n, bits]`` float32 rows of ±1/sqrt(bits)."""
    bits = np.unpackbits(codes, axis=1)
    return (np.where(bits > 0, 1.0, -1.0) / np.sqrt(max(bits.shape[1], 1))).astype(np.float32)
