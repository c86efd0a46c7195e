"""Copy detection end to end with the real effnet-lite0 on real photos: an index built by
`loupe index --local-features`, then `loupe match`, `loupe dedup` and `POST /api/duplicates`."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from test_copydetect import screenshot

from loupe.cli.main import main as loupe

INDEXED = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "page")
HELD_OUT = ("immunohistochemistry", "hubble_deep_field", "brick", "grass", "text", "moon")   # not "cat": it is chelsea


def jpeg(img, q=20):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copies_of(img):
    w, h = img.size
    overlay = img.copy()
    d = ImageDraw.Draw(overlay)
    d.rectangle((0, int(h * 0.8), w, h), fill=(255, 255, 255))
    d.text((10, int(h * 0.82)), "REPOST LOL", fill=(255, 0, 0))
    return {
        "crop": img.crop((int(w * .15), int(h * .1), int(w * .85), int(h * .8))),
        "flip": ImageOps.mirror(img),
        "jpeg": jpeg(img, 15),
        "blur+grey": ImageOps.grayscale(img.filter(ImageFilter.GaussianBlur(2))).convert("RGB"),
        "border": ImageOps.expand(img, border=(60, 30), fill=(20, 200, 40)),
        "overlay": overlay,
    }


def stem(engine, image_id: str) -> str:
    meta = engine.metadata(image_id)
    return Path(meta.get("path") or meta["source"]).stem


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def copy_index(tmp_path_factory, photos, effnet):
    root = tmp_path_factory.mktemp("copyidx")
    src = root / "src"
    src.mkdir()
    for name in INDEXED:
        photos[name].save(src / f"{name}.png")
    shutil.copy(src / "coffee.png", src / "coffee-again.png")          # exact duplicate (same bytes)
    jpeg(photos["rocket"], 40).save(src / "rocket-reencoded.jpg")      # near duplicate
    out = root / "idx"
    rc = loupe(["index", str(src), "--out", str(out), "--encoder", "effnet-lite0", "--local-features",
                "--device", "cpu", "--workers", "0"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def engine(copy_index):
    from retrieval.engine.engine import Engine

    return Engine(copy_index, device="cpu")


def test_planted_copies_match_and_unrelated_do_not(engine, photos):
    from retrieval.copydetect.match import match_images
    from retrieval.copydetect.scores import MatchConfig

    queries, expected = [], []
    for name in ("chelsea", "astronaut"):
        for img in copies_of(photos[name]).values():
            queries.append(img)
            expected.append(name)
    for name in HELD_OUT:
        if name in photos:
            queries.append(jpeg(photos[name], 30))
            expected.append(None)
    results = match_images(engine, queries, MatchConfig())
    names = {m.id: stem(engine, m.id) for r in results for m in r}
    for res, exp in zip(results, expected):
        if exp is None:
            assert res == [], [(names[m.id], m.score) for m in res]
        else:
            assert res, f"copy of {exp} not matched"
            assert names[res[0].id] == exp
            assert res[0].verify is not None       # the index has local features: verified


def screenshot_of(img, scale=0.4, at=(230, 120)):
    """``img`` pasted, small, into a made-up application window (title bar, side panel, menu text), and
    the box it covers."""
    small = img.resize((int(img.width * scale), int(img.height * scale)))
    canvas = screenshot(small, at, (1000, 700), panel=180, menu=12, margin=12,
                        footer=((230, 600), "Posted by someone, 3 hours ago. 12 comments"))
    return canvas, (at[0], at[1], at[0] + small.width, at[1] + small.height)


def test_a_copy_inside_a_screenshot_is_matched_through_its_region(engine, photos):
    from retrieval.copydetect.match import match_images
    from retrieval.copydetect.regions import box_iou
    from retrieval.copydetect.scores import MatchConfig

    shot, box = screenshot_of(photos["astronaut"])
    unrelated, _ = screenshot_of(photos["grass"])
    res = match_images(engine, [shot, unrelated], MatchConfig())
    assert res[0], "the astronaut inside the screenshot was not matched"
    assert stem(engine, res[0][0].id) == "astronaut"
    assert res[0][0].region is not None and box_iou(res[0][0].region, box) > 0.8
    assert res[1] == []
    # the whole screenshot alone scores the astronaut lower than its region does
    whole = match_images(engine, [shot], MatchConfig(regions=False, threshold=-5.0))[0]
    astro = [m for m in whole if stem(engine, m.id) == "astronaut"]
    assert not astro or astro[0].score < res[0][0].score


def test_match_cli_json(copy_index, photos, tmp_path, capsys):
    q1 = tmp_path / "q1.jpg"
    jpeg(photos["chelsea"].crop((50, 20, 400, 280)), 25).save(q1)
    q2 = tmp_path / "q2.png"
    photos["grass"].save(q2)
    assert loupe(["match", str(copy_index), str(q1), str(q2), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"matches"}
    assert [m["query"] for m in out["matches"]] == [str(q1)]
    assert set(out["matches"][0]) >= {"query", "id", "path", "score"}
    assert out["matches"][0]["path"].endswith(("chelsea.jpg", "chelsea.png"))
    # text output names the file; --device is honoured
    assert loupe(["match", str(copy_index), str(q1), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.splitlines()[0].split("\t")
    assert line[0] == str(q1) and line[1] == out["matches"][0]["path"]
    # a threshold nobody reaches -> no matches, exit 1; a missing file -> one-line error, exit 2
    assert loupe(["match", str(copy_index), str(q1), "--threshold", "5", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"matches": []}
    assert loupe(["match", str(copy_index), str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg" in capsys.readouterr().err


def test_build_background_is_used(copy_index, photos, tmp_path, capsys):
    from retrieval.copydetect.match import background_path, load_background
    from retrieval.copydetect.scores import MatchConfig
    from retrieval.engine.engine import Engine

    folder = tmp_path / "unrelated"
    folder.mkdir()
    for name in HELD_OUT:
        if name in photos:
            photos[name].save(folder / f"{name}.png")
    try:
        assert loupe(["match", str(copy_index), "--build-background", str(folder)]) == 0
        path = background_path(copy_index, "effnet-lite0")
        assert path.is_file()
        bg = load_background(Engine(copy_index, device="cpu"), "effnet-lite0", MatchConfig())
        assert bg.source == "file" and len(bg) == len(list(folder.iterdir()))
    finally:
        background_path(copy_index, "effnet-lite0").unlink(missing_ok=True)


def test_dedup_cli_pairs_groups_and_exact(copy_index, tmp_path, capsys, engine):
    out_file = tmp_path / "pairs.parquet"
    assert loupe(["dedup", str(copy_index), "--threshold", "0.8", "--json", "--out", str(out_file)]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert set(res) >= {"pairs", "groups"}
    groups = [sorted(stem(engine, i) for i in g) for g in res["groups"]]
    assert ["rocket", "rocket-reencoded"] in groups
    assert all(set(p) >= {"a", "b", "a_path", "b_path", "score"} for p in res["pairs"])
    assert any(len(e["sources"]) == 2 and any("coffee-again" in s for s in e["sources"]) for e in res["exact"])
    assert out_file.is_file() and "pairs" in captured.err


def test_api_duplicates(engine, photos):
    from server.app import create_app

    app = create_app(engine=engine)
    client = app.test_client()
    assert "duplicates" in client.get("/healthz").get_json().get("features", [])
    img = base64.b64encode(_png(ImageOps.mirror(photos["chelsea"]))).decode()
    r = client.post("/api/duplicates", json={"image": img})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["matches"] and set(body["matches"][0]) >= {"id", "score"}
    assert stem(engine, body["matches"][0]["id"]) == "chelsea"
    # multipart upload + a threshold
    r = client.post("/api/duplicates", data={"image": (io.BytesIO(_png(photos["chelsea"])), "q.png"),
                                             "threshold": "2.5"}, content_type="multipart/form-data")
    assert r.status_code == 200 and r.get_json()["matches"] == []
    # unrelated image: no matches at the default threshold
    other = photos["brick"]
    r = client.post("/api/duplicates", json={"image": base64.b64encode(_png(other)).decode()})
    assert r.get_json()["matches"] == []
    # an indexed image by id: it matches itself first
    own = body["matches"][0]["id"]
    r = client.post("/api/duplicates", json={"image_id": own, "verify": False})
    assert r.status_code == 200 and r.get_json()["matches"][0]["id"] == own
    # errors are 4xx JSON
    assert client.post("/api/duplicates", json={"text": "a cat"}).status_code == 400
    assert client.post("/api/duplicates", json={"image": img, "threshold": "high"}).status_code == 400
    assert client.post("/api/duplicates", json={}).status_code == 400
    assert client.post("/api/duplicates", json={"image": img, "regions": "maybe"}).status_code == 400
    # a screenshot holding a copy: matched through its region, which the answer reports
    shot, box = screenshot_of(photos["chelsea"])
    shot_b64 = base64.b64encode(_png(shot)).decode()
    r = client.post("/api/duplicates", json={"image": shot_b64})
    found = r.get_json()["matches"]
    assert found and stem(engine, found[0]["id"]) == "chelsea" and len(found[0]["region"]) == 4
    r = client.post("/api/duplicates", json={"image": shot_b64, "regions": False, "threshold": -2})
    assert all("region" not in m for m in r.get_json()["matches"])


@pytest.mark.skipif(importlib.util.find_spec("pdqhash") is None, reason="optional extra 'pdq' not installed")
def test_pdq_binary_index_match_and_dedup(tmp_path, photos, capsys):
    """PDQ: the index stores binary codes; match and dedup search them by Hamming distance."""
    from retrieval.copydetect.match import match_images
    from retrieval.copydetect.scores import MatchConfig
    from retrieval.engine.engine import Engine

    src = tmp_path / "src"
    src.mkdir()
    for name in INDEXED:
        photos[name].save(src / f"{name}.png")
    jpeg(photos["chelsea"], 30).save(src / "chelsea-reencoded.jpg")
    out = tmp_path / "idx"
    assert loupe(["index", str(src), "--out", str(out), "--encoder", "pdq", "--encoder", "effnet-lite0",
                  "--local-features", "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    engine = Engine(out, device="cpu")
    assert engine.manifest.encoders["pdq"].index_type == "binary"
    queries = [jpeg(photos["astronaut"], 20), photos["brick"]]
    res = match_images(engine, queries, MatchConfig(normalize=False, threshold=0.8, verify=False), encoder="pdq")
    assert [stem(engine, m.id) for m in res[0]][:1] == ["astronaut"]
    assert res[0][0].similarity > 0.8 and res[1] == [] and res[0][0].verify is None
    # pdq candidates verified with effnet-lite0's stored local features (same shards and rows)
    res = match_images(engine, queries[:1], MatchConfig(normalize=False, threshold=0.8), encoder="pdq")
    best = res[0][0]
    w = MatchConfig().w_verify
    assert best.verify is not None and best.score == pytest.approx(best.similarity + w * best.verify)
    assert loupe(["dedup", str(out), "--encoder", "pdq", "--threshold", "0.8", "--json"]) == 0
    groups = [sorted(stem(engine, i) for i in g) for g in json.loads(capsys.readouterr().out)["groups"]]
    assert groups == [["chelsea", "chelsea-reencoded"]]
