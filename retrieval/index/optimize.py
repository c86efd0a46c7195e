"""A searchable layout per encoder, separate from the write shards: ``loupe optimize DIR``.

``loupe index`` writes shards of at most ``--shard-size`` images: the unit of commit, crash safety and
resume. Searching them one by one makes a query's cost grow with the number of shards (each HNSW/IVF
shard costs its own fixed work: ~1.7 ms per 50k-vector HNSW shard at the old default). ``optimize``
builds, per encoder, **one** index over every shard's vectors:

* ``flat`` (exact) for small collections (``FLAT_LAYOUT_MAX``);
* ``hnsw`` (``HNSW32,Flat``) up to ``HNSW_LAYOUT_MAX`` vectors, when its bytes fit the memory budget;
* ``hnsw-pca`` (``PCA128,HNSW32,Flat``, L2 on the projection) instead of ``hnsw`` from ``PCA_LAYOUT_MIN`` vectors
  of at least ``2 * PCA_DIM`` dimensions: the graph is built and walked on a PCA projection to ``PCA_DIM``
  dimensions (trained on a sample; distances 4x cheaper at 512-d, and a better graph for the same build time:
  efConstruction ``PCA_EF_CONSTRUCTION``), and the top ``k * k_factor`` candidates are re-scored exactly from
  the write shards' stored vectors, as ``ivfpq``'s are. Unit vectors: the L2 order is the inner-product order,
  and L2 distances survive the projection's centring where inner products do not. 1M x 512-d (RESULTS.md):
  ``hnsw`` needs efSearch 768 for recall@10 0.97 at 9 ms a query on one thread;
* ``ivfpq`` (``IVF{nlist},PQ{m}x8``) beyond (below ``2 * PCA_DIM`` dimensions), with the top ``k * k_factor``
  candidates re-scored exactly from the stored vectors of the write shards (memory-mapped; "refine" in faiss'
  terms). One coarse quantizer is trained (on ``TRAIN_PER_LIST`` sampled rows per list, so ``nlist`` can grow as
  ``4 * sqrt(n)``: 16,384 lists at 10M), each write shard's vectors are encoded with it, and the shards' inverted lists
  are merged into one on-disk, memory-mapped file (``search-NNNNN.ivfdata``, :mod:`retrieval.index.ondisk`): the
  layout is never held whole in RAM. 10M x 128-d on a 2-core, 24 GB box (RESULTS.md, issue 14 part 7):
  ``IVF16384,PQ32x8``, nprobe 1024 / k_factor 16 tuned, unseen recall@10 0.954 at 12.3 ms a query;
* ``ivfpq-pca`` (``UPCA{PCA_DIM},IVF{nlist},PQ{PCA_DIM / 4}x8``) instead of ``ivfpq`` for vectors of at least
  ``2 * PCA_DIM`` dimensions (write shards flat or HNSW): as ``ivfpq``, but the lists are built and scanned on
  an **uncentred** PCA projection to ``PCA_DIM`` dimensions (the top eigenvectors of the sample's second-moment
  matrix, no mean subtracted: a linear map ``W`` with orthonormal rows, so ``<Wx, Wq>`` is the inner product of
  ``x`` with ``q``'s part in the kept subspace and the inner-product metric stays valid; a centred PCA needs L2,
  whose by-residual PQ tables cost 8,192 adds per probed list). Four dimensions per PQ sub-quantizer where
  ``ivfpq`` at 512-d has eight: half the bytes scanned and better-ranked candidates. 1M x 512-d, IVF4096,
  nprobe 512 (RESULTS.md, issue 14 part 9): recall@10 0.8817 at 2.185 ms vs ``IVF4096,PQ64x8``'s 0.8790 at
  3.738 ms (k_factor 32, one thread; the centred ``PCA128`` + L2: 0.8890 at 5.501 ms). 10M x 512-d, default
  flags: nprobe 2048 / k_factor 128 tuned, unseen recall@10 0.9550 at 14.820 ms on two threads (32.348 on one),
  where ``ivfpq``'s ``PQ64x8`` gave 0.9570 at 21.535 ms (45.146 on one);
* ``ivfpq-fastscan`` (``UPCA{PCA_DIM},IVF{nlist},PQ{PCA_DIM}x4fs``; below ``2 * PCA_DIM`` dimensions no
  projection, ``PQ{d}x4fs``) instead of both when its lists fit half the memory budget in RAM
  (``fastscan_bytes``: 72 B a vector, 728 MB at 10M; the other half is left to the engine's ids and metadata,
  ~200 B a vector) and the write shards hold exact vectors: 4-bit PQ codes, one dimension per
  sub-quantizer, scanned with faiss' SIMD fast-scan kernels (André et al., "Quicker ADC": the 16-entry
  tables held in registers) instead of one table look-up per byte; the top ``k * k_factor`` candidates are
  re-scored exactly as in ``ivfpq``. Its codes rank candidates well enough that few need re-scoring, which
  at 10M x 512-d costs page faults (20 GB of write shards on a 23 GiB box). faiss keeps fast-scan codes in
  blocks of 32 vectors (``BlockInvertedLists``), which ``OnDiskInvertedLists`` cannot map, so these lists are
  read into RAM. 1M x 512-d, IVF4096, nprobe 512, one thread (RESULTS.md, issue 14 part 11): recall@10
  0.8903 at 2.419 ms with k_factor 16 where ``ivfpq-pca``'s ``PQ32x8`` gave 0.8907 at 4.866 ms with 128;
* ``ivf-rabitq`` (``IVF{nlist},RaBitQ``, on request): as ``ivfpq`` but with RaBitQ codes (Gao & Long, SIGMOD 2024:
  one bit per dimension of the randomly rotated residual, plus two floats, with an unbiased estimator of the inner
  product; ``d / 8 + 8`` bytes) scanned with ``RABITQ_QUERY_BITS``-bit queries. Its codes rank candidates much
  better per byte than PQ at high dimension, so fewer candidates need re-scoring (10M x 512-d: k_factor 64 where
  PQ64x8 needed 128), but its scan gained less from two threads: 27.2 ms vs PQ64x8's 21.5 at recall@10 0.96
  (RESULTS.md, issue 14 part 8), so ``auto`` does not pick it.

Then it measures recall@10 of the new index against exact search on a sample of the collection's own
vectors used as queries the index has not seen (:mod:`retrieval.index.tuning`):

* HNSW: the sample is **held out** — every other vector is inserted, recall is measured with the sample as
  queries, then the sample is inserted last (recorded as ``held_out``, so ``open_layout`` knows the row
  order). An inserted vector would be an easy query (the search reaches it and finds its neighbours through
  its own links); a held-out one is as hard as a new picture's;
* IVF(-PQ): **leave-one-out** — each sample vector searches the full index and its own row is dropped from
  its answer and from the truth (which lists are probed does not depend on the query being indexed).

It records the cheapest ``efSearch`` / ``nprobe`` (/ ``k_factor``) that reach ``--target-recall`` with the
layout in the manifest (``extra.search_layout[encoder]``, :class:`retrieval.index.layout.LayoutEntry`): its
file (``DIR/<encoder>/search-NNNNN.faiss``), the shards (name, count) it covers, the parameters and the
measured recall. The manifest is replaced atomically, so readers switch at once and a crash during
``optimize`` leaves the previous layout in place. Searching it is :mod:`retrieval.index.layout`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from retrieval.errors import LoupeError
from retrieval.index import store
from retrieval.index.layout import (
    LAYOUT_FILE,
    LAYOUT_KEY,
    LayoutEntry,
    LayoutSearcher,
    layout_files,
    layout_order,
    layouts_of,
)
from retrieval.index.ondisk import DATA_SUFFIX, build_ondisk, data_file_of, data_files, remove_orphans
from retrieval.index.tuning import (
    DEFAULT_QUERIES,
    DEFAULT_TARGET_RECALL,
    check_target_recall,
    drop_own_rows,
    exact_neighbours,
    held_out_rows,
    sample_rows,
    tune,
)

log = logging.getLogger("loupe.optimize")

__all__ = ["LAYOUT_KEY", "LAYOUT_TYPES", "choose_layout", "build_index", "optimize", "needs_optimize",
           "layouts_of", "OptimizeSummary"]

FLAT_LAYOUT_MAX = 50_000           # one exact index below this (a 50k x 512 scan: ~2 ms on one core)
HNSW_LAYOUT_MAX = 5_000_000
HNSW_EF_CONSTRUCTION = 80
PCA_DIM = 128                      # hnsw-pca: the graph's dimensions
PCA_LAYOUT_MIN = 500_000           # auto: hnsw-pca instead of hnsw from this many vectors (of >= 2 * PCA_DIM dims)
PCA_EF_CONSTRUCTION = 200
AUTO_OPTIMIZE_MIN = 20_000         # `loupe index` optimizes by itself from this many images ...
AUTO_OPTIMIZE_DELTA = 2            # ... when at least this many shards are outside the layout
LAYOUT_TYPES = ("auto", "flat", "hnsw", "hnsw-pca", "ivfpq-fastscan", "ivfpq", "ivfpq-pca", "ivf-rabitq")
RESCORED = ("ivfpq", "ivfpq-pca", "ivfpq-fastscan", "ivf-rabitq", "hnsw-pca")  # candidates re-scored from the
                                                                              # write shards' vectors
ON_DISK = ("ivfpq", "ivfpq-pca", "ivf-rabitq")  # layouts built and searched with their inverted lists on disk (mapped)
PROJECTED = {"hnsw-pca": "hnsw", "ivfpq-pca": "ivfpq"}  # searched on a projection: re-scoring needs exact shards
NEEDS_EXACT = {**PROJECTED, "ivfpq-fastscan": "ivfpq"}  # ... and 4-bit codes: without exact shards, the fallback
RABITQ_QUERY_BITS = 4              # ivf-rabitq: bits per query dimension in the scan (faiss' default 8); 10M x 512-d
                                   # (RESULTS.md, part 7): recall@10 0.9547 at 30.7 ms vs 0.956 at 37.7 ms with 8
TRAIN_SAMPLE = 100_000             # training rows at least (PCA, small IVF) ...
TRAIN_PER_LIST = 40                # ... and for IVF at least this many per list (faiss warns below 39): 655,360
                                   # rows for the 16,384 lists of 10M vectors, where a fixed 100,000 capped nlist
                                   # at 2,048 and left lists 8x longer (RESULTS.md, "10M IVF-PQ")


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
            requested = "hnsw-pca" if n >= PCA_LAYOUT_MIN and dim >= 2 * PCA_DIM else "hnsw"
        elif fastscan_bytes(n, dim) <= budget // 2:     # in RAM beside the engine's ids and metadata (~200 B a
            requested = "ivfpq-fastscan"                 # vector): 10M yes, 100M on a 24 GB box no (7.2 GB)
        else:
            requested = "ivfpq-pca" if dim >= 2 * PCA_DIM else "ivfpq"
    if requested in PROJECTED and dim < 2 * PCA_DIM:
        raise LoupeError(f"layout {requested} projects vectors to {PCA_DIM} dimensions; these have {dim}: "
                         f"use --layout {PROJECTED[requested]}")
    if requested == "flat":
        return "flat", "Flat"
    if requested == "hnsw":
        return "hnsw", "HNSW32,Flat"
    if requested == "hnsw-pca":
        return "hnsw-pca", f"PCA{PCA_DIM},HNSW32,Flat"
    if requested == "ivfpq-pca":
        return "ivfpq-pca", f"UPCA{PCA_DIM},IVF{ivf_nlist(n)},PQ{pq_subquantizers(PCA_DIM, n, budget)}x8"
    if requested == "ivf-rabitq":
        return "ivf-rabitq", f"IVF{ivf_nlist(n)},RaBitQ"
    if requested == "ivfpq-fastscan":
        d, m = fastscan_shape(dim)
        return "ivfpq-fastscan", ("" if d == dim else f"UPCA{d},") + f"IVF{ivf_nlist(n)},PQ{m}x4fs"
    return "ivfpq", f"IVF{ivf_nlist(n)},PQ{pq_subquantizers(dim, n, budget)}x8"


def fastscan_shape(dim: int) -> tuple[int, int]:
    """(dimensions scanned, 4-bit sub-quantizers) of ``ivfpq-fastscan`` for ``dim``-d vectors: the uncentred
    ``PCA_DIM`` projection from ``2 * PCA_DIM`` dimensions, one dimension per sub-quantizer. Two per
    sub-quantizer (half the bytes, a 2x faster scan) ranked candidates too poorly at 10M x 512-d: recall@10
    0.9376 with 1,280 candidates where one per sub-quantizer reached 0.9548 with 160 (RESULTS.md, part 11)."""
    d = PCA_DIM if dim >= 2 * PCA_DIM else dim
    return d, d


def fastscan_bytes(n: int, dim: int) -> int:
    """RAM of an ``ivfpq-fastscan`` layout of ``n`` vectors: 4-bit codes and an 8-byte id per vector (72 B at
    128 sub-quantizers), the centroids (its lists are held in RAM, not mapped: faiss keeps fast-scan codes in
    32-vector blocks)."""
    from indexer.index_types import ivf_nlist

    d, m = fastscan_shape(dim)
    return n * ((m + 1) // 2 + 8) + ivf_nlist(n) * d * 4


def train_size(factory: str, n: int) -> int:
    """Rows to train ``factory`` on, of ``n``: ``TRAIN_SAMPLE``, or ``TRAIN_PER_LIST`` per IVF list when more."""
    m = re.search(r"(?:^|,)IVF(\d+)", factory)
    want = max(TRAIN_SAMPLE, TRAIN_PER_LIST * int(m.group(1))) if m else TRAIN_SAMPLE
    return min(n, want)


def train_index(factory: str, dim: int, chunks: Callable[[], Any], n: int, *, use_gpu: bool = False):
    """An empty faiss index of ``factory``, trained (IVF) on a sample of ``train_size`` rows of the ``n``
    vectors of ``chunks()`` (an iterable of [m, dim] blocks); returns (index, the factory fitted to the sample)."""
    from indexer.index_types import fit_factory, train

    if factory.startswith(("IVF", "PCA", "UPCA")):
        rows = sample_rows(n, train_size(factory, n), seed=1)
        sample, offset = [], 0
        for chunk in chunks():
            a, b = np.searchsorted(rows, [offset, offset + len(chunk)])
            if b > a:
                sample.append(np.asarray(chunk)[rows[a:b] - offset])
            offset += len(chunk)
        sample = np.concatenate(sample).astype(np.float32)
        factory = fit_factory(factory, len(sample))
        index = _new_index(factory, dim, sample)
        train(index, sample, use_gpu=use_gpu)
        if hasattr(index, "qb"):                  # IVF RaBitQ: saved with the index, so every search uses it
            index.qb = RABITQ_QUERY_BITS
    else:
        index = _new_index(factory, dim)
    hnsw = hnsw_of(index)
    if hnsw is not None:
        hnsw.efConstruction = PCA_EF_CONSTRUCTION if factory.startswith("PCA") else HNSW_EF_CONSTRUCTION
    return index, factory


def _new_index(factory: str, dim: int, sample: np.ndarray | None = None):
    """An empty index of ``factory``: inner product, except a PCA projection's graph (L2: see module docstring).
    ``UPCA{d},...``: ``...`` (inner product) behind the uncentred projection of ``sample``."""
    import faiss

    from indexer.index_types import new_index

    if factory.startswith("PCA"):
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    if factory.startswith("UPCA"):
        head, rest = factory.split(",", 1)
        if sample is None:
            raise ValueError(f"{factory}: the projection is trained on a sample")
        inner = new_index(rest, int(head[4:]))
        return faiss.IndexPreTransform(uncentred_pca(sample, int(head[4:])), inner)  # faiss' wrapper keeps both
    return new_index(factory, dim)


def uncentred_pca(sample: np.ndarray, d_out: int):
    """A ``faiss.LinearTransform`` onto the top ``d_out`` eigenvectors of ``sample``'s second-moment matrix
    (``X^T X``, no mean subtracted, no bias): orthonormal rows, so inner products keep their meaning (the
    query's component in the kept subspace). Saved and read by faiss as a plain linear transform."""
    import faiss

    x = np.asarray(sample)
    if x.ndim != 2 or x.shape[1] < d_out:
        raise ValueError(f"cannot project {x.shape[-1]}-d vectors to {d_out} dimensions")
    moment = np.zeros((x.shape[1], x.shape[1]))
    for a in range(0, len(x), 65_536):                 # X^T X in float64 blocks (not a 2.7 GB copy of 655,360 x 512)
        block = x[a:a + 65_536].astype(np.float64)
        moment += block.T @ block
    _, vectors = np.linalg.eigh(moment)                 # ascending eigenvalues
    projection = np.ascontiguousarray(vectors[:, ::-1][:, :d_out].T, dtype=np.float32)
    transform = faiss.LinearTransform(x.shape[1], d_out, False)
    faiss.copy_array_to_vector(projection.ravel(), transform.A)
    transform.is_trained = True
    return transform


def hnsw_of(index):
    """The HNSW graph of ``index`` (inside a PCA pre-transform too), or None."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return getattr(index, "hnsw", None)


def build_index(factory: str, dim: int, chunks: Callable[[], Any], n: int, *, use_gpu: bool = False,
                hold: np.ndarray | None = None, progress: Callable[[int], None] | None = None):
    """A trained faiss index of ``factory`` with every vector of ``chunks()`` held in RAM (called twice for
    IVF: once for the training sample, once to add) except the rows ``hold`` (sorted; ``optimize`` adds
    them last, after measuring recall with them as queries). ``optimize`` builds IVF layouts on disk instead."""
    index, factory = train_index(factory, dim, chunks, n, use_gpu=use_gpu)
    hold = np.zeros(0, np.int64) if hold is None else np.asarray(hold, dtype=np.int64)
    added = offset = 0
    for chunk in chunks():
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        local = hold[(hold >= offset) & (hold < offset + len(chunk))] - offset
        offset += len(chunk)
        if len(local):
            chunk = np.delete(chunk, local, axis=0)
        for a in range(0, len(chunk), 50_000):
            index.add(chunk[a:a + 50_000])
            added += len(chunk[a:a + 50_000])
            if progress is not None:
                progress(added)
    return index, factory


def _tune_layout(index, entry: LayoutEntry, shards, name: str, chunks: Callable[[], Any], *, queries: int,
                 target: float, exact_vectors: Callable[[np.ndarray], np.ndarray] | None):
    """``tune`` the new layout ``index`` on a sample of the collection's own vectors used as unseen queries:
    the ``held_out`` rows (HNSW: not inserted yet) or, for the other layouts, leave-one-out."""
    n = entry.count
    held = np.asarray(entry.held_out or [], dtype=np.int64)
    if len(held):                          # HNSW: every row but the held-out ones is in the graph
        searcher = LayoutSearcher(index, entry, layout_order(n, held)[:n - len(held)], set(),
                                  exact_vectors=exact_vectors if entry.rescore else None)
        sample = shards.vectors_at(name, held)
        _, truth = exact_neighbours(chunks(), sample, 10, exclude=held)
        own, method = None, "held_out"
    else:                                  # IVF: an indexed query does not change which lists are probed
        searcher = LayoutSearcher(index, entry, np.arange(n, dtype=np.int64), set(), exact_vectors=exact_vectors)
        own = sample_rows(n, queries, seed=7)
        sample = shards.vectors_at(name, own)
        _, truth = exact_neighbours(chunks(), sample, 11)
        truth, method = drop_own_rows(truth, own, 10), "leave_one_out"
    tuned = tune(lambda q, k, p: searcher.search(q, k, p)[1], index, sample, truth, target=target, k=10,
                 refine=entry.rescore, own=own)
    tuned.method = method
    return tuned


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
        # every shard mapped, not read: optimize streams them once or twice and reads a few rows to
        # measure (20 GB of 10M x 512-d shards read into RAM were killed by the OOM killer on 24 GB); their
        # unit norms are checked as they are streamed, not all at open first
        shards = ShardSet(index_dir, manifest, ids, map_all=True, streamed=True)
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
                exact = all(k in ("flat", "hnsw") for k in shards._kinds[name])
                if kind in NEEDS_EXACT and not exact:   # nothing exact to re-score from: the full-dimension,
                    log.warning("%s: write shards hold compressed vectors; layout %s instead of %s", name,  # 8-bit
                                NEEDS_EXACT[kind], kind)
                    kind, factory = choose_layout(n, entry.dim, requested=NEEDS_EXACT[kind], max_memory=max_memory)
                folder = index_dir / name
                before = previous.get(name)
                remove_orphans(folder, {f.name for f in layout_files(index_dir, name, before)} if before else set())
                file = _next_file(folder, before)
                report = None if progress is None else (lambda done, name=name, n=n: progress(name, done, n))
                rescore = kind in RESCORED and exact
                held = held_out_rows(n, queries, seed=7) if kind in ("hnsw", "hnsw-pca") else np.zeros(0, np.int64)
                if kind in ON_DISK:                # one trained quantizer, the shards' lists merged on disk
                    trained, factory = train_index(factory, entry.dim, chunks, n, use_gpu=use_gpu)
                    index, records = build_ondisk(trained, chunks(), folder / file, progress=report)
                    written.extend(records)
                    del trained
                else:
                    index, factory = build_index(factory, entry.dim, chunks, n, use_gpu=use_gpu, hold=held,
                                                 progress=report)
                layout_entry = LayoutEntry(file=file, index_type=kind, factory=factory,
                                           shards=[[s.name, s.count] for s in manifest.shards], count=n,
                                           rescore=rescore, data_file=data_file_of(file) if kind in ON_DISK else None,
                                           held_out=held.tolist() or None)
                tuned = _tune_layout(index, layout_entry, shards, name, chunks, queries=queries, target=target_recall,
                                     exact_vectors=(lambda rows, name=name: shards.vectors_at(name, rows)))
                if len(held):                      # measured: now they join the graph, last (``layout_order``)
                    index.add(np.ascontiguousarray(shards.vectors_at(name, held), dtype=np.float32))
                    if report is not None:
                        report(n)
                if kind not in ON_DISK:
                    records = {folder / file: store.atomic_write_with(folder / file,
                                                                      lambda tmp, ix=index: _write_index(ix, tmp))}
                    written.extend(records)
                manifest.record_all(index_dir, records)
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
                                          "measured_on": f"{tuned.queries} {tuned.method.replace('_', '-')} queries",
                                          "reached": tuned.reached, "latency_ms": round(tuned.latency_ms, 4),
                                          "seconds": layout_entry.build_seconds}
                if not tuned.reached:
                    log.warning("%s: no parameter of %s reached recall@10 %.2f (best %.4f with %s)", name, factory,
                                target_recall, tuned.recall, tuned.params)
                del index
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




def _write_index(index, path) -> None:
    import faiss

    faiss.write_index(index, str(path))
