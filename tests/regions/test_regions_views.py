"""Stored feature maps (``retrieval.regions.views``): `loupe index --regions` keeps every picture's map, and a
``regions`` query uses its hits' stored maps instead of reading and encoding their pictures — with the same
regions as a freshly encoded map."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from regions_data import INDEXED, png_bytes
from test_regions_residual import _astronaut_with_cat, _on_the_patch

from retrieval.errors import IndexFormatError
from retrieval.index import store
from retrieval.regions import views as views_mod
from retrieval.regions.proposals import propose_regions, work_picture
from retrieval.regions.saliency import canvas_tokens
from retrieval.regions.store import build_region_index, open_region_sets
from retrieval.regions.views import view_paths


def _regions(resp):
    return [(r.region.box, r.region.kind, [h.id for h in r.hits]) for r in resp.regions.regions]


def test_the_index_stores_every_pictures_map(region_index, region_engine, effnet):
    out, _ = region_index
    stored = region_engine.region_sets["effnet-lite0"].views
    assert stored is not None and len(stored.rows) == len(INDEXED) + 1
    assert stored.tokens.dtype == np.float16 and stored.shape == (14, 14, 112)        # effnet-lite0's fine map
    info = region_engine.manifest.extra["regions"]["effnet-lite0"]["views"]
    assert info["count"] == len(INDEXED) + 1 and info["shape"] == [14, 14, 112]
    for path in view_paths(out, "effnet-lite0"):
        assert store.relative(out, path) in region_engine.manifest.files
    for image_id in list(stored.rows)[:3]:
        fresh = canvas_tokens(effnet, [work_picture(region_engine.load_image(image_id))])[0]
        kept = stored.get(image_id)
        assert kept.size == fresh.size and kept.side == pytest.approx(fresh.side)
        assert kept.origin == pytest.approx(fresh.origin)
        assert np.abs(kept.tokens - fresh.tokens).max() < 2e-3                          # float16 rounding


def test_stored_maps_give_the_regions_that_encoding_the_pictures_gives(region_engine, effnet, photos):
    picture = _astronaut_with_cat(photos)
    rs = region_engine.region_sets["effnet-lite0"]
    astronaut = next(i for i in rs.ids if region_engine.metadata(i)["path"].endswith("astronaut.png"))
    by_map = propose_regions(picture, effnet, explain_by=[rs.views.get(astronaut)])
    by_picture = propose_regions(picture, effnet, explain_by=[region_engine.load_image(astronaut)])
    assert [(r.box, r.kind) for r in by_map] == [(r.box, r.kind) for r in by_picture]
    assert np.allclose([r.score for r in by_map], [r.score for r in by_picture], atol=1e-4)     # float16 rounding
    assert by_map[0].kind == "residual" and _on_the_patch(by_map[0].box)
    query = png_bytes(picture)
    with_maps = region_engine.search(image=query, regions=True, k=5)
    saved, rs.views = rs.views, None
    try:
        without = region_engine.search(image=query, regions=True, k=5)
    finally:
        rs.views = saved
    assert _regions(with_maps) == _regions(without) and with_maps.ids == without.ids


def test_a_regions_query_reads_no_hit_picture_when_their_maps_are_stored(region_engine, photos, monkeypatch):
    read = []
    monkeypatch.setattr(region_engine, "load_image", lambda image_id: read.append(image_id) or 1 / 0)
    resp = region_engine.search(image=png_bytes(_astronaut_with_cat(photos)), regions=True, k=3)
    assert read == [] and resp.regions.regions[0].region.kind == "residual"


def test_an_indexed_pictures_regions_query_uses_its_stored_map(region_engine, monkeypatch):
    import retrieval.regions.proposals as proposals

    rs = region_engine.region_sets["effnet-lite0"]
    image_id = rs.ids[0]
    want = region_engine.search(image_id=image_id, regions=True, k=3)       # may encode (reference run)
    encoded = []
    real = proposals.canvas_tokens
    monkeypatch.setattr(proposals, "canvas_tokens",
                        lambda enc, images: encoded.append(len(images)) or real(enc, images))
    got = region_engine.search(image_id=image_id, regions=True, k=3)
    assert encoded == [] and _regions(got) == _regions(want) and got.ids == want.ids
    saved, rs.views = rs.views, None              # without stored maps the query picture is encoded
    try:
        again = region_engine.search(image_id=image_id, regions=True, k=3)
    finally:
        rs.views = saved
    assert encoded and encoded[0] >= 1 and again.ids == want.ids


def _copy(region_index, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(region_index[0], out)
    return out


def test_a_region_index_from_before_maps_gets_them_on_the_next_run(region_index, region_engine, tmp_path):
    out = _copy(region_index, tmp_path)
    manifest = store.read_manifest(out)
    del manifest.extra["regions"]["effnet-lite0"]["views"]
    for path in view_paths(out, "effnet-lite0"):
        manifest.files.pop(store.relative(out, path))
        path.unlink()
    store.write_manifest(out, manifest)
    assert open_region_sets(out, store.read_manifest(out))["effnet-lite0"].views is None
    stray = out / "regions" / ".effnet-lite0.views.npy.x1y2.tmp.npy"         # a killed run's temporary file
    stray.write_bytes(b"partial")
    summary = build_region_index(out, device="cpu")
    assert not stray.exists()
    assert summary["images"] == 0                                     # no new regions: only the maps
    again = open_region_sets(out, store.read_manifest(out))["effnet-lite0"].views
    before = region_engine.region_sets["effnet-lite0"].views
    assert set(again.rows) == set(before.rows)
    for image_id in before.rows:
        assert np.array_equal(again.get(image_id).tokens, before.get(image_id).tokens)
    # a run with nothing new keeps the maps' files as they are (no rewrite of a large file)
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in view_paths(out, "effnet-lite0")]
    build_region_index(out, device="cpu")
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in view_paths(out, "effnet-lite0")] == stamps
    assert set(open_region_sets(out, store.read_manifest(out))["effnet-lite0"].views.rows) == set(before.rows)


def test_damaged_maps_are_an_index_format_error(region_index, tmp_path):
    out = _copy(region_index, tmp_path)
    maps, _ = view_paths(out, "effnet-lite0")
    with open(maps, "r+b") as fh:
        fh.truncate(maps.stat().st_size - 1000)
    with pytest.raises(IndexFormatError, match="truncated"):
        open_region_sets(out, store.read_manifest(out))
    out2 = _copy(region_index, tmp_path / "b")
    _, table = view_paths(out2, "effnet-lite0")
    manifest = store.read_manifest(out2)
    manifest.files.pop(store.relative(out2, table))                  # unrecorded: read, then checked
    store.write_manifest(out2, manifest)
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(table)
    pq.write_table(t.set_column(t.schema.get_field_index("row"), "row", pa.array([10**6] * t.num_rows)), table)
    with pytest.raises(IndexFormatError, match="do not match"):
        open_region_sets(out2, store.read_manifest(out2))


def test_maps_too_large_to_keep_are_not_stored_and_queries_encode_the_pictures(region_index, tmp_path, monkeypatch,
                                                                               photos):
    from retrieval.engine import Engine

    out = _copy(region_index, tmp_path)
    manifest = store.read_manifest(out)
    del manifest.extra["regions"]["effnet-lite0"]["views"]
    store.write_manifest(out, manifest)
    monkeypatch.setattr(views_mod, "VIEW_BYTES_MAX", 1000)
    build_region_index(out, device="cpu")
    assert "views" not in json.loads((out / "manifest.json").read_text())["extra"]["regions"]["effnet-lite0"]
    engine = Engine(out, device="cpu")
    try:
        assert engine.region_sets["effnet-lite0"].views is None
        resp = engine.search(image=png_bytes(_astronaut_with_cat(photos)), regions=True, k=3)
        assert resp.regions.regions[0].region.kind == "residual" and _on_the_patch(resp.regions.regions[0].box)
    finally:
        engine.close()
