"""`loupe dedup` is right by default (issue 16): on an effnet-lite0 index, copies resized to 70 % and
saved as JPEG quality 60 are found (the plain cosine threshold found 2 of 10), similar-looking
different pictures are not, the output names files and says which to remove, and the exit status says
whether anything was found."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.copydetect.check import Thumbs, aligned_correlation, pdq_similarity
from retrieval.copydetect.dedup import DedupResult, Pairs
from retrieval.testing.samples import tuxpaint_stamps
from tests._engine_helpers import build_photo_index


def _resized_jpeg(img: Image.Image, scale=0.7, quality=60) -> Image.Image:
    small = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_aligned_correlation_finds_crops_and_resizes_not_other_pictures():
    from retrieval.testing.samples import skimage_photos

    photos = skimage_photos(("chelsea", "coffee", "astronaut", "camera"), max_side=256)
    a = photos["chelsea"]
    w, h = a.size
    crop = a.crop((int(w * 0.1), int(h * 0.12), int(w * 0.92), int(h * 0.9))).resize((150, 100))
    assert aligned_correlation(a, _resized_jpeg(a)) > 0.96
    assert aligned_correlation(a, crop) > 0.96
    assert aligned_correlation(crop, a) > 0.96          # either image may be the container
    for other in ("coffee", "astronaut", "camera"):
        assert aligned_correlation(a, photos[other]) < 0.8
    blank = Image.new("RGB", (50, 50), "white")
    assert aligned_correlation(blank, blank.copy()) == 0.0    # flat pictures give no evidence
    assert aligned_correlation(Thumbs.of(a), Thumbs.of(crop)) == pytest.approx(aligned_correlation(a, crop))


def test_pdq_similarity_scale():
    x = np.zeros(256, bool)
    y = x.copy()
    y[:32] = True
    assert pdq_similarity(x, x) == 1.0 and pdq_similarity(x, y) == pytest.approx(0.75)


def test_to_remove_keeps_the_largest_then_oldest():
    ids = ["a", "b", "c", "d"]
    res = DedupResult(ids=ids, pairs=Pairs(np.array([0, 2]), np.array([1, 3]), np.array([0.9, 0.9], np.float32)),
                      groups=[[0, 1], [2, 3]],
                      exact=[{"id": "a", "sha256": "x", "sources": ["/p/a.png", "/p/a-copy.png"]}])
    res.files = {0: {"path": "/p/a.png", "width": 100, "height": 100, "size": 10, "mtime": 5.0},
                 1: {"path": "/p/b.jpg", "width": 200, "height": 200, "size": 5, "mtime": 9.0},
                 2: {"path": "/p/c.png", "width": 50, "height": 50, "size": 7, "mtime": 3.0},
                 3: {"path": "/p/d.png", "width": 50, "height": 50, "size": 7, "mtime": 1.0}}
    # group 1: b is larger -> a goes, and with it every source of a's identical bytes
    # group 2: same size -> the older d stays
    assert res.to_remove() == ["/p/a.png", "/p/c.png", "/p/a-copy.png"]
    js = res.to_json()
    assert js["remove"] == res.to_remove()
    assert js["pairs"][0]["a_path"] == "/p/a.png" and js["group_paths"][1] == ["/p/c.png", "/p/d.png"]


# letter glyphs are left out: some are scaled copies of one another (the filled "x" and "X"), which dedup
# rightly pairs, so a sample that drew both would count a right answer as wrong
STAMPS = [p for p, _ in tuxpaint_stamps() if "alphabets" not in p.parts]


@pytest.fixture(scope="module")
def stamp_index(tmp_path_factory):
    """40 real Tux Paint stamps (a seeded sample) and 10 of them resized
    to 70 % and saved as JPEG quality 60, indexed with effnet-lite0 (as the README's tour does)."""
    if len(STAMPS) < 200:
        pytest.skip("Tux Paint stamps not installed (apt-get install tuxpaint-stamps-default)")
    from retrieval.images import load_image

    root = tmp_path_factory.mktemp("stamps")
    src = root / "pictures"
    src.mkdir()
    rng = random.Random(0)
    chosen = sorted(rng.sample(STAMPS, 40), key=str)
    originals = []
    for i, p in enumerate(chosen):
        img = load_image(p)
        img.thumbnail((256, 256))
        path = src / f"s{i:02d}_{p.stem}.png"
        img.save(path)
        originals.append((path, img))
    planted = {}
    for j, (path, img) in enumerate(originals[::4]):
        copy = src / f"copy{j:02d}_{path.stem}.jpg"
        _resized_jpeg(img).save(copy, quality=95)
        planted[str(copy.resolve())] = str(path.resolve())
    idx = build_photo_index(root / "idx", sorted(src.iterdir()), ["effnet-lite0"])
    return idx, planted


def _found(pairs, planted):
    got = {frozenset((p["a_path"], p["b_path"])) for p in pairs}
    truth = {frozenset(t) for t in planted.items()}
    return len(got & truth), len(got - truth)


def test_dedup_finds_resized_copies_by_default(stamp_index, capsys):
    from loupe.cli.main import main

    idx, planted = stamp_index
    assert main(["dedup", str(idx), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hits, wrong = _found(out["pairs"], planted)
    assert hits >= 9, out["summary"]                      # the cosine threshold found 2 of 10
    assert hits / (hits + wrong) >= 0.9, out["pairs"]
    assert all(p["check"] in ("pdq", "aligned", "sscd", "vectors") for p in out["pairs"])
    # one file of each planted pair goes: the smaller copy, never the original
    assert set(out["remove"]) <= set(planted) and len(out["remove"]) >= 9


def test_dedup_text_and_to_remove_output_are_paths(stamp_index, capsys):
    from loupe.cli.main import main

    idx, planted = stamp_index
    assert main(["dedup", str(idx)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(Path(f).is_file() for line in lines for f in line.split("\t"))
    assert main(["dedup", str(idx), "--to-remove"]) == 0
    removed = capsys.readouterr().out.splitlines()
    assert removed and set(removed) <= set(planted)


def test_dedup_exit_status_one_when_nothing_found(stamp_index, capsys):
    from loupe.cli.main import main

    idx, _ = stamp_index
    assert main(["dedup", str(idx), "--check", "none", "--threshold", "0.9999"]) == 1
    assert capsys.readouterr().out == ""


def test_api_duplicates_confirms_copies_from_pixels_by_default(stamp_index, monkeypatch):
    """/api/duplicates gets dedup's default behaviour: with no threshold given, the top candidates are
    compared from pixels, so a copy is reported even when its score misses the decision threshold
    (forced here), and the match says which check found it; an explicit threshold means scores only."""
    import base64

    import retrieval.copydetect.scores as scores
    from retrieval.engine.engine import Engine
    from server.app import create_app

    idx, planted = stamp_index
    engine = Engine(idx, device="cpu")
    original = sorted(set(planted.values()))[0]
    query = _resized_jpeg(Image.open(original).convert("RGB"), scale=0.6, quality=50)
    buf = io.BytesIO()
    query.save(buf, "JPEG", quality=95)
    body = {"image": base64.b64encode(buf.getvalue()).decode()}
    monkeypatch.setattr(scores, "default_threshold", lambda *a, **k: 99.0)     # no score reaches it
    client = create_app(engine=engine).test_client()
    r = client.post("/api/duplicates", json=body)
    assert r.status_code == 200, r.get_json()
    found = r.get_json()["matches"]
    paths = [engine.metadata(m["id"])["path"] for m in found]
    assert original in paths and all(m.get("check") in ("pdq", "aligned") for m in found)
    r = client.post("/api/duplicates", json=body | {"threshold": 2.9})
    assert r.get_json()["matches"] == []
