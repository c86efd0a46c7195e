"""`make demo`'s builder: real sample photos + offline encoders; "a cat" finds the cat first."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_demo_index_answers_a_cat_with_the_cat(tmp_path, conse, effnet):
    from loupe.cli import demo
    from retrieval.engine.engine import Engine
    from retrieval.index import store

    # a demo index left by an older Loupe (other encoders) is rebuilt, not an error
    stale = tmp_path / "demo" / "index"
    stale.mkdir(parents=True)
    store.write_manifest(stale, store.Manifest(encoders={"effnet-lite0": store.EncoderEntry("effnet-lite0", 1280)}))
    index_dir = demo.build(tmp_path / "demo", max_stamps=3, device="cpu")
    engine = Engine(index_dir, device="cpu")
    assert engine.encoder_names == list(demo.ENCODERS)
    assert "colour-names" in engine.encoder_names
    assert engine.text_encoder == "conse-effnet-lite0"
    assert engine.count >= 10
    first = engine.search(text="a cat", k=3).hits[0]
    assert "cat" in engine.metadata(first.id)["caption"].lower()
    # idempotent: a second build embeds nothing new
    assert demo.build(tmp_path / "demo", max_stamps=3, device="cpu") == index_dir
    assert Engine(index_dir).count == engine.count


def test_tuxpaint_stamps_have_captions():
    from loupe.cli import demo

    stamps = demo.tuxpaint_stamps(5)
    if not demo.STAMPS.is_dir():
        assert stamps == []
        return
    assert 0 < len(stamps) <= 5
    assert all(p.suffix == ".png" and caption for p, caption in stamps)
