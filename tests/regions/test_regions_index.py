"""The region index: `loupe index --regions` stores a few regions per picture; a query of a small object
finds the picture that contains it, and the hit says where."""

from __future__ import annotations

import numpy as np
from PIL import Image
from regions_data import INDEXED, PLANTED, cat_face, png_bytes

from retrieval.regions.proposals import box_iou
from retrieval.regions.search import RegionHit
from retrieval.regions.store import open_region_sets, region_paths
from retrieval.regions.views import view_paths


def test_index_summary_and_files(region_index, region_engine):
    out, summary = region_index
    n = len(INDEXED) + 1
    assert summary["regions"]["images"] == n and n <= summary["regions"]["regions"] <= 4 * n
    vec, boxes = region_paths(out, "effnet-lite0")
    maps, frames = view_paths(out, "effnet-lite0")
    assert summary["regions"]["bytes"] == sum(p.stat().st_size for p in (vec, boxes, maps, frames))
    rs = region_engine.region_sets["effnet-lite0"]
    assert len(rs) == summary["regions"]["regions"] and len(set(rs.ids)) == n
    assert np.allclose(np.linalg.norm(rs.vectors, axis=1), 1, atol=1e-4)
    for image_id, box in zip(rs.ids, rs.boxes):
        w, h = region_engine.load_image(image_id).size
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
    manifest = region_engine.manifest
    assert manifest.extra["regions"]["effnet-lite0"]["count"] == len(rs)
    assert "regions/effnet-lite0.npy" in manifest.files and "regions/effnet-lite0.parquet" in manifest.files


def test_a_small_object_finds_the_picture_that_contains_it(region_engine, photos):
    query = cat_face(photos).rotate(8, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    resp = region_engine.search(image=png_bytes(query), k=3)
    top = resp.hits[0]
    assert region_engine.metadata(top.id)["path"].endswith("poster.png")
    assert isinstance(top, RegionHit) and box_iou(top.box, PLANTED) > 0.1
    x0, y0, x1, y1 = top.box
    assert x0 < PLANTED[2] and PLANTED[0] < x1 and y0 < PLANTED[3] and PLANTED[1] < y1     # overlaps the object
    # reference: the region vectors searched by brute force give the same best region and score
    rs = region_engine.region_sets["effnet-lite0"]
    scores = rs.vectors @ resp.query.vector
    best = int(np.argmax(scores))
    assert rs.ids[best] == top.id and tuple(rs.boxes[best]) == top.box
    assert abs(float(scores[best]) - top.score) < 1e-5
    # the whole picture alone scores lower: without the region index the hit would have no box
    whole = float(region_engine.vectors("effnet-lite0", [top])[0] @ resp.query.vector)
    assert whole < top.score


def test_filters_apply_to_region_hits(region_engine, photos):
    query = png_bytes(cat_face(photos))
    resp = region_engine.search(image=query, k=7, filter={"path": {"contains": "coffee"}})
    assert [region_engine.metadata(h.id)["path"].rsplit("/", 1)[-1] for h in resp.hits] == ["coffee.png"]
    only = region_engine.search(image=query, k=7, filter={"path": {"contains": "poster"}}).hits
    assert len(only) == 1 and isinstance(only[0], RegionHit) and box_iou(only[0].box, PLANTED) > 0.1


def test_region_rows_of_images_no_longer_indexed_are_dropped(region_index, region_engine):
    out, _ = region_index
    keep = set(region_engine.region_sets["effnet-lite0"].ids[:1])
    sets = open_region_sets(out, region_engine.manifest, keep.__contains__)
    assert set(sets["effnet-lite0"].ids) == keep


def test_a_picture_explained_by_an_indexed_one_stores_its_residual_region_first(region_index, region_engine, photos):
    from retrieval.regions.store import _Neighbours

    poster_id = next(i for i in region_engine.region_sets["effnet-lite0"].ids
                     if region_engine.metadata(i)["path"].endswith("poster.png"))
    near = _Neighbours(region_index[0], "cpu", 1)
    try:
        pictures = near.pictures("effnet-lite0", poster_id)
    finally:
        near.close()
    assert len(pictures) == 1 and np.array_equal(np.asarray(pictures[0]), np.asarray(photos["coffee"]))
    rs = region_engine.region_sets["effnet-lite0"]
    first = next(b for i, b in zip(rs.ids, rs.boxes) if i == poster_id)     # rows keep the proposals' order
    assert box_iou(tuple(first), PLANTED) > 0.45        # without the residual region: 0.35 (a salient component)
