"""An ``Engine`` is one version of the index, opened whole (issue 18).

``loupe index`` deletes the files of a version once it has replaced the manifest (every timed commit
rewrites the shard being filled under a new number; a prune rewrites shards). An engine therefore opens
every file of its manifest version when it is built — metadata, vector shards, local features (mapped)
and the re-ranking PCA — and none by path afterwards; a file that vanishes *while* it opens, because the
manifest was replaced meanwhile, makes it open the new version instead. (The end-to-end race, a served
index polled during many commits and a prune, is ``tests/server/test_live_reindex.py``.)
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from _engine_helpers import build_index, fake_id, unit

from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
from retrieval.index import descriptors, store, vector_files
from retrieval.index import records as records_module
from retrieval.types import Hit

DIM, LOCAL_DIM, TOKENS = 8, 4, 4


def _local(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pos = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.int16)
    return [(unit(rng.standard_normal((TOKENS, LOCAL_DIM))), pos) for _ in range(n)]


def _with_local(out, sizes=(3, 2)):
    """``build_index``'s index plus local features for every shard and a PCA file."""
    vecs = unit(np.random.default_rng(0).standard_normal((sum(sizes), DIM)))
    build_index(out, {"e": vecs}, shard_sizes=list(sizes))
    m = store.read_manifest(out)
    for i, shard in enumerate(m.shards):
        descriptors.write_local(out, "e", shard.name, _local(shard.count, seed=i))
    m.encoders["e"].local_features = {"dim": LOCAL_DIM, "grid": [2, 2], "per_image": TOKENS, "dtype": "float16"}
    descriptors.LocalReducer(np.zeros(DIM, np.float32), np.eye(LOCAL_DIM, DIM, dtype=np.float32)).save(
        store.pca_path(out, "e"))
    store.write_manifest(out, m)
    return vecs


def _next_version(out, new_shard: str, seed: int) -> None:
    """What a timed commit does: the open shard's rows under a new number, the manifest, then the old files
    deleted."""
    m = store.read_manifest(out)
    old = m.shards[-1]
    rows = store.read_metadata(out, old.name).to_pylist()
    store.write_metadata(out, new_shard, rows)
    index = vector_files.read_vectors(out, "e", old.name, mmap=False)
    vector_files.write_vectors(out, "e", new_shard, index)
    descriptors.write_local(out, "e", new_shard, _local(old.count, seed=seed))
    m.shards[-1] = store.ShardEntry(new_shard, old.count)
    store.write_manifest(out, m)
    for path in [store.meta_path(out, old.name), store.vectors_path(out, "e", old.name),
                 *store.local_paths(out, "e", old.name)]:
        path.unlink()


def test_an_opened_engine_reads_no_index_file_by_path(tmp_path):
    out = tmp_path / "idx"
    vecs = _with_local(out)
    engine = Engine(out, device="cpu")
    for folder in (out / "e", out / "meta"):             # every file of the version, deleted under it
        shutil.rmtree(folder)
    hits = engine.search(vector=vecs[4].tolist(), k=5).hits
    assert hits[0].id == fake_id(4) and len(hits) == 5
    feats = engine.local_features("e", hits)
    assert [d.shape for d, _ in feats] == [(TOKENS, LOCAL_DIM)] * 5
    assert engine.local_reducer("e").dim == LOCAL_DIM
    assert engine.metadata(fake_id(0))["caption"] == "image 0"
    assert engine.stored_vector("e", fake_id(1)) == pytest.approx(vecs[1], abs=1e-6)


def test_a_version_replaced_while_it_opens_is_skipped_for_the_new_one(tmp_path, monkeypatch):
    out = tmp_path / "idx"
    _with_local(out)
    real = descriptors.LocalShard
    calls = []

    def racing_local_shard(index_dir, encoder, shard, *args, **kwargs):
        calls.append(shard)
        if len(calls) == 1:                              # the indexer commits while the engine opens
            _next_version(out, "shard-00007", seed=7)
        return real(index_dir, encoder, shard, *args, **kwargs)

    monkeypatch.setattr(records_module.descriptors, "LocalShard", racing_local_shard)
    engine = Engine(out, device="cpu")
    assert engine.shard_names == ["shard-00000", "shard-00007"]
    assert not engine.changed_on_disk()
    desc, _ = engine.local_features("e", [Hit(fake_id(3), 0.0, 1, 0)])[0]
    assert np.allclose(desc, _local(2, seed=7)[0][0], atol=1e-2)


def test_a_missing_file_of_an_unchanged_version_is_still_an_error(tmp_path):
    out = tmp_path / "idx"
    _with_local(out)
    store.local_paths(out, "e", "shard-00001")[0].unlink()
    with pytest.raises(IndexFormatError, match="shard-00001"):
        Engine(out, device="cpu")


def test_reopen_opens_the_next_version_whole(tmp_path):
    out = tmp_path / "idx"
    _with_local(out)
    engine = Engine(out, device="cpu")
    _next_version(out, "shard-00002", seed=2)
    assert engine.changed_on_disk()
    new = engine.reopen()
    _next_version(out, "shard-00003", seed=3)            # deletes shard-00002's files: `new` does not care
    assert new.shard_names == ["shard-00000", "shard-00002"]
    desc, _ = new.local_features("e", [Hit(fake_id(3), 0.0, 1, 0)])[0]
    assert np.allclose(desc, _local(2, seed=2)[0][0], atol=1e-2)
    old_desc, _ = engine.local_features("e", [Hit(fake_id(3), 0.0, 1, 0)])[0]   # and the first view still answers
    assert np.allclose(old_desc, _local(2, seed=1)[0][0], atol=1e-2)


def test_a_manifest_replaced_within_one_mtime_tick_is_seen(tmp_path):
    out = tmp_path / "idx"
    _with_local(out)
    engine = Engine(out, device="cpu")
    path = out / store.MANIFEST
    st = path.stat()
    store.atomic_write_bytes(path, path.read_bytes())   # same bytes, a new file ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... with the same mtime (two commits in one tick)
    assert engine.changed_on_disk()


def test_caption_entries_read_the_new_version_when_a_shard_vanishes(tmp_path, monkeypatch):
    from retrieval.classify import vocab

    out = tmp_path / "idx"
    _with_local(out)
    real = store.read_metadata
    calls = []

    def racing_read(index_dir, shard, *args, **kwargs):
        calls.append(shard)
        if len(calls) == 2:                              # between the manifest and the last shard's metadata
            _next_version(out, "shard-00005", seed=5)
        return real(index_dir, shard, *args, **kwargs)

    monkeypatch.setattr(vocab.store, "read_metadata", racing_read)
    entries = vocab.caption_entries(out)
    assert calls[:2] == ["shard-00000", "shard-00001"] and "shard-00005" in calls
    assert sorted(entries.texts) == [f"image {i}" for i in range(5)]
