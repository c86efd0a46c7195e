"""Which FAISS index each shard gets, in the spirit of autofaiss.

``choose_index_type(n, dim, ...)`` picks, for an expected number of vectors ``n``:

* ``flat`` (exact inner product) when ``n <= FLAT_MAX_VECTORS`` and ``n * dim * 4`` bytes fit the
  memory budget;
* ``hnsw`` (``HNSW32,Flat``: exact vectors + a graph, ~10x faster search) when ``n <= HNSW_MAX_VECTORS``
  and ``n * (4 * dim + 288)`` bytes fit;
* ``ivfpq`` (``IVF{nlist},PQ{m}x8``: ``m`` bytes per vector) otherwise, with ``m`` the largest of
  64/32/16/8/4 (dividing ``dim``, at least 4 dimensions per sub-quantizer) whose codes fit the budget.

The budget is ``--max-memory`` or, by default, half the machine's RAM. Binary encoders (PDQ) always
get a ``BFlat`` Hamming index (``index_type`` ``binary``). IVF-PQ is trained once, on the first
shard's vectors (a sample of the corpus), on a GPU when faiss has one; ``nlist`` and the PQ bits are
capped to what the sample can train, and the factory string actually used is recorded in the
manifest.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from retrieval.errors import LoupeError

log = logging.getLogger(__name__)

FLAT_MAX_VECTORS = 500_000
HNSW_MAX_VECTORS = 5_000_000
HNSW_M = 32
HNSW_BYTES_PER_VECTOR = HNSW_M * 2 * 4 + 32   # graph links (+ level overhead)
INDEX_TYPES = ("auto", "flat", "ivfpq", "hnsw")
MIN_POINTS_PER_CENTROID = 39                   # faiss warns below this


@dataclass(frozen=True)
class IndexChoice:
    index_type: str      # flat | hnsw | ivfpq | binary
    factory: str         # faiss index_factory string


def parse_memory(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GB"``, ``"1000000"`` -> bytes."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise LoupeError(f"cannot read memory size {text!r}: use e.g. 512M, 4G or a number of bytes")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def default_memory_budget() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


def estimate_bytes(index_type: str, n: int, dim: int, m: int = 64, nlist: int = 1024) -> int:
    if index_type == "flat":
        return n * dim * 4
    if index_type == "hnsw":
        return n * (4 * dim + HNSW_BYTES_PER_VECTOR)
    if index_type == "ivfpq":
        return n * (m + 8) + nlist * dim * 4
    if index_type == "binary":
        return n * dim // 8
    raise ValueError(index_type)


def ivf_nlist(n: int) -> int:
    """A power of two near 4 * sqrt(n) (autofaiss' rule of thumb), at least 1."""
    if n <= 1:
        return 1
    return max(1, 2 ** int(round(math.log2(4 * math.sqrt(n)))))


def pq_subquantizers(dim: int, n: int, budget: int) -> int:
    choices = [m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= max(1, dim // 4)]
    for m in choices:
        if n * (m + 8) <= budget:
            return m
    return choices[-1]


def choose_index_type(n: int, dim: int, *, requested: str = "auto", max_memory: int | None = None,
                      binary: bool = False, shard_size: int | None = None) -> IndexChoice:
    """The index for ``n`` vectors of ``dim`` dimensions (see module docstring)."""
    if requested not in INDEX_TYPES:
        raise LoupeError(f"unknown index type {requested!r}: use one of {', '.join(INDEX_TYPES)}")
    if binary:
        return IndexChoice("binary", "BFlat")
    budget = max_memory if max_memory is not None else default_memory_budget()
    per_shard = max(1, min(n, shard_size or n))
    if requested == "auto":
        if n <= FLAT_MAX_VECTORS and estimate_bytes("flat", n, dim) <= budget:
            requested = "flat"
        elif n <= HNSW_MAX_VECTORS and estimate_bytes("hnsw", n, dim) <= budget:
            requested = "hnsw"
        else:
            requested = "ivfpq"
    if requested == "flat":
        return IndexChoice("flat", "Flat")
    if requested == "hnsw":
        return IndexChoice("hnsw", f"HNSW{HNSW_M},Flat")
    m = pq_subquantizers(dim, n, budget)
    return IndexChoice("ivfpq", f"IVF{ivf_nlist(per_shard)},PQ{m}x8")


def fit_factory(factory: str, n_train: int) -> str:
    """Cap an IVF-PQ (or IVF-RaBitQ) factory to what ``n_train`` training vectors can fit (tiny corpora, tests);
    a leading projection (``PCA128,`` / ``UPCA128,``) is kept as it is."""
    head = re.match(r"(U?PCA\d+,)(.+)", factory)
    if head:
        return head.group(1) + fit_factory(head.group(2), n_train)
    rabitq = re.fullmatch(r"IVF(\d+),RaBitQ", factory)
    if rabitq:
        cap = max(1, n_train // MIN_POINTS_PER_CENTROID)
        return f"IVF{min(int(rabitq.group(1)), 2 ** int(math.log2(cap)))},RaBitQ"
    m = re.fullmatch(r"IVF(\d+),PQ(\d+)x(\d+)(fs)?", factory)
    if not m:
        return factory
    nlist, msub, nbits = int(m.group(1)), int(m.group(2)), int(m.group(3))
    cap = max(1, n_train // MIN_POINTS_PER_CENTROID)
    nlist = min(nlist, 2 ** int(math.log2(cap)))
    fitted = max(1, min(nbits, int(math.log2(max(2, n_train)))))
    fast = m.group(4) and fitted == nbits          # fast-scan codes are 4 bits: fewer rows, plain PQ codes
    return f"IVF{nlist},PQ{msub}x{fitted}" + ("fs" if fast else "")


def new_index(factory: str, dim: int):
    """An empty (untrained) FAISS index for ``factory`` with the inner-product metric."""
    import faiss

    if factory == "BFlat":
        return faiss.IndexBinaryFlat(dim)
    if factory == "Flat":
        return faiss.IndexFlatIP(dim)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    hnsw = getattr(index, "hnsw", None)
    if hnsw is not None:
        hnsw.efConstruction = 80   # measured: 1M x 512, efSearch 256 -> recall@10 0.834 (benchmarks/RESULTS.md)
        hnsw.efSearch = 64
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # polysemous codes only serve Hamming-threshold search (polysemous_ht), which Loupe never uses; the
        # training costs minutes (20k x 64-d, PQ16x8: 255 s of a 258 s train on one core, 2 s without)
        faiss.downcast_index(ivf).do_polysemous_training = False
    return index


def train(index, sample: np.ndarray, *, use_gpu: bool = False):
    """Train ``index`` on ``sample`` (float32 [n, d]); IVF clustering on the GPU when asked and possible."""
    import faiss

    if index.is_trained:
        return index
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if use_gpu and ivf is not None:
        try:
            # the IVF's own space and metric (behind a projection: its output dimensions; hnsw-pca's L2)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        except Exception as exc:  # noqa: BLE001 - GPU training is an optimisation only
            log.warning("GPU clustering unavailable (%s); training on the CPU", exc)
    index.train(sample)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, 32)
        ivf.clustering_index = None
    return index


def add_vectors(index, vectors: np.ndarray) -> None:
    if len(vectors):
        dtype = np.uint8 if vectors.dtype == np.uint8 else np.float32
        index.add(np.ascontiguousarray(vectors, dtype=dtype))


def all_codes(index) -> np.ndarray:
    """Every stored vector of a shard index (exact for flat/HNSW/binary, decoded for IVF-PQ)."""
    import faiss

    from retrieval.index.vector_files import reconstruct_all

    if isinstance(index, faiss.IndexBinary):
        return faiss.vector_to_array(faiss.downcast_IndexBinary(index).xb).reshape(index.ntotal, index.d // 8)
    return reconstruct_all(index)
