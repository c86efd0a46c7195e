"""Recall-targeted search parameters, as autofaiss does.

An approximate index (HNSW, IVF, IVF-PQ with a refine stage) trades recall for speed through one knob
(``efSearch``, ``nprobe``; plus the refine ``k_factor`` for compressed codes). The same value gives very
different recall on different collections — efSearch 128 gave recall@10 0.75 on one 500k shard and 0.99
on ten 50k shards — so Loupe measures instead of guessing:

1. ``probe_queries`` takes a sample of the index's **own vectors** and moves each one away from itself
   by random noise, as far as a typical vector is from its nearest neighbour (the median nearest-neighbour
   cosine of the sample). An own vector used as is would be an easy query (an HNSW search that reaches the
   point finds its neighbours through the point's own links: recall 0.947 at efSearch 16 on 100k synthetic
   vectors, where held-out queries get 0.596); the moved copies behave like unseen queries (0.649 there;
   0.889 vs 0.909 at efSearch 64, 0.959 vs 0.976 at 128), so the choice errs on the safe side;
2. ``exact_neighbours`` computes their true top-k by exact inner product over every vector (streamed,
   so a memory-mapped collection is never copied whole);
3. ``tune`` tries the knob's values from cheap to expensive and keeps the first one whose recall@k reaches
   the target plus a safety margin (``MARGIN`` of the remaining gap: 0.9625 for a target of 0.95), because
   probe queries are only a model of real ones (on 100k 256-d synthetic vectors the probes measured 0.955
   where held-out queries got 0.944 at the same efSearch); when none does, the most accurate one tried is
   kept. ``reached`` says whether the probe recall reached the target itself.

The result (``Tuned``) is recorded in the manifest (``search`` entry of the optimized layout) and used by
``Engine.search`` unless a request passes its own ``params``; ``loupe info DIR`` and ``/healthz`` show it.
Recall@k is the share of the true top-k that the index returns in its top-k (faiss' "k-recall@k").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from retrieval.errors import InvalidQueryError

EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
K_FACTOR_GRID = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_QUERIES = 1000
DEFAULT_K = 10
LATENCY_QUERIES = 100
MARGIN = 0.25               # aim at target + MARGIN * (1 - target) on the probe queries


def check_target_recall(value: Any) -> float:
    """``--target-recall`` must be a number in (0, 1]."""
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise InvalidQueryError(f"target recall must be a number in (0, 1], not {value!r}") from None
    if not (0.0 < target <= 1.0):
        raise InvalidQueryError(f"target recall must be in (0, 1] (e.g. 0.95), not {value!r}")
    return target


@dataclass
class Tuned:
    """What ``tune`` chose and what it measured."""

    params: dict[str, int]              # {"efSearch": 96} | {"nprobe": 16} | {"nprobe": 16, "k_factor": 4} | {}
    recall: float                       # recall@k measured with ``params`` on ``queries`` sample queries
    target: float
    k: int = DEFAULT_K
    queries: int = 0
    latency_ms: float = 0.0             # mean time per query, one query at a time, one thread
    reached: bool = True
    tried: list[dict[str, Any]] = field(default_factory=list)   # every (params, recall, latency) measured

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["recall"] = round(float(self.recall), 4)
        out["latency_ms"] = round(float(self.latency_ms), 4)
        out["tried"] = [{**t, "recall": round(float(t["recall"]), 4), "latency_ms": round(float(t["latency_ms"]), 4)}
                        for t in self.tried]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Tuned":
        return cls(**{k: obj[k] for k in ("params", "recall", "target", "k", "queries", "latency_ms", "reached",
                                          "tried") if k in obj})


# -- sample and reference ----------------------------------------------------------------------
def sample_rows(n: int, size: int = DEFAULT_QUERIES, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a uniform sample of ``min(size, n)`` of ``n`` vectors."""
    rng = np.random.default_rng(seed)
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size, replace=False)).astype(np.int64)


def exact_neighbours(chunks: Iterable[np.ndarray], queries: np.ndarray, k: int = DEFAULT_K
                     ) -> tuple[np.ndarray, np.ndarray]:
    """True top-``k`` (scores, global rows) of ``queries`` over the vectors given as consecutive
    ``chunks`` (e.g. one per shard, or blocks of a memory-mapped array), by exact inner product."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    offset = 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if len(chunk):
            flat = faiss.IndexFlatIP(chunk.shape[1])
            flat.add(chunk)
            d, i = flat.search(q, min(k, len(chunk)))
            if d.shape[1] < k:
                pad = k - d.shape[1]
                d = np.pad(d, ((0, 0), (0, pad)), constant_values=-np.inf)
                i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
            heap.add_result(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + offset, -1).astype(np.int64))
        offset += len(chunk)
    heap.finalize()
    return heap.D, heap.I


def probe_queries(own: np.ndarray, chunks: Callable[[], Iterable[np.ndarray]], *, seed: int = 0
                  ) -> tuple[np.ndarray, float]:
    """Query vectors for tuning made from ``own`` (a sample of the index's vectors): each moved by Gaussian
    noise so that its cosine to the original is the median nearest-neighbour cosine of the sample (computed
    exactly over ``chunks()``). Returns (queries [m, d] unit float32, that median cosine)."""
    own = np.ascontiguousarray(own, dtype=np.float32)
    scores, _ = exact_neighbours(chunks(), own, 2)        # [self, nearest other]
    nn_cos = float(np.clip(np.median(scores[:, 1]) if scores.shape[1] > 1 else 0.5, 0.05, 0.999))
    sigma = float(np.sqrt(1.0 / nn_cos ** 2 - 1.0))      # |v + s*g| with |g| ~ 1, g _|_ v: cos = 1 / sqrt(1 + s^2)
    noise = np.random.default_rng(seed).standard_normal(own.shape).astype(np.float32) / np.sqrt(own.shape[1])
    queries = own + sigma * noise
    queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    return queries.astype(np.float32), nn_cos


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = DEFAULT_K) -> float:
    """Mean share of each query's true top-``k`` (rows, -1 = none) found in its top-``k``."""
    found, truth = np.asarray(found)[:, :k], np.asarray(truth)[:, :k]
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = set(int(x) for x in t if x >= 0)
        hits += len(t & set(int(x) for x in f if x >= 0))
        total += len(t)
    return hits / total if total else 1.0


# -- the knob ----------------------------------------------------------------------------------
def knob_of(index) -> tuple[str | None, tuple[int, ...]]:
    """The parameter that trades recall for speed on ``index`` and the values worth trying."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", tuple(p for p in NPROBE_GRID if p < ivf.nlist) + (int(ivf.nlist),)
    inner = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", EF_SEARCH_GRID
    return None, ()


def tune(search: Callable[[np.ndarray, int, dict[str, int]], np.ndarray], index, queries: np.ndarray,
         truth: np.ndarray, *, target: float = DEFAULT_TARGET_RECALL, k: int = DEFAULT_K,
         refine: bool = False) -> Tuned:
    """Pick the cheapest parameters of ``index`` whose recall@k on ``queries`` reaches ``target`` (plus the
    margin, see the module docstring).

    ``search(queries, k, params) -> rows [nq, k]`` runs the search the engine will run (so the choice
    holds for the engine's own code path); ``truth`` is ``exact_neighbours``' rows. With ``refine`` (an
    ``IndexRefine`` over compressed codes) the refine ``k_factor`` is tuned first at a generous knob
    value, then the knob at that ``k_factor``, then (when the knob had to go past the generous value)
    ``k_factor`` is lowered again to the smallest that still reaches the goal at the chosen knob."""
    target = check_target_recall(target)
    goal = min(1.0, target + MARGIN * (1.0 - target))
    knob, grid = knob_of(index)
    tried: list[dict[str, Any]] = []

    def measure(params: dict[str, int]) -> tuple[float, float]:
        import faiss

        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)                 # as `loupe serve` searches
        try:
            rows = search(queries, k, params)          # recall: one batch (the same answers, faster)
            timed = queries[:LATENCY_QUERIES]           # latency: one query at a time, as a server sees them
            t0 = time.perf_counter()
            for i in range(len(timed)):
                search(timed[i:i + 1], k, params)
            latency = (time.perf_counter() - t0) / max(len(timed), 1) * 1e3
        finally:
            faiss.omp_set_num_threads(threads)
        recall = recall_at_k(rows, truth, k)
        tried.append({"params": dict(params), "recall": recall, "latency_ms": latency})
        return recall, latency

    if knob is None:                               # exact: nothing to tune, measure once
        recall, latency = measure({})
        return Tuned({}, recall, target, k, len(queries), latency, recall >= target, tried)

    base: dict[str, int] = {}
    generous = {knob: grid[min(len(grid) - 1, len(grid) * 3 // 4)]}
    if refine:
        for kf in K_FACTOR_GRID:
            recall, _ = measure({**generous, "k_factor": kf})
            base = {"k_factor": kf}
            if recall >= goal:
                break
    best: tuple[float, float, dict[str, int]] | None = None
    for value in grid:
        params = {**base, knob: int(value)}
        recall, latency = measure(params)
        if best is None or recall > best[0]:
            best = (recall, latency, params)
        if recall >= goal:
            if refine and value > generous[knob]:    # smaller k_factors missed at a larger knob value
                params, recall, latency = _smaller_k_factor(measure, params, recall, latency, goal)
            return Tuned(params, recall, target, k, len(queries), latency, True, tried)
        if recall >= 0.999:                          # saturated: more cannot help
            break
    assert best is not None
    return Tuned(best[2], best[0], target, k, len(queries), best[1], best[0] >= target, tried)


def _smaller_k_factor(measure, params: dict[str, int], recall: float, latency: float, goal: float
                      ) -> tuple[dict[str, int], float, float]:
    """The smallest ``k_factor`` below ``params``' that still reaches ``goal`` at ``params``' knob value.

    ``k_factor`` was chosen at a generous knob value; when even that one missed the goal (the coarse
    quantizer, not the codes, limiting recall), it climbed to the top of ``K_FACTOR_GRID``. At the knob
    value finally chosen a smaller one often reaches the goal with fewer candidates to keep and re-score
    (1M x 128-d synthetic: k_factor 64 was chosen with nprobe 384)."""
    for kf in (x for x in K_FACTOR_GRID if x < params.get("k_factor", 1)):
        trial = {**params, "k_factor": kf}
        r, lat = measure(trial)
        if r >= goal:
            return trial, r, lat
    return params, recall, latency
