"""Pair verification for re-ranking (pure array functions): local matching (similarities, MaxSim,
mutual / plain nearest-neighbour matches), batched over a whole shortlist, and the spatial check
(``ransac_affine``: a 2-D affine transform fitted by RANSAC; ``verify_pair``: matches + RANSAC + inlier
score). ``verify_pair`` is the standalone spatial check copy detection and attribution use.
Used by ``retrieval.rerank`` (see its docstring for the method and how the scores are fused).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from retrieval.rerank.config import DEFAULT_CONFIG, RerankConfig


@dataclass
class VerificationResult:
    inliers: int                    # RANSAC inlier count (0 when too few matches)
    score: float                    # min(inliers, cap)/cap if inliers >= min_inliers else 0
    matches: np.ndarray             # int [m, 2] (query token, candidate token) mutual-NN matches
    inlier_mask: np.ndarray         # bool [m]
    transform: np.ndarray | None    # float [2, 3] affine (query xy -> candidate xy, normalised coords)
    match_sims: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


# -- local matching ----------------------------------------------------------------------------
def grid_coordinates(pos: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """(row, col) grid positions → (x, y) cell centres normalised to [0, 1]."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 2)
    h, w = int(grid[0]), int(grid[1])
    return np.stack([(pos[:, 1] + 0.5) / w, (pos[:, 0] + 0.5) / h], axis=1)


def similarity(q_desc: np.ndarray, c_desc: np.ndarray) -> np.ndarray:
    return np.asarray(q_desc, np.float32) @ np.asarray(c_desc, np.float32).T


def maxsim_score(sim: np.ndarray) -> float:
    """Chamfer / MaxSim: the mean over query tokens of their best candidate-token similarity."""
    if sim.size == 0:
        return 0.0
    return float(sim.max(axis=1).mean())


def mutual_nearest_neighbors(sim: np.ndarray, min_sim: float = -np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) that are each other's nearest neighbour; returns (matches int [m, 2], sims [m])."""
    if sim.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    nn_q = sim.argmax(axis=1)            # best candidate token of each query token
    nn_c = sim.argmax(axis=0)            # best query token of each candidate token
    i = np.arange(sim.shape[0])
    keep = nn_c[nn_q] == i
    i = i[keep]
    j = nn_q[keep]
    s = sim[i, j]
    ok = (s >= min_sim) & np.isfinite(s)
    return np.stack([i[ok], j[ok]], axis=1).astype(np.int64), s[ok].astype(np.float32)


def nearest_neighbors(sim: np.ndarray, min_sim: float = -np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Every query token with its nearest candidate token; returns (matches int [m, 2], sims [m])."""
    if sim.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    i = np.arange(sim.shape[0])
    j = sim.argmax(axis=1)
    s = sim[i, j]
    ok = (s >= min_sim) & np.isfinite(s)
    return np.stack([i[ok], j[ok]], axis=1).astype(np.int64), s[ok].astype(np.float32)


# -- RANSAC ------------------------------------------------------------------------------------
def _triples(m: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    total = m * (m - 1) * (m - 2) // 6
    if total <= iters:
        return np.array(list(itertools.combinations(range(m), 3)), dtype=np.int64).reshape(-1, 3)
    # seeded random distinct triples (duplicates within a triple are resampled)
    out = rng.integers(0, m, size=(iters * 2, 3))
    out = out[(out[:, 0] != out[:, 1]) & (out[:, 0] != out[:, 2]) & (out[:, 1] != out[:, 2])]
    while len(out) < iters:  # pragma: no cover - only for tiny m with many iterations
        more = rng.integers(0, m, size=(iters, 3))
        more = more[(more[:, 0] != more[:, 1]) & (more[:, 0] != more[:, 2]) & (more[:, 1] != more[:, 2])]
        out = np.concatenate([out, more])
    return out[:iters]


def _plausible(linear: np.ndarray, max_scale: float, max_aspect: float, allow_reflection: bool) -> np.ndarray:
    """linear: [k, 2, 2] → bool [k]: scales within bounds, limited anisotropy, optional reflection."""
    sv = np.linalg.svd(linear, compute_uv=False)          # [k, 2], descending
    ok = (sv[:, 1] > 1.0 / max_scale) & (sv[:, 0] < max_scale) & (sv[:, 0] <= max_aspect * sv[:, 1])
    if not allow_reflection:
        ok &= np.linalg.det(linear) > 0
    return ok


def _fit_affine_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    a = np.concatenate([src, np.ones((len(src), 1))], axis=1)
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)          # [3, 2]
    return sol.T                                            # [2, 3]


def ransac_affine(src: np.ndarray, dst: np.ndarray, *, threshold: float, iters: int = 512, seed: int = 0,
                  max_scale: float = 4.0, max_aspect: float = 3.0, allow_reflection: bool = False,
                  weights: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Affine ``dst ≈ A @ [src, 1]`` by RANSAC. Returns (A [2, 3] or None, inlier mask bool [m]).

    Hypotheses from 3-point samples are scored all at once (inlier count, ties broken by the smaller
    summed inlier residual); the winner is refitted on its inliers (least squares) and its inlier set
    recomputed once. Deterministic for a given ``seed``.
    """
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    m = len(src)
    if m < 3:
        return None, np.zeros(m, bool)
    rng = np.random.default_rng(seed)
    tri = _triples(m, iters, rng)                                    # [k, 3]
    s = np.concatenate([src[tri], np.ones((len(tri), 3, 1))], axis=2)  # [k, 3, 3]
    d = dst[tri]                                                      # [k, 3, 2]
    det = np.linalg.det(s)
    good = np.abs(det) > 1e-9
    if not good.any():
        return None, np.zeros(m, bool)
    s, d, tri = s[good], d[good], tri[good]
    a_t = np.linalg.solve(s, d)                                      # [k, 3, 2]: [x y 1] @ a_t = [x' y']
    linear = np.transpose(a_t[:, :2, :], (0, 2, 1))                  # [k, 2, 2]
    plausible = _plausible(linear, max_scale, max_aspect, allow_reflection)
    if not plausible.any():
        return None, np.zeros(m, bool)
    a_t = a_t[plausible]
    src_h = np.concatenate([src, np.ones((m, 1))], axis=1)          # [m, 3]
    k = len(a_t)                  # every hypothesis at once: one [m, 3] x [3, 2k] product (einsum: ~10x slower)
    pred = (src_h @ a_t.transpose(1, 0, 2).reshape(3, 2 * k)).reshape(m, k, 2) - dst[:, None, :]
    resid = np.hypot(pred[..., 0], pred[..., 1]).T                   # [k, m]
    inl = resid <= threshold
    w = np.ones(m) if weights is None else np.asarray(weights, np.float64)
    counts = (inl * w).sum(axis=1)
    cost = np.where(inl, resid, 0.0).sum(axis=1)
    best = int(np.lexsort((cost, -counts))[0])
    mask = inl[best]
    transform = a_t[best].T                                          # [2, 3]
    if mask.sum() >= 3:
        refit = _fit_affine_lstsq(src[mask], dst[mask])
        if _plausible(refit[None, :, :2], max_scale, max_aspect, allow_reflection)[0]:
            mask2 = np.linalg.norm(src_h @ refit.T - dst, axis=1) <= threshold
            if (mask2 * w).sum() >= (mask * w).sum():
                transform, mask = refit, mask2
    return transform, mask


def verify_pair(q_desc: np.ndarray, q_pos: np.ndarray, c_desc: np.ndarray, c_pos: np.ndarray,
                q_grid: Sequence[int], c_grid: Sequence[int] | None = None,
                config: RerankConfig = DEFAULT_CONFIG, *, sim: np.ndarray | None = None) -> VerificationResult:
    """Spatially verify a (query, candidate) pair of local features.

    ``*_desc``: unit rows [p, c]; ``*_pos``: (row, col) on the grid ``*_grid`` (h, w). Mutual-NN matches
    are fitted with an affine transform (RANSAC); ``inliers`` counts the consistent matches and
    ``score`` maps them to [0, 1] (0 below ``config.min_inliers``).
    """
    c_grid = q_grid if c_grid is None else c_grid
    if sim is None:
        sim = similarity(q_desc, c_desc)
    if config.matching == "nn":
        matches, sims = nearest_neighbors(sim, config.min_match_sim)
    else:
        matches, sims = mutual_nearest_neighbors(sim, config.min_match_sim)
    empty = VerificationResult(0, 0.0, matches, np.zeros(len(matches), bool), None, sims)
    if len(matches) < 3:
        return empty
    src = grid_coordinates(np.asarray(q_pos)[matches[:, 0]], q_grid)
    dst = grid_coordinates(np.asarray(c_pos)[matches[:, 1]], c_grid)
    cell = 1.0 / max(int(c_grid[0]), int(c_grid[1]))
    transform, mask = ransac_affine(src, dst, threshold=config.ransac_threshold * cell, iters=config.ransac_iters,
                                    seed=config.seed, max_scale=config.max_scale, max_aspect=config.max_aspect,
                                    allow_reflection=config.allow_reflection)
    if transform is None:
        return empty
    n = int(mask.sum())
    needed = max(config.min_inliers, int(np.ceil(config.min_inlier_ratio * len(matches))))
    score = min(n, config.inlier_cap) / config.inlier_cap if n >= needed else 0.0
    return VerificationResult(n, float(score), matches, mask, transform, sims)


# -- batched matching over a shortlist ---------------------------------------------------------
def _stack_candidates(candidates: Sequence[tuple[np.ndarray, np.ndarray]], dim: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate descriptors padded into one array: ``(desc [n, p, c] float32, valid [n, p] bool)``."""
    counts = [len(d) for d, _ in candidates]
    p = max(counts, default=0)
    if counts and all(c == p for c in counts):
        desc = np.stack([np.asarray(d, np.float32).reshape(p, dim) for d, _ in candidates]) if p else \
            np.zeros((len(counts), 0, dim), np.float32)
        return desc, np.ones((len(counts), p), bool)
    desc = np.zeros((len(counts), p, dim), np.float32)
    valid = np.zeros((len(counts), p), bool)
    for n, ((d, _), c) in enumerate(zip(candidates, counts)):
        if c:
            desc[n, :c] = np.asarray(d, np.float32)
            valid[n, :c] = True
    return desc, valid


def batched_similarity(q_desc: np.ndarray, candidates: Sequence[tuple[np.ndarray, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """All query–candidate token similarities in one matrix product.

    Returns ``(sims [n, P, p] float32, valid [n, p])``: padding columns (candidates with fewer tokens)
    hold ``-inf``."""
    q = np.asarray(q_desc, np.float32)
    desc, valid = _stack_candidates(candidates, q.shape[1] if q.ndim == 2 else 0)
    n, p, c = desc.shape
    # a batched matmul of small matrices: one BLAS call per candidate, no thread start-up (a single large
    # product goes multi-threaded in OpenBLAS, which is far slower on a loaded machine)
    sims = np.matmul(q[None], desc.transpose(0, 2, 1)) if n * p and len(q) else np.zeros((n, len(q), p), np.float32)
    if not valid.all():
        sims = np.where(valid[:, None, :], sims, -np.inf).astype(np.float32)
    return sims, valid


def batched_match_counts(sims: np.ndarray, config: RerankConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Per candidate, how many matches ``verify_pair`` would see (mutual NN or NN, ≥ ``min_match_sim``,
    finite) — for all candidates at once from ``sims [n, P, p]``."""
    n, P, p = sims.shape
    if P == 0 or p == 0:
        return np.zeros(n, np.int64)
    nn_q = sims.argmax(axis=2)                                        # [n, P]
    s = np.take_along_axis(sims, nn_q[:, :, None], axis=2)[:, :, 0]   # [n, P]
    ok = (s >= config.min_match_sim) & np.isfinite(s)
    if config.matching != "nn":
        nn_c = sims.argmax(axis=1)                                    # [n, p]
        ok &= np.take_along_axis(nn_c, nn_q, axis=1) == np.arange(P)[None, :]
    return ok.sum(axis=1)
