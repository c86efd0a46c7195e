"""The engine passes instructions through to the composition methods (not only `sum`)."""

from __future__ import annotations

import numpy as np

from retrieval.compose.compose import compose_instruction, compose_sum
from retrieval.encoders import create_encoder
from retrieval.engine.engine import Engine
from tests._engine_helpers import all_vectors, build_photo_index, png_bytes


def test_engine_uses_requested_composition(tmp_path, photo_dir, photos, tiny_clip):
    out = build_photo_index(tmp_path / "idx", sorted(photo_dir.iterdir()), [tiny_clip])
    engine = Engine(out, device="cpu")
    enc = create_encoder(tiny_clip, device="cpu")
    query = png_bytes(photos["chelsea"])
    instruction = "a dog instead of a cat"
    img_vec = enc.encode_images([photos["chelsea"]])[0]
    arith = engine.embed(image=query, instruction=instruction, method="arithmetic").vector
    expected = compose_instruction(enc, img_vec, instruction, method="arithmetic", label="cat").vector
    np.testing.assert_allclose(arith, expected, atol=1e-5)
    plain = engine.embed(image=query, instruction=instruction, method="sum").vector
    np.testing.assert_allclose(plain, compose_sum(img_vec, enc.encode_texts([instruction])[0], 0.5), atol=1e-5)
    assert float(np.abs(arith - plain).max()) > 1e-3
    # a weight without a method asks for sum (the weight is sum's image/text mix)
    np.testing.assert_allclose(engine.embed(image=query, instruction=instruction, weight=0.5).vector, plain, atol=1e-6)
    # no method: auto = fusion (the text list's vector; the search pools a text and an image list)
    default = engine.embed(image=query, instruction=instruction).vector
    fusion = compose_instruction(enc, img_vec, instruction, method="fusion").vector
    np.testing.assert_allclose(default, fusion, atol=1e-5)

    def hits(**kw):
        return [(h.id, round(h.score, 5)) for h in engine.search(image=query, instruction=instruction, k=5, **kw).hits]

    assert hits() == hits(method="fusion") and hits() != hits(method="sum")


def test_embed_keeps_query_tokens_from_the_same_pass(tmp_path, photo_dir, photos, tiny_clip):
    """Re-ranking's query tokens come from the embedding forward pass (no second pass), unchanged."""
    out = build_photo_index(tmp_path / "idx", sorted(photo_dir.iterdir()), [tiny_clip])
    engine = Engine(out, device="cpu")
    enc = create_encoder(tiny_clip, device="cpu")
    query = png_bytes(photos["coffee"])
    plain = engine.embed(image=query)
    kept = engine.embed(image=query, keep_local=True)
    assert plain.local is None and kept.local is not None
    np.testing.assert_allclose(kept.vector, plain.vector, atol=1e-6)
    tokens, grid = enc.local_features([photos["coffee"]])
    assert kept.local[1] == grid
    np.testing.assert_allclose(kept.local[0], tokens[0], atol=1e-5)


def test_fusion_search_matches_brute_force(tmp_path, photo_dir, photos, tiny_clip, tiny_dino):
    """method="fusion": text list (text encoder) and image list (the image-only encoder for an object
    change, the text encoder for an attribute change) pooled and re-scored, checked against a
    brute-force fusion over every indexed image (the pool covers the whole small index)."""
    from retrieval.compose.fusion import (
        FUSION_ATTRIBUTE_WEIGHT,
        FUSION_IMAGE_WEIGHT,
        fuse_candidates,
        pick_image_encoder,
    )

    out = build_photo_index(tmp_path / "idx", sorted(photo_dir.iterdir()), [tiny_clip, tiny_dino])
    engine = Engine(out, device="cpu")
    assert engine.text_encoder == tiny_clip and pick_image_encoder(engine, tiny_clip) == tiny_dino
    clip, dino = create_encoder(tiny_clip, device="cpu"), create_encoder(tiny_dino, device="cpu")
    query = png_bytes(photos["chelsea"])
    ids, clip_vecs = all_vectors(engine, tiny_clip)
    ids_d, dino_vecs = all_vectors(engine, tiny_dino)
    assert ids == ids_d
    img_clip = clip.encode_images([photos["chelsea"]])[0]
    # the uploaded bytes are an indexed file: an instruction asks for a change, so the query itself is no answer
    from retrieval.index import store

    itself = store.content_id(store.sha256_bytes(query))
    assert itself in ids
    keep = np.array([i for i, x in enumerate(ids) if x != itself])
    for instruction, image_q, image_vecs, weight in (
            ("as a dog", dino.encode_images([photos["chelsea"]])[0], dino_vecs, FUSION_IMAGE_WEIGHT),
            ("in red", img_clip, clip_vecs, FUSION_ATTRIBUTE_WEIGHT)):
        text_q = compose_instruction(clip, img_clip, instruction, method="fusion").vector
        expected = fuse_candidates(text_q, clip_vecs[keep], image_q, image_vecs[keep], weight=weight)
        order = keep[np.argsort(-expected, kind="stable")[:4]]
        expected = dict(zip(keep, expected))
        resp = engine.search(image=query, instruction=instruction, method="fusion", k=4)
        assert [h.id for h in resp.hits] == [ids[i] for i in order], instruction
        np.testing.assert_allclose([h.score for h in resp.hits], [expected[i] for i in order], atol=1e-4)
        np.testing.assert_allclose(resp.query.vector, text_q, atol=1e-5)
    # an indexed image as the query: its stored vectors are used, and it is not among the answers
    by_id = engine.search(image_id=ids[0], instruction="as a dog", method="fusion", k=len(ids))
    assert len(by_id.hits) == len(ids) - 1 and ids[0] not in {h.id for h in by_id.hits}
    # without an image-only encoder the image list comes from the text encoder
    solo = Engine(build_photo_index(tmp_path / "solo", sorted(photo_dir.iterdir()), [tiny_clip]), device="cpu")
    text_q = compose_instruction(clip, img_clip, "as a dog", method="fusion").vector
    expected = fuse_candidates(text_q, clip_vecs[keep], img_clip, clip_vecs[keep], weight=FUSION_IMAGE_WEIGHT)
    resp = solo.search(image=query, instruction="as a dog", method="fusion", k=3)
    assert [h.id for h in resp.hits] == [ids[i] for i in keep[np.argsort(-expected, kind="stable")[:3]]]
