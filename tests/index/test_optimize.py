"""`loupe optimize`: one searchable index per encoder over the write shards, recall-targeted parameters,
delta shards searched beside it, pruned rows masked, atomic switch, the writer's lock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _engine_helpers import build_index, fake_id, unit

from retrieval.engine.engine import Engine
from retrieval.errors import IndexLockedError, InvalidQueryError
from retrieval.index import store, vector_files
from retrieval.index.layout import LAYOUT_KEY, layouts_of
from retrieval.index.optimize import needs_optimize, optimize
from retrieval.index.tuning import MARGIN, exact_neighbours, recall_at_k

ROOT = Path(__file__).resolve().parents[2]


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 24 fixed centres (the same for every seed: queries of another seed are unseen
    samples of the same collection)."""
    centres = unit(np.random.default_rng(1234 + dim).standard_normal((24, dim)))
    rng = np.random.default_rng(seed)
    return unit(centres[rng.integers(0, 24, n)] + 0.35 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3)


def brute(vecs: np.ndarray, q: np.ndarray, k: int, keep: np.ndarray | None = None) -> list[int]:
    scores = vecs @ q
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(i) for i in order if np.isfinite(scores[i])]


def ids_of(hits) -> list[str]:
    return [h.id for h in hits]


@pytest.fixture()
def six_shards(tmp_path):
    vecs = clustered(1200, 24, 0)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[200] * 6)
    return out, vecs


def test_flat_layout_equals_exact_search_and_replaces_the_fan_out(six_shards):
    out, vecs = six_shards
    summary = optimize(out, queries=100)
    info = summary.encoders["e"]
    assert info["layout"] == "flat" and info["recall@10"] == 1.0 and info["params"] == {}
    manifest = store.read_manifest(out)
    layout = layouts_of(manifest)["e"]
    assert [s for s, _ in layout.shards] == [s.name for s in manifest.shards]
    assert (out / "e" / layout.file).is_file()
    engine = Engine(out, device="cpu")
    searcher = engine.shards.layouts["e"]
    assert searcher.covered == set(range(6))
    calls = []
    for index in engine.shards.indexes["e"]:             # no write shard is searched any more
        original = index.search
        index.search = lambda *a, _o=original, **kw: calls.append(1) or _o(*a, **kw)
    for qi in range(0, 1200, 97):
        q = vecs[qi] + 0.05
        got = ids_of(engine.search_vector("e", q, 10))
        assert got == [fake_id(i) for i in brute(vecs, unit(q)[0] if unit(q).ndim > 1 else unit(q), 10)]
    assert calls == []


def test_hnsw_layout_reaches_the_target_recall_on_unseen_queries(tmp_path):
    vecs = clustered(6000, 32, 1)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000] * 6, factory="HNSW32,Flat", index_type="hnsw")
    summary = optimize(out, layout="hnsw", target_recall=0.95, queries=300)
    info = summary.encoders["e"]
    assert info["layout"] == "hnsw" and info["reached"] and info["recall@10"] >= 0.95
    assert set(info["params"]) == {"efSearch"}
    tuned = layouts_of(store.read_manifest(out))["e"].tuned
    assert tuned["params"] == info["params"] and tuned["target"] == 0.95
    # the chosen efSearch is the cheapest that reached the target with its margin: every cheaper one fell short
    goal = 0.95 + MARGIN * 0.05
    assert info["recall@10"] >= goal
    cheaper = [t for t in tuned["tried"] if t["params"]["efSearch"] < info["params"]["efSearch"]]
    assert all(t["recall"] < goal for t in cheaper)
    # held-out queries (not made from indexed vectors) through the engine: close to the measured recall
    engine = Engine(out, device="cpu")
    queries = clustered(200, 32, 99)
    _, truth = exact_neighbours([vecs], queries, 10)
    found = np.array([[int(engine.records.offsets[h.shard]) + h.row for h in engine.search_vector("e", q, 10)]
                      for q in queries])
    assert recall_at_k(found, truth) >= 0.9


def test_hnsw_layout_inserts_the_held_out_rows_last_and_maps_them_back(tmp_path):
    vecs = clustered(3000, 24, 3)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000] * 3, factory="HNSW32,Flat", index_type="hnsw")
    summary = optimize(out, layout="hnsw", queries=200)
    assert summary.encoders["e"]["measured_on"] == "200 held-out queries"
    entry = layouts_of(store.read_manifest(out))["e"]
    held = np.array(entry.held_out)
    assert len(held) == 200 and np.all(np.diff(held) > 0)
    assert entry.tuned["method"] == "held_out" and entry.tuned["queries"] == 200
    engine = Engine(out, device="cpu")
    searcher = engine.shards.layouts["e"]
    # every layout row is the vector of the global row it maps to; the held-out rows are the last ones
    assert sorted(searcher.to_global.tolist()) == list(range(3000))
    assert searcher.to_global[-200:].tolist() == held.tolist()
    stored = searcher.index.reconstruct_n(0, searcher.index.ntotal)
    assert np.allclose(stored, vecs[searcher.to_global], atol=1e-6)
    # a held-out picture's own vector finds itself (its id), as any other's
    for r in list(held[:20]) + [0, 1500, 2999]:
        hit = engine.search_vector("e", vecs[r], 1, params={"efSearch": 256})[0]
        assert hit.id == fake_id(int(r)) and hit.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("held_out", [[5, 3], [1, 1], [0, 3000], ["7"], 12])
def test_a_damaged_held_out_list_is_refused(tmp_path, held_out):
    from retrieval.errors import IndexFormatError

    vecs = clustered(3000, 24, 3)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1500] * 2)
    optimize(out, layout="hnsw", queries=100)
    manifest = store.read_manifest(out)
    manifest.extra[LAYOUT_KEY]["e"]["held_out"] = held_out
    store.write_manifest(out, manifest)
    with pytest.raises(IndexFormatError, match="held_out"):
        Engine(out, device="cpu")


def test_ivfpq_layout_rescores_candidates_exactly(tmp_path):
    vecs = clustered(4000, 32, 2)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000] * 4)
    summary = optimize(out, layout="ivfpq", target_recall=0.9, queries=200)
    info = summary.encoders["e"]
    assert info["layout"] == "ivfpq" and info["factory"].startswith("IVF") and "k_factor" in info["params"]
    engine = Engine(out, device="cpu")
    q = unit(vecs[5] + 0.1)
    hits = engine.search_vector("e", q, 10)
    # scores are exact inner products with the stored vectors, not PQ approximations
    for h in hits:
        row = int(engine.records.offsets[h.shard]) + h.row
        assert h.score == pytest.approx(float(vecs[row] @ q), abs=1e-5)


def test_hnsw_pca_layout_walks_a_projected_graph_and_rescores_exactly(tmp_path):
    import faiss

    from retrieval.index.optimize import PCA_DIM, choose_layout

    vecs = clustered(3000, 256, 4)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000] * 3)
    summary = optimize(out, layout="hnsw-pca", target_recall=0.95, queries=200)
    info = summary.encoders["e"]
    assert info["layout"] == "hnsw-pca" and info["factory"] == f"PCA{PCA_DIM},HNSW32,Flat"
    assert info["reached"] and info["recall@10"] >= 0.95 and info["measured_on"] == "200 held-out queries"
    assert {"efSearch", "k_factor"} >= set(info["params"]) >= {"efSearch"}
    entry = layouts_of(store.read_manifest(out))["e"]
    assert entry.rescore and len(entry.held_out) == 200
    engine = Engine(out, device="cpu")
    searcher = engine.shards.layouts["e"]
    assert isinstance(searcher.index, faiss.IndexPreTransform) and searcher.index.d == 256
    assert faiss.downcast_index(searcher.index.index).d == PCA_DIM
    assert sorted(searcher.to_global.tolist()) == list(range(3000))
    # unseen queries: recall against brute force, scores exact inner products (not projected distances)
    queries = clustered(100, 256, 98)
    _, truth = exact_neighbours([vecs], queries, 10)
    found = []
    for q in queries:
        hits = engine.search_vector("e", q, 10)
        rows = [int(engine.records.offsets[h.shard]) + h.row for h in hits]
        assert [h.score for h in hits] == pytest.approx([float(vecs[r] @ q) for r in rows], abs=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        found.append(rows)
    assert recall_at_k(np.array(found), truth) >= 0.9
    # a held-out picture's own vector finds itself; a filter is exact
    for r in list(entry.held_out[:10]) + [0, 2999]:
        assert engine.search_vector("e", vecs[r], 1)[0].id == fake_id(int(r))
    keep = np.zeros(3000, bool)
    keep[::7] = True
    q = queries[0]
    hits = engine.search_vector("e", q, 5, filter={"id": {"in": [fake_id(int(i)) for i in np.flatnonzero(keep)]}},
                                params={"efSearch": 1024, "k_factor": 8})
    assert [h.id for h in hits] == [fake_id(i) for i in brute(vecs, q, 5, keep)]
    # auto picks it for large high-dimensional collections only; too few dimensions is a clear error
    assert choose_layout(1_000_000, 512)[0] == "hnsw-pca" and choose_layout(1_000_000, 128)[0] == "hnsw"
    assert choose_layout(200_000, 512)[0] == "hnsw"
    with pytest.raises(Exception, match="hnsw-pca"):
        choose_layout(10_000, 64, requested="hnsw-pca")


def test_delta_shards_are_searched_beside_the_layout_and_pruned_rows_masked(six_shards):
    out, vecs = six_shards
    optimize(out, queries=50)
    manifest = store.read_manifest(out)
    # a later `loupe index` run: one new shard; and a pruned shard-00002 replaced by a subset under a new name
    extra = clustered(100, 24, 5)
    rows = [{"id": fake_id(5000 + i), "source": f"/new/{i}.jpg"} for i in range(100)]
    store.write_metadata(out, "shard-00006", rows)
    from _engine_helpers import make_index
    vector_files.write_vectors(out, "e", "shard-00006", make_index("Flat", extra))
    keep = list(range(0, 200, 2))                         # shard-00002 keeps its even rows
    old_rows = store.read_metadata(out, "shard-00002").to_pylist()
    store.write_metadata(out, "shard-00007", [old_rows[i] for i in keep])
    vector_files.write_vectors(out, "e", "shard-00007", make_index("Flat", vecs[400:600][keep]))
    manifest.shards = [s for s in manifest.shards if s.name != "shard-00002"] + [
        store.ShardEntry("shard-00006", 100), store.ShardEntry("shard-00007", len(keep))]
    store.write_manifest(out, manifest)
    (out / "meta" / "shard-00002.parquet").unlink()
    (out / "e" / "shard-00002.faiss").unlink()

    engine = Engine(out, device="cpu")
    searcher = engine.shards.layouts["e"]
    assert len(searcher.covered) == 5 and not searcher.all_live
    ids, all_vecs = [], []
    for _, v, shard_ids in engine.all_vectors("e"):
        ids += shard_ids
        all_vecs.append(v)
    all_vecs = np.concatenate(all_vecs)
    removed = {fake_id(400 + i) for i in range(1, 200, 2)}
    for qv in (vecs[401], vecs[402], extra[3], vecs[7]):
        got = ids_of(engine.search_vector("e", qv, 15))
        assert got == [ids[i] for i in brute(all_vecs, qv, 15)]
        assert not removed & set(got) and len(set(got)) == len(got)
    # a filter applies to the layout's rows and to the delta alike
    flt = {"id": {"in": [ids[i] for i in range(0, len(ids), 3)]}}
    keepmask = np.zeros(len(ids), bool)
    keepmask[::3] = True
    got = ids_of(engine.search_vector("e", vecs[10], 10, filter=flt))
    assert got == [ids[i] for i in brute(all_vecs, vecs[10], 10, keepmask)]
    assert needs_optimize(store.read_manifest(out), min_images=1, min_delta_shards=2)
    # the next optimize folds everything in and deletes the previous layout file
    old_file = out / "e" / layouts_of(store.read_manifest(out))["e"].file
    optimize(out, queries=50)
    assert not old_file.exists()
    assert Engine(out, device="cpu").shards.layouts["e"].all_live


def test_a_crash_during_optimize_keeps_the_previous_layout(six_shards, monkeypatch):
    out, _ = six_shards
    optimize(out, queries=50)
    before = (out / store.MANIFEST).read_bytes()

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_manifest", boom)
    with pytest.raises(OSError):
        optimize(out, queries=50, layout="hnsw")
    assert (out / store.MANIFEST).read_bytes() == before
    monkeypatch.undo()
    engine = Engine(out, device="cpu")
    assert engine.shards.layouts["e"].entry.index_type == "flat"


def test_optimize_refuses_a_running_writer_and_bad_targets(six_shards):
    from indexer.lock import IndexLock

    out, _ = six_shards
    with IndexLock(out):
        with pytest.raises(IndexLockedError):
            optimize(out)
    for bad in (0, -0.1, 1.5, "x"):
        with pytest.raises(InvalidQueryError):
            optimize(out, target_recall=bad)
    assert LAYOUT_KEY not in store.read_manifest(out).extra


def test_cli_optimize_and_info(six_shards):
    out, _ = six_shards

    def run(*a):
        return subprocess.run([sys.executable, "-m", "loupe", *a], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)

    bad = run("optimize", str(out), "--target-recall", "1.5")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "(0, 1]" in bad.stderr
    ok = run("optimize", str(out), "--queries", "50")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["encoders"]["e"]["layout"] == "flat"
    info = run("info", str(out), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["images"] == 1200 and data["encoders"]["e"]["layout"]["recall@10"] == 1.0
    assert data["encoders"]["e"]["layout"]["measured_on"] == {"queries": 50, "method": "leave_one_out"}
    text = run("info", str(out))
    assert "layout: flat" in text.stdout and "on 50 leave-one-out queries" in text.stdout


def test_request_params_are_checked():
    from retrieval.engine.request import SearchRequest
    from retrieval.errors import InvalidFieldError

    SearchRequest(text="x", params={"efSearch": 64, "k_factor": 4})
    with pytest.raises(InvalidFieldError, match="did you mean 'efSearch'"):
        SearchRequest(text="x", params={"efsearch": 64})
    with pytest.raises(InvalidQueryError, match="1..100000"):
        SearchRequest(text="x", params={"nprobe": 0})


def test_loupe_index_optimizes_at_the_end_when_asked(tmp_path, photo_dir, tiny_clip):
    from _indexer_helpers import index

    out = tmp_path / "idx"
    summary = index([photo_dir], out, [tiny_clip], shard_size=3, commit_seconds=None, optimize="never").to_json()
    assert "optimized" not in summary and "optimize" not in summary["stages"]
    assert LAYOUT_KEY not in store.read_manifest(out).extra
    summary = index([photo_dir], out, [tiny_clip], shard_size=3, commit_seconds=None, optimize="always").to_json()
    assert summary["optimized"]["encoders"][tiny_clip]["layout"] == "flat"
    assert summary["stages"]["optimize"] > 0
    manifest = store.read_manifest(out)
    assert len(manifest.shards) >= 2
    engine = Engine(out, device="cpu")
    assert engine.shards.layouts[tiny_clip].covered == set(range(len(manifest.shards)))
    # the default (auto) does nothing on a small index
    assert not needs_optimize(manifest)


def test_bring_your_own_embeddings(tmp_path):
    """`loupe index VECTORS.parquet --vectors COLUMN --encoder NAME`: rows normalised, bad rows reported,
    metadata kept, ids stable (a re-run resumes), the registry encoder's dimension enforced."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from _indexer_helpers import index

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((50, 16)).astype(np.float32)
    column = [v.tolist() for v in vecs] + [[1.0] * 15, [float("nan")] * 16, [0.0] * 16, None]
    table = pa.table({"path": [f"/photos/{i}.jpg" for i in range(54)], "emb": column,
                      "caption": [f"photo {i}" for i in range(54)], "year": list(range(1990, 2044))})
    src = tmp_path / "vectors.parquet"
    pq.write_table(table, src)
    out = tmp_path / "idx"
    summary = index([src], out, ["my-model"], vectors="emb", shard_size=20, optimize="never").to_json()
    assert summary["indexed"] == 50 and summary["shards"] == 3
    reasons = {f["source"]: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {f"/photos/{i}.jpg" for i in (50, 51, 52, 53)}
    assert "15 dimensions" in reasons["/photos/50.jpg"] and "NaN" in reasons["/photos/51.jpg"]
    engine = Engine(out, device="cpu")
    assert engine.manifest.encoders["my-model"].modalities == ["vector"] and engine.text_encoder is None
    q = unit(vecs[7])
    hits = engine.search_vector("my-model", q, 3)
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    meta = engine.describe_hit(hits[0])
    assert meta["caption"] == "photo 7" and "1997" in json.dumps(meta)
    again = index([src], out, ["my-model"], vectors="emb", shard_size=20, optimize="never").to_json()
    assert again["indexed"] == 0 and again["skipped"] == 50
    with pytest.raises(Exception, match="512"):
        index([src], tmp_path / "other", ["clip-vit-b-32"], vectors="emb")
    with pytest.raises(Exception, match="no column 'vec'"):
        index([src], tmp_path / "third", ["x"], vectors="vec")


def test_the_layout_file_is_checksummed_and_verified(six_shards):
    from retrieval.index.verify import verify_index

    out, _ = six_shards
    optimize(out, queries=50)
    manifest = store.read_manifest(out)
    layout = layouts_of(manifest)["e"]
    rel = f"e/{layout.file}"
    assert manifest.files[rel]["size"] == (out / rel).stat().st_size
    assert verify_index(out).ok
    path = out / rel
    data = bytearray(path.read_bytes())
    data[-64:] = b"\x7f" * 64                       # garbage in the last vectors, same size
    path.write_bytes(bytes(data))
    report = verify_index(out)
    assert not report.ok and any(p.file == rel for p in report.problems)
    with pytest.raises(Exception, match="norm|SHA|damaged|optimize"):
        Engine(out, device="cpu")


def test_the_ivf_training_sample_grows_with_the_lists_and_is_the_sampled_rows(monkeypatch):
    """A fixed 100,000-row sample capped 10M vectors at 2,048 lists (fit_factory: 39 rows per list); the
    sample now grows with nlist, and the rows read from the chunks are exactly the sampled ones."""
    import faiss

    from indexer.index_types import fit_factory
    from retrieval.index import optimize as opt
    from retrieval.index.tuning import sample_rows

    assert opt.train_size("IVF16384,PQ32x8", 10_000_000) == opt.TRAIN_PER_LIST * 16384
    assert fit_factory("IVF16384,PQ32x8", opt.train_size("IVF16384,PQ32x8", 10_000_000)) == "IVF16384,PQ32x8"
    assert opt.train_size("IVF1024,PQ32x8", 10_000_000) == opt.TRAIN_SAMPLE
    assert opt.train_size("IVF16384,PQ32x8", 50_000) == 50_000
    assert opt.train_size("PCA128,HNSW32,Flat", 10_000_000) == opt.TRAIN_SAMPLE
    assert opt.train_size("UPCA128,IVF16384,PQ32x8", 10_000_000) == opt.TRAIN_PER_LIST * 16384   # behind a projection

    monkeypatch.setattr(opt, "TRAIN_SAMPLE", 200)
    monkeypatch.setattr(opt, "TRAIN_PER_LIST", 40)          # 8 lists -> 320 of the 900 rows
    vecs = unit(np.random.default_rng(3).standard_normal((900, 16)).astype(np.float32))
    chunks = lambda: (vecs[a:a + 130] for a in range(0, 900, 130))   # noqa: E731 - uneven chunks on purpose
    index, factory = opt.train_index("IVF8,PQ4x4", 16, chunks, 900)
    assert factory == "IVF8,PQ4x4" and index.is_trained
    rows = sample_rows(900, 320, seed=1)
    assert len(rows) == 320
    ref = faiss.index_factory(16, "IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    ref.train(vecs[rows])                  # faiss' k-means is seeded: the same sample gives the same centroids
    got = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 8)
    want = faiss.extract_index_ivf(ref).quantizer.reconstruct_n(0, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)
