"""Colour names (retrieval.colour), the colour-names encoder, and colour in instruction queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval.colour import naming as colour
from retrieval.compose.compose import compose_instruction
from retrieval.compose.fusion import (
    FUSION_ATTRIBUTE_WEIGHT,
    FUSION_COLOUR_WEIGHT,
    FUSION_IMAGE_WEIGHT,
    FUSION_KEEP_COLOUR_WEIGHT,
    TEXT_COLOUR_WEIGHT,
    colour_plan,
    colour_text_scores,
    colour_words,
    fuse_candidates,
    instruction_colour,
    pick_image_encoder,
)
from retrieval.encoders import create_encoder
from retrieval.engine.engine import Engine
from retrieval.errors import InvalidQueryError
from tests._engine_helpers import all_vectors, build_photo_index, png_bytes

TERMS = colour.BASIC_TERMS
RGB = {"red": (210, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 210), "yellow": (230, 200, 20)}


def _shape(rgb, kind: str = "disc", size: int = 96, bg=(255, 255, 255)) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (d.ellipse if kind == "disc" else d.rectangle)(box, fill=tuple(rgb))
    return img


def test_lab_matches_scikit_image():
    from skimage.color import rgb2lab

    rgb = np.random.default_rng(0).random((50, 3))
    np.testing.assert_allclose(colour.srgb_to_lab(rgb), rgb2lab(rgb[None])[0], atol=0.05)


def test_survey_prototypes_name_the_canonical_colours():
    assert colour.head_term("dark olive green") == "green" and colour.head_term("bluegrey") == "grey"
    assert colour.head_term("navy") == "blue" and colour.head_term("leather") is None
    probe = {"red": (220, 20, 30), "green": (30, 160, 40), "blue": (20, 40, 220), "yellow": (240, 220, 20),
             "orange": (255, 140, 0), "purple": (128, 0, 128), "pink": (255, 182, 193), "brown": (120, 70, 30),
             "black": (10, 10, 10), "white": (255, 255, 255), "grey": (128, 128, 128)}
    p = colour.name_colours(colour.srgb_to_lab(np.array(list(probe.values())) / 255.0))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert [TERMS[i] for i in p.argmax(axis=1)] == list(probe)


def test_lookup_table_is_the_naming_at_cell_centres():
    table = colour.lookup_table()
    assert table.shape == (32 ** 3, len(TERMS))
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 32, size=(20, 3))
    centres = (cells * 8 + 3.5) / 255.0
    expected = colour.name_colours(colour.srgb_to_lab(centres))
    got = table[(cells[:, 0] * 32 + cells[:, 1]) * 32 + cells[:, 2]]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _reference_colour_names(img: Image.Image) -> np.ndarray:
    """colour_names, pixel by pixel in numpy (no torch): table lookup × object weights."""
    x = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
    names = colour.lookup_table()[(x // 8).astype(int) @ np.array([1024, 32, 1])]
    lab = colour.srgb_to_lab(x / 255.0)
    border = np.concatenate([lab[0], lab[-1], lab[1:-1, 0], lab[1:-1, -1]])
    bg = np.median(border, axis=0)
    contrast = 1 - np.exp(-((lab - bg) ** 2).sum(-1) / (2 * colour.BACKGROUND_DELTA_E ** 2))
    grid = np.linspace(-1, 1, 64)
    centre = np.exp(-(grid[:, None] ** 2 + grid[None] ** 2) / (2 * colour.CENTRE_SIGMA ** 2))
    w = (contrast + 0.02) * centre
    return (names * w[..., None]).sum((0, 1)) / w.sum()


def test_colour_names_matches_a_pixelwise_reference(photos):
    enc = create_encoder("colour-names", device="cpu")
    imgs = [photos["chelsea"], photos["coffee"], _shape(RGB["red"])]
    got = enc.distributions(imgs)
    for img, row in zip(imgs, got):
        np.testing.assert_allclose(row, _reference_colour_names(img), atol=2e-3)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_object_weights_ignore_the_background():
    """A red disc on white is red, although three quarters of its pixels are white; on a grey
    background the same; a plain average of the pixels would call both mostly background."""
    for bg in ((255, 255, 255), (128, 128, 128)):
        img = _shape(RGB["red"], bg=bg)
        p = colour.colour_names(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None])[0]
        assert TERMS[int(p.argmax())] == "red" and p[TERMS.index("red")] > 0.6, bg
        plain = colour.lookup_table()[(np.asarray(img.resize((64, 64)), int) // 8) @ np.array([1024, 32, 1])]
        assert plain.mean(axis=(0, 1))[TERMS.index("red")] < 0.4


def test_phrases():
    assert np.array_equal(colour.phrase_distribution("red"), np.eye(11)[TERMS.index("red")])
    assert np.array_equal(colour.phrase_distribution("Gray"), np.eye(11)[TERMS.index("grey")])
    navy = colour.phrase_distribution("navy blue")
    assert TERMS[int(navy.argmax())] == "blue" and navy.sum() == pytest.approx(1.0)
    teal = colour.phrase_distribution("teal")   # a survey name between two terms
    assert {TERMS[i] for i in np.argsort(-teal)[:2]} == {"green", "blue"}
    both = colour.phrase_distribution("red and white")
    assert both[TERMS.index("red")] == pytest.approx(0.5) and both[TERMS.index("white")] == pytest.approx(0.5)
    assert colour.phrase_distribution("a photograph") is None
    with pytest.raises(InvalidQueryError, match="names no colour"):
        colour.phrase_vectors(["hello world"])


def test_encoder_vectors_are_bhattacharyya_embeddings():
    enc = create_encoder("colour-names", device="cpu")
    imgs = [_shape(RGB[c], kind) for c in ("red", "green", "blue") for kind in ("disc", "square")]
    v = enc.encode_images(imgs)
    p = enc.distributions(imgs)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v @ v.T, np.sqrt(p) @ np.sqrt(p).T, atol=1e-5)
    t = enc.encode_texts(["red", "green", "blue"])
    np.testing.assert_allclose(v @ t[0], np.sqrt(p[:, TERMS.index("red")]), atol=1e-5)
    # each colour's query ranks its own two shapes first
    for j in range(3):
        assert set(np.argsort(-(v @ t[j]))[:2]) == {2 * j, 2 * j + 1}
    # same colour, other shape: more alike than same shape, other colour
    assert v[0] @ v[1] > v[0] @ v[2] + 0.5


def test_instruction_colour_and_plan():
    assert instruction_colour("in red") == "red"
    assert instruction_colour("the same, but navy blue") == "navy blue"
    assert instruction_colour("as a red boot") == "red"
    assert instruction_colour("in leather") is None       # a survey name, but a material here
    assert instruction_colour("with red straps") is None  # a part, not the whole
    assert instruction_colour("as a boot") is None
    assert colour_plan("in red") == ("red", FUSION_COLOUR_WEIGHT)
    assert colour_plan("as a boot") == (None, FUSION_KEEP_COLOUR_WEIGHT)
    assert colour_plan("in leather") == (None, 0.0)
    assert colour_plan("in red", {"colour": 0.5}) == ("red", 0.5)


def test_fuse_candidates_adds_standardised_colour_scores():
    rng = np.random.default_rng(3)
    tq, iq, cq = rng.normal(size=8), rng.normal(size=8), np.sqrt(np.eye(11)[8])
    tv, iv = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    cv = colour.colour_vectors(rng.random((6, 11)))
    base = fuse_candidates(tq, tv, iq, iv, weight=0.35)
    c = cv @ cq
    np.testing.assert_allclose(fuse_candidates(tq, tv, iq, iv, weight=0.35, colour_query=cq, colour_vectors=cv,
                                               colour_weight=2.0), base + 2.0 * (c - c.mean()) / c.std(), atol=1e-6)
    np.testing.assert_allclose(fuse_candidates(tq, tv, iq, iv, weight=0.35, colour_query=cq, colour_vectors=cv,
                                               colour_weight=0.0), base)


@pytest.fixture
def colour_dir(tmp_path):
    folder = tmp_path / "shapes"
    folder.mkdir()
    for c in ("red", "green", "blue", "yellow"):
        for kind in ("disc", "square"):
            _shape(RGB[c], kind).save(folder / f"{c}-{kind}.png")
    return folder


def test_engine_colour_queries_and_fusion_match_brute_force(tmp_path, colour_dir, tiny_clip, tiny_dino):
    out = build_photo_index(tmp_path / "idx", sorted(colour_dir.iterdir()), [tiny_clip, "colour-names", tiny_dino])
    engine = Engine(out, device="cpu")
    assert engine.text_encoder == tiny_clip and pick_image_encoder(engine, tiny_clip) == tiny_dino
    ids, cvecs = all_vectors(engine, "colour-names")
    names = dict(zip(ids, cvecs))

    # a colour phrase searched in the colour-names space: the two red shapes first, scores sqrt(p_red)
    resp = engine.search(text="red", encoder="colour-names", k=2)
    red_rows = [i for i, h in enumerate(ids) if np.argmax(names[h] ** 2) == TERMS.index("red")]
    assert sorted(h.id for h in resp.hits) == sorted(ids[i] for i in red_rows)
    np.testing.assert_allclose([h.score for h in resp.hits], np.sort(cvecs[red_rows, TERMS.index("red")])[::-1],
                               atol=1e-5)
    with pytest.raises(InvalidQueryError):
        engine.search(text="a cat", encoder="colour-names", k=2)

    clip, dino = create_encoder(tiny_clip, device="cpu"), create_encoder(tiny_dino, device="cpu")
    cenc = create_encoder("colour-names", device="cpu")
    query_img = _shape(RGB["blue"], "disc", size=80)
    query = png_bytes(query_img)
    _, clip_vecs = all_vectors(engine, tiny_clip)
    _, dino_vecs = all_vectors(engine, tiny_dino)
    img_clip = clip.encode_images([query_img])[0]
    cases = (("in red", img_clip, clip_vecs, FUSION_ATTRIBUTE_WEIGHT, cenc.encode_texts(["red"])[0],
              FUSION_COLOUR_WEIGHT),
             ("as a dog", dino.encode_images([query_img])[0], dino_vecs, FUSION_IMAGE_WEIGHT,
              cenc.encode_images([query_img])[0], FUSION_KEEP_COLOUR_WEIGHT))
    for instruction, image_q, image_vecs, weight, colour_q, colour_w in cases:
        text_q = compose_instruction(clip, img_clip, instruction, method="fusion").vector
        expected = fuse_candidates(text_q, clip_vecs, image_q, image_vecs, weight=weight, colour_query=colour_q,
                                   colour_vectors=cvecs, colour_weight=colour_w)
        order = np.argsort(-expected, kind="stable")[:4]
        resp = engine.search(image=query, instruction=instruction, method="fusion", k=4)
        assert [h.id for h in resp.hits] == [ids[i] for i in order], instruction
        np.testing.assert_allclose([h.score for h in resp.hits], expected[order], atol=1e-4)
    # "in red" from a blue disc: the colour channel lifts the red shapes (the tiny CLIP is random: without
    # the colour-names encoder their place is chance)
    plain = Engine(build_photo_index(tmp_path / "plain", sorted(colour_dir.iterdir()), [tiny_clip, tiny_dino]),
                   device="cpu")

    def red_ranks(eng):
        hits = [h.id for h in eng.search(image=query, instruction="in red", method="fusion", k=len(ids)).hits]
        return sorted(hits.index(ids[i]) for i in red_rows)

    assert max(red_ranks(engine)) < min(red_ranks(plain))


def test_indexer_stores_colour_names_in_a_flat_index(tmp_path, colour_dir):
    """The real indexing pipeline (DataLoader worker, uint8 thumbnails): vectors equal the encoder's own
    on the files, and the 11-d index stays exact even when another index type is asked for."""
    from indexer.pipeline import IndexConfig, build_index
    from retrieval.index import store

    out = tmp_path / "idx"
    summary = build_index(IndexConfig(sources=[str(colour_dir)], out=out, encoders=["colour-names"],
                                      index_type="hnsw", workers=1, device="cpu"))
    assert summary.indexed == 8 and not summary.failed
    assert store.read_manifest(out).encoders["colour-names"].index_type == "flat"
    engine = Engine(out, device="cpu")
    ids, vecs = all_vectors(engine, "colour-names")
    paths = [engine.source_file(i) for i in ids]
    np.testing.assert_allclose(vecs, create_encoder("colour-names", device="cpu").encode_images(paths), atol=1e-5)
    red = engine.search(text="red", encoder="colour-names", k=2)
    assert sorted(engine.source_file(h.id).name for h in red.hits) == ["red-disc.png", "red-square.png"]

def test_server_colour_search(tmp_path, colour_dir, tiny_clip):
    from server import create_app

    out = build_photo_index(tmp_path / "idx", sorted(colour_dir.iterdir()), [tiny_clip, "colour-names"])
    client = create_app({"TESTING": False}, engine=Engine(out, device="cpu")).test_client()
    ok = client.post("/api/search", json={"text": "navy blue", "encoder": "colour-names", "k": 2})
    assert ok.status_code == 200, ok.get_json()
    assert len(ok.get_json()["results"]) == 2
    top = ok.get_json()["results"][0]
    heat = client.post("/api/attribution", json={"text": "navy blue", "encoder": "colour-names",
                                                 "result_id": top["id"], "format": "json"})
    assert heat.status_code == 200, heat.get_json()
    assert heat.get_json()["method"] == "colour" and heat.get_json()["encoder"] == "colour-names"
    png = client.post("/api/attribution", json={"text": "navy blue", "encoder": "colour-names", "result_id": top["id"]})
    assert png.status_code == 200 and png.mimetype == "image/png"
    bad = client.post("/api/search", json={"text": "a cat", "encoder": "colour-names"})
    assert bad.status_code == 400 and "names no colour" in bad.get_json()["error"]["message"]


def test_colour_attribution_is_an_exact_split_of_the_match():
    """The per-pixel shares sum to half the Bhattacharyya coefficient (first order, exact), and a red
    query lights up the red half of a red/blue picture."""
    from retrieval.explain.attribution import attribute, default_method

    enc = create_encoder("colour-names", device="cpu")
    img = Image.new("RGB", (128, 96), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle((8, 20, 56, 76), fill=RGB["red"])
    d.rectangle((72, 20, 120, 76), fill=RGB["blue"])
    red = enc.encode_texts(["red"])[0]
    shares = colour.pixel_contributions(enc.to_batch([img]), red)
    assert shares.shape == (64, 64)
    assert float(shares.sum()) == pytest.approx(0.5 * float(enc.encode_images([img])[0] @ red), rel=1e-4)
    assert default_method(enc) == "colour"
    heat = attribute(enc, img, red)                   # at the image's own size, whole image (no crop)
    assert heat.shape == (96, 128)
    assert heat[30:70, 12:52].mean() > 5 * heat[30:70, 76:116].mean()
    blue = attribute(enc, img, enc.encode_texts(["blue"])[0])
    assert blue[30:70, 76:116].mean() > 5 * blue[30:70, 12:52].mean()
    with pytest.raises(InvalidQueryError):
        attribute(enc, img, red, method="integrated")


def test_colour_words():
    assert colour_words("a photo of a red sandal.") == "red"
    assert colour_words("A Dark-Green fedora") == "dark green"
    assert colour_words("a blue and yellow flag") == "blue yellow"
    assert colour_words("a leather boot") is None and colour_words("a dark room") is None


def test_text_queries_naming_a_colour_add_the_colour_list(tmp_path, colour_dir, tiny_clip):
    """"a red shape" on an index with colour-names: text list and colour list pooled, re-scored
    zscore(text) + w * zscore(colour) — checked against that formula over the whole (small) index; text
    without a colour word, a subtracted term or an explicit encoder keep the plain text search."""
    out = build_photo_index(tmp_path / "idx", sorted(colour_dir.iterdir()), [tiny_clip, "colour-names"])
    engine = Engine(out, device="cpu")
    clip, cenc = create_encoder(tiny_clip, device="cpu"), create_encoder("colour-names", device="cpu")
    ids, clip_vecs = all_vectors(engine, tiny_clip)
    _, cvecs = all_vectors(engine, "colour-names")
    text_q = clip.encode_texts(["a red shape"])[0]
    expected = colour_text_scores(clip_vecs @ text_q, cvecs @ cenc.encode_texts(["red"])[0], weight=TEXT_COLOUR_WEIGHT)
    order = np.argsort(-expected, kind="stable")[:4]
    resp = engine.search(text="a red shape", k=4)
    assert [h.id for h in resp.hits] == [ids[i] for i in order]
    np.testing.assert_allclose([h.score for h in resp.hits], expected[order], atol=1e-4)
    # the random tiny CLIP cannot see "red"; the colour list lifts the red shapes above where text alone has them
    def red_ranks(**kw):
        names = [engine.source_file(h.id).name for h in engine.search(text="a red shape", k=len(ids), **kw).hits]
        return sorted(names.index(n) for n in ("red-disc.png", "red-square.png"))

    assert sum(red_ranks()) < sum(red_ranks(encoder=tiny_clip))
    for kwargs in ({"text": "a shape"}, {"text": ["+a red shape", "-a blue shape"]},
                   {"text": "a red shape", "encoder": tiny_clip}):
        plain = engine.search(k=4, **kwargs)
        vec = engine.embed(**kwargs).vector
        ref = np.argsort(-(clip_vecs @ vec), kind="stable")[:4]
        assert [h.id for h in plain.hits] == [ids[i] for i in ref], kwargs


def test_top_colours():
    p = np.zeros(11)
    p[[TERMS.index("red"), TERMS.index("pink"), TERMS.index("white")]] = (0.6, 0.32, 0.08)
    assert colour.top_colours(p) == [{"colour": "red", "score": 0.6}, {"colour": "pink", "score": 0.32}]
    assert colour.top_colours(np.full(11, 1 / 11))[0]["score"] == pytest.approx(1 / 11, abs=1e-4)  # first always
    assert len(colour.top_colours(np.full(11, 1 / 11))) == 1


def test_colour_filter(tmp_path, colour_dir, tiny_clip):
    """``{"colour-names": "red"}`` keeps exactly the images whose red share is >= FILTER_MIN_SHARE (checked
    against the stored vectors), with any query; lists mean any of; bad values and indexes without
    colour-names are 4xx errors."""
    out = build_photo_index(tmp_path / "idx", sorted(colour_dir.iterdir()), [tiny_clip, "colour-names"])
    engine = Engine(out, device="cpu")
    ids, cvecs = all_vectors(engine, "colour-names")
    red_share = cvecs[:, TERMS.index("red")] ** 2
    want = {ids[i] for i in np.flatnonzero(red_share >= colour.FILTER_MIN_SHARE)}
    assert {engine.source_file(i).name for i in want} == {"red-disc.png", "red-square.png"}
    got = engine.search(text="a shape", k=8, filter={"colour-names": "red"})
    assert {h.id for h in got.hits} == want
    by_image = engine.search(image=png_bytes(_shape(RGB["blue"])), k=8, filter={"colour-names": ["red", "yellow"]})
    assert {engine.source_file(h.id).name.split("-")[0] for h in by_image.hits} == {"red", "yellow"}
    assert len(by_image.hits) == 4
    both = engine.search(text="a shape", k=8, filter={"colour-names": "red", "path": {"contains": "disc"}})
    assert [engine.source_file(h.id).name for h in both.hits] == ["red-disc.png"]
    for bad in ({"colour-names": {"gte": 0.3}}, {"colour-names": "a cat"}, {"colour-names": [1, 2]}):
        with pytest.raises(InvalidQueryError):
            engine.search(text="a shape", k=3, filter=bad)
    plain = Engine(build_photo_index(tmp_path / "plain", sorted(colour_dir.iterdir()), [tiny_clip]), device="cpu")
    with pytest.raises(InvalidQueryError, match="colour-names encoder"):
        plain.search(text="a shape", k=3, filter={"colour-names": "red"})


def test_colour_queries_on_an_index_that_cannot_see_colour_get_a_note(tmp_path, colour_dir, conse, capsys):
    """No colour-names and a text encoder that cannot see colour (ConSE): a colour query still answers,
    with a note saying how to fix it (engine, CLI --json, HTTP); other queries get no note."""
    from server import create_app
    from tests._engine_helpers import build_index, image_rows

    paths = sorted(colour_dir.iterdir())
    out = build_index(tmp_path / "idx", {"conse-effnet-lite0": conse.encode_images([str(p) for p in paths])},
                      rows=image_rows(paths), modalities={"conse-effnet-lite0": list(conse.modalities)})
    engine = Engine(out, device="cpu")
    resp = engine.search(text="a red shape", k=3)
    assert len(resp.hits) == 3 and len(resp.notes) == 1 and "--encoder colour-names" in resp.notes[0]
    assert engine.search(text="a shape", k=3).notes == []
    assert engine.search(image=png_bytes(_shape(RGB["blue"])), instruction="in red", k=3).notes
    assert engine.search(image=png_bytes(_shape(RGB["blue"])), instruction="as a boot", k=3).notes == []
    client = create_app({"TESTING": False}, engine=engine).test_client()
    body = client.post("/api/search", json={"text": "a red shape", "k": 2}).get_json()
    assert body["notes"] == resp.notes and len(body["results"]) == 2
    assert "notes" not in client.post("/api/search", json={"text": "a shape", "k": 2}).get_json()
    import json

    from loupe.cli.main import main

    capsys.readouterr()
    assert main(["search", str(out), "--text", "a red shape", "-k", "2", "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["notes"] == resp.notes and "note: this index cannot see colours" in captured.err


def test_colour_can_be_switched_off_per_request(tmp_path, colour_dir, tiny_clip, tiny_dino, capsys):
    """colour=false (engine, HTTP field, --no-colour): the plain text search and the colour-free fusion."""
    from server import create_app

    out = build_photo_index(tmp_path / "idx", sorted(colour_dir.iterdir()), [tiny_clip, "colour-names", tiny_dino])
    engine = Engine(out, device="cpu")
    plain = Engine(build_photo_index(tmp_path / "plain", sorted(colour_dir.iterdir()), [tiny_clip, tiny_dino]),
                   device="cpu")

    def ids(resp):
        return [h.id for h in resp.hits]

    assert ids(engine.search(text="a red shape", k=8, colour=False)) == ids(plain.search(text="a red shape", k=8))
    assert ids(engine.search(text="a red shape", k=8)) != ids(plain.search(text="a red shape", k=8))
    query = png_bytes(_shape(RGB["blue"], size=80))
    for instruction in ("in red", "as a dog"):
        assert ids(engine.search(image=query, instruction=instruction, k=8, colour=False)) == ids(
            plain.search(image=query, instruction=instruction, k=8)), instruction
    client = create_app({"TESTING": False}, engine=engine).test_client()
    body = client.post("/api/search", json={"text": "a red shape", "k": 8, "colour": False}).get_json()
    assert [r["id"] for r in body["results"]] == ids(plain.search(text="a red shape", k=8))
    assert client.post("/api/search", json={"text": "a red shape", "colour": "maybe"}).status_code == 400
    import json

    from loupe.cli.main import main

    capsys.readouterr()
    assert main(["search", str(out), "--text", "a red shape", "-k", "8", "--json", "--no-colour", "--device",
                 "cpu"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["results"]] == ids(plain.search(text="a red shape",
                                                                                                  k=8))
    with pytest.raises(InvalidQueryError):
        engine.search(text="a red shape", colour="no")
