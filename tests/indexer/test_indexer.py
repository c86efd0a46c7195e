"""The indexer, in-process: layout, manifest, self-retrieval, incremental/prune, multi-encoder, local
features, index types, the lock and refusals, time-based commits, the stage runner with fake stages.
Its inputs (bad inputs, tricky images, sources) are in test_indexer_inputs.py."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from _indexer_helpers import all_rows, cos, index  # tests/ is on sys.path
from PIL import Image

from indexer import index_types
from indexer.lock import IndexLock
from indexer.pipeline import stored_vectors
from retrieval.errors import IndexLockedError, LoupeError
from retrieval.index import descriptors, store, vector_files

_index, _all_rows, _cos = index, all_rows, cos


def _covered_sources(out) -> list[str]:
    return [s for r in _all_rows(out) for s in [r["source"], *json.loads(r["aliases"] or "[]")]]


def _files(folder) -> list[str]:
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".png"))


# -- layout, manifest, self-retrieval ------------------------------------------------------------
def test_layout_and_manifest(tmp_path, photo_dir, tiny_clip):
    out = tmp_path / "idx"
    s = _index([photo_dir], out, [tiny_clip], shard_size=4)
    files = _files(photo_dir)
    m = store.read_manifest(out)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "loupe-index" and raw["version"] == store.FORMAT_VERSION
    assert raw["count"] == m.count == s.indexed
    # skimage's `cat` and `chelsea` are the same photo: one embedding, the other an alias
    unique = {store.sha256_bytes(Path(f).read_bytes()) for f in files}
    assert s.indexed == len(unique) and s.skipped == len(files) - len(unique) and s.failed == []
    assert [sh.name for sh in m.shards] == [store.shard_name(i) for i in range(len(m.shards))]
    assert [sh.count for sh in m.shards][:-1] == [4] * (len(m.shards) - 1)
    entry = m.encoders[tiny_clip]
    assert (entry.dim, entry.index_type, entry.factory, entry.metric) == (32, "flat", "Flat", "ip")
    assert entry.modalities == ["image", "text"] and m.text_encoder == tiny_clip
    for sh in m.shards:
        meta = store.read_metadata(out, sh.name)
        assert meta.column_names == list(store.METADATA_COLUMNS)
        assert vector_files.read_vectors(out, tiny_clip, sh.name).ntotal == meta.num_rows == sh.count
    rows = _all_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    for r in rows:
        data = Path(r["source"]).read_bytes()
        assert r["id"] == store.content_id(store.sha256_bytes(data)) and r["sha256"] == store.sha256_bytes(data)
        assert r["path"] == r["source"] and r["size"] == len(data)
        w, h = Image.open(r["source"]).size
        assert (r["width"], r["height"]) == (w, h)
        assert r["mtime"] == pytest.approx(os.stat(r["source"]).st_mtime)
    assert sorted(_covered_sources(out)) == files
    assert sum(len(json.loads(r["aliases"])) for r in rows) == len(files) - len(unique)
    assert not (out / ".lock").read_text().strip()  # released


def test_each_image_is_its_own_top1(tmp_path, photo_dir, effnet):
    out = tmp_path / "idx"
    _index([photo_dir], out, ["effnet-lite0"], device="cpu", batch_size=8)
    vecs, ids = stored_vectors(out, "effnet-lite0")
    assert vecs.shape == (len(ids), 1280)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    by_source = {s: r["id"] for r in _all_rows(out) for s in [r["source"], *json.loads(r["aliases"])]}
    files = _files(photo_dir)
    queries = effnet.encode_images(files)
    top = np.argmax(queries @ vecs.T, axis=1)
    assert [ids[t] for t in top] == [by_source[f] for f in files]
    # the stored vector is the encoder's output for that file (same preprocessing path)
    for f, q in zip(files, queries):
        assert _cos(q, vecs[ids.index(by_source[f])]) > 0.9999


def test_summary_line_from_cli(tmp_path, photo_dir, tiny_clip, capsys):
    from loupe.cli.main import main

    out = tmp_path / "idx"
    (photo_dir / "broken.jpg").write_bytes(b"not an image")
    rc = main(["index", str(photo_dir), "--out", str(out), "--encoder", tiny_clip, "--workers", "0"])
    cap = capsys.readouterr()
    assert rc == 0
    lines = cap.out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary) == ["indexed", "skipped", "failed", "shards", "seconds", "stages"]
    assert list(summary["stages"]) == ["read", "embed", "write"]
    # each figure is rounded to 1 ms: the stages' sum may pass the rounded total by up to 2 ms (4 roundings);
    # it failed once in CI as 0.078 + 0.004 + 0.004 = 0.08600000000000001 > 0.086
    assert summary["stages"]["embed"] > 0 and sum(summary["stages"].values()) <= summary["seconds"] + 0.002 + 1e-9
    assert summary["failed"] == [{"source": str(photo_dir / "broken.jpg"), "reason": "not a recognised image format"}]
    assert summary["indexed"] == store.read_manifest(out).count and summary["shards"] == 1
    assert "indexing" not in cap.err  # no progress bar when stderr is not a terminal
    rc = main(["index", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


# -- incremental, prune, aliases, changed files -------------------------------------------------------
def test_incremental_add_prune_and_alias_promotion(tmp_path, photos, tiny_clip):
    src = tmp_path / "src"
    src.mkdir()
    names = [n for n in photos if n != "cat"][:6]  # skimage `cat` is `chelsea`
    for n in names[:4]:
        photos[n].save(src / f"{n}.png")
    out = tmp_path / "idx"
    s1 = _index([src], out, [tiny_clip], shard_size=3)
    assert (s1.indexed, s1.skipped) == (4, 0)
    s2 = _index([src], out, [tiny_clip], shard_size=3)
    assert (s2.indexed, s2.skipped, s2.failed) == (0, 4, [])
    for n in names[4:]:
        photos[n].save(src / f"{n}.png")
    shutil.copy(src / f"{names[0]}.png", src / "copy of first.png")
    s3 = _index([src], out, [tiny_clip], shard_size=3)
    assert (s3.indexed, s3.skipped) == (2, 5)  # 4 unchanged + 1 duplicate by content
    rows = _all_rows(out)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    first = next(r for r in rows if r["source"] == str(src / f"{names[0]}.png"))
    assert json.loads(first["aliases"]) == [str(src / "copy of first.png")]

    # delete two files: without --prune they stay, with --prune they go
    gone_ids = {r["id"] for r in rows if r["source"] in (str(src / f"{names[1]}.png"), str(src / f"{names[4]}.png"))}
    (src / f"{names[1]}.png").unlink()
    (src / f"{names[4]}.png").unlink()
    (src / f"{names[0]}.png").unlink()   # its alias survives: the row is kept, promoted
    s4 = _index([src], out, [tiny_clip], shard_size=3)
    assert s4.indexed == 0 and store.read_manifest(out).count == 6
    s5 = _index([src], out, [tiny_clip], shard_size=3, prune=True)
    assert s5.indexed == 0 and s5.pruned == 2
    rows = _all_rows(out)
    assert len(rows) == 4 and not gone_ids & {r["id"] for r in rows}
    promoted = next(r for r in rows if r["id"] == first["id"])
    assert promoted["source"] == promoted["path"] == str(src / "copy of first.png")
    assert json.loads(promoted["aliases"]) == []
    assert sorted(_covered_sources(out)) == _files(src)
    again = _index([src], out, [tiny_clip], shard_size=3, prune=True)   # the promoted alias counts as unchanged
    assert (again.indexed, again.skipped, again.pruned) == (0, 4, 0)
    m = store.read_manifest(out)
    for sh in m.shards:   # rewritten shards are consistent, and no unlisted shard file is left
        assert vector_files.read_vectors(out, tiny_clip, sh.name).ntotal == store.read_metadata(out, sh.name).num_rows
    listed = {sh.name for sh in m.shards}
    on_disk = {p.name.split(".")[0] for p in (out / "meta").iterdir()}
    on_disk |= {p.name.split(".")[0] for p in (out / tiny_clip).glob("shard-*")}
    assert on_disk == listed
    # vectors follow their rows through the rewrite
    vecs, ids = stored_vectors(out, tiny_clip)
    from retrieval.encoders import create_encoder

    enc = create_encoder(tiny_clip, device="cpu")
    for r in rows:
        assert _cos(enc.encode_images([r["source"]])[0], vecs[ids.index(r["id"])]) > 0.9999


def test_changed_file_replaces_its_old_content(tmp_path, photos, tiny_clip):
    src = tmp_path / "src"
    src.mkdir()
    photos["astronaut"].save(src / "a.png")
    photos["coffee"].save(src / "b.png")
    out = tmp_path / "idx"
    _index([src], out, [tiny_clip])
    old = {r["source"]: r["id"] for r in _all_rows(out)}
    photos["rocket"].save(src / "a.png")
    os.utime(src / "a.png", (1, 1))
    s = _index([src], out, [tiny_clip])
    assert s.indexed == 1
    new = {r["source"]: r["id"] for r in _all_rows(out)}
    assert new[str(src / "b.png")] == old[str(src / "b.png")]
    assert new[str(src / "a.png")] != old[str(src / "a.png")] and len(new) == 2
    assert old[str(src / "a.png")] not in {r["id"] for r in _all_rows(out)}


# -- multi-encoder, local features ---------------------------------------------------------------
def test_multi_encoder_shards_hold_the_same_images(tmp_path, photo_dir, tiny_clip, tiny_dino):
    from retrieval.encoders import create_encoder

    out = tmp_path / "idx"
    s = _index([photo_dir], out, [tiny_clip, tiny_dino], shard_size=5, workers=1)
    m = store.read_manifest(out)
    assert list(m.encoders) == [tiny_clip, tiny_dino] and m.default_encoder == tiny_clip
    assert len(m.shards) == -(-s.indexed // 5)
    encs = {n: create_encoder(n, device="cpu") for n in m.encoders}
    for sh in m.shards:
        sources = store.read_metadata(out, sh.name).column("source").to_pylist()
        for name, enc in encs.items():
            index = vector_files.read_vectors(out, name, sh.name, mmap=False)
            assert index.ntotal == len(sources) and index.d == 32
            stored = vector_files.reconstruct_all(index)
            fresh = enc.encode_images(sources)
            np.testing.assert_allclose(np.sum(stored * fresh, axis=1), 1.0, atol=1e-4)


def test_local_features(tmp_path, photo_dir, tiny_clip, effnet):
    out = tmp_path / "idx"
    s = _index([photo_dir], out, ["effnet-lite0", tiny_clip], shard_size=6, local_features=True, device="cpu")
    m = store.read_manifest(out)
    lf = m.encoders["effnet-lite0"].local_features
    assert lf == {"dim": 128, "grid": [7, 7], "per_image": 49, "dtype": "float16", "layer": "final"}
    assert m.encoders[tiny_clip].local_features == {"dim": 32, "grid": [4, 4], "per_image": 16, "dtype": "float16",
                                                         "layer": "final"}
    reducer = descriptors.LocalReducer.load(store.pca_path(out, "effnet-lite0"))
    assert reducer.components.shape == (128, 1280)
    rows = _all_rows(out)
    sh = m.shards[-1]
    shard = descriptors.LocalShard(out, "effnet-lite0", sh.name)
    assert shard.desc.dtype == np.float16 and len(shard.off) == sh.count + 1
    source = store.read_metadata(out, sh.name).column("source").to_pylist()[0]
    desc, pos = shard.get(0)
    assert desc.shape == (49, 128) and pos.shape == (49, 2)
    assert pos.tolist() == [[r, c] for r in range(7) for c in range(7)]
    _, tokens, grid = effnet.encode_images_and_local([source])
    expected = reducer.transform(tokens[0])
    np.testing.assert_allclose(desc, expected, atol=2e-3)
    assert s.indexed == len(rows)
    # resume keeps the same PCA and adds local features for the new shard
    extra = tmp_path / "more"
    extra.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(extra / "red.png")
    _index([photo_dir, extra], out, [], shard_size=6)   # encoders and local features come from the manifest
    m2 = store.read_manifest(out)
    assert len(m2.shards) == len(m.shards) + 1
    assert descriptors.LocalShard(out, tiny_clip, m2.shards[-1].name).get(0)[0].shape == (16, 32)
    np.testing.assert_array_equal(descriptors.LocalReducer.load(store.pca_path(out, "effnet-lite0")).components,
                                  reducer.components)


def test_local_features_token_cap():
    from indexer.local_features import LOCAL_MAX_TOKENS, select_tokens

    assert select_tokens(49).tolist() == list(range(49))
    keep = select_tokens(37 * 37)
    assert len(keep) == LOCAL_MAX_TOKENS and keep[0] == 0 and keep[-1] == 37 * 37 - 1
    assert np.all(np.diff(keep) > 0)


# -- index types ---------------------------------------------------------------------------------
def test_index_type_chooser():
    ch = index_types.choose_index_type
    big = 64 * 2**30
    assert ch(1_000, 512, max_memory=big).index_type == "flat"
    assert ch(index_types.FLAT_MAX_VECTORS, 512, max_memory=big) == index_types.IndexChoice("flat", "Flat")
    assert ch(index_types.FLAT_MAX_VECTORS + 1, 512, max_memory=big) == index_types.IndexChoice("hnsw", "HNSW32,Flat")
    large = ch(50_000_000, 512, max_memory=big, shard_size=100_000)
    assert large.index_type == "ivfpq" and large.factory == "IVF1024,PQ64x8"
    # a memory budget turns a small corpus compressed too
    small_budget = ch(100_000, 512, max_memory=20 * 2**20)
    assert small_budget.index_type == "ivfpq"
    m = int(small_budget.factory.split("PQ")[1].split("x")[0])
    assert 100_000 * (m + 8) <= 20 * 2**20 and m == 64
    assert ch(100_000, 512, max_memory=5 * 2**20).factory.endswith("PQ32x8")
    assert ch(10, 256, binary=True) == index_types.IndexChoice("binary", "BFlat")
    assert ch(10, 32, requested="hnsw").index_type == "hnsw"
    with pytest.raises(LoupeError):
        ch(10, 32, requested="lsh")
    assert index_types.fit_factory("IVF1024,PQ64x8", 100) == "IVF2,PQ64x6"
    assert index_types.fit_factory("IVF1024,PQ64x8", 1_000_000) == "IVF1024,PQ64x8"
    assert index_types.fit_factory("IVF1024,RaBitQ", 100) == "IVF2,RaBitQ"
    assert index_types.fit_factory("IVF16384,RaBitQ", 1_000_000) == "IVF16384,RaBitQ"
    assert index_types.fit_factory("UPCA128,IVF1024,PQ32x8", 100) == "UPCA128,IVF2,PQ32x6"   # the projection kept
    assert index_types.parse_memory("4G") == 4 * 2**30 and index_types.parse_memory("512mb") == 512 * 2**20
    with pytest.raises(LoupeError):
        index_types.parse_memory("lots")


def _noise_images(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"n{i:03d}.png")


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_compressed_index_types(tmp_path, tiny_clip, kind):
    import faiss

    src = tmp_path / "src"
    _noise_images(src, 120)
    out = tmp_path / "idx"
    s = _index([src], out, [tiny_clip], index_type=kind, shard_size=80, batch_size=40)
    assert s.indexed == 120
    m = store.read_manifest(out)
    entry = m.encoders[tiny_clip]
    assert entry.index_type == kind
    rows = _all_rows(out)
    assert len(rows) == 120
    total = 0
    for sh in m.shards:
        index = vector_files.read_vectors(out, tiny_clip, sh.name, mmap=False)
        assert index.ntotal == sh.count
        total += index.ntotal
        if kind == "ivfpq":
            ivf = faiss.extract_index_ivf(index)
            assert entry.factory == f"IVF{ivf.nlist},PQ8x6" and ivf.nlist == 2  # capped to an 80-vector sample
        else:
            assert entry.factory == "HNSW32,Flat"
            exact = vector_files.reconstruct_all(index)
            _, labels = index.search(exact, 1)
            assert labels[:, 0].tolist() == list(range(index.ntotal))  # HNSW: label = row in the shard
    assert total == 120
    if kind == "ivfpq":
        assert (out / tiny_clip / "trained.faiss").is_file()
    # prune rebuilds the affected shards with the same index type (IVF-PQ keeps its training)
    before = {r["source"]: r["id"] for r in rows}
    vecs_before, ids_before = stored_vectors(out, tiny_clip)
    for i in range(0, 120, 3):
        (src / f"n{i:03d}.png").unlink()
    s2 = _index([src], out, [tiny_clip], shard_size=80, batch_size=40, prune=True)
    assert (s2.indexed, s2.pruned) == (0, 40)
    m2 = store.read_manifest(out)
    assert m2.count == 80 and m2.encoders[tiny_clip].factory == entry.factory
    vecs_after, ids_after = stored_vectors(out, tiny_clip)
    assert sorted(ids_after) == sorted(before[str(p)] for p in src.iterdir())
    for k, i in enumerate(ids_after):   # surviving vectors unchanged (HNSW exact; IVF-PQ codes re-encoded)
        assert _cos(vecs_after[k], vecs_before[ids_before.index(i)]) > (0.9999 if kind == "hnsw" else 0.95)
    for sh in m2.shards:
        index = vector_files.read_vectors(out, tiny_clip, sh.name, mmap=False)
        assert index.ntotal == sh.count
        if kind == "ivfpq":
            assert faiss.extract_index_ivf(index).nlist == 2


# -- the lock and refusals -----------------------------------------------------------------------
def test_second_writer_is_refused_or_waits(tmp_path, photo_dir, tiny_clip):
    out = tmp_path / "idx"
    with IndexLock(out):
        with pytest.raises(IndexLockedError, match="another `loupe index`.*--wait"):
            _index([photo_dir], out, [tiny_clip])
        assert not (out / "manifest.json").exists()
    lock = IndexLock(out)
    lock.acquire()
    timer = threading.Timer(0.5, lock.release)
    timer.start()
    s = _index([photo_dir], out, [tiny_clip], wait=True)
    timer.join()
    assert s.indexed > 0


def test_existing_index_refuses_other_encoders(tmp_path, photo_dir, tiny_clip, tiny_dino):
    out = tmp_path / "idx"
    _index([photo_dir], out, [tiny_clip])
    with pytest.raises(LoupeError, match="cannot change encoders"):
        _index([photo_dir], out, [tiny_dino])
    with pytest.raises(LoupeError, match="without --local-features"):
        _index([photo_dir], out, [tiny_clip], local_features=True)
    with pytest.raises(LoupeError, match="new index"):
        _index([photo_dir], out, [tiny_clip], index_type="hnsw")


def test_empty_source_gives_an_empty_index(tmp_path, tiny_clip):
    (tmp_path / "empty").mkdir()
    s = _index([tmp_path / "empty"], tmp_path / "idx", [tiny_clip])
    assert (s.indexed, s.shards) == (0, 0)
    assert store.read_manifest(tmp_path / "idx").count == 0


def test_time_based_commits(tmp_path, photo_dir, tiny_clip):
    out = tmp_path / "idx"
    n = len(_files(photo_dir))
    s = _index([photo_dir], out, [tiny_clip], batch_size=4, shard_size=1000, commit_seconds=0)
    m = store.read_manifest(out)
    # every batch was committed, each time as a new version of the one open shard, not as a new shard
    assert len(m.shards) == s.shards == 1 and m.count == s.indexed == n - s.skipped
    assert m.shards[0].name == store.shard_name(-(-n // 4) - 1)       # one version per batch
    assert sorted(p.name.split(".")[0] for p in (out / "meta").iterdir()) == [m.shards[0].name]
    assert sorted(p.name for p in (out / tiny_clip).iterdir() if p.name.startswith("shard-")) == [
        f"{m.shards[0].name}.faiss"]                                  # previous versions deleted
    _index([photo_dir], tmp_path / "ref", [tiny_clip], batch_size=4, shard_size=1000, commit_seconds=None)
    np.testing.assert_allclose(stored_vectors(out, tiny_clip)[0], stored_vectors(tmp_path / "ref", tiny_clip)[0])
    # the open shard's index grows in place between commits (HNSW is not rebuilt): same vectors, same order
    _index([photo_dir], tmp_path / "hnsw", [tiny_clip], batch_size=4, shard_size=1000, commit_seconds=0,
           index_type="hnsw")
    assert store.read_manifest(tmp_path / "hnsw").encoders[tiny_clip].index_type == "hnsw"
    np.testing.assert_allclose(stored_vectors(tmp_path / "hnsw", tiny_clip)[0],
                               stored_vectors(tmp_path / "ref", tiny_clip)[0], atol=1e-6)
    s5 = _index([photo_dir], tmp_path / "idx5", [tiny_clip], batch_size=2, shard_size=5, commit_seconds=0)
    counts = [sh.count for sh in store.read_manifest(tmp_path / "idx5").shards]
    k = s5.indexed
    assert counts == [5] * (k // 5) + ([k % 5] if k % 5 else []) and s5.shards == len(counts)
    s2 = _index([photo_dir], tmp_path / "idx2", [tiny_clip], batch_size=4, shard_size=1000)
    assert s2.shards == 1                                             # default: 300 s, one shard here


# -- the runner: reader -> mapper -> writer, with fake stages -------------------------------------------
class _RecordingWriter:
    def __init__(self, log):
        self.log = log

    def add(self, rows, vectors, local=None):
        self.log.append(("add", [r["id"] for r in rows], vectors["enc"].tolist()))

    def add_alias(self, image_id, source):
        self.log.append(("alias", image_id, source))

    def close(self, *, finish=True):
        self.log.append(("close", finish))


def _fake_batches():
    from indexer.decode import Record
    from indexer.runner import ReadBatch
    from indexer.sources import Failure

    return iter([
        ReadBatch(records=[Record(0), Record(1), Record(2)], data={}, kept=[0, 2],
                  rows=[{"id": "a"}, {"id": "c"}], failures=[Failure("b.jpg", "broken")]),
        ReadBatch(records=[Record(3)], data={}, aliases=[("a", "copy-of-a.jpg")]),
    ])


def test_runner_joins_swappable_stages_and_times_each():
    from indexer.runner import IndexSummary, run_stages

    log, progress, summary = [], [], IndexSummary()

    def mapper(batch):
        log.append(("map", batch.kept))
        return {"enc": np.asarray(batch.kept, dtype=np.float32)}, {}

    def open_writer():
        log.append(("open",))          # after the first batch is read: workers fork before the writer thread
        return _RecordingWriter(log)

    run_stages(_fake_batches(), mapper, open_writer, summary, lambda done, new: progress.append((done, new)))
    assert log == [("open",), ("map", [0, 2]), ("add", ["a", "c"], [0.0, 2.0]),
                   ("alias", "a", "copy-of-a.jpg"), ("close", True)]
    assert (summary.indexed, summary.skipped, [f.source for f in summary.failed]) == (2, 1, ["b.jpg"])
    assert progress == [(3, 2), (4, 2)]
    assert all(t >= 0 for t in summary.stages.to_json().values())


def test_runner_commits_on_ctrl_c_and_aborts_on_errors():
    from indexer.runner import IndexSummary, run_stages

    for error, finish in ((KeyboardInterrupt, [True]), (RuntimeError, [False])):
        log = []

        def mapper(batch, error=error):
            raise error("stop")

        with pytest.raises(error):
            run_stages(_fake_batches(), mapper, lambda log=log: _RecordingWriter(log), IndexSummary())
        assert [entry[1] for entry in log if entry[0] == "close"] == finish
