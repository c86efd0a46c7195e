"""Copy detection maths: score normalisation exactly as documented, background k-th neighbour (with
self-exclusion for index samples), binary (PDQ) candidates vs brute-force Hamming, DISC21 µAP."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from retrieval.copydetect.match import sample_background
from retrieval.copydetect.metrics import micro_average_precision, recall_at_precision, threshold_for_precision
from retrieval.copydetect.regions import RegionConfig, box_iou, flat_mask, query_regions, trim_box
from retrieval.copydetect.scores import (
    Background,
    MatchConfig,
    background_similarity,
    final_scores,
    knn,
    match_arrays,
    merge_views,
    normalize_scores,
    pair_similarity,
    view_penalties,
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


# -- query regions and multi-view scoring -------------------------------------------------------------
def _texture(w, h, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def screenshot(picture, at, size=(800, 600), *, panel=160, menu=8, margin=10, footer=None):
    """``picture`` pasted at ``at`` into a made-up application window of ``size``: a title bar, a side
    panel ``panel`` pixels wide with ``menu`` lines of text, and ``footer = (xy, text)`` if given."""
    canvas = Image.new("RGB", size, (240, 240, 245))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, size[0], 40), fill=(60, 90, 160))
    d.rectangle((0, 40, panel, size[1]), fill=(220, 222, 230))
    for i in range(menu):
        d.text((margin, 60 + 30 * i), f"menu item {i}", fill=(40, 40, 40))
    if footer is not None:
        d.text(footer[0], footer[1], fill=(40, 40, 40))
    canvas.paste(picture, at)
    return canvas


@pytest.mark.parametrize("size,at", [((120, 90), (300, 200)), ((60, 40), (600, 500)), ((400, 300), (250, 60))])
def test_query_regions_find_a_picture_embedded_in_a_screenshot(size, at):
    pic = _texture(*size, seed=size[0])
    shot = screenshot(pic, at)
    boxes = query_regions(shot)
    assert boxes[0] == (0, 0, 800, 600)                      # the whole image first
    truth = (at[0], at[1], at[0] + size[0], at[1] + size[1])
    assert max(box_iou(b, truth) for b in boxes[1:]) >= 0.8


def test_query_regions_trim_a_uniform_border():
    pic = _texture(300, 200, seed=1)
    padded = ImageOps.expand(pic, border=(60, 20, 60, 45), fill=(30, 200, 60))
    boxes = query_regions(padded)
    assert max(box_iou(b, (60, 20, 360, 220)) for b in boxes[1:]) >= 0.9
    # the trimmed box in working coordinates matches the brute-force answer
    arr = np.asarray(padded, np.float32)
    assert trim_box(arr, 12.0) == (60, 20, 360, 220)


def test_query_regions_of_a_full_frame_picture_are_just_the_whole_image():
    assert query_regions(_texture(400, 300, seed=2)) == [(0, 0, 400, 300)]
    assert len(query_regions(screenshot(_texture(60, 40, 3), (300, 300)), RegionConfig(max_regions=1))) == 1


def test_flat_mask_matches_brute_force():
    arr = np.random.default_rng(4).integers(0, 20, size=(9, 11, 3)).astype(np.float32)
    got = flat_mask(arr, 10.0)
    h, w = arr.shape[:2]
    for y in range(h):
        for x in range(w):
            nb = [(y + dy, x + dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))
                  if 0 <= y + dy < h and 0 <= x + dx < w]
            assert got[y, x] == all(np.abs(arr[y, x] - arr[p]).max() <= 10.0 for p in nb)


def test_merge_views_is_the_max_over_views_per_query():
    rng = np.random.default_rng(5)
    owner = np.array([0, 0, 0, 1, 2, 2])
    rows = rng.integers(-1, 12, size=(6, 5))
    scores = rng.normal(size=(6, 5)).astype(np.float32)
    s, r, v = merge_views(owner, scores, rows, 3, 4)
    for qi in range(3):
        best = {}
        for vi in np.nonzero(owner == qi)[0]:
            for sc, row in zip(scores[vi], rows[vi]):
                if row >= 0 and (row not in best or sc > best[row][0]):
                    best[row] = (sc, vi)
        ranked = sorted(best.items(), key=lambda t: -t[1][0])[:4]
        assert list(r[qi][: len(ranked)]) == [row for row, _ in ranked]
        np.testing.assert_allclose(s[qi][: len(ranked)], [sc for _, (sc, _) in ranked])
        assert list(v[qi][: len(ranked)]) == [vi for _, (_, vi) in ranked]
        assert np.all(r[qi][len(ranked):] == -1)
    np.testing.assert_allclose(view_penalties(owner, 0.1), [0, 0.1, 0.1, 0, 0, 0.1])


def test_background_skips_twins_of_the_candidate():
    rng = np.random.default_rng(6)
    db = unit(rng.normal(size=(40, 16)))
    db[7] = unit(db[3] + 0.05 * rng.normal(size=16))              # a twin of row 3 in the collection
    ids = np.array([f"id{i}" for i in range(40)], dtype=object)
    q = unit(np.stack([db[3] + 0.1 * rng.normal(size=16), rng.normal(size=16)]))
    cands = [["id3", "id9"], ["id1", "id2"]]
    cvecs = [db[[3, 9]], db[[1, 2]]]
    got = background_similarity(q, Background(db, ids, "index-sample"), 2, cands, candidate_vectors=cvecs,
                                twin_threshold=0.9)
    sims = q @ db.T
    for qi in range(2):
        for ci, cid in enumerate(cands[qi]):
            c = int(cid[2:])
            keep = [j for j in np.argsort(-sims[qi]) if j != c and db[j] @ db[c] < 0.9]
            assert got[qi, ci] == pytest.approx(sims[qi, keep[1]], abs=1e-5)
    # without twin skipping the twin (row 7) is the copy's background neighbour
    plain = background_similarity(q, Background(db, ids, "index-sample"), 1, cands)
    assert plain[0, 0] == pytest.approx(sims[0, 7], abs=1e-5)


def test_pair_similarity_of_binary_codes_is_the_hamming_score():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 2, size=(2, 5, 256)).astype(bool)
    got = pair_similarity(np.packbits(a, axis=1), np.packbits(b, axis=1))
    np.testing.assert_allclose(got, 1 - 2 * (a != b).sum(1) / 256, atol=1e-6)


def test_match_arrays_with_region_views_finds_an_embedded_copy():
    rng = np.random.default_rng(8)
    d = 32
    db = unit(rng.normal(size=(300, d)))
    ids = [f"{i:015x}" for i in range(300)]
    background = Background(db, np.asarray(ids, dtype=object), "index-sample")
    whole = unit(rng.normal(size=(2, d)))                          # the screenshots themselves: unrelated
    region = unit(db[11] + 0.3 * rng.normal(size=d) / np.sqrt(d))  # a region of query 0 is a copy of row 11
    views = np.concatenate([whole[:1], region[None], whole[1:]])
    owner, boxes = [0, 0, 1], [None, (10, 20, 110, 90), None]
    cfg = MatchConfig(k=5, threshold=0.3, region_penalty=0.0)
    res = match_arrays(views, db, ids, cfg, background=background, owner=owner, boxes=boxes)
    assert [m.id for m in res[0]] == [ids[11]] and res[0][0].region == (10, 20, 110, 90)
    assert res[0][0].to_json()["region"] == [10, 20, 110, 90]
    assert res[1] == []
    # the whole images alone miss it; a region penalty lowers exactly the region view's score
    assert match_arrays(whole, db, ids, cfg, background=background) == [[], []]
    pen = match_arrays(views, db, ids, MatchConfig(k=5, threshold=-1, region_penalty=0.2), background=background,
                       owner=owner, boxes=boxes)
    assert pen[0][0].score == pytest.approx(res[0][0].score - 0.2, abs=1e-5)
