"""Pair verification for re-ranking: RANSAC, nearest-neighbour matching, MaxSim, the batched
similarities and match counts, and ``verify_pair`` on a rotated, scaled copy."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.rerank.config import RerankConfig
from retrieval.rerank.verify import (
    batched_match_counts,
    batched_similarity,
    grid_coordinates,
    maxsim_score,
    mutual_nearest_neighbors,
    nearest_neighbors,
    ransac_affine,
    verify_pair,
)
from tests._rerank_helpers import unit


def _affine(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


# -- RANSAC ------------------------------------------------------------------------------------
@pytest.mark.parametrize("angle,scale", [(0, 1.0), (25, 0.55), (-40, 1.6), (90, 0.8)])
def test_ransac_recovers_known_affine(angle, scale):
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 1, size=(60, 2))
    true = _affine(angle, scale, 0.2, -0.1)
    dst = src @ true[:, :2].T + true[:, 2] + rng.normal(0, 0.002, size=(60, 2))
    outliers = rng.choice(60, 24, replace=False)          # 40% outliers
    dst[outliers] = rng.uniform(-1, 2, size=(24, 2))
    est, mask = ransac_affine(src, dst, threshold=0.02, iters=400, seed=0)
    assert est is not None
    np.testing.assert_allclose(est, true, atol=0.02)
    inl = np.ones(60, bool)
    inl[outliers] = False
    assert mask[inl].all() and mask.sum() <= inl.sum() + 2


def test_ransac_is_deterministic_and_rejects_reflections():
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 1, size=(40, 2))
    dst = src.copy()
    dst[:, 0] = 1 - dst[:, 0]                              # a mirror image: no proper affine explains it
    _, mask = ransac_affine(src, dst, threshold=0.02, iters=300, seed=0)
    assert mask.sum() <= 3
    _, mask_ok = ransac_affine(src, dst, threshold=0.02, iters=300, seed=0, allow_reflection=True)
    assert mask_ok.all()
    a = ransac_affine(src, src + 0.1, threshold=0.02, iters=50, seed=7)
    b = ransac_affine(src, src + 0.1, threshold=0.02, iters=50, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_ransac_too_few_points():
    t, mask = ransac_affine(np.zeros((2, 2)), np.zeros((2, 2)), threshold=0.1)
    assert t is None and mask.shape == (2,) and not mask.any()


# -- matching and pair verification ------------------------------------------------------------
def test_mutual_nn_and_maxsim_small():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.7], [0.1, 0.3, 0.75]], np.float32)
    m, s = mutual_nearest_neighbors(sim)
    assert m.tolist() == [[0, 0], [2, 2]] and np.allclose(s, [0.9, 0.75])
    assert maxsim_score(sim) == pytest.approx((0.9 + 0.8 + 0.75) / 3)
    assert grid_coordinates(np.array([[0, 0], [1, 3]]), (2, 4)).tolist() == [[0.125, 0.25], [0.875, 0.75]]


def test_verify_pair_detects_rotated_scaled_copy():
    rng = np.random.default_rng(4)
    grid = (12, 12)
    pos = np.stack(np.meshgrid(np.arange(12), np.arange(12), indexing="ij"), -1).reshape(-1, 2)
    cand = unit(rng.normal(size=(144, 32)))
    A = _affine(30, 0.6, 0.25, 0.1)                       # query = rotated, enlarged crop of the candidate
    src = grid_coordinates(pos, grid)
    dst = src @ A[:, :2].T + A[:, 2]
    cells = np.clip(np.floor(dst[:, ::-1] * 12).astype(int), 0, 11)
    q = unit(cand[cells[:, 0] * 12 + cells[:, 1]] + 0.2 * rng.normal(size=(144, 32)))
    res = verify_pair(q, pos, cand, pos, grid, grid)
    other = verify_pair(q, pos, unit(rng.normal(size=(144, 32))), pos, grid, grid)
    assert res.inliers >= 40 and res.score == 1.0
    assert other.score == 0.0 and other.inliers < 8
    np.testing.assert_allclose(res.transform[:, :2], A[:, :2], atol=0.1)


# -- batched similarities and match counts -----------------------------------------------------
def test_batched_similarity_and_match_counts_equal_per_pair():
    rng = np.random.default_rng(10)
    q = unit(rng.normal(size=(9, 8)))
    cands = [(unit(rng.normal(size=(n, 8))), np.zeros((n, 2), int)) for n in (9, 4, 0, 12)]
    sims, valid = batched_similarity(q, cands)
    assert sims.shape == (4, 9, 12) and valid.sum(axis=1).tolist() == [9, 4, 0, 12]
    for c, (d, _) in enumerate(cands):
        np.testing.assert_allclose(sims[c, :, :len(d)], q @ d.T, atol=1e-6)
        assert np.isneginf(sims[c, :, len(d):]).all()
    sims[0, :3] = -np.inf                       # query tokens below their background take no part
    for cfg in (RerankConfig(), RerankConfig(matching="nn"), RerankConfig(min_match_sim=0.2)):
        counts = batched_match_counts(sims, cfg)
        for c, (d, _) in enumerate(cands):
            fn = nearest_neighbors if cfg.matching == "nn" else mutual_nearest_neighbors
            assert counts[c] == len(fn(sims[c, :, :len(d)], cfg.min_match_sim)[0])
