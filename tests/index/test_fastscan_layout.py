"""``ivfpq-fastscan``: 4-bit PQ codes scanned with faiss' SIMD fast-scan kernels behind the uncentred 128-d
projection, the lists held in RAM, the top candidates re-scored exactly from the write shards. Checked against
the same faiss index searched directly plus a brute-force re-scoring, and against exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from _engine_helpers import build_index, fake_id, unit

from retrieval.engine.engine import Engine
from retrieval.index import store
from retrieval.index.layout import layouts_of
from retrieval.index.optimize import PCA_DIM, choose_layout, fastscan_bytes, optimize
from retrieval.index.tuning import exact_neighbours, recall_at_k
from retrieval.index.verify import verify_index


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    centres = unit(np.random.default_rng(55 + dim).standard_normal((24, dim)))
    rng = np.random.default_rng(seed)
    return unit(centres[rng.integers(0, 24, n)] + 0.3 * rng.standard_normal((n, dim)))


def reference(index, vecs: np.ndarray, q: np.ndarray, k: int, nprobe: int, k_factor: int) -> list[int]:
    """faiss' own search of the layout index for k * k_factor candidates, re-scored by brute force."""
    params = faiss.SearchParametersPreTransform(index_params=faiss.SearchParametersIVF(nprobe=nprobe))
    _, cand = index.search(q[None].astype(np.float32), k * k_factor, params=params)
    cand = cand[0][cand[0] >= 0]
    scores = vecs[cand] @ q
    return [int(cand[i]) for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.fixture(scope="module")
def fastscan_index(tmp_path_factory):
    vecs = clustered(4000, 256, 3)
    out = build_index(tmp_path_factory.mktemp("fs") / "idx", {"e": vecs}, shard_sizes=[1000] * 4)
    summary = optimize(out, layout="ivfpq-fastscan", target_recall=0.95, queries=200)
    return out, vecs, summary.encoders["e"]


def test_the_layout_scans_4_bit_codes_in_ram_and_rescores_exactly(fastscan_index):
    out, vecs, info = fastscan_index
    assert info["layout"] == "ivfpq-fastscan"
    assert info["factory"].startswith(f"UPCA{PCA_DIM},IVF") and info["factory"].endswith(f",PQ{PCA_DIM}x4fs")
    assert info["reached"] and {"nprobe", "k_factor"} == set(info["params"])
    entry = layouts_of(store.read_manifest(out))["e"]
    assert entry.rescore and entry.data_file is None          # the lists live in the index file, read into RAM
    assert verify_index(out).ok                               # readable, every row once in the lists
    engine = Engine(out, device="cpu")
    layout = engine.shards.layouts["e"]
    ivf = faiss.downcast_index(faiss.extract_index_ivf(layout.index))
    assert isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.d == PCA_DIM and ivf.pq.nbits == 4
    assert ivf.metric_type == faiss.METRIC_INNER_PRODUCT and ivf.ntotal == 4000
    nprobe, k_factor = entry.params["nprobe"], entry.params["k_factor"]
    queries = clustered(60, 256, 91)
    found = []
    for q in queries:
        hits = engine.search_vector("e", q, 10)
        rows = [int(engine.records.offsets[h.shard]) + h.row for h in hits]
        # the engine's answer is faiss' candidates re-scored exactly; scores are exact inner products
        assert rows == reference(layout.index, vecs, q, 10, nprobe, k_factor)
        assert [h.score for h in hits] == pytest.approx([float(vecs[r] @ q) for r in rows], abs=1e-5)
        found.append(rows)
    _, truth = exact_neighbours([vecs], queries, 10)
    assert recall_at_k(np.array(found), truth) >= 0.85
    # a picture's own vector finds itself; a filter (id selector through the fast-scan kernels) is exact
    for r in (0, 1999, 3999):
        assert engine.search_vector("e", vecs[r], 1)[0].id == fake_id(r)
    keep = np.zeros(4000, bool)
    keep[::9] = True
    q = queries[0]
    hits = engine.search_vector("e", q, 5, filter={"id": {"in": [fake_id(int(i)) for i in np.flatnonzero(keep)]}},
                                params={"nprobe": 64, "k_factor": 32})
    scores = np.where(keep, vecs @ q, -np.inf)
    assert [h.id for h in hits] == [fake_id(int(i)) for i in np.argsort(-scores, kind="stable")[:5]]


def test_two_threads_give_the_same_answers_one_query_or_a_batch(fastscan_index):
    """One query or a batch, one thread or two: the same candidates, the same exact scores."""
    out, vecs, _ = fastscan_index
    engine = Engine(out, device="cpu")
    layout = engine.shards.layouts["e"]
    queries = clustered(20, 256, 92)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = [layout.search(q[None], 10) for q in queries]
        faiss.omp_set_num_threads(2)
        two = [layout.search(q[None], 10) for q in queries]
        batch = layout.search(queries, 10)
    finally:
        faiss.omp_set_num_threads(threads)
    for (s1, r1), (s2, r2) in zip(one, two):
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(s1, s2, atol=1e-6)
    np.testing.assert_array_equal(batch[1], np.concatenate([r for _, r in one]))
    rows = batch[1][batch[1] >= 0]
    assert np.allclose(batch[0][batch[1] >= 0], np.einsum(
        "ij,ij->i", vecs[rows], np.repeat(queries, (batch[1] >= 0).sum(axis=1), axis=0)), atol=1e-5)


def test_auto_picks_it_when_its_lists_fit_the_memory_budget(tmp_path):
    assert choose_layout(10_000_000, 512) == ("ivfpq-fastscan", f"UPCA{PCA_DIM},IVF16384,PQ{PCA_DIM}x4fs")
    assert choose_layout(10_000_000, 128) == ("ivfpq-fastscan", "IVF16384,PQ128x4fs")    # no projection below 256-d
    assert choose_layout(10_000, 33, requested="ivfpq-fastscan")[1] == "IVF512,PQ33x4fs"   # one dim per code
    need = fastscan_bytes(10_000_000, 512)
    assert need == 10_000_000 * (64 + 8) + 16384 * PCA_DIM * 4
    # half the budget: the engine's ids and metadata need the rest (100M on a 24 GB box: on disk)
    assert choose_layout(10_000_000, 512, max_memory=2 * need)[0] == "ivfpq-fastscan"
    assert choose_layout(10_000_000, 512, max_memory=2 * need - 2)[0] == "ivfpq-pca"        # on disk, mapped
    assert choose_layout(100_000_000, 512, max_memory=12 * 2**30)[0] == "ivfpq-pca"
    assert choose_layout(1_000_000, 512)[0] == "hnsw-pca"                                   # HNSW range unchanged
    # compressed write shards: nothing exact to re-score 4-bit candidates from, so ivfpq's 8-bit codes
    vecs = clustered(3000, 32, 4)
    compressed = build_index(tmp_path / "pq", {"e": vecs}, shard_sizes=[1500, 1500], factory="IVF16,PQ16x6",
                             index_type="ivfpq")
    info = optimize(compressed, layout="ivfpq-fastscan", target_recall=0.5, queries=50).encoders["e"]
    assert info["layout"] == "ivfpq" and not info["factory"].endswith("fs")


def test_a_tiny_training_sample_falls_back_to_codes_it_can_train():
    from indexer.index_types import fit_factory

    assert fit_factory("UPCA128,IVF16384,PQ128x4fs", 1_000_000) == "UPCA128,IVF16384,PQ128x4fs"
    assert fit_factory("IVF1024,PQ64x4fs", 4000) == "IVF64,PQ64x4fs"
    assert fit_factory("IVF1024,PQ64x4fs", 10) == "IVF1,PQ64x3"        # < 16 rows: not enough for 4-bit codebooks
