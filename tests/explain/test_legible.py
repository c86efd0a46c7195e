"""Overlays a person can read (issue 19): the default map is smooth at the encoder's scale, the PNG has
a legend, outlines and a hatched not-seen area, the pair view links matched regions, text maps of the
offline encoder carry their caveat, through the library, `loupe explain --pair` and the HTTP routes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from retrieval.explain.attribution import TEXT_NOTE, Explanation, attribute
from retrieval.explain.grid import crop_box, seen_mask, smoothness
from retrieval.explain.legend import BAND_BG, NOTE_BG
from retrieval.explain.matching import match_maps
from retrieval.explain.overlay import HATCH_GREY, colormap_lut, overlay_image, overlay_png
from retrieval.explain.pair import LINE_COLOURS, pair_image


@pytest.fixture(scope="module")
def cat_pair(photos):
    """A real wide photo (451x300) and a rotated crop of it as the query."""
    res = photos["chelsea"]
    w, h = res.size
    query = res.crop((int(w * 0.2), int(h * 0.05), int(w * 0.75), int(h * 0.9))).rotate(12, fillcolor=(255, 255, 255))
    return query, res


@pytest.fixture(scope="module")
def cat_maps(effnet, cat_pair):
    query, res = cat_pair
    qv = effnet.encode_images([query])[0]
    return attribute(effnet, res, qv), attribute(effnet, res, qv, "integrated-raw")


def test_smoothness_measure():
    rng = np.random.default_rng(0)
    speckle = rng.random((120, 160))
    yy, xx = np.mgrid[0:120, 0:160]
    blob = np.exp(-((yy - 60) ** 2 + (xx - 90) ** 2) / (2 * 20.0 ** 2))
    assert smoothness(speckle) < 0.3 and smoothness(blob) > 0.99
    assert smoothness(np.zeros((10, 10))) == 1.0


def test_default_map_is_smooth_and_still_localised(effnet, cat_maps, cat_pair):
    """The default effnet-lite0 map correlates highly with a blurred copy of itself (the per-pixel map
    it smooths does not), is zero outside the encoder's crop and still puts its peak where the query is."""
    default, raw = cat_maps
    _, res = cat_pair
    assert default.shape == raw.shape == (300, 451)
    s_default, s_raw = smoothness(default), smoothness(raw)
    assert s_default > 0.85, s_default
    assert s_raw < 0.8 and s_default > s_raw + 0.2, (s_default, s_raw)
    seen = seen_mask(res.size, crop_box(effnet, res.size))
    assert default[~seen].max() == 0 and default[seen].max() == pytest.approx(1.0)
    # the query is the middle of the photo (20..75 % across): most of the top 20 % lies there
    top = default >= np.quantile(default[seen], 0.8)
    xs = np.nonzero(top)[1]
    assert np.mean((xs > 0.15 * 451) & (xs < 0.8 * 451)) > 0.8


def test_overlay_png_legend_outline_and_hatching(photos):
    img = photos["coffee"]                                   # 600x400: the encoder sees a centre square
    w, h = img.size
    box = (100.0, 0.0, 500.0, 400.0)
    heat = np.zeros((h, w), np.float32)
    heat[100:250, 200:350] = 1.0
    plain = np.asarray(Image.open(io.BytesIO(overlay_png(img, heat, box=box))).convert("RGB"))
    assert plain.shape == (h, w, 3)                          # no legend: the image's own size (page thumbnails)
    seen = seen_mask(img.size, box)
    hatched = np.all(plain == HATCH_GREY, axis=2)
    assert hatched[~seen].mean() > 0.1 and hatched[seen].mean() < 0.01      # hatching only where unseen
    diff = np.abs(plain[50:350, 20:80].astype(int) - np.asarray(img)[50:350, 20:80]).mean()
    assert diff > 20, diff                                                  # the unseen sides are washed out
    white = np.all(plain == 255, axis=2)
    assert white[98:102, 220:330].any() and white[248:252, 220:330].any()   # the top region is outlined
    assert not white[300:380, 150:450].any()                                # nowhere else
    legend = np.asarray(Image.open(io.BytesIO(overlay_png(img, heat, box=box, legend=True, label="integrated",
                                                           note=TEXT_NOTE))).convert("RGB"))
    assert legend.shape[1] == w and legend.shape[0] > h + 40
    np.testing.assert_array_equal(legend[:h], plain)         # the legend is added below, the overlay unchanged
    band = legend[h:]
    lut = colormap_lut("inferno").astype(np.int64)
    codes = set((band.astype(np.int64) @ [65536, 256, 1]).ravel().tolist())
    present = [k for k in range(60, 250) if int(lut[k] @ [65536, 256, 1]) in codes]
    assert len(present) > 40, present                        # the colour bar, in the overlay's colour map
    assert np.any(np.all(band == NOTE_BG, axis=2))           # the caveat is on the PNG
    assert np.any(np.all(band == HATCH_GREY, axis=2))        # the hatching is explained
    # an image the encoder sees whole: no hatching, and no hatch item in the legend
    full = np.asarray(overlay_image(img, heat, box=(0, 0, w, h), legend=True, label="colour"))
    assert not np.any(np.all(full[:h] == HATCH_GREY, axis=2)) and not np.any(np.all(full[h:] == HATCH_GREY, axis=2))
    assert np.any(np.all(full[h:] == BAND_BG, axis=2))


def test_pair_view_links_matched_regions(effnet, cat_pair, cat_maps):
    query, res = cat_pair
    default, _ = cat_maps
    qmap = attribute(effnet, query, effnet.encode_images([res])[0])
    info = match_maps(effnet, query, res)[2]
    assert info["verified"] and 3 <= len(info["lines"]) <= 24
    for ln in info["lines"]:                                   # cell centres inside each image's crop
        qx, qy = ln["query"]
        rx, ry = ln["result"]
        left, top, right, bottom = crop_box(effnet, res.size)
        assert left <= rx <= right and top <= ry <= bottom and 0 <= qx <= query.size[0] and 0 <= qy <= query.size[1]
    ex = Explanation(default, "integrated", "effnet-lite0", qmap, info, res, query, crop_box(effnet, res.size),
                     crop_box(effnet, query.size))
    img = np.asarray(pair_image(ex, height=240))
    assert img.shape[0] > 240 + 40 and img.shape[1] > 2 * 240
    first = np.all(img == LINE_COLOURS[0], axis=2)
    assert first.sum() > 50                                    # lines (and their end points) are drawn
    # the gap between the two panels is crossed by the lines
    qw = round(query.size[0] * 240 / query.size[1])
    ys, xs = np.nonzero(first)
    assert np.any((xs > qw + 10) & (xs < qw + 30))
    text_ex = Explanation(default, "occlusion", "conse-effnet-lite0", None, {}, res, None,
                          crop_box(effnet, res.size), None, TEXT_NOTE)
    single = np.asarray(pair_image(text_ex, height=200))
    assert np.any(np.all(single == NOTE_BG, axis=2)) and not np.any(np.all(single == LINE_COLOURS[0], axis=2))


# -- through the engine: the CLI and the routes -------------------------------------------------------
@pytest.fixture(scope="module")
def engine_and_files(tmp_path_factory, photos, effnet, conse):
    from _engine_helpers import build_photo_index, save_photos

    from retrieval.engine.engine import Engine

    root = tmp_path_factory.mktemp("legible")
    paths = save_photos(root, photos, ("chelsea", "coffee", "rocket", "astronaut"))
    w, h = photos["chelsea"].size
    query = root / "query.png"
    photos["chelsea"].crop((int(w * 0.2), int(h * 0.05), int(w * 0.75), int(h * 0.9))).save(query)
    index = build_photo_index(root / "idx", paths, ["effnet-lite0", "conse-effnet-lite0"])
    engine = Engine(index, device="cpu")
    ids = {}
    for hit_name in ("chelsea", "coffee"):
        hits = engine.search(image=(root / f"{hit_name}.png").read_bytes(), encoder="effnet-lite0", k=1).hits
        ids[hit_name] = hits[0].id
    return engine, root, query, ids


def test_explain_cli_pair_and_legend(engine_and_files, tmp_path, capsys):
    from loupe.cli.main import main

    engine, root, query, ids = engine_and_files
    out, pair = tmp_path / "why.png", tmp_path / "pair.png"
    rc = main(["explain", str(engine.index_dir), "--image", str(query), "--result", ids["chelsea"], "--encoder",
               "effnet-lite0", "--out", str(out), "--pair", str(pair), "--legend"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "integrated" and summary["pair"] == str(pair) and summary["inliers"] >= 3
    assert "note" not in summary and summary["label"] == "integrated gradients, smoothed"
    assert Image.open(out).size[1] > 300                      # the legend band under the 451x300 overlay
    pimg = np.asarray(Image.open(pair).convert("RGB"))
    assert np.all(pimg == LINE_COLOURS[0], axis=2).sum() > 20
    rc = main(["explain", str(engine.index_dir), "--text", "a cup of coffee", "--result", ids["coffee"],
               "--encoder", "conse-effnet-lite0", "--out", str(out), "--pair", str(pair)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["note"] == TEXT_NOTE
    assert Image.open(out).size == (600, 400)                 # without --legend: the image's size
    assert np.any(np.all(np.asarray(Image.open(pair).convert("RGB")) == NOTE_BG, axis=2))


def test_attribution_routes_pair_view_and_note(engine_and_files):
    from server.app import create_app

    engine, root, query, ids = engine_and_files
    client = create_app({"TESTING": True}, engine=engine).test_client()
    data = {"image": (io.BytesIO(query.read_bytes()), "q.png"), "result_id": ids["chelsea"],
            "encoder": "effnet-lite0"}
    r = client.post("/api/attribution/pair", data=data, content_type="multipart/form-data")
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert r.headers["X-Attribution-Method"] == "integrated" and "X-Attribution-Note" not in r.headers
    assert Image.open(io.BytesIO(r.data)).size[0] > 2 * 300
    data = {"image": (io.BytesIO(query.read_bytes()), "q.png"), "result_id": ids["chelsea"],
            "encoder": "effnet-lite0", "format": "json", "max_side": "64"}
    body = client.post("/api/attribution/pair", data=data, content_type="multipart/form-data").get_json()
    assert body["lines"] and body["details"]["inliers"] >= 3
    assert max(body["query"]["width"], body["query"]["height"]) == 64
    # text query on the offline encoder: the caveat travels with the map
    r = client.post("/api/attribution", json={"text": "a cup of coffee", "result_id": ids["coffee"],
                                              "encoder": "conse-effnet-lite0"})
    assert r.status_code == 200 and r.headers["X-Attribution-Note"] == r.headers["X-Loupe-Note"] == TEXT_NOTE
    assert r.headers["X-Attribution-Method"] == "occlusion"
    assert r.headers["X-Attribution-Encoder"] == "conse-effnet-lite0"
    assert Image.open(io.BytesIO(r.data)).size == (600, 400)
    body = client.post("/api/attribution", json={"text": "a cup of coffee", "result_id": ids["coffee"],
                                                 "encoder": "conse-effnet-lite0", "format": "json",
                                                 "max_side": 32}).get_json()
    assert body["note"] == TEXT_NOTE and body["box"][0] > 0 and body["width"] == 32
    r = client.post("/api/attribution/pair", json={"text": "a cup of coffee", "result_id": ids["coffee"],
                                                   "encoder": "conse-effnet-lite0"})
    assert r.status_code == 200 and r.headers["X-Attribution-Note"] == TEXT_NOTE
    assert client.post("/api/attribution/pair", json={"text": "x", "result_id": "f" * 15}).status_code == 404


def test_page_image_query_is_explained_by_the_encoder_that_ranked_it(engine_and_files):
    """The page sends an image query without an ``encoder``: search and "Why?" both use the index's default
    encoder (here its text encoder, conse-effnet-lite0), and the map goes through its image path (integrated
    gradients), not the text query's occlusion (which text queries keep: the test above)."""
    from server.app import create_app

    engine, root, query, ids = engine_and_files
    client = create_app({"TESTING": True}, engine=engine).test_client()

    def form(**extra):
        return {"image": (io.BytesIO(query.read_bytes()), "q.png"), "k": "4", **extra}

    found = client.post("/api/search", data=form(), content_type="multipart/form-data").get_json()
    assert found["encoder"] == "conse-effnet-lite0" and ids["chelsea"] in [r["id"] for r in found["results"]]
    r = client.post("/api/attribution", data=form(result_id=ids["chelsea"]), content_type="multipart/form-data")
    assert r.status_code == 200 and r.headers["X-Attribution-Encoder"] == found["encoder"]
    assert r.headers["X-Attribution-Method"] == "integrated" and "X-Loupe-Note" not in r.headers
    body = client.post("/api/attribution/pair", data=form(result_id=ids["chelsea"], format="json", max_side="48"),
                       content_type="multipart/form-data").get_json()
    assert body["encoder"] == "conse-effnet-lite0" and body["method"] == "integrated" and "note" not in body
    assert body["query"] is not None and body["lines"]
    # the map of the image path is the library's integrated-gradients map of the same pair, not occlusion
    heat = np.asarray(client.post("/api/attribution", data=form(result_id=ids["chelsea"], format="json"),
                                  content_type="multipart/form-data").get_json()["heatmap"])
    enc = engine.encoder("conse-effnet-lite0")
    res = engine.load_image(ids["chelsea"])
    qv = enc.encode_images([Image.open(query).convert("RGB")])[0]
    want = attribute(enc, res, qv, "integrated")
    assert heat.shape == want.shape and np.corrcoef(heat.ravel(), want.ravel())[0, 1] > 0.99
