"""The first-hour failure: `loupe index DIR --out X` with the default encoder and no weights (no model hub)
fails at once with one message that says what to do, and leaves no folder behind."""

from __future__ import annotations

import time

import pytest

from retrieval.encoders import weights
from retrieval.errors import MissingWeightsError


def test_default_encoder_without_weights_fails_fast_and_leaves_nothing(tmp_path, photo_dir, monkeypatch):
    from indexer.pipeline import IndexConfig, build_index

    monkeypatch.delenv("LOUPE_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(weights, "_hub_probe", {})          # probe again (the conftest blocks the network)
    out = tmp_path / "idx"
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        build_index(IndexConfig(sources=[str(photo_dir)], out=str(out), encoders=[], workers=0))
    assert time.perf_counter() - t0 < 30              # was ~60 s of hub retries (measured: 11 s cold CLI here)
    message = str(info.value)
    assert "cannot be reached" in message and "effnet-lite0" in message and "LOUPE_WEIGHTS_DIR" in message
    assert not out.exists()


def test_an_existing_folder_is_kept_when_a_run_fails(tmp_path, photo_dir, monkeypatch):
    from indexer.pipeline import IndexConfig, build_index

    monkeypatch.delenv("LOUPE_WEIGHTS_DIR", raising=False)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MissingWeightsError):
        build_index(IndexConfig(sources=[str(photo_dir)], out=str(out), encoders=["clip-vit-b-32"], workers=0))
    assert (out / "notes.txt").read_text() == "keep me"


def test_hub_offline_env_means_unreachable(monkeypatch):
    monkeypatch.setattr(weights, "_hub_probe", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.hub_reachable() is False
