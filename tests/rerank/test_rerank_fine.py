"""The fine local layer (``loupe index --local-layer fine``): effnet-lite0's 14x14 stage-4 map as the
stored local descriptors; the query side reads the same map from the same forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.encoders.effnet import FINE_STAGE


def test_encode_images_and_fine_matches_the_models_own_forward(effnet, photos):
    imgs = [photos["astronaut"], photos["coffee"]]
    g, tok, grid, ftok, fgrid = effnet.encode_images_and_fine(imgs)
    g2, tok2, grid2 = effnet.encode_images_and_local(imgs)
    np.testing.assert_allclose(g, g2, atol=1e-5)
    np.testing.assert_allclose(tok, tok2, atol=1e-5)
    assert grid == grid2 == (7, 7) and fgrid == (14, 14) and ftok.shape == (2, 196, 112)
    # reference: timm's own blocks, stopped after the fine stage, cells as unit rows (row-major)
    seen = {}
    hook = effnet.model.blocks[FINE_STAGE].register_forward_hook(lambda m, i, o: seen.setdefault("fine", o))
    try:
        with torch.no_grad():
            effnet.model.forward_features(effnet.to_batch(imgs))
    finally:
        hook.remove()
    ref = seen["fine"].flatten(2).transpose(1, 2).numpy()
    ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(ftok, ref, atol=1e-5)
    only, only_grid = effnet.encode_fine(imgs)         # the search-by-region map: the same cells, no head
    assert only_grid == (14, 14)
    np.testing.assert_allclose(only, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ftok, axis=-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def fine_index(tmp_path_factory, effnet):
    from loupe.cli.main import main
    from tests._engine_helpers import photo_folder_and_crop_query

    root = tmp_path_factory.mktemp("rerank-fine")
    src, photos = photo_folder_and_crop_query(
        root, ("astronaut", "coffee", "rocket", "camera", "moon", "page", "brick", "chelsea"))
    out = root / "idx"
    assert main(["index", str(src), "--out", str(out), "--encoder", "effnet-lite0", "--local-features",
                 "--local-layer", "fine", "--device", "cpu"]) == 0
    from retrieval.engine.engine import Engine

    return Engine(out, device="cpu"), root, photos


def test_fine_index_stores_the_fine_map_and_reranks(fine_index, effnet):
    from retrieval.engine.query import QueryContext
    from retrieval.rerank.query import query_local_features

    engine, root, photos = fine_index
    info = engine.manifest.encoders["effnet-lite0"].local_features
    assert info["layer"] == "fine" and info["grid"] == [14, 14] and info["dim"] == 112 and info["per_image"] == 196
    hits = engine.search(image=photos["coffee"], encoder="effnet-lite0", k=8).hits
    coffee = hits[0].id
    desc, pos = engine.local_features("effnet-lite0", [hits[0]])[0]
    _, _, _, ftok, _ = effnet.encode_images_and_fine([photos["coffee"]])
    assert desc.shape == (196, 112) and pos.shape == (196, 2) and int(pos[:, 0].max()) == 13
    np.testing.assert_allclose(np.asarray(desc, np.float32), ftok[0], atol=2e-3)    # stored fp16, unit rows
    # the query side reads the same layer, from the embedding pass or from the image
    ctx = QueryContext(vector=effnet.encode_images([photos["coffee"]])[0], encoder="effnet-lite0",
                       image=photos["coffee"])
    q_desc, q_pos, q_grid = query_local_features(engine, ctx, "effnet-lite0")
    assert q_grid == (14, 14) and q_desc.shape == (196, 112) and ctx.local_fine is not None
    np.testing.assert_allclose(q_desc, np.asarray(desc, np.float32), atol=2e-3)
    # re-ranking a rotated crop: the original comes first, and an indexed image_id query works too
    query = (root / "query.jpg").read_bytes()
    rr = engine.search(image=query, encoder="effnet-lite0", k=5, rerank=True)
    plain = engine.search(image=query, encoder="effnet-lite0", k=5)
    assert str(engine.metadata(rr.hits[0].id)["path"]).endswith("/astronaut.png")
    assert rr.hits[0].score > plain.hits[0].score                     # fused score adds local evidence
    assert engine.search(image_id=coffee, encoder="effnet-lite0", k=3, rerank=True).hits[0].id == coffee


def test_fine_index_uses_its_own_defaults(fine_index, effnet):
    """A fine-layer index re-ranks with FINE_DEFAULT_CONFIG unless told otherwise; dict overrides apply
    on top of it."""
    from dataclasses import replace

    from retrieval.engine.query import QueryContext
    from retrieval.rerank.config import DEFAULT_CONFIG, FINE_DEFAULT_CONFIG
    from retrieval.rerank.reranker import rerank_hits

    engine, root, photos = fine_index
    assert not FINE_DEFAULT_CONFIG.crop and not FINE_DEFAULT_CONFIG.spatial
    from PIL import Image

    query = Image.open(root / "query.jpg").convert("RGB")

    def run(config):
        ctx = QueryContext(vector=effnet.encode_images([query])[0], encoder="effnet-lite0", image=query)
        hits = engine.search_vector("effnet-lite0", ctx.vector, 8)
        return [(h.id, round(h.score, 6)) for h in rerank_hits(engine, ctx, hits, k=8, config=config)]

    default = run(None)
    assert default == run(FINE_DEFAULT_CONFIG) != run(DEFAULT_CONFIG)
    assert run({"w_local": 1.0}) == run(replace(FINE_DEFAULT_CONFIG, w_local=1.0))
