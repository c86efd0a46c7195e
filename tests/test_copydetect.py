"""Copy detection maths: score normalisation exactly as documented, background k-th neighbour (with
self-exclusion for index samples), binary (PDQ) candidates vs brute-force Hamming, DISC21 µAP."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.copydetect import (
    Background,
    MatchConfig,
    background_similarity,
    final_scores,
    knn,
    match_arrays,
    micro_average_precision,
    normalize_scores,
    recall_at_precision,
    sample_background,
    threshold_for_precision,
)
from retrieval.errors import InvalidQueryError


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_normalize_scores_subtracts_beta_times_background():
    sims = np.array([[0.9, 0.5], [0.7, 0.6]], np.float32)
    bg = np.array([0.3, 0.65], np.float32)
    np.testing.assert_allclose(normalize_scores(sims, bg, beta=1.0), [[0.6, 0.2], [0.05, -0.05]], atol=1e-6)
    np.testing.assert_allclose(normalize_scores(sims, bg, beta=0.5), [[0.75, 0.35], [0.375, 0.275]], atol=1e-6)
    per_cand = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    np.testing.assert_allclose(normalize_scores(sims, per_cand, beta=2.0), sims - 2 * per_cand, atol=1e-6)


def test_final_scores_formula():
    sims = np.array([[0.8, 0.4]], np.float32)
    bg = np.array([0.3], np.float32)
    ver = np.array([[1.0, np.nan]], np.float32)
    cfg = MatchConfig(beta=1.0, w_verify=0.5)
    np.testing.assert_allclose(final_scores(sims, cfg, background_kth=bg, verify=ver), [[1.0, 0.1]], atol=1e-6)
    raw = MatchConfig(normalize=False)
    np.testing.assert_allclose(final_scores(sims, raw), sims)
    with pytest.raises(InvalidQueryError):
        final_scores(sims, cfg)   # normalisation without a background


def test_background_kth_neighbour_matches_brute_force():
    rng = np.random.default_rng(0)
    bg = unit(rng.normal(size=(50, 16)))
    q = unit(rng.normal(size=(7, 16)))
    sims = q @ bg.T
    for k in (1, 3, 10):
        expected = -np.sort(-sims, axis=1)[:, k - 1]
        np.testing.assert_allclose(background_similarity(q, Background(bg), k), expected, atol=1e-5)


def test_background_from_index_skips_the_candidate_itself():
    rng = np.random.default_rng(1)
    db = unit(rng.normal(size=(20, 8)))
    ids = np.array([f"id{i}" for i in range(20)], dtype=object)
    q = unit(db[3] + 0.05 * rng.normal(size=8))[None]      # a copy of db[3]
    bg = Background(db, ids, "index-sample")
    got = background_similarity(q, bg, 1, [["id3", "id5"]])
    sims = (q @ db.T)[0]
    order = np.argsort(-sims)
    assert order[0] == 3
    # for candidate id3 the first background neighbour that is not id3 is used
    assert got[0, 0] == pytest.approx(sims[order[1]], abs=1e-5)
    # for id5 the plain nearest one (id3) is used
    assert got[0, 1] == pytest.approx(sims[3], abs=1e-5)


def test_match_arrays_planted_copies_and_one_threshold():
    rng = np.random.default_rng(2)
    d = 32
    db = unit(rng.normal(size=(200, d)))
    ids = [f"{i:015x}" for i in range(200)]
    background = Background(unit(rng.normal(size=(100, d))))
    copies = unit(db[[5, 17, 42]] + 0.5 * rng.normal(size=(3, d)) / np.sqrt(d))
    unrelated = unit(rng.normal(size=(3, d)))
    cfg = MatchConfig(k=5, threshold=0.2)
    res = match_arrays(np.concatenate([copies, unrelated]), db, ids, cfg, background=background)
    assert [r[0].id for r in res[:3]] == [ids[5], ids[17], ids[42]]
    assert all(len(r) == 0 for r in res[3:])
    m = res[0][0]
    assert m.score == pytest.approx(m.similarity - m.background, abs=1e-5)
    # a verifier's score is added with weight w_verify
    res_v = match_arrays(copies, db, ids, MatchConfig(k=5, threshold=0.2, w_verify=0.5), background=background,
                         verify_fn=lambda qi, row: 1.0 if ids[row] in (ids[5], ids[17], ids[42]) else 0.0)
    assert res_v[0][0].score == pytest.approx(m.score + 0.5, abs=1e-5) and res_v[0][0].verify == 1.0


def test_binary_candidates_agree_with_brute_force_hamming():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, size=(300, 256)).astype(bool)
    q_bits = bits[:10].copy()
    flip = rng.random(q_bits.shape) < 0.05
    q_bits ^= flip
    codes, q_codes = np.packbits(bits, axis=1), np.packbits(q_bits, axis=1)
    scores, rows = knn(q_codes, codes, 5)
    ham = (q_bits[:, None, :] != bits[None, :, :]).sum(-1)
    ref_scores = -np.sort(-(1 - 2 * ham / 256), axis=1)[:, :5]
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    assert np.all(rows[:, 0] == np.arange(10))
    # ±1 float queries are packed on the fly
    f_scores, f_rows = knn(np.where(q_bits, 1.0, -1.0).astype(np.float32) / 16, codes, 5)
    np.testing.assert_allclose(f_scores, scores)


def test_sample_background_is_seeded_uniform_and_bounded():
    blocks = [(i, unit(np.random.default_rng(i).normal(size=(30, 4))), [f"s{i}-{j}" for j in range(30)])
              for i in range(4)]
    a = sample_background(blocks, 25, seed=0)
    b = sample_background(blocks, 25, seed=0)
    assert len(a) == 25 and list(a.ids) == list(b.ids)
    assert len({i.split("-")[0] for i in a.ids}) > 1       # from several shards
    assert len(sample_background(blocks, 1000)) == 120


def test_micro_ap_as_disc21_defines_it():
    # predictions pooled over queries; 3 queries have a true reference
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    correct = [True, False, True, False, True]
    # AP = (1/1 + 2/3 + 3/5) / 3
    assert micro_average_precision(scores, correct, 3) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a missed ground truth (never predicted) lowers µAP
    assert micro_average_precision([0.9], [True], 2) == pytest.approx(0.5)
    assert recall_at_precision(scores, correct, 3, 0.9) == pytest.approx(1 / 3)
    assert recall_at_precision(scores, correct, 3, 0.6) == pytest.approx(1.0)
    assert threshold_for_precision(scores, correct, 3, 0.6) == pytest.approx(0.5)
    assert threshold_for_precision([0.5], [False], 1, 0.9) is None
    with pytest.raises(InvalidQueryError):
        micro_average_precision([1.0], [True], 0)
