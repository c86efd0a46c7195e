"""Automatic regions: proposals from the feature map and the picture's content; each region searched."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from regions_data import PLANTED, png_bytes, poster

from retrieval.regions.box import crop_to_box
from retrieval.regions.proposals import ProposalConfig, box_iou, otsu_threshold, propose_regions, window_boxes
from retrieval.regions.search import CROP_JITTER


def test_otsu_splits_two_levels():
    values = np.concatenate([np.full(100, 0.1), np.full(50, 0.9)])
    assert 0.1 < otsu_threshold(values) < 0.9


def test_windows_cover_the_far_edges():
    boxes = window_boxes((40, 60), [0.5])
    assert boxes[:, 2].max() == 60 and boxes[:, 3].max() == 40 and boxes[:, :2].min() == 0
    assert np.allclose(boxes[:, 2] - boxes[:, 0], 20)


def test_a_distinct_object_is_proposed_from_content_alone():
    rng = np.random.default_rng(0)
    pixels = (120 + rng.normal(0, 6, (300, 400, 3))).clip(0, 255).astype(np.uint8)   # grey, a little noise
    pixels[180:260, 40:150] = (230, 40, 30)                                          # a red object
    regions = propose_regions(Image.fromarray(pixels), None)
    assert regions and regions[0].kind == "segment"               # selective search's regions come first
    assert box_iou(regions[0].box, (40, 180, 150, 260)) > 0.7
    only = propose_regions(Image.fromarray(pixels), None, ProposalConfig(segments=0))
    assert only[0].kind == "salient" and box_iou(only[0].box, (40, 180, 150, 260)) > 0.5


def test_the_planted_object_is_among_the_proposals(effnet, photos):
    regions = propose_regions(poster(photos), effnet)
    assert 1 <= len(regions) <= ProposalConfig().max_regions
    assert regions[0].kind == "segment" and "window" in {r.kind for r in regions}
    assert max(box_iou(r.box, PLANTED) for r in regions) > 0.4


def test_regions_search_returns_boxes_inside_and_each_region_searched(region_engine, effnet, photos):
    picture = poster(photos)
    resp = region_engine.search(image=png_bytes(picture), regions=True, k=4)
    rs = resp.regions
    assert rs.size == picture.size and len(rs.regions) >= 2
    for rr in rs.regions:
        x0, y0, x1, y1 = rr.box
        assert 0 <= x0 < x1 <= picture.width and 0 <= y0 < y1 <= picture.height
        # reference: the mean of the region's crops at each CROP_JITTER (grown/shrunk by that fraction of
        # its width and height on each side), searched exactly
        w, h = x1 - x0, y1 - y0
        crops = [crop_to_box(picture, (max(0, round(x0 - j * w)), max(0, round(y0 - j * h)),
                                       min(picture.width, round(x1 + j * w)), min(picture.height, round(y1 + j * h))))
                 for j in CROP_JITTER]
        vec = effnet.encode_images(crops).mean(axis=0)
        want = region_engine.search(vector=vec / np.linalg.norm(vec), k=4)
        assert [h.id for h in rr.hits] == want.ids
        assert np.allclose([h.score for h in rr.hits], [h.score for h in want.hits], atol=1e-4)
    # the fused list: every hit comes from the global list or a region's, scored >= its whole-picture cosine
    plain = region_engine.search(image=png_bytes(picture), k=4)
    pool = set(plain.ids) | {h.id for rr in rs.regions for h in rr.hits}
    assert len(resp.hits) == 4 and set(resp.ids) <= pool
    g = region_engine.vectors("effnet-lite0", resp.hits) @ plain.query.vector
    assert all(h.score >= s - 1e-5 for h, s in zip(resp.hits, g))
    assert resp.hits == sorted(resp.hits, key=lambda h: -h.score)


def test_regions_api_response_shape(region_engine, photos):
    import base64

    from server.app import create_app

    client = create_app({"TESTING": False}, engine=region_engine).test_client()
    image = base64.b64encode(png_bytes(poster(photos))).decode()
    body = client.post("/api/search", json={"image": image, "regions": True, "k": 3}).get_json()
    assert body["query_size"] == [600, 400] and len(body["results"]) == 3 and body["score_kind"] == "regions"
    for region in body["regions"]:
        assert set(region) >= {"box", "score", "kind", "results"} and len(region["box"]) == 4
        assert region["kind"] in ("residual", "segment", "salient", "window") and len(region["results"]) == 3
        assert all("image_url" in r for r in region["results"])
    bad = client.post("/api/search", json={"image": image, "regions": "maybe"})
    assert bad.status_code == 400 and "regions" in bad.get_json()["error"]["message"]


@pytest.mark.parametrize("fields", [{"regions": True, "box": [300, 100, 500, 300]}])
def test_regions_inside_a_box(region_engine, photos, fields):
    resp = region_engine.search(image=png_bytes(poster(photos)), k=3, **fields)
    assert resp.box == (300, 100, 500, 300)
    assert all(0 <= r.box[0] < r.box[2] <= 200 and 0 <= r.box[1] < r.box[3] <= 200 for r in resp.regions.regions)


def test_passes_side_by_side_give_the_same_regions_and_lists(region_engine, photos, monkeypatch):
    """The whole picture's search beside the feature map's pass, and the region crops in two threads
    (``retrieval.encoders.passes``): the same proposals and lists as one pass after the other."""
    import retrieval.encoders.passes as passes
    import retrieval.regions.search as search

    query = png_bytes(poster(photos))
    answers = []
    for w, share in ((1, None), (2, None), (2, 1)):      # one after the other; side by side; threads shared out
        monkeypatch.setattr(passes, "plan", lambda enc, calls, w=w, share=share: (min(w, calls), share))
        monkeypatch.setattr(search, "width", lambda enc, w=w: w)
        resp = region_engine.search(image=query, regions=True, k=4)
        answers.append((resp.ids, [(rr.box, rr.region.kind, [h.id for h in rr.hits]) for rr in resp.regions.regions],
                        [h.score for h in resp.hits]))
    # what ``_whole_picture`` computes beside the passes (saliency, segments, the background's explanation) is
    # what propose_regions computes itself after them
    whole = search._whole_picture
    given = []

    def without_parts(*args):
        out = whole(*args)
        given.append(out[2])
        return out[:2] + (None,)

    monkeypatch.setattr(search, "_whole_picture", without_parts)
    resp = region_engine.search(image=query, regions=True, k=4)
    answers.append((resp.ids, [(rr.box, rr.region.kind, [h.id for h in rr.hits]) for rr in resp.regions.regions],
                    [h.score for h in resp.hits]))
    parts = given[0]
    assert parts is not None and len(parts.masks) > 0 and parts.explanation is not None
    for other in answers[1:]:
        assert answers[0][:2] == other[:2]
        np.testing.assert_allclose(answers[0][2], other[2], atol=1e-5)
