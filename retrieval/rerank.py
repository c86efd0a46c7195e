"""Local-global re-ranking: local matching, spatial verification (RANSAC), αQE / DBA, score fusion.

Everything below ``rerank_hits`` is a pure function over arrays; ``rerank_hits`` is the thin adapter
the Engine calls (``Engine.search(rerank=True)``).

Pipeline for an image query against the top ``N`` (default 100) global candidates:

1. **Local matching.** Query and candidate local descriptors (unit rows, the index's PCA-reduced
   patch tokens / feature-map cells) give a similarity matrix ``S = Q Cᵀ``. Two scores:
   *MaxSim / Chamfer* ``mean_i max_j S_ij`` (query → candidate: every query patch finds its best
   counterpart; robust to the candidate holding more than the query), and the set of *mutual nearest
   neighbours* (``j = argmax_j S_ij`` and ``i = argmax_i S_ij``, ``S_ij ≥ min_match_sim``).
2. **Spatial verification.** The mutual-NN matches' grid centres (normalised to [0, 1]) are fitted
   with a 2-D affine transform by RANSAC (minimal samples of 3; all triples when there are at most
   ``ransac_iters`` of them, else ``ransac_iters`` seeded random triples; hypotheses evaluated as one
   batched numpy computation; implausible transforms — scale outside ``[1/max_scale, max_scale]``,
   anisotropy above ``max_aspect``, reflections — are rejected; the best one is refitted on its
   inliers by least squares). The inlier count is the evidence: it survives crops (scale), rotations,
   and partial copies (only the shared part matches).
3. **Multi-region query descriptors** (``config.regions``): square windows of the query's token grid
   (``region_sizes`` cells, ``region_stride``) are mean-pooled like the encoder's own global pooling and
   L2-normalised; a candidate's ``region`` score is its best cosine over these regional vectors
   (max-pooled). A query whose object sits in clutter (an object pasted onto another picture, a
   small crop's context) matches the object's own image through the region that holds it. With a
   ``search`` function and ``region_expand = m``, each region also fetches its own global top-``m``;
   the union is cut back to ``n_candidates`` by ``global + w_region * region`` before local matching.
   **Query-crop second pass** (``config.crop``): the ``crop_count`` best windows (``crop_select``:
   ``gain`` = the window whose vector beats the global vector by most on some candidate, ``match`` = the
   best region–candidate cosine, ``novel`` = the window least like the global vector) are mapped from
   grid cells to a pixel box of the query image (``grid_box_to_pixels``, the encoder's own centre crop
   undone, ``crop_margin`` cells added), cropped and embedded again with the encoder's ``encode_images``
   (one batched forward pass). A candidate's ``crop`` score is its best cosine to these crop vectors; with
   ``search`` and ``crop_expand = m`` each crop vector fetches its own top-``m`` too (an object pasted on
   another picture covers a few cells whose pooled features mostly describe the surroundings; re-embedding
   the enlarged crop describes the object itself).
4. **Fusion** (documented, defaults tuned on ``benchmarks/bench_rerank.py``)::

       fused = global + w_region * max(region, crop) + w_local * maxsim
               + w_spatial * min(inliers, inlier_cap) / inlier_cap

   (``crop_fuse="sum"`` adds ``w_crop * crop`` instead of taking the max; without the crop pass the
   region term is ``region`` alone)

   where ``inliers`` counts only when ``inliers >= max(min_inliers, min_inlier_ratio * matches)``
   (fewer is what chance gives: random matches on a coarse grid fit some affine map by accident).
   All similarities are one batched product; RANSAC runs only for candidates with at least
   ``min_inliers`` matches (the others cannot score), optionally only for the best ``spatial_top``.
5. **αQE** (optional): the query vector is expanded with the top ``qe_k`` re-ranked candidates,
   ``q' = norm(q + Σ_i max(q·v_i, 0)^α v_i)``, and the global term is recomputed with ``q'``.
   **DBA** (optional): candidate vectors are replaced by ``norm(Σ_j (v_i·v_j)^α v_j)`` over their
   ``dba_k`` nearest neighbours within the shortlist before scoring.

For a text query, the encoder's local features must live in the joint text–image space (CLIP's
projected patch tokens): each candidate gets ``mean of the top 1/8 patch similarities`` to the text
vector (projected through the index's PCA), fused as ``global + w_text * patch_score``. Encoders whose
local features are not in the text space (ConSE's CNN cells) keep the global order.

``verify_pair`` is the standalone spatial check (used by copy detection).
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .encoders.base import l2_normalize
from .rerank_regions import (  # noqa: F401 - re-exported: defined here before the split
    crop_windows,
    encoder_view,
    grid_box_to_pixels,
    region_scores,
    region_vectors,
    region_windows,
)

__all__ = ["RerankConfig", "DEFAULT_CONFIG", "FINE_DEFAULT_CONFIG",
           "VerificationResult", "LocalScores", "grid_coordinates", "similarity",
           "maxsim_score", "mutual_nearest_neighbors", "ransac_affine", "verify_pair", "alpha_query_expansion",
           "database_side_augmentation", "fuse_scores", "text_patch_scores", "rerank_arrays", "rerank_hits",
           "query_local_features", "query_tokens", "batched_similarity", "batched_match_counts", "nearest_neighbors",
           "region_windows", "region_vectors", "region_scores",
           "crop_windows", "encoder_view", "grid_box_to_pixels"]


@dataclass(frozen=True)
class RerankConfig:
    """Knobs of the re-ranker (defaults tuned on benchmarks/bench_rerank.py, effnet-lite0)."""

    n_candidates: int = 100        # re-rank this many global candidates
    local: bool = True             # MaxSim local score
    spatial: bool = True           # RANSAC spatial verification
    qe: bool = False               # α-query expansion over the re-ranked shortlist
    dba: bool = False              # database-side augmentation within the shortlist
    w_local: float = 2.0
    w_spatial: float = 0.1
    w_text: float = 0.5
    matching: str = "mutual"       # "mutual": mutual nearest neighbours; "nn": every query token's nearest
    min_match_sim: float = 0.0     # matches below this similarity are dropped
    local_norm_pct: float | None = 80.0   # per-token background percentile over the shortlist (None: off)
    min_inliers: int = 5
    min_inlier_ratio: float = 0.2  # ... and at least this fraction of the mutual-NN matches
    inlier_cap: int = 10
    ransac_iters: int = 512
    ransac_threshold: float = 1.0  # residual threshold, in cells of the candidate's grid
    max_scale: float = 4.0
    max_aspect: float = 3.0
    allow_reflection: bool = False
    seed: int = 0
    qe_k: int = 2
    qe_alpha: float = 3.0
    dba_k: int = 2
    dba_alpha: float = 3.0
    text_top_frac: float = 0.125
    spatial_top: int | None = 20    # RANSAC only for this many candidates (by the score without it); None: all
    regions: bool = True           # multi-region query descriptors (see region_vectors)
    w_region: float = 1.0
    region_sizes: tuple[int, ...] = (2, 3, 4, 5)   # window sides, in grid cells
    region_stride: int = 1
    region_expand: int = 0         # each region also fetches its own top-k candidates (0: rescore only)
    crop: bool = True              # query-crop second pass (see crop_windows / grid_box_to_pixels)
    crop_fuse: str = "max"         # "max": the region term becomes w_region·max(region, crop); "sum": + w_crop·crop
    w_crop: float = 1.0            # only with crop_fuse="sum"
    crop_count: int = 1            # crop this many query windows (one batched forward pass)
    crop_select: str = "match"     # "match" | "gain" | "novel": how the windows to crop are chosen
    crop_margin: float = 1.0       # cells added on every side of the window before cropping
    crop_expand: int = 0           # each crop vector also fetches its own top-k candidates (0: rescore only)


DEFAULT_CONFIG = RerankConfig()
# An index whose local descriptors are the fine map (``loupe index --local-layer fine``): 4x the cells, so
# local matching alone lifts crops and rotations as far as the crop pass and RANSAC did on the coarse map,
# and those two would take the latency past 3x global search (benchmarks/results/rerank.md).
FINE_DEFAULT_CONFIG = replace(DEFAULT_CONFIG, crop=False, spatial=False, w_local=4.0)


@dataclass
class VerificationResult:
    inliers: int                    # RANSAC inlier count (0 when too few matches)
    score: float                    # min(inliers, cap)/cap if inliers >= min_inliers else 0
    matches: np.ndarray             # int [m, 2] (query token, candidate token) mutual-NN matches
    inlier_mask: np.ndarray         # bool [m]
    transform: np.ndarray | None    # float [2, 3] affine (query xy -> candidate xy, normalised coords)
    match_sims: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class LocalScores:
    """Per-candidate evidence and the fused score, in candidate order."""

    global_scores: np.ndarray
    maxsim: np.ndarray
    inliers: np.ndarray
    spatial: np.ndarray
    fused: np.ndarray
    verifications: list[VerificationResult | None]


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
    pred = np.einsum("mi,kij->kmj", src_h, a_t)                      # [k, m, 2]
    resid = np.linalg.norm(pred - dst[None], axis=2)                 # [k, m]
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


# -- query expansion / DBA ---------------------------------------------------------------------
def alpha_query_expansion(query: np.ndarray, neighbours: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """αQE (Radenović et al.): ``norm(q + Σ_i max(q·v_i, 0)^α v_i)`` over the given neighbour vectors."""
    q = np.asarray(query, np.float32).reshape(-1)
    v = np.asarray(neighbours, np.float32).reshape(-1, q.shape[0])
    w = np.maximum(v @ q, 0.0) ** alpha
    return l2_normalize((q + w @ v)[None])[0]


def database_side_augmentation(vectors: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """DBA: each vector becomes ``norm(Σ_{j ∈ kNN(i) ∪ {i}} max(v_i·v_j, 0)^α v_j)`` within ``vectors``."""
    v = np.asarray(vectors, np.float32)
    if len(v) == 0 or k <= 0:
        return v.copy()
    sim = v @ v.T
    k = min(k + 1, len(v))                        # the vector itself is its own nearest neighbour
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    w = np.maximum(np.take_along_axis(sim, nn, axis=1), 0.0) ** alpha
    return l2_normalize(np.einsum("nk,nkd->nd", w, v[nn]))


# -- fusion ------------------------------------------------------------------------------------
def fuse_scores(global_scores: np.ndarray, maxsim: np.ndarray, spatial: np.ndarray,
                config: RerankConfig = DEFAULT_CONFIG, region_scores: np.ndarray | None = None,
                crop_scores: np.ndarray | None = None) -> np.ndarray:
    """``global + w_region·region + w_crop·crop + w_local·maxsim + w_spatial·spatial`` (terms switched off
    by the config, or not given, count 0)."""
    out = np.asarray(global_scores, np.float64).copy()
    crop = config.crop and crop_scores is not None
    if config.regions and region_scores is not None:
        rs = np.asarray(region_scores, np.float64)
        if crop and config.crop_fuse == "max":
            rs, crop = np.maximum(rs, np.asarray(crop_scores, np.float64)), False
        out += config.w_region * rs
    if crop:
        out += config.w_crop * np.asarray(crop_scores, np.float64)
    if config.local:
        out += config.w_local * np.asarray(maxsim, np.float64)
    if config.spatial:
        out += config.w_spatial * np.asarray(spatial, np.float64)
    return out


def text_patch_scores(text_vec: np.ndarray, candidates: Sequence[np.ndarray], top_frac: float = 0.125) -> np.ndarray:
    """Per candidate: the mean of its top ``top_frac`` patch similarities to the text vector."""
    t = np.asarray(text_vec, np.float32).reshape(-1)
    out = np.zeros(len(candidates), np.float64)
    for n, desc in enumerate(candidates):
        if len(desc) == 0:
            continue
        s = np.sort(np.asarray(desc, np.float32) @ t)[::-1]
        top = max(1, int(round(len(s) * top_frac)))
        out[n] = float(s[:top].mean())
    return out


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


def rerank_arrays(q_desc: np.ndarray, q_pos: np.ndarray, q_grid: Sequence[int], global_scores: np.ndarray,
                  candidates: Sequence[tuple[np.ndarray, np.ndarray]], c_grid: Sequence[int] | None = None,
                  config: RerankConfig = DEFAULT_CONFIG, region_scores: np.ndarray | None = None,
                  crop_scores: np.ndarray | None = None) -> LocalScores:
    """Local + spatial evidence and fused scores for one image query against its candidates.

    With ``config.local_norm_pct`` set (default 80), each query token's best similarity to a
    candidate is measured against that token's ``local_norm_pct``-th percentile over the whole
    shortlist (its *background*): tokens that match every candidate equally well (a white
    background, sky, texture) stop counting, and only tokens above their background take part in
    the matching that spatial verification sees. ``maxsim`` is then ``mean_i max(M_ci - b_i, 0)``.

    All similarities come from one matrix product; RANSAC runs only for candidates with at least
    ``min_inliers`` matches (fewer cannot pass the inlier test, so the scores are unchanged), and with
    ``config.spatial_top`` set, only for that many candidates ranked first by the fused score without
    the spatial term.
    """
    n = len(candidates)
    maxsim = np.zeros(n)
    inliers = np.zeros(n, np.int64)
    spatial = np.zeros(n)
    verifications: list[VerificationResult | None] = [None] * n
    q_desc = np.asarray(q_desc, np.float32)
    g = np.asarray(global_scores, np.float64)
    if n == 0 or len(q_desc) == 0:
        fused = fuse_scores(g, maxsim, spatial, config, region_scores, crop_scores)
        return LocalScores(g, maxsim, inliers, spatial, fused, verifications)
    sims, valid = batched_similarity(q_desc, candidates)
    has = valid.any(axis=1)
    best = np.full((n, len(q_desc)), np.nan)
    if has.any():
        best[has] = sims[has].max(axis=2)
    normalise = config.local_norm_pct is not None and int(has.sum()) >= 2
    if normalise:
        base = (np.percentile(best, config.local_norm_pct, axis=0) if has.all()
                else np.nanpercentile(best, config.local_norm_pct, axis=0))
        margin = best - base[None, :]                                 # [n, P] (nan for empty candidates)
        maxsim[has] = np.maximum(margin[has], 0.0).mean(axis=1)
        sims = np.where((margin > 0)[:, :, None], sims, np.float32(-np.inf))
    else:
        maxsim[has] = best[has].mean(axis=1)
    if config.spatial:
        counts = batched_match_counts(sims, config)
        todo = np.flatnonzero(has & (counts >= max(3, config.min_inliers)))
        if config.spatial_top is not None and len(todo) > config.spatial_top:
            pre = fuse_scores(g, maxsim, spatial, config, region_scores, crop_scores)
            todo = todo[np.argsort(-pre[todo], kind="stable")[:config.spatial_top]]
        for idx in todo:
            c_desc, c_pos = candidates[idx]
            p = len(c_desc)
            res = verify_pair(q_desc, q_pos, c_desc, c_pos, q_grid, c_grid, config, sim=sims[idx, :, :p])
            verifications[idx] = res
            inliers[idx] = res.inliers
            spatial[idx] = res.score
    return LocalScores(g, maxsim, inliers, spatial, fuse_scores(g, maxsim, spatial, config, region_scores, crop_scores),
                       verifications)


def _expanded_scores(query: np.ndarray, vectors: np.ndarray, order: np.ndarray, config: RerankConfig) -> np.ndarray:
    """Global scores recomputed with αQE (top ``qe_k`` of ``order``) and/or DBA over ``vectors``."""
    v = database_side_augmentation(vectors, config.dba_k, config.dba_alpha) if config.dba else vectors
    q = np.asarray(query, np.float32)
    if config.qe and config.qe_k > 0:
        q = alpha_query_expansion(q, v[order[:config.qe_k]], config.qe_alpha)
    return v @ q


# -- Engine adapter ----------------------------------------------------------------------------
_REDUCERS: dict[tuple[str, str, float], Any] = {}
_REDUCERS_LOCK = threading.Lock()


def _reducer(engine, encoder: str):
    from . import store

    path = store.pca_path(engine.index_dir, encoder)
    if not os.path.isfile(path):
        return None
    key = (str(Path(path).resolve()), encoder, os.path.getmtime(path))
    with _REDUCERS_LOCK:
        if key not in _REDUCERS:
            _REDUCERS[key] = store.LocalReducer.load(path)
        return _REDUCERS[key]


def _local_info(engine, encoder: str) -> dict | None:
    entry = engine.manifest.encoders.get(encoder)
    return entry.local_features if entry is not None else None


def _grid_positions(grid: Sequence[int]) -> np.ndarray:
    h, w = int(grid[0]), int(grid[1])
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)


def reduce_tokens(engine, encoder: str, tokens: np.ndarray) -> np.ndarray:
    """Raw encoder tokens → the index's local descriptor space (its PCA, then unit rows)."""
    red = _reducer(engine, encoder)
    return l2_normalize(tokens) if red is None else red.transform(tokens)


def query_tokens(engine, ctx, encoder_name: str | None = None) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The query image's encoder tokens ``(tokens [p, C], grid)``: ``ctx.local`` when the embedding step
    kept them (one forward pass), else one ``encode_images_and_local`` pass on ``ctx.image`` (then kept in
    ``ctx.local`` when ``encoder_name`` is the context's own encoder); None without an image in hand."""
    name = encoder_name or ctx.encoder
    local = getattr(ctx, "local", None)
    if local is not None and name == ctx.encoder:
        tokens, grid = local
        return np.asarray(tokens), (int(grid[0]), int(grid[1]))
    if getattr(ctx, "image", None) is not None:
        enc = engine.encoder(name)
        _, tokens, grid = enc.encode_images_and_local([ctx.image])
        grid = (int(grid[0]), int(grid[1]))
        if name == ctx.encoder:
            try:
                ctx.local = (tokens[0], grid)
            except AttributeError:  # pragma: no cover - a read-only context
                pass
        return np.asarray(tokens[0]), grid
    return None


def _query_fine_tokens(engine, ctx, name: str) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The query image's fine-layer tokens (an index built with ``--local-layer fine``): kept from the
    embedding pass (``ctx.local_fine``), else one ``encode_images_and_fine`` pass (which also keeps the
    final map in ``ctx.local`` for the regions)."""
    fine = getattr(ctx, "local_fine", None)
    if fine is not None and name == ctx.encoder:
        return np.asarray(fine[0]), (int(fine[1][0]), int(fine[1][1]))
    image = getattr(ctx, "image", None)
    if image is None:          # an indexed image_id query: its stored descriptors are read instead
        return None
    _, tokens, grid, ftok, fgrid = engine.encoder(name).encode_images_and_fine([image])
    if name == ctx.encoder:
        try:
            ctx.local, ctx.local_fine = (tokens[0], (int(grid[0]), int(grid[1]))), (ftok[0], fgrid)
        except AttributeError:  # pragma: no cover - a read-only context
            pass
    return np.asarray(ftok[0]), (int(fgrid[0]), int(fgrid[1]))


def query_local_features(engine, ctx, encoder_name: str | None = None
                         ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """The query's local descriptors in the index's space: ``(desc [p, c], pos [p, 2], grid)`` or None.

    Uses ``ctx.local = (tokens, grid)`` when the embedding step kept them (one forward pass), else runs
    the encoder's ``encode_images_and_local`` on ``ctx.image``, else reads an indexed ``ctx.image_id``'s."""
    name = encoder_name or ctx.encoder
    info = _local_info(engine, name) or {}
    if info.get("layer") == "fine":
        q = _query_fine_tokens(engine, ctx, name)
    else:
        q = query_tokens(engine, ctx, name)
    if q is not None:
        tokens, grid = q
        return reduce_tokens(engine, name, tokens), _grid_positions(grid), grid
    if getattr(ctx, "image_id", None):
        hit = engine.hit_for_id(name, ctx.image_id)
        desc, pos = engine.local_features(name, [hit])[0]
        grid = tuple(info.get("grid") or (int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1))
        return np.asarray(desc, np.float32), np.asarray(pos), (int(grid[0]), int(grid[1]))
    return None


def _text_in_patch_space(engine, name: str) -> bool:
    try:
        enc = engine.encoder(name)
    except Exception:  # noqa: BLE001 - unloadable encoder: no text re-ranking
        return False
    return bool(enc.supports_text and enc.spec.local == "patch_tokens")


def _project_text(engine, name: str, text_vec: np.ndarray) -> np.ndarray:
    """A text vector into the index's local descriptor space (PCA directions, no centring)."""
    red = _reducer(engine, name)
    t = np.asarray(text_vec, np.float32).reshape(1, -1)
    if red is None:
        return l2_normalize(t)[0]
    return l2_normalize(t @ red.components.T)[0]


def _new_candidates(search: Callable[[np.ndarray, int], list], vectors: np.ndarray, n: int, hits: list) -> list:
    """Hits the ``search`` of each vector (top ``n``) finds that are not in ``hits`` yet, in order, once."""
    seen = {h.id for h in hits}
    new = []
    for v in vectors:
        for h in search(v, n):
            if h.id not in seen:
                seen.add(h.id)
                new.append(h)
    return new


def _expand_with_regions(engine, ctx, name: str, hits: list, regions: np.ndarray, g: np.ndarray,
                         search: Callable[[np.ndarray, int], list] | None, config: RerankConfig
                         ) -> tuple[list, np.ndarray, np.ndarray]:
    """Region scores for ``hits``; with ``search`` and ``config.region_expand``, each region's own top
    candidates join first. The shortlist is then cut to ``n_candidates`` by ``global + w_region·region``.
    Returns ``(hits, global scores, region scores)``."""
    hits = list(hits)
    if search is not None and config.regions and config.region_expand > 0:
        new = _new_candidates(search, regions, config.region_expand, hits)
        if new:
            vecs_new = np.asarray(engine.vectors(name, new), np.float32)
            g = np.concatenate([g, (vecs_new @ np.asarray(ctx.vector, np.float32)).astype(np.float64)])
            hits += new
    vecs = np.asarray(engine.vectors(name, hits), np.float32)
    rs = region_scores(regions, vecs)
    if len(hits) > config.n_candidates:
        w = config.w_region if config.regions else 0.0
        keep = np.sort(np.argsort(-(g + w * rs), kind="stable")[:config.n_candidates])
        hits, g, rs = [hits[i] for i in keep], g[keep], rs[keep]
    return hits, g, rs


CropEncoder = Callable[[Any, list], np.ndarray]


def _crop_pass(engine, ctx, name: str, hits: list, g: np.ndarray, rs: np.ndarray, windows: np.ndarray,
               regions: np.ndarray, grid: Sequence[int], search: Callable[[np.ndarray, int], list] | None,
               config: RerankConfig, crop_encoder: CropEncoder | None
               ) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None]:
    """The query-crop second pass: choose windows (``crop_windows``), crop them from the query image,
    embed the crops (one batch), score ``hits`` by their best crop cosine; with ``search`` and
    ``config.crop_expand`` the crops' own top candidates join, and the shortlist is cut back to
    ``n_candidates`` by ``global + w_region·region + w_crop·crop``. Returns ``(hits, g, rs, crop scores)``
    (crop scores None without a query image)."""
    image = ctx.get_image() if hasattr(ctx, "get_image") else getattr(ctx, "image", None)
    if image is None:
        return hits, g, rs, None
    vecs = np.asarray(engine.vectors(name, hits), np.float32)
    chosen = crop_windows(windows, regions, vecs, g, ctx.vector, config.crop_count, config.crop_select)
    if len(chosen) == 0:
        return hits, g, rs, None
    enc = engine.encoder(name)
    view = encoder_view(enc.spec, image.size)
    boxes = [grid_box_to_pixels(windows[i], grid, image.size, view, config.crop_margin) for i in chosen]
    if crop_encoder is not None:
        cv = crop_encoder(image, boxes)
    else:
        cv = enc.encode_images([image.crop(b) for b in boxes])
    cv = l2_normalize(np.asarray(cv, np.float32).reshape(len(boxes), -1))
    hits = list(hits)
    if search is not None and config.crop_expand > 0:
        new = _new_candidates(search, cv, config.crop_expand, hits)
        if new:
            vecs_new = np.asarray(engine.vectors(name, new), np.float32)
            g = np.concatenate([g, (vecs_new @ np.asarray(ctx.vector, np.float32)).astype(np.float64)])
            rs = np.concatenate([rs, region_scores(regions, vecs_new)])
            vecs = np.concatenate([vecs, vecs_new])
            hits += new
    cs = region_scores(cv, vecs)
    if len(hits) > config.n_candidates:
        pre = fuse_scores(g, np.zeros(len(g)), np.zeros(len(g)), replace(config, local=False, spatial=False),
                          rs if config.regions else None, cs)
        keep = np.sort(np.argsort(-pre, kind="stable")[:config.n_candidates])
        hits, g, rs, cs = [hits[i] for i in keep], g[keep], rs[keep], cs[keep]
    return hits, g, rs, cs


def rerank_hits(engine, ctx, hits: list, k: int, config: RerankConfig | dict | None = None, *,
                search: Callable[[np.ndarray, int], list] | None = None,
                crop_encoder: CropEncoder | None = None) -> list:
    """Re-rank ``hits`` (top-N global candidates of ``ctx``) with local evidence; return the top ``k``.

    ``config``: a :class:`RerankConfig`, or None / a dict of overrides of the defaults, which are
    ``DEFAULT_CONFIG`` or, for an index built with ``--local-layer fine``, ``FINE_DEFAULT_CONFIG``.
    Returned hits are copies with ``score`` set to the fused score. Without local features in the
    index (``loupe index --local-features``), the global order is kept (αQE/DBA and multi-region
    scores still apply if set). ``search(vector, n) -> hits`` (the engine's search with the request's
    filter and parameters) lets the query's regions fetch candidates of their own
    (``config.region_expand``); without it, regions only re-score the given hits.
    ``crop_encoder(image, boxes) -> vectors`` replaces the encoder's ``encode_images`` on the crops of the
    query-crop pass (``config.crop``; e.g. a cache); the crops' vectors must be in the index's space.
    """
    if config is None or isinstance(config, dict):
        fine = (_local_info(engine, ctx.encoder) or {}).get("layer") == "fine"
        base = FINE_DEFAULT_CONFIG if fine else DEFAULT_CONFIG
        config = replace(base, **config) if isinstance(config, dict) else base
    hits = list(hits)[: max(config.n_candidates, int(k))]
    if not hits:
        return []
    name = ctx.encoder
    g = np.array([h.score for h in hits], np.float64)
    has_local = bool(_local_info(engine, name))
    is_image = getattr(ctx, "image", None) is not None or bool(getattr(ctx, "image_id", None))
    rs = cs = None
    if is_image and (config.regions or config.crop) and not getattr(ctx, "instruction", None):
        q_tok = query_tokens(engine, ctx, name)
        if q_tok is not None:
            windows = region_windows(q_tok[1], config.region_sizes, config.region_stride)
            regions = region_vectors(q_tok[0], q_tok[1], windows)
            hits, g, rs = _expand_with_regions(engine, ctx, name, hits, regions, g, search, config)
            if config.crop:
                hits, g, rs, cs = _crop_pass(engine, ctx, name, hits, g, rs, windows, regions, q_tok[1], search,
                                             config, crop_encoder)
            if not config.regions:
                rs = None
    fused = fuse_scores(g, np.zeros(len(g)), np.zeros(len(g)), replace(config, local=False, spatial=False), rs, cs)
    if has_local:
        if is_image and (config.local or config.spatial):
            q = query_local_features(engine, ctx, name)
            if q is not None:
                cands = engine.local_features(name, hits)
                info = _local_info(engine, name) or {}
                c_grid = tuple(info.get("grid") or q[2])
                fused = rerank_arrays(q[0], q[1], q[2], g, cands, c_grid, config, rs, cs).fused
        elif not is_image and getattr(ctx, "text", None) and _text_in_patch_space(engine, name):
            t = _project_text(engine, name, ctx.vector)
            cands = engine.local_features(name, hits)
            fused = g + config.w_text * text_patch_scores(t, [d for d, _ in cands], config.text_top_frac)
    if config.qe or config.dba:
        order = np.argsort(-fused, kind="stable")
        vecs = np.asarray(engine.vectors(name, hits), np.float32)
        new_g = _expanded_scores(ctx.vector, vecs, order, config)
        fused = fused - g + new_g
    order = np.argsort(-fused, kind="stable")[:k]
    return [replace(hits[i], score=float(fused[i])) for i in order]
