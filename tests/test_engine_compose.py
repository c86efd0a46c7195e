"""The engine passes instructions through to the composition methods (not only `sum`)."""

from __future__ import annotations

import numpy as np

from retrieval import create_encoder
from retrieval.compose import compose_instruction, compose_sum
from retrieval.engine import Engine
from tests._engine_helpers import build_photo_index, png_bytes


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
    plain = engine.embed(image=query, instruction=instruction).vector          # default: sum
    np.testing.assert_allclose(plain, compose_sum(img_vec, enc.encode_texts([instruction])[0], 0.5), atol=1e-5)
    assert float(np.abs(arith - plain).max()) > 1e-3


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
