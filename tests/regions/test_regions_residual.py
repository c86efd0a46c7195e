"""Explaining away the background: the query area the best whole-picture matches do not explain."""

from __future__ import annotations

import numpy as np
from regions_data import png_bytes

from retrieval.regions.proposals import box_iou, propose_regions
from retrieval.regions.residual import ResidualConfig, align, explain
from retrieval.regions.saliency import CanvasTokens

ASTRONAUT_PATCH = (300, 60, 420, 180)       # where a crop of the (unindexed) cat photo is pasted


def _tokens(rng, shape):
    t = rng.normal(size=(*shape, 16)).astype(np.float32)
    return t / np.linalg.norm(t, axis=2, keepdims=True)


def test_a_shifted_copy_is_aligned_and_only_the_new_block_is_unexplained():
    rng = np.random.default_rng(0)
    hit_tokens = _tokens(rng, (12, 12))
    hit = CanvasTokens(hit_tokens, (120, 120), 120.0, (0.0, 0.0))               # 10-pixel cells
    query_tokens = np.roll(hit_tokens, shift=(-2, -3), axis=(0, 1)).copy()       # the hit moved up 2, left 3 cells
    query_tokens[4:7, 2:5] = _tokens(rng, (3, 3))                                # something new on it
    query = CanvasTokens(query_tokens, (90, 100), 120.0, (0.0, 0.0))    # 9 x 10 cells on the picture, the rest padding
    transform, inliers = align(query, hit)
    assert transform is not None and inliers >= 40
    assert np.allclose(transform[:, :2], np.eye(2), atol=1e-3) and np.allclose(transform[:, 2], [30, 20], atol=0.5)
    found = explain(query, [hit], ResidualConfig(explained_sim=0.7, radius=0.0))
    unexplained = np.argwhere(found.similarity < 0.7)
    assert {tuple(c) for c in unexplained} == {(r, c) for r in range(4, 7) for c in range(2, 5)}
    assert np.isnan(found.similarity[10:, :]).all() and np.isnan(found.similarity[:, 9:]).all()   # padding
    assert not np.isnan(found.similarity[:10, :9]).any() and found.fraction == (90 - 9) / 90
    assert found.unexplained(ResidualConfig(explained_sim=0.7)) == 9


def test_unrelated_tokens_do_not_align():
    rng = np.random.default_rng(1)
    a = CanvasTokens(_tokens(rng, (10, 10)), (100, 100), 100.0, (0.0, 0.0))
    b = CanvasTokens(_tokens(rng, (10, 10)), (100, 100), 100.0, (0.0, 0.0))
    assert align(a, b)[0] is None and explain(a, [b]) is None


def _on_the_patch(box) -> bool:
    """Most of ``box`` lies on the pasted patch, and it covers a good part of it."""
    x0, y0, x1, y1 = ASTRONAUT_PATCH
    inter = max(0, min(box[2], x1) - max(box[0], x0)) * max(0, min(box[3], y1) - max(box[1], y0))
    return inter >= 0.8 * (box[2] - box[0]) * (box[3] - box[1]) and box_iou(box, ASTRONAUT_PATCH) > 0.4


def _astronaut_with_cat(photos):
    picture = photos["astronaut"].copy()
    x0, y0, x1, y1 = ASTRONAUT_PATCH
    picture.paste(photos["chelsea"].crop((110, 20, 300, 172)).resize((x1 - x0, y1 - y0)), (x0, y0))
    return picture


def test_the_residual_region_is_the_object_pasted_on_an_indexed_picture(effnet, photos):
    picture = _astronaut_with_cat(photos)
    found = []
    regions = propose_regions(picture, effnet, explain_by=[photos["astronaut"]], explanation=found)
    assert regions[0].kind == "residual" and _on_the_patch(regions[0].box)
    assert found[0] is not None and found[0].fraction > 0.6
    # the picture alone explains itself: no residual region; without explaining pictures: none either
    assert "residual" not in {r.kind for r in propose_regions(photos["astronaut"], effnet,
                                                              explain_by=[photos["astronaut"]])}
    assert "residual" not in {r.kind for r in propose_regions(picture, effnet)}
    # a picture that explains nothing of it (another photo) gives no residual region
    assert "residual" not in {r.kind for r in propose_regions(picture, effnet, explain_by=[photos["moon"]])}


def test_a_regions_query_puts_the_residual_region_first(region_engine, photos):
    resp = region_engine.search(image=png_bytes(_astronaut_with_cat(photos)), regions=True, k=3)
    first = resp.regions.regions[0]
    assert first.region.kind == "residual" and _on_the_patch(first.box)
    assert len(resp.regions.regions) <= 3            # ProposalConfig.max_with_residual


def test_residual_candidates_rank_segments_by_the_residual_and_fall_back_to_components():
    from retrieval.regions.proposals import ProposalConfig, residual_candidates

    residual = np.zeros((40, 60), np.float32)
    residual[10:20, 30:45] = 0.9                       # what the hits do not explain
    inside = np.zeros((40, 60), bool)
    inside[10:20, 30:45] = True
    around = np.zeros((40, 60), bool)
    around[5:30, 20:55] = True
    elsewhere = np.zeros((40, 60), bool)
    elsewhere[25:38, 2:18] = True
    segments = [((2, 25, 18, 38), elsewhere), ((20, 5, 55, 30), around), ((30, 10, 45, 20), inside)]
    config = ProposalConfig(segment_margin=0.0)
    assert residual_candidates(residual, segments, config)[0][0] == (30, 10, 45, 20)
    box, _ = residual_candidates(residual, [], config)[0]     # no segments: the connected area, grown by margin
    assert box[0] <= 30 and box[1] <= 10 and box[2] >= 45 and box[3] >= 20 and box_iou(box, (30, 10, 45, 20)) > 0.5
