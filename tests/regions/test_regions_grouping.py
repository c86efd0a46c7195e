"""Selective search (hierarchical grouping of superpixels) and the fused-list rules, against references."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.regions.fusion import FuseRule, fuse
from retrieval.regions.grouping import hierarchical_grouping, segment, selective_search
from retrieval.regions.proposals import box_iou, propose_regions


def _two_objects() -> np.ndarray:
    rng = np.random.default_rng(0)
    rgb = (128 + rng.normal(0, 4, (96, 128, 3))).clip(0, 255).astype(np.uint8)
    rgb[10:40, 12:52] = (220, 30, 30)          # a red object
    rgb[50:90, 70:120] = (30, 40, 210)         # a blue one
    return rgb


def test_each_object_is_a_region_of_the_hierarchy_and_the_last_is_the_picture():
    rgb = _two_objects()
    labels = segment(rgb, 100.0)
    n = int(labels.max()) + 1
    regions = hierarchical_grouping(labels, rgb)
    assert len(regions) == 2 * n - 1                       # n segments + n - 1 merges (a connected picture)
    assert regions[-1][0] == (0, 0, 128, 96) and regions[-1][1].all()
    boxes = [b for b, _ in selective_search(rgb)]
    for obj in ((12, 10, 52, 40), (70, 50, 120, 90)):
        assert max(box_iou(b, obj) for b in boxes) > 0.9
    # a region's box is the box of its segments' pixels
    for box, segs in regions[: n + 5]:
        ys, xs = np.nonzero(segs[labels])
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_region_sums_and_ranking_equal_the_per_mask_reference():
    from retrieval.regions.proposals import rank_segments

    rgb = _two_objects()
    found = selective_search(rgb)
    values = np.random.default_rng(1).random(rgb.shape[:2]).astype(np.float32)
    pairs = list(found)                                     # (box, mask) per region, as iteration gives them
    assert len(pairs) == len(found) > 10
    assert np.allclose(found.pixel_sums(), [m.sum() for _, m in pairs])
    assert np.allclose(found.pixel_sums(values), [values[m].sum() for _, m in pairs], rtol=1e-5)
    for i in (0, len(found) // 2, len(found) - 1):
        ys, xs = np.nonzero(found.mask(i))
        assert found.box(i) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    fast, slow = rank_segments(found, values, 0.05), rank_segments(pairs, values, 0.05)
    assert [b for b, _ in fast] == [b for b, _ in slow]
    assert np.allclose([s for _, s in fast], [s for _, s in slow], atol=1e-6)
    threaded = selective_search(rgb, workers=2)              # segmentations in threads: the same regions
    assert np.array_equal(threaded.boxes, found.boxes) and np.array_equal(threaded.which, found.which)
    assert all(np.array_equal(a, b) for a, b in zip(threaded.members, found.members))
    part = found.subset([3, 1])
    assert [part.box(0), part.box(1)] == [found.box(3), found.box(1)]


def test_segments_are_proposed_first_and_fit_the_object():
    rgb = _two_objects()
    big = Image.fromarray(rgb).resize((512, 384), Image.NEAREST)
    regions = propose_regions(big, None)
    assert regions[0].kind == "segment"
    segments = [r.box for r in regions if r.kind == "segment"]
    for obj in ((48, 40, 208, 160), (280, 200, 480, 360)):
        assert max(box_iou(b, obj) for b in segments) > 0.8


def _reference_gain(g, global_list, region_lists, gain, top):
    cands = {c for c, _ in global_list} | {c for _, hits in region_lists for c, _ in hits}
    out = {}
    for c in cands:
        best = max([s for _, hits in region_lists for cc, s in hits if cc == c], default=-1e9)
        tops = max([s for _, hits in region_lists for cc, s in hits[:top] if cc == c], default=-1e9)
        out[c] = max(g[c], best) + gain * max(0.0, tops - g[c])
    return out


@pytest.mark.parametrize("gain, top", [(1.0, 1), (2.0, 2), (0.0, 1)])
def test_gain_rule_equals_its_formula(gain, top):
    rng = np.random.default_rng(1)
    ids = [f"i{j}" for j in range(30)]
    g = {c: float(rng.uniform(0, 1)) for c in ids}
    glob = sorted(((c, g[c]) for c in rng.choice(ids, 10, replace=False)), key=lambda t: -t[1])
    regions = [("segment", sorted(((str(c), float(rng.uniform(0, 1))) for c in rng.choice(ids, 10, replace=False)),
                                  key=lambda t: -t[1])) for _ in range(4)]
    got = fuse(g, glob, regions, FuseRule("gain", gain=gain, top=top))
    want = _reference_gain(g, glob, regions, gain, top)
    assert {c for c, _ in got} == set(want)
    assert all(abs(s - want[c]) < 1e-9 for c, s in got)
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)


def test_object_found_by_one_region_beats_the_background_under_gain_but_not_rrf():
    g = {"background": 0.9, "object": 0.2, "other": 0.5}
    glob = [("background", 0.9), ("other", 0.5)]
    regions = [("segment", [("object", 0.8), ("background", 0.6)]), ("window", [("background", 0.85), ("other", 0.4)])]
    assert fuse(g, glob, regions, FuseRule("gain"))[0][0] == "object"
    assert fuse(g, glob, regions, FuseRule("gain", kinds=("window",)))[0][0] == "background"
    rrf = fuse(g, glob, regions, FuseRule("rrf", k_rrf=60.0))
    assert [c for c, _ in rrf] == ["background", "other", "object"]
    assert abs(rrf[0][1] - (1 / 61 + 1 / 62 + 1 / 61)) < 1e-12
    inter = fuse(g, glob, regions, FuseRule("interleave"))
    assert [c for c, _ in inter] == ["background", "object", "other"]
    with pytest.raises(ValueError, match="unknown fusion mode"):
        FuseRule("mean")
