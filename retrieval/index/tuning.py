"""Recall-targeted search parameters, as autofaiss does.

An approximate index (HNSW, IVF, IVF-PQ with a refine stage) trades recall for speed through one knob
(``efSearch``, ``nprobe``; plus the refine ``k_factor`` for compressed codes). The same value gives very
different recall on different collections — efSearch 128 gave recall@10 0.75 on one 500k shard and 0.99
on ten 50k shards — so Loupe measures instead of guessing:

1. the queries are a sample of the collection's **own vectors** used as queries the index has not seen.
   An indexed vector used as is would be an easy query for HNSW (the search reaches the point and finds
   its neighbours through the point's own links: recall@10 0.947 at efSearch 16 on 100k synthetic
   vectors, where unseen queries get 0.596). So ``optimize`` **holds the sample out** of an HNSW graph
   (``held_out_rows``), measures, then inserts it last; on 100k × 128-d synthetic vectors held-out rows
   measured 0.7703 / 0.9051 / 0.9736 / 0.9960 at efSearch 32 / 64 / 128 / 256 where truly unseen queries
   got 0.7767 / 0.9029 / 0.9737 / 0.9957 (the earlier model — own vectors moved by noise — gave 0.6801 /
   0.8345 / 0.9413 / 0.9873: too pessimistic at 1M × 128-d, optimistic at 60k × 512-d). For IVF layouts a
   query being indexed does not change which lists are probed, so each sample vector searches the full
   index and its own row is left out of its answer and its truth (``own``, ``drop_own_rows``);
2. ``exact_neighbours`` computes the true top-k by exact inner product over every vector (streamed,
   so a memory-mapped collection is never copied whole; ``exclude``: rows not in the index yet);
3. ``tune`` bisects the knob's values (recall grows with the knob) for the cheapest one whose recall@k reaches
   the target plus a small margin (``MARGIN`` of the remaining gap: 0.955 for a target of 0.95): the
   sample's recall is an estimate (1,000 queries: standard error ≈ 0.003 near 0.95), and the choice
   should hold for the queries users send. When none does, the most accurate one tried is kept.
   ``reached`` says whether the measured recall reached the target itself.

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

EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 768, 1024, 1536, 2048)
NPROBE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
K_FACTOR_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # past 64: 10M x 512-d reached recall@10 0.954 at nprobe 2048
                                                    # with 128, where 64 needed nprobe 4096 (37.5 vs 63.9 ms)
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_QUERIES = 1000
DEFAULT_K = 10
LATENCY_QUERIES = 100
MARGIN = 0.1                # aim at target + MARGIN * (1 - target) on the sample (sampling error)


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
    method: str = ""                    # how the sample was queried: held_out | leave_one_out ("": older Loupe)

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
                                          "tried", "method") if k in obj})


# -- sample and reference ----------------------------------------------------------------------
def sample_rows(n: int, size: int = DEFAULT_QUERIES, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a uniform sample of ``min(size, n)`` of ``n`` vectors."""
    rng = np.random.default_rng(seed)
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size, replace=False)).astype(np.int64)


def exact_neighbours(chunks: Iterable[np.ndarray], queries: np.ndarray, k: int = DEFAULT_K, *,
                     exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """True top-``k`` (scores, global rows) of ``queries`` over the vectors given as consecutive
    ``chunks`` (e.g. one per shard, or blocks of a memory-mapped array), by exact inner product; rows in
    ``exclude`` (global row numbers) are left out."""
    import faiss

    q = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    skip = np.zeros(0, np.int64) if exclude is None else np.unique(np.asarray(exclude, dtype=np.int64))
    offset = 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        keep = None
        local = skip[(skip >= offset) & (skip < offset + len(chunk))] - offset
        if len(local):
            keep = np.delete(np.arange(len(chunk), dtype=np.int64), local)
            chunk, size = chunk[keep], len(chunk)
        else:
            size = len(chunk)
        if len(chunk):
            flat = faiss.IndexFlatIP(chunk.shape[1])
            flat.add(chunk)
            d, i = flat.search(q, min(k, len(chunk)))
            if keep is not None:
                i = np.where(i >= 0, keep[np.maximum(i, 0)], -1)
            if d.shape[1] < k:
                pad = k - d.shape[1]
                d = np.pad(d, ((0, 0), (0, pad)), constant_values=-np.inf)
                i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
            heap.add_result(np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + offset, -1).astype(np.int64))
        offset += size
    heap.finalize()
    return heap.D, heap.I


def held_out_rows(n: int, size: int = DEFAULT_QUERIES, seed: int = 0) -> np.ndarray:
    """Sorted rows to hold out of an ``n``-vector graph while measuring it: ``size`` of them, at most a tenth
    of ``n`` (the graph measured is then at least 90 % of the final one); none below 20 vectors."""
    size = min(size, n // 10)
    if size < 2:
        return np.zeros(0, np.int64)
    return sample_rows(n, size, seed=seed)


def drop_own_rows(rows: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """``rows`` [nq, >= k] with each query's own row ``own[i]`` removed (when there), cut to ``k``: a
    leave-one-out answer (search ``k + 1``) or truth (exact ``k + 1``)."""
    rows = np.asarray(rows)
    is_own = rows == np.asarray(own, dtype=rows.dtype)[:, None]
    order = np.argsort(is_own, axis=1, kind="stable")       # own row last, the others in their order
    return np.take_along_axis(rows, order, 1)[:, :k]


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
    if isinstance(inner, faiss.IndexPreTransform):      # a graph on a PCA projection (hnsw-pca)
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", EF_SEARCH_GRID
    return None, ()


def tune(search: Callable[[np.ndarray, int, dict[str, int]], np.ndarray], index, queries: np.ndarray,
         truth: np.ndarray, *, target: float = DEFAULT_TARGET_RECALL, k: int = DEFAULT_K,
         refine: bool = False, own: np.ndarray | None = None) -> Tuned:
    """Pick the cheapest parameters of ``index`` whose recall@k on ``queries`` reaches ``target`` (plus the
    margin, see the module docstring).

    ``search(queries, k, params) -> rows [nq, k]`` runs the search the engine will run (so the choice
    holds for the engine's own code path); ``truth`` is ``exact_neighbours``' rows. ``own``: each query's
    own row in the index (leave-one-out): it is searched with ``k + 1`` and its own row dropped. With ``refine`` (an
    ``IndexRefine`` over compressed codes) the refine ``k_factor`` is tuned first at a generous knob
    value, then the knob at that ``k_factor``, then (when the knob had to go past the generous value)
    ``k_factor`` is lowered again to the smallest that still reaches the goal at the chosen knob."""
    target = check_target_recall(target)
    goal = min(1.0, target + MARGIN * (1.0 - target))
    knob, grid = knob_of(index)
    tried: list[dict[str, Any]] = []
    extra = 0 if own is None else 1

    def measure(params: dict[str, int]) -> tuple[float, float]:
        import faiss

        started = time.perf_counter()
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)                 # as `loupe serve` searches
        try:
            rows = search(queries, k + extra, params)  # recall: one batch (the same answers, faster)
            if own is not None:
                rows = drop_own_rows(rows, own, k)
            timed = queries[:LATENCY_QUERIES]           # latency: one query at a time, as a server sees them
            t0 = time.perf_counter()
            for i in range(len(timed)):
                search(timed[i:i + 1], k + extra, params)
            latency = (time.perf_counter() - t0) / max(len(timed), 1) * 1e3
        finally:
            faiss.omp_set_num_threads(threads)
        recall = recall_at_k(rows, truth, k)
        tried.append({"params": dict(params), "recall": recall, "latency_ms": latency,
                      "seconds": round(time.perf_counter() - started, 2)})
        return recall, latency

    if knob is None:                               # exact: nothing to tune, measure once
        recall, latency = measure({})
        return Tuned({}, recall, target, k, len(queries), latency, recall >= target, tried)

    base: dict[str, int] = {}
    at_generous = min(len(grid) - 1, len(grid) * 3 // 4)
    generous = {knob: grid[at_generous]}
    known: dict[int, Trial] = {}
    if refine:
        for kf in K_FACTOR_GRID:
            recall, latency = measure({**generous, "k_factor": kf})
            base = {"k_factor": kf}
            known = {at_generous: (recall, latency, {**generous, **base})}
            if recall >= goal:
                break
    chosen, best = bisect_knob(measure, base, knob, grid, goal, known)
    if chosen is not None:
        params, recall, latency = chosen
        if refine and params[knob] > generous[knob]:  # smaller k_factors missed at a larger knob value
            params, recall, latency = _smaller_k_factor(measure, params, recall, latency, goal)
        return Tuned(params, recall, target, k, len(queries), latency, True, tried)
    return Tuned(best[2], best[0], target, k, len(queries), best[1], best[0] >= target, tried)


SATURATED = 0.999           # a recall this high is taken as the knob's ceiling: larger values cannot help
Trial = tuple[float, float, dict[str, int]]      # (recall, latency ms, params) of one measurement


def bisect_knob(measure, base: dict[str, int], knob: str, grid: tuple[int, ...], goal: float,
                known: dict[int, Trial] | None = None) -> tuple[tuple[dict[str, int], float, float] | None, Trial]:
    """The cheapest value of ``grid`` whose recall reaches ``goal``, found by bisection: recall grows with the
    knob (more lists probed, a wider graph search), so every value below one that misses the goal can be skipped.
    About log2(len(grid)) measurements instead of one per value up to the answer: at 10M x 512-d each value
    measured at k_factor 256 took 121-183 s, and the scan from nprobe 1 had reached only nprobe 8 after 18.5
    minutes; the bisection measured 3 values (benchmarks/RESULTS.md, issue 14 part 8). Returns
    ``((params, recall, latency) or None when no value reaches the goal, (recall, latency, params) of the most
    accurate value measured)``; a saturated value (``SATURATED``) that still misses the goal ends the search like
    a reaching one, with ``None``. ``known``: grid positions already measured with ``base``."""
    seen = dict(known or {})

    def at(i: int) -> Trial:
        if i not in seen:
            params = {**base, knob: int(grid[i])}
            seen[i] = (*measure(params), params)
        return seen[i]

    lo, hi = 0, len(grid) - 1                # every value below ``lo`` misses; ``hi`` is the last one left
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[0] >= min(goal, SATURATED):
            hi = mid
        else:
            lo = mid + 1
    recall, latency, params = at(lo)
    best = max(seen.values(), key=lambda x: x[0])
    return ((params, recall, latency) if recall >= goal else None), best


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
