"""IVF-PQ layouts built as faiss' contrib.ondisk does: one trained quantizer, the write shards' inverted lists
merged into one memory-mapped data file (retrieval.index.ondisk), checked against one in-RAM IVF-PQ built
from the same trained index and vectors."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest
from _engine_helpers import build_index, fake_id, unit

from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
from retrieval.index import store
from retrieval.index.layout import layout_files, layouts_of, read_layout
from retrieval.index.ondisk import build_ondisk, check_ids, ondisk_lists, read_ondisk
from retrieval.index.optimize import optimize
from retrieval.index.verify import verify_index


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    centres = unit(np.random.default_rng(77 + dim).standard_normal((20, dim)))
    rng = np.random.default_rng(seed)
    return unit(centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim)))


def trained_ivfpq(vecs: np.ndarray, factory: str = "IVF32,PQ8x6"):
    index = faiss.index_factory(vecs.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    index.train(vecs[::2])
    return index


def test_merged_on_disk_lists_search_exactly_like_one_in_ram_index(tmp_path):
    vecs = clustered(3000, 32, 0)
    trained = trained_ivfpq(vecs)
    ram = faiss.clone_index(trained)
    ram.add(vecs)                                    # the reference: every vector in one in-RAM IVF-PQ
    blocks = [vecs[:1000], vecs[1000:1000], vecs[1000:1700], vecs[1700:]]   # write shards, one empty
    done = []
    index, records = build_ondisk(faiss.clone_index(trained), blocks, tmp_path / "e" / "search-00000.faiss",
                                  progress=done.append)
    assert done[-1] == 3000
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["search-00000.faiss", "search-00000.ivfdata"]
    assert {p.name for p in records} == {"search-00000.faiss", "search-00000.ivfdata"}
    for path, rec in records.items():
        assert rec == store.file_record(path)
    assert index.ntotal == 3000 and ondisk_lists(index) is not None
    # the folder moves: the index names its data file without a folder
    shutil.move(tmp_path / "e", tmp_path / "moved")
    opened = read_ondisk(tmp_path / "moved" / "search-00000.faiss", tmp_path / "moved" / "search-00000.ivfdata")
    lists = ondisk_lists(opened)
    assert lists is not None and lists.read_only
    queries = clustered(60, 32, 9)
    for nprobe in (1, 4, 32):
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        d_ref, i_ref = ram.search(queries, 10, params=params)
        for candidate in (index, opened):
            d, i = candidate.search(queries, 10, params=params)
            assert np.array_equal(i, i_ref) and np.array_equal(d, d_ref)
    # an id selector (filters, masked rows) works on the mapped lists as on the in-RAM ones
    keep = np.zeros(3000, bool)
    keep[::3] = True
    bitmap = np.packbits(keep, bitorder="little")
    sel = faiss.IDSelectorBitmap(3000, faiss.swig_ptr(bitmap))
    params = faiss.SearchParametersIVF(nprobe=8, sel=sel)
    assert np.array_equal(opened.search(queries, 10, params=params)[1], ram.search(queries, 10, params=params)[1])
    check_ids(opened, 3000, "x")
    with pytest.raises(IndexFormatError, match="once each"):
        check_ids(opened, 3001, "x")


def _reference_engine_answer(out, vecs, q, k, nprobe, k_factor):
    """Top-k by the in-RAM IVF index built from the layout's own trained quantizer and codebooks, candidates
    re-scored exactly — what the engine must answer through the on-disk layout."""
    manifest = store.read_manifest(out)
    entry = layouts_of(manifest)["e"]
    ram = faiss.read_index(str(out / "e" / entry.file), faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = faiss.extract_index_ivf(ram)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()                              # the index owns it now
    ram.ntotal = ivf.ntotal = 0
    ram.add(vecs)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(ram, faiss.IndexPreTransform):     # ivfpq-pca: the lists behind the projection
        params = faiss.SearchParametersPreTransform(index_params=params)
    _, cand = ram.search(q[None], k * k_factor, params=params)
    cand = cand[0][cand[0] >= 0]
    scores = vecs[cand] @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [fake_id(int(i)) for i in cand[order]]


@pytest.mark.parametrize("kind", ["ivfpq", "ivf-rabitq", "ivfpq-pca"])
def test_optimize_writes_an_on_disk_ivf_layout_that_engine_and_verify_use(tmp_path, kind):
    from retrieval.index.optimize import RABITQ_QUERY_BITS

    dim = 256 if kind == "ivfpq-pca" else 32        # ivfpq-pca projects to 128 dimensions
    vecs = clustered(4000, dim, 1)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1500, 1000, 1500])
    info = optimize(out, layout=kind, target_recall=0.9, queries=150).encoders["e"]
    assert info["layout"] == kind and info["reached"] and info["recall@10"] >= 0.9
    assert info["factory"].endswith(",RaBitQ" if kind == "ivf-rabitq" else "x8")
    assert info["factory"].startswith("UPCA128,IVF") == (kind == "ivfpq-pca")
    manifest = store.read_manifest(out)
    entry = layouts_of(manifest)["e"]
    assert entry.data_file == entry.file.replace(".faiss", ".ivfdata")
    for path in layout_files(out, "e", entry):       # both files recorded (size + SHA-256) in the manifest
        assert manifest.files[store.relative(out, path)] == store.file_record(path)
    assert not [p for p in (out / "e").iterdir() if p.name.startswith(".")]    # no scratch left
    engine = Engine(out, device="cpu")
    layout = engine.shards.layouts["e"]
    assert ondisk_lists(layout.index) is not None
    if kind == "ivf-rabitq":                         # 1-bit codes, scanned with 4-bit queries (saved in the file)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(layout.index))
        assert isinstance(ivf, faiss.IndexIVFRaBitQ) and ivf.qb == RABITQ_QUERY_BITS and ivf.code_size == 32 // 8 + 8
    nprobe, k_factor = entry.params["nprobe"], entry.params["k_factor"]
    for qi in (3, 77, 1999, 3500):
        q = unit(vecs[qi] + 0.05 * np.random.default_rng(qi).standard_normal(dim))
        hits = engine.search_vector("e", q, 10)
        assert [h.id for h in hits] == _reference_engine_answer(out, vecs, q, 10, nprobe, k_factor)
        rows = [int(engine.records.offsets[h.shard]) + h.row for h in hits]   # exact inner products, not codes
        assert [h.score for h in hits] == pytest.approx([float(vecs[r] @ q) for r in rows], abs=1e-5)
    assert verify_index(out).ok
    engine.close()


def test_damaged_or_truncated_layout_data_is_reported(tmp_path):
    vecs = clustered(2000, 16, 2)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000, 1000])
    optimize(out, layout="ivfpq", target_recall=0.8, queries=50)
    entry = layouts_of(store.read_manifest(out))["e"]
    data = out / "e" / entry.data_file
    raw = bytearray(data.read_bytes())
    raw[:] = b"\xff" * len(raw)                      # codes and ids garbage, same size
    data.write_bytes(bytes(raw))
    rel = f"e/{entry.data_file}"
    assert any(p.file == rel and "SHA-256" in p.message for p in verify_index(out).problems)
    # without checksums the merged lists' ids give it away
    report = verify_index(out, checksums=False)
    assert any("once each" in p.message for p in report.problems)
    with open(data, "r+b") as fh:                    # truncated: refused at open, never mapped past the end
        fh.truncate(len(raw) // 2)
    with pytest.raises(IndexFormatError, match="ivfdata"):
        Engine(out, device="cpu")
    with pytest.raises(IndexFormatError, match="shorter"):
        read_layout(out, "e", entry)


def test_a_crash_during_an_ivfpq_optimize_keeps_the_previous_layout_and_leaves_no_files(tmp_path, monkeypatch):
    vecs = clustered(2000, 16, 3)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000, 1000])
    optimize(out, queries=50)                         # a flat layout first
    before = (out / store.MANIFEST).read_bytes()
    files_before = sorted(p.name for p in (out / "e").iterdir())

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_manifest", boom)
    with pytest.raises(OSError):
        optimize(out, layout="ivfpq", queries=50)
    monkeypatch.undo()
    assert (out / store.MANIFEST).read_bytes() == before
    assert sorted(p.name for p in (out / "e").iterdir()) == files_before
    assert Engine(out, device="cpu").shards.layouts["e"].entry.index_type == "flat"
    # files a killed optimize left behind (no manifest names them) go at the next optimize
    (out / "e" / "search-00007.ivfdata").write_bytes(b"x" * 10)
    (out / "e" / ".search-00008.parts-abc").mkdir()
    optimize(out, layout="ivfpq", target_recall=0.8, queries=50)
    entry = layouts_of(store.read_manifest(out))["e"]
    assert sorted(p.name for p in (out / "e").iterdir()) == sorted(
        ["shard-00000.faiss", "shard-00001.faiss", entry.file, entry.data_file])
    assert verify_index(out).ok


def test_ivfpq_pca_scans_an_uncentred_projection_that_keeps_inner_products(tmp_path):
    """ivfpq-pca's projection: the top eigenvectors of X^T X (no mean subtracted, no bias), orthonormal rows,
    the lists behind it inner-product; compressed write shards fall back to ivfpq (nothing exact to re-score)."""
    from retrieval.index.optimize import PCA_DIM, choose_layout, uncentred_pca

    vecs = clustered(3000, 256, 5) + 0.5 / 16        # a large common mean, as real embeddings have
    vecs = unit(vecs)
    transform = uncentred_pca(vecs, PCA_DIM)
    a = faiss.vector_to_array(transform.A).reshape(PCA_DIM, 256)
    assert not transform.have_bias and np.allclose(a @ a.T, np.eye(PCA_DIM), atol=1e-4)
    _, v = np.linalg.eigh(vecs.astype(np.float64).T @ vecs)
    top = v[:, ::-1][:, :PCA_DIM]                    # same subspace (eigenvector signs are arbitrary)
    assert np.allclose(a.T @ a, top @ top.T, atol=1e-3)
    projected = transform.apply(vecs[:50])
    assert np.allclose(projected, vecs[:50] @ a.T, atol=1e-5)
    # the common mean is not removed (a centred PCA drops it), so <Wx, Wq> keeps its share of every inner product
    mean = vecs.mean(axis=0)
    assert np.linalg.norm(a @ mean) > 0.99 * np.linalg.norm(mean)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1500, 1500])
    optimize(out, layout="ivfpq-pca", target_recall=0.9, queries=100)
    layout = read_layout(out, "e", layouts_of(store.read_manifest(out))["e"])
    assert isinstance(layout, faiss.IndexPreTransform) and layout.d == 256
    assert faiss.downcast_VectorTransform(layout.chain.at(0)).__class__ is faiss.LinearTransform
    ivf = faiss.extract_index_ivf(layout)
    assert ivf.d == PCA_DIM and ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    # the choice: auto beyond the HNSW range when ivfpq-fastscan's lists do not fit half the memory budget in
    # RAM (10M: 728 MB), projected when there are >= 2 * PCA_DIM dimensions
    assert choose_layout(10_000_000, 512, max_memory=405_000_000) == ("ivfpq-pca", f"UPCA{PCA_DIM},IVF16384,PQ32x8")
    assert choose_layout(10_000_000, 128, max_memory=405_000_000)[0] == "ivfpq"
    with pytest.raises(Exception, match="ivfpq-pca projects"):
        choose_layout(10_000_000, 64, requested="ivfpq-pca")
    compressed = build_index(tmp_path / "pq", {"e": vecs}, shard_sizes=[1500, 1500], factory="IVF16,PQ16x6",
                             index_type="ivfpq")
    info = optimize(compressed, layout="ivfpq-pca", target_recall=0.5, queries=50).encoders["e"]
    assert info["layout"] == "ivfpq" and not info["factory"].startswith("UPCA")


def test_candidates_are_rescored_a_block_of_queries_at_a_time_with_the_same_answers(tmp_path, monkeypatch):
    """A batch (the tuner's, dedup's) re-scores its candidates in blocks of ``RESCORE_ROWS`` rows: bounded
    memory (1,000 queries x 2,560 candidates x 512-d were 5.2 GB at once), the same scores and rows."""
    import retrieval.index.layout as layout_module

    vecs = clustered(3000, 32, 4)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1500, 1500])
    optimize(out, layout="ivfpq", target_recall=0.9, queries=100)
    engine = Engine(out, device="cpu")
    layout = engine.shards.layouts["e"]
    queries = clustered(37, 32, 8)
    whole = layout.search(queries, 10)
    seen = []
    exact = layout.exact_vectors
    layout.exact_vectors = lambda rows: seen.append(len(rows)) or exact(rows)
    monkeypatch.setattr(layout_module, "RESCORE_ROWS", 100)
    blocks = layout.search(queries, 10)
    k_factor = layout.entry.params["k_factor"]
    assert max(seen) <= max(100, 10 * k_factor) and len(seen) > 1
    np.testing.assert_array_equal(blocks[1], whole[1])
    np.testing.assert_array_equal(blocks[0], whole[0])
    # and they are the exact inner products of the rows found
    found = whole[1][whole[1] >= 0]
    assert np.allclose(np.sort(whole[0][whole[1] >= 0]), np.sort(np.einsum(
        "ij,ij->i", vecs[found], np.repeat(queries, (whole[1] >= 0).sum(axis=1), axis=0))), atol=1e-5)
    engine.close()
