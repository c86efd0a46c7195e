"""End to end: an index with local features (A's indexer), Engine.search(rerank=True),
`loupe explain`, and POST /api/attribution through the Flask test client."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip, effnet):
    from skimage import data  # noqa: F401  (photos come from conftest's helper)

    from loupe.cli.main import main
    from tests._engine_helpers import photo_folder_and_crop_query

    root = tmp_path_factory.mktemp("rerank-int")
    src, _ = photo_folder_and_crop_query(root, ("astronaut", "coffee", "rocket", "camera", "moon", "page", "brick"))
    out = root / "idx"
    rc = main(["index", str(src), "--out", str(out), "--encoder", tiny_clip, "--encoder", "effnet-lite0",
               "--local-features", "--device", "cpu"])
    assert rc == 0
    from retrieval.engine.engine import Engine

    return Engine(out, device="cpu"), root


def _id_of(engine, name):
    for shard in range(len(engine.shard_names)):
        table = engine.records.tables[shard].to_pylist()
        for rec in table:
            if rec["path"] and rec["path"].endswith(f"/{name}.png"):
                return rec["id"]
    raise KeyError(name)


def test_engine_rerank_image_and_text(built):
    engine, root = built
    query = (root / "query.jpg").read_bytes()
    plain = engine.search(image=query, encoder="effnet-lite0", k=5)
    rr = engine.search(image=query, encoder="effnet-lite0", k=5, rerank=True)
    astro = _id_of(engine, "astronaut")
    assert rr.hits[0].id == astro and "rerank_ms" in rr.timings
    assert rr.hits[0].score > plain.hits[0].score          # fused score adds local evidence
    by_id = engine.search(image_id=astro, encoder="effnet-lite0", k=3, rerank=True)
    assert by_id.hits[0].id == astro
    # text re-ranking: CLIP's patch tokens live in the text space
    t = engine.search(text="a photo of a cat", k=4, rerank=True)
    assert len(t.hits) == 4 and all(np.isfinite(h.score) for h in t.hits)


def test_explain_cli(built, tmp_path, capsys):
    from loupe.cli.main import main

    engine, root = built
    idx = engine.index_dir
    astro = _id_of(engine, "astronaut")
    out = tmp_path / "why.png"
    qout = tmp_path / "q.png"
    rc = main(["explain", str(idx), "--image", str(root / "query.jpg"), "--result", astro, "--out", str(out),
               "--encoder", "effnet-lite0", "--query-out", str(qout), "--json", str(tmp_path / "h.json")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "integrated"
    assert Image.open(out).size == (512, 512) and Image.open(qout).size == Image.open(root / "query.jpg").size
    heat = json.loads((tmp_path / "h.json").read_text())
    assert heat["width"] == 512 and heat["height"] == 512 and len(heat["heatmap"]) == 512
    coffee = _id_of(engine, "coffee")
    rc = main(["explain", str(idx), "--text", "a cup of coffee", "--result", coffee, "--out", str(out)])
    assert rc == 0 and Image.open(out).size == (600, 400)
    assert main(["explain", str(idx), "--text", "a cat", "--result", "0" * 15, "--out", str(out)]) == 2


def test_attribution_route(built):
    from server.app import create_app

    engine, root = built
    app = create_app({"TESTING": True}, engine=engine)
    client = app.test_client()
    assert "attribution" in client.get("/healthz").get_json()["features"]
    cat = _id_of(engine, "coffee")
    r = client.post("/api/attribution", json={"text": "a cat", "result_id": cat})
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert Image.open(io.BytesIO(r.data)).size == (600, 400)
    r = client.post("/api/attribution", json={"text": "a cat", "result_id": cat, "format": "json"})
    body = r.get_json()
    assert r.status_code == 200 and body["width"] == 600 and body["height"] == 400
    assert len(body["heatmap"]) == 400 and len(body["heatmap"][0]) == 600
    # multipart upload, as the web page sends it, with the matched-regions method
    astro = _id_of(engine, "astronaut")
    data = {"image": (io.BytesIO((root / "query.jpg").read_bytes()), "q.jpg"), "result_id": astro,
            "encoder": "effnet-lite0", "rerank": "true", "format": "json"}
    r = client.post("/api/attribution", data=data, content_type="multipart/form-data")
    body = r.get_json()
    assert r.status_code == 200 and body["method"] == "matches" and body["details"]["verified"]
    data = {"image": (io.BytesIO((root / "query.jpg").read_bytes()), "q.jpg"), "result_id": astro,
            "encoder": "effnet-lite0", "side": "query", "format": "json", "max_side": "64"}
    body = client.post("/api/attribution", data=data, content_type="multipart/form-data").get_json()
    qsize = Image.open(root / "query.jpg").size
    assert body["side"] == "query" and body["method"] == "integrated" and max(body["width"], body["height"]) == 64
    assert (body["image_width"], body["image_height"]) == qsize
    # errors are 4xx JSON
    r = client.post("/api/attribution", json={"text": "a cat"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_query"
    r = client.post("/api/attribution", json={"text": "a cat", "result_id": "f" * 15})
    assert r.status_code == 404
    r = client.post("/api/attribution", json={"text": "a cat", "result_id": cat, "format": "gif"})
    assert r.status_code == 400


def test_query_crop_pass_on_the_real_engine(built):
    """An indexed photo shrunk and pasted onto another: the crop pass crops the real query image, embeds
    the crop with effnet-lite0 and adds its cosine; the crop vector equals the encoder's own embedding of
    that crop, so the original's fused score rises by ``w_crop ×`` that cosine."""
    from dataclasses import replace

    from retrieval.engine.query import QueryContext
    from retrieval.rerank.config import DEFAULT_CONFIG
    from retrieval.rerank.reranker import rerank_hits

    engine, root = built
    photos = {n: Image.open(p).convert("RGB") for n, p in
              ((p.stem, p) for p in (root / "photos").glob("*.png"))}
    bg = photos["brick"].resize((448, 448))
    obj = photos["coffee"].resize((200, 134))
    bg.paste(obj, (180, 150))
    enc = engine.encoder("effnet-lite0")
    g, tok, grid = enc.encode_images_and_local([bg])
    hits = engine.search_vector("effnet-lite0", g[0], 7)
    coffee = _id_of(engine, "coffee")
    boxes = []

    def crop_encoder(image, bxs):
        boxes.extend(bxs)
        return enc.encode_images([image.crop(b) for b in bxs])

    def run(cfg, **kw):
        ctx = QueryContext(vector=g[0], encoder="effnet-lite0", image=bg)
        ctx.local = (tok[0], grid)
        return {h.id: h.score for h in rerank_hits(engine, ctx, hits, k=7, config=cfg, **kw)}

    off = run(replace(DEFAULT_CONFIG, crop=False))
    on_cfg = replace(DEFAULT_CONFIG, crop=True, w_crop=1.0, crop_count=1, crop_select="gain", crop_margin=0.5,
                     crop_fuse="sum")
    on = run(on_cfg, crop_encoder=crop_encoder)
    assert len(boxes) == 1 and boxes[0] != (0, 0, 448, 448)
    crop_vec = enc.encode_images([bg.crop(boxes[0])])[0]
    v = engine.vectors("effnet-lite0", [h for h in hits if h.id == coffee])[0]
    assert on[coffee] - off[coffee] == pytest.approx(float(v @ crop_vec), abs=1e-4)
    # the default path (no crop_encoder): the encoder's own encode_images on the same crop, same scores
    assert run(on_cfg) == pytest.approx(on, abs=1e-4)
