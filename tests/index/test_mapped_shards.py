"""Write shards covered by an optimized layout are memory-mapped, not read into RAM (queries go through the
layout; the shards serve only re-scoring and reconstruction): same answers, still checked at open (beyond
RAM: where their rows are read), and a shard truncated in place while served is refused (``IndexFormatError``,
a 503), never a SIGBUS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from _engine_helpers import build_index, unit

from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
from retrieval.index import store, vector_files
from retrieval.index.layout import covered_shards
from retrieval.index.optimize import optimize
from retrieval.index.shards import ShardSet

ROOT = Path(__file__).resolve().parents[2]


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    centres = unit(np.random.default_rng(77).standard_normal((16, dim)))
    rng = np.random.default_rng(seed)
    return unit(centres[rng.integers(0, 16, n)] + rng.standard_normal((n, dim)) / np.sqrt(dim))


@pytest.fixture()
def ivfpq_index(tmp_path):
    vecs = clustered(4000, 32, 3)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000] * 4)
    optimize(out, layout="ivfpq", target_recall=0.9, queries=150)
    return out, vecs


def _shardset(out: Path, *, mmap: bool) -> ShardSet:
    manifest = store.read_manifest(out)
    ids = [store.read_metadata(out, s.name).column("id").to_pylist() for s in manifest.shards]
    return ShardSet(out, manifest, ids, mmap=mmap)


def test_covered_shards_are_mapped_and_answer_as_read_ones(ivfpq_index):
    out, vecs = ivfpq_index
    manifest = store.read_manifest(out)
    assert covered_shards(manifest, "e") == {0, 1, 2, 3}
    mapped, in_ram = _shardset(out, mmap=True), _shardset(out, mmap=False)
    try:
        assert set(mapped._mapped) == {("e", i) for i in range(4)}          # small files, yet mapped
        assert not in_ram._mapped
        for i in range(4):                                                  # mapped, not copied
            assert not mapped.indexes["e"][i].codes.is_owned
            assert in_ram.indexes["e"][i].codes.is_owned
        rows = np.array([0, 999, 1000, 2500, 3999, 17])
        np.testing.assert_array_equal(mapped.vectors_at("e", rows), vecs[rows])
        np.testing.assert_array_equal(mapped.reconstruct("e", 2, 500), vecs[2500])
        params = mapped.layouts["e"].entry.params
        for qi in range(0, 4000, 333):
            q = unit(vecs[qi] + 0.2 * clustered(1, 32, qi)[0])
            a = mapped.layouts["e"].search(q[None], 10, params)
            b = in_ram.layouts["e"].search(q[None], 10, params)
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_array_equal(a[0], b[0])
            assert np.allclose(a[0][0], vecs[a[1][0]] @ q, atol=1e-5)       # exact re-scoring from the map
    finally:
        mapped.close()
        in_ram.close()


def test_delta_shards_written_after_optimize_stay_in_ram(tmp_path):
    vecs = clustered(3000, 16, 4)
    out = build_index(tmp_path / "idx", {"e": vecs[:2000]}, shard_sizes=[1000, 1000])
    optimize(out, layout="flat", queries=50)
    manifest = store.read_manifest(out)          # a later indexing run adds shard-00002
    name = store.shard_name(2)
    store.write_metadata(out, name, [{"id": store.int_to_id(10**6 + i), "source": f"d{i}"} for i in range(1000)])
    index = faiss.IndexFlatIP(16)
    index.add(np.ascontiguousarray(vecs[2000:]))
    manifest.record_all(out, vector_files.write_vectors(out, "e", name, index))
    manifest.shards.append(store.ShardEntry(name=name, count=1000))
    store.write_manifest(out, manifest)
    shards = _shardset(out, mmap=True)
    try:
        assert set(shards._mapped) == {("e", 0), ("e", 1)}
        assert shards.indexes["e"][2].codes.is_owned
    finally:
        shards.close()


def test_a_covered_shard_with_a_bad_vector_is_refused_at_open(ivfpq_index):
    out, vecs = ivfpq_index
    bad = vecs[1000:2000].copy()
    bad[7] *= 3.0                                 # same file size, one vector no longer unit
    index = faiss.IndexFlatIP(32)
    index.add(bad)
    faiss.write_index(index, str(store.vectors_path(out, "e", "shard-00001")))
    with pytest.raises(IndexFormatError, match="vector 7 has norm"):
        Engine(out, device="cpu")


def test_in_an_index_too_big_for_ram_a_bad_vector_under_the_layout_is_refused_where_it_is_read(
        ivfpq_index, monkeypatch):
    """Beyond RAM every shard is mapped; those under the layout are not read whole at open (20 GB at 10M x
    512-d): the re-scoring, a reconstruction or a full read that meets the bad vector refuses it, the
    others answer, and ``loupe verify`` finds it."""
    import retrieval.index.shards as shards_module
    from retrieval.index.verify import verify_index

    out, vecs = ivfpq_index
    bad = vecs[1000:2000].copy()
    bad[7] *= 3.0
    index = faiss.IndexFlatIP(32)
    index.add(bad)
    faiss.write_index(index, str(store.vectors_path(out, "e", "shard-00001")))
    monkeypatch.setattr(shards_module, "too_big_for_ram", lambda *a, **kw: True)
    engine = Engine(out, device="cpu")               # opens: the shard is not read whole
    try:
        assert engine.shards._unchecked == {("e", i) for i in range(4)}
        good = engine.search_vector("e", vecs[3500], 5)             # a search that does not meet it
        assert good and good[0].id == engine.shards.ids[3][500]
        with pytest.raises(IndexFormatError, match="shard-00001.*vector 7 has norm 3"):
            engine.search_vector("e", vecs[1007], 5)                 # re-scores the bad vector
        with pytest.raises(IndexFormatError, match="vector 7 has norm"):
            engine.shards.reconstruct("e", 1, 7)
        assert np.allclose(engine.shards.reconstruct("e", 1, 6), vecs[1006])
        with pytest.raises(IndexFormatError, match="vector 7 has norm"):
            for _ in engine.shards.all_vectors("e"):
                pass
        assert ("e", 0) not in engine.shards._unchecked            # read whole: checked, not again
    finally:
        engine.close()
    assert not verify_index(out).ok


def test_optimize_checks_each_shard_as_it_streams_it_and_refuses_a_bad_one(ivfpq_index):
    """``optimize`` maps every shard and reads each whole anyway: their norms are checked then, not all at
    open first (at 10M x 512-d that was a read of 20 GB through page faults before the work began)."""
    from retrieval.index.layout import layouts_of

    out, vecs = ivfpq_index
    before = layouts_of(store.read_manifest(out))["e"]
    bad = vecs[2000:3000].copy()
    bad[11] = np.nan
    index = faiss.IndexFlatIP(32)
    index.add(bad)
    faiss.write_index(index, str(store.vectors_path(out, "e", "shard-00002")))
    manifest = store.read_manifest(out)
    ids = [store.read_metadata(out, s.name).column("id").to_pylist() for s in manifest.shards]
    shards = ShardSet(out, manifest, ids, map_all=True, streamed=True)     # as optimize opens them
    assert shards._unchecked == {("e", i) for i in range(4)}
    shards.close()
    with pytest.raises(IndexFormatError, match="shard-00002.*vector 11 has norm nan"):
        optimize(out, layout="ivfpq", target_recall=0.9, queries=100)
    assert layouts_of(store.read_manifest(out))["e"] == before        # the previous layout stays


def test_release_pages_only_drops_mapped_pages(tmp_path):
    vecs = clustered(5000, 64, 5)
    index = faiss.IndexFlatIP(64)
    index.add(vecs)
    path = tmp_path / "x.faiss"
    faiss.write_index(index, str(path))
    assert vector_files.release_pages(index) is False                       # owned: never touched
    np.testing.assert_array_equal(vector_files.flat_vectors(index), vecs)
    mapped = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    assert vector_files.bad_norm_row(mapped) is None
    assert vector_files.release_pages(mapped) is True
    np.testing.assert_array_equal(vector_files.flat_vectors(mapped), vecs)   # mapped again on the next read


_TRUNCATE_SCRIPT = """
import os, sys
sys.path[:0] = [sys.argv[2]]
from retrieval.index import store
from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
engine = Engine(sys.argv[1], device="cpu")
assert ("e", 1) in engine.shards._mapped, "covered shard not mapped"
q = engine.shards.reconstruct("e", 1, 3).tolist()
print("before", engine.search(vector=q, k=1).hits[0].row, flush=True)
os.truncate(store.vectors_path(sys.argv[1], "e", "shard-00001"), 200)
for what in ("search", "reconstruct"):
    try:
        engine.search(vector=q, k=1) if what == "search" else engine.shards.reconstruct("e", 1, 3)
        print(what, "answered", flush=True)
    except IndexFormatError as exc:
        print(what, "refused", "changed size" in str(exc), flush=True)
"""


def test_a_covered_shard_truncated_while_served_is_refused_not_a_crash(ivfpq_index):
    """The IVF-PQ layout re-scores from the mapped write shards: after the shard is truncated in place,
    a search and a reconstruction raise ``IndexFormatError`` (the server's 503) instead of SIGBUS. A
    subprocess, so a regression fails this test instead of killing the test run."""
    out, _ = ivfpq_index
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE_SCRIPT, str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["before", "3", "search", "refused", "True", "reconstruct", "refused", "True"], \
        proc.stdout + proc.stderr[-2000:]


_LAYOUT_SCRIPT = """
import os, sys
sys.path[:0] = [sys.argv[2]]
from retrieval.index.layout import layouts_of
from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
engine = Engine(sys.argv[1], device="cpu")
layout = engine.shards.layouts["e"]
q = engine.shards.reconstruct("e", 1, 3).tolist()
print("before", engine.search(vector=q, k=1).hits[0].row, flush=True)
os.truncate(os.path.join(sys.argv[1], "e", layout.entry.file), 200)
try:
    engine.search(vector=q, k=1)
    print("answered", flush=True)
except IndexFormatError as exc:
    print("refused", "changed size" in str(exc), flush=True)
"""


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_mapped_layout_file_truncated_while_served_is_refused_not_a_crash(tmp_path, kind):
    """A flat or HNSW layout is read with ``IO_FLAG_MMAP_IFC`` (vectors and graph mapped): its size is
    checked before each search like a mapped shard's."""
    vecs = clustered(3000, 16, 6)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1500, 1500])
    optimize(out, layout=kind, queries=50)
    proc = subprocess.run([sys.executable, "-c", _LAYOUT_SCRIPT, str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["before", "3", "refused", "True"], proc.stdout + proc.stderr[-2000:]


def test_shards_larger_than_ram_together_are_all_mapped_and_optimize_maps_them(tmp_path, monkeypatch):
    """Without a layout, small shard files are read into RAM — unless together they exceed MAP_ALL_SHARE of
    physical memory (10M x 512-d: 20 GB of 205 MB files killed a 24 GB box in `loupe optimize`); optimize
    maps every shard whatever their size. Mapped or read, the same vectors; a bad norm is still refused."""
    from retrieval.index import shards as shards_mod

    vecs = clustered(3000, 16, 5)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000] * 3)
    manifest = store.read_manifest(out)
    ids = [store.read_metadata(out, s.name).column("id").to_pylist() for s in manifest.shards]
    assert not shards_mod.too_big_for_ram(out, manifest)              # 192 KB of shards
    assert shards_mod.too_big_for_ram(out, manifest, share=1e-9)
    small = ShardSet(out, manifest, ids)
    assert not small._mapped and all(ix.codes.is_owned for ix in small.indexes["e"])
    monkeypatch.setattr(shards_mod, "MAP_ALL_SHARE", 1e-9)           # "larger than RAM"
    big = ShardSet(out, manifest, ids)
    assert set(big._mapped) == {("e", i) for i in range(3)}
    assert not any(ix.codes.is_owned for ix in big.indexes["e"])
    rows = np.array([0, 999, 1000, 2999])
    np.testing.assert_array_equal(big.vectors_at("e", rows), vecs[rows])
    small.close()
    big.close()
    monkeypatch.setattr(shards_mod, "MAP_ALL_SHARE", 0.5)

    seen = {}
    real = shards_mod.ShardSet.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        seen["mapped"] = set(self._mapped)

    monkeypatch.setattr(shards_mod.ShardSet, "__init__", spy)
    optimize(out, layout="flat")
    assert seen["mapped"] == {("e", i) for i in range(3)}

    # a non-unit vector in a shard that is mapped because of the total size is still refused at open
    bad = vecs[:1000].copy()
    bad[7] *= 3
    out2 = build_index(tmp_path / "idx2", {"e": np.concatenate([bad, vecs[1000:]])}, shard_sizes=[1000] * 3)
    monkeypatch.setattr(shards_mod, "MAP_ALL_SHARE", 1e-9)
    m2 = store.read_manifest(out2)
    ids2 = [store.read_metadata(out2, s.name).column("id").to_pylist() for s in m2.shards]
    with pytest.raises(IndexFormatError):
        ShardSet(out2, m2, ids2)
