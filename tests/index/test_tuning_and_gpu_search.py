"""Recall-targeted tuning (retrieval.index.tuning) and the torch exact search used on GPUs
(retrieval.index.torch_search), checked on the CPU against faiss' exact search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from _engine_helpers import build_index, unit

from retrieval.engine.engine import Engine
from retrieval.index.torch_search import TorchFlatSearcher
from retrieval.index.tuning import (
    K_FACTOR_GRID,
    MARGIN,
    drop_own_rows,
    exact_neighbours,
    held_out_rows,
    recall_at_k,
    tune,
)


def data(n=3000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((16, dim)))
    return unit(centres[rng.integers(0, 16, n)] + rng.standard_normal((n, dim)) * 0.25)


def test_exact_neighbours_streams_chunks_like_one_flat_index():
    vecs = data()
    q = data(50, seed=3)
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs)
    d_ref, i_ref = flat.search(q, 10)
    d, i = exact_neighbours([vecs[:1000], vecs[1000:1001], vecs[1001:]], q, 10)
    assert np.array_equal(i, i_ref) and np.allclose(d, d_ref, atol=1e-6)


def test_recall_at_k_counts_the_true_top_k():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_at_k(found, truth, 4) == pytest.approx((2 + 4) / 8)


def test_exact_neighbours_leaves_out_excluded_rows():
    vecs = data()
    q = data(40, seed=4)
    exclude = np.array([5, 999, 1000, 1001, 2500])
    keep = np.setdiff1d(np.arange(len(vecs)), exclude)
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs[keep])
    d_ref, i_ref = flat.search(q, 10)
    d, i = exact_neighbours([vecs[:1000], vecs[1000:1001], vecs[1001:]], q, 10, exclude=exclude)
    assert np.array_equal(i, keep[i_ref]) and np.allclose(d, d_ref, atol=1e-6)
    # the queries' own vectors: excluded, each one's nearest is another row
    _, own = exact_neighbours([vecs], vecs[exclude], 1, exclude=exclude)
    assert not np.isin(own, exclude).any()


def test_held_out_rows_and_drop_own_rows():
    rows = held_out_rows(100_000, 1000, seed=3)
    assert len(rows) == 1000 and np.all(np.diff(rows) > 0) and rows[-1] < 100_000
    assert len(held_out_rows(5000, 1000)) == 500          # at most a tenth of the collection
    assert len(held_out_rows(15, 1000)) == 0               # too small to hold anything out
    found = np.array([[7, 3, 4], [1, 2, 3], [9, 8, 5]])
    assert drop_own_rows(found, np.array([7, 5, 8]), 2).tolist() == [[3, 4], [1, 2], [9, 5]]


def hnsw_without(vecs, held):
    index = faiss.index_factory(vecs.shape[1], "HNSW8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 16
    rest = np.setdiff1d(np.arange(len(vecs)), held)
    index.add(vecs[rest])
    return index, rest


def test_tune_picks_the_cheapest_efsearch_reaching_the_target():
    vecs = data(4000)
    held = held_out_rows(len(vecs), 300, seed=2)
    index, rest = hnsw_without(vecs, held)
    queries = vecs[held]
    _, truth = exact_neighbours([vecs], queries, 10, exclude=held)

    def search(q, k, params):
        index.hnsw.efSearch = params.get("efSearch", 16)
        return rest[index.search(q, k)[1]]

    tuned = tune(search, index, queries, truth, target=0.96)
    goal = 0.96 + MARGIN * 0.04
    assert tuned.reached and tuned.recall >= goal
    ef = tuned.params["efSearch"]
    index.hnsw.efSearch = ef
    assert recall_at_k(rest[index.search(queries, 10)[1]], truth) == pytest.approx(tuned.recall)
    assert all(t["recall"] < goal for t in tuned.tried if t["params"]["efSearch"] < ef)


def test_held_out_recall_predicts_unseen_queries_where_indexed_vectors_do_not():
    """Why the sample is held out of the graph: an indexed vector as a query is easy for HNSW (the search
    reaches it and follows its links), so at a low efSearch its recall overstates what a new query gets."""
    both = unit(np.random.default_rng(1).standard_normal((6400, 32)).astype(np.float32))
    vecs, unseen = both[:6000], both[6000:]                # one distribution: 6,000 indexed, 400 never
    held = held_out_rows(len(vecs), 400, seed=5)
    index, rest = hnsw_without(vecs, held)
    index.hnsw.efSearch = 8
    _, t_held = exact_neighbours([vecs], vecs[held], 10, exclude=held)
    _, t_unseen = exact_neighbours([vecs], unseen, 10, exclude=held)
    r_held = recall_at_k(rest[index.search(vecs[held], 10)[1]], t_held)
    r_unseen = recall_at_k(rest[index.search(unseen, 10)[1]], t_unseen)
    own = rest[:400]                                        # indexed vectors, leave-one-out
    _, t_own = exact_neighbours([vecs], vecs[own], 11)
    r_own = recall_at_k(drop_own_rows(rest[index.search(vecs[own], 11)[1]], own, 10), drop_own_rows(t_own, own, 10))
    assert abs(r_held - r_unseen) < 0.05                   # measured 0.304 vs 0.286
    assert r_own > r_unseen + 0.1                          # measured 0.522: would tune far too low


def test_tune_leave_one_out_drops_each_querys_own_row():
    vecs = data(4000)
    index = faiss.index_factory(vecs.shape[1], "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add(vecs)
    own = np.arange(0, 4000, 20)
    _, truth = exact_neighbours([vecs], vecs[own], 11)
    truth = drop_own_rows(truth, own, 10)
    assert not (truth == own[:, None]).any()
    seen = []

    def search(q, k, params):
        index.nprobe = params.get("nprobe", 1)
        seen.append(k)
        return index.search(q, k)[1]

    tuned = tune(search, index, vecs[own], truth, target=0.9, own=own)
    assert set(seen) == {11}                                # k + 1: room for the own row
    index.nprobe = tuned.params["nprobe"]
    found = index.search(vecs[own], 11)[1]
    assert recall_at_k(drop_own_rows(found, own, 10), truth) == pytest.approx(tuned.recall)
    # without dropping it, the own row (always found first) would take a true neighbour's place
    assert recall_at_k(found[:, :10], truth) < tuned.recall


@pytest.mark.parametrize("half,rescore", [(False, None), (True, None), (False, True)])
def test_torch_flat_search_equals_faiss_exact(half, rescore):
    """float32 (exact matmul), float16 + re-scoring from the stored vectors, float32 + re-scoring from the
    copy itself (what a GPU with room for float32 does: its matmul may run in TF32)."""
    vecs = data(2000, 48)
    q = data(20, 48, seed=9)
    flat = faiss.IndexFlatIP(48)
    flat.add(vecs)
    d_ref, i_ref = flat.search(q, 10)
    chunks = [vecs[:700], vecs[700:]]
    searcher = TorchFlatSearcher(chunks, "cpu", half=half, exact_vectors=(lambda rows: vecs[rows]) if half else None,
                                 rescore=rescore)
    assert searcher.rescore == (half or bool(rescore))
    assert np.array_equal(searcher.matrix.float().numpy()[700:], vecs[700:].astype(np.float16 if half else np.float32))
    d, i = searcher.search(q, 10)
    assert np.array_equal(i, i_ref)
    assert np.allclose(d, d_ref, atol=1e-5)
    mask = np.zeros(2000, bool)
    mask[::7] = True
    d, i = searcher.search(q, 10, mask)
    sel = faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
    d_ref, i_ref = flat.search(q, 10, params=faiss.SearchParameters(sel=sel))
    assert np.array_equal(i, i_ref)


@pytest.mark.parametrize("half,rescore", [(False, None), (True, None), (False, True)])
def test_torch_flat_search_in_blocks_equals_one_block(monkeypatch, half, rescore):
    """A large batch goes through the collection in blocks (the score buffer stays bounded); the merged
    answer, a filter across block edges, and the re-scoring of many queries at once equal faiss' exact search."""
    from retrieval.index import torch_search

    vecs = data(3000, 32)
    q = data(300, 32, seed=4)
    flat = faiss.IndexFlatIP(32)
    flat.add(vecs)
    monkeypatch.setattr(torch_search, "SCORE_BYTES", 300 * 4 * 700)     # 700 rows a block for 300 queries
    monkeypatch.setattr(torch_search, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(torch_search, "RESCORE_ROWS", 1000)             # re-scored a few queries at a time
    assert torch_search.block_rows(300, 4) == 700 and torch_search.block_rows(300, 2) == 1400
    searcher = TorchFlatSearcher([vecs[:1000], vecs[1000:]], "cpu", half=half, rescore=rescore,
                                 exact_vectors=(lambda rows: vecs[rows]) if half else None)
    d_ref, i_ref = flat.search(q, 10)
    d, i = searcher.search(q, 10)
    assert np.array_equal(i, i_ref)
    assert np.allclose(d, d_ref, atol=1e-5)
    mask = np.zeros(3000, bool)
    mask[690:710] = True                                                # straddles the first block edge
    mask[2999] = True
    d, i = searcher.search(q, 25, mask)
    sel = faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
    d_ref, i_ref = flat.search(q, 25, params=faiss.SearchParameters(sel=sel))
    assert np.array_equal(i[:, :21], i_ref[:, :21]) and (i[:, 21:] == -1).all()
    assert np.allclose(d[:, :21], d_ref[:, :21], atol=1e-5)


def test_rescoring_on_the_device_replaces_matmul_scores_with_exact_ones():
    import torch

    vecs, q = data(50, 8), data(3, 8, seed=2)
    searcher = TorchFlatSearcher([vecs], "cpu", half=False, rescore=True)
    rows = torch.tensor([[4, 9, 1], [0, 2, 3], [7, 7, 5]])
    rough = torch.full((3, 3), 0.5)
    rough[2, 2] = float("-inf")                                   # a filtered-out candidate stays out
    got = searcher._rescore_on_device(torch.from_numpy(q), rough, rows).numpy()
    want = np.einsum("qfd,qd->qf", vecs[rows.numpy()], q)
    assert np.allclose(got[np.isfinite(got)], want[np.isfinite(got)], atol=1e-6)
    assert np.isneginf(got[2, 2]) and np.isfinite(got).sum() == 8


def test_float32_copy_only_where_it_fits():
    from retrieval.index import torch_search

    assert not torch_search.fits_float32(1, "cpu")              # not a CUDA device: the smaller copy
    assert TorchFlatSearcher([data(10, 4)], "cpu").half is False  # torch-cpu (tests): float32, no re-scoring


def test_engine_on_an_accelerator_answers_as_on_the_cpu(tmp_path):
    vecs = data(900, 16)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[300, 300, 300])
    cpu = Engine(out, device="cpu")
    acc = Engine(out, device="cpu", search_device="torch-cpu")
    assert "e" in acc.shards.accelerated and not cpu.shards.accelerated
    for qi in (0, 311, 899):
        a = cpu.search_vector("e", vecs[qi], 12)
        b = acc.search_vector("e", vecs[qi], 12)
        assert [h.id for h in a] == [h.id for h in b]
        assert [(h.shard, h.row) for h in a] == [(h.shard, h.row) for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    flt = {"group": "even"}
    assert [h.id for h in cpu.search_vector("e", vecs[4], 10, filter=flt)] == \
        [h.id for h in acc.search_vector("e", vecs[4], 10, filter=flt)]


def tune_refined(codes_rank_all_from: int, codes_hits_below: int):
    """``tune`` a refined IVF (2,048 lists) on a fake search whose recall@10 is the smaller of what the probed
    lists hold (all 10 true neighbours from nprobe 384, 9 below) and what the codes rank (all 10 from
    ``k_factor`` ``codes_rank_all_from``, ``codes_hits_below`` below)."""
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 2048, faiss.METRIC_INNER_PRODUCT)   # knob_of: nlist
    nq = 50
    truth = np.tile(np.arange(10), (nq, 1))

    def search(q, k, params):
        coarse = 10 if params["nprobe"] >= 384 else 9
        codes = 10 if params.get("k_factor", 1) >= codes_rank_all_from else codes_hits_below
        hits = min(coarse, codes)
        return np.tile(np.concatenate([np.arange(hits), np.arange(100, 100 + k - hits)]), (len(q), 1))

    return tune(search, index, np.zeros((nq, 8), np.float32), truth, target=0.95, refine=True)


def test_tune_lowers_k_factor_again_once_the_knob_is_chosen():
    """A refined IVF-PQ: ``k_factor`` is first tuned at a generous ``nprobe``; when even that ``nprobe`` misses
    the goal (the coarse quantizer limits recall, here below nprobe 384), ``k_factor`` climbs to the top of
    the grid — then, at the ``nprobe`` finally chosen, the smallest ``k_factor`` that reaches the goal is
    kept (fewer candidates to keep and re-score)."""
    tuned = tune_refined(8, 8)
    assert tuned.reached and tuned.recall == 1.0
    assert tuned.params == {"nprobe": 384, "k_factor": 8}
    tried_at_384 = {t["params"]["k_factor"]: t["recall"] for t in tuned.tried if t["params"]["nprobe"] == 384}
    assert tried_at_384[max(K_FACTOR_GRID)] == 1.0 and tried_at_384[4] < 0.95   # the top found first, lowered to 8


def test_tune_keeps_more_candidates_rather_than_probe_more_lists():
    """Codes too coarse to rank the true top 10 within 64 x k candidates (10M x 512-d, PQ64x8: recall@10 0.937 at
    nprobe 2048 with k_factor 64, 0.954 with 128): a larger ``k_factor`` reaches the goal at the smaller ``nprobe``."""
    tuned = tune_refined(128, 9)
    assert tuned.reached and tuned.recall == 1.0
    assert tuned.params == {"nprobe": 384, "k_factor": 128}


@pytest.mark.parametrize("reaches_from", [1, 6, 48, 192, 2048, 4096, None])
def test_tune_bisects_the_knob_for_the_cheapest_value_a_linear_scan_finds(reaches_from):
    """Recall grows with ``nprobe``: the bisection finds the value a scan from the cheapest would, in about
    log2(grid) measurements instead of one per value up to the answer (``None``: no value reaches the goal,
    the most accurate one measured is kept)."""
    from retrieval.index.tuning import knob_of

    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 4096, faiss.METRIC_INNER_PRODUCT)
    _, grid = knob_of(index)
    nq = 40
    truth = np.tile(np.arange(10), (nq, 1))

    def hits_at(nprobe):                    # monotone: 10 from ``reaches_from`` on, fewer below
        if reaches_from is not None and nprobe >= reaches_from:
            return 10
        return min(9, 1 + int(np.log2(nprobe)) // 2)

    def search(q, k, params):
        hits = hits_at(params["nprobe"])
        return np.tile(np.concatenate([np.arange(hits), np.arange(100, 100 + k - hits)]), (len(q), 1))

    tuned = tune(search, index, np.zeros((nq, 8), np.float32), truth, target=0.95)
    linear = next((v for v in grid if hits_at(v) == 10), None)
    if linear is None:
        assert not tuned.reached and tuned.params == {"nprobe": grid[-1]}          # the most accurate
        assert tuned.recall == pytest.approx(hits_at(grid[-1]) / 10)
    else:
        assert tuned.reached and tuned.params == {"nprobe": linear} and tuned.recall == 1.0
    assert len(tuned.tried) <= int(np.ceil(np.log2(len(grid)))) + 1 < grid.index(2048)
    assert all(t["seconds"] >= 0 for t in tuned.tried)


def test_one_query_on_several_threads_splits_the_ivf_lists_with_the_same_answers():
    from retrieval.index.shards import search_index

    x = data(4000, 32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 64, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    params = faiss.SearchParametersIVF(nprobe=16)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        ref = [index.search(x[i:i + 1], 10, params=params) for i in range(20)]
        faiss.omp_set_num_threads(2)
        for i in range(20):
            d, r = search_index(index, x[i:i + 1], 10, params)
            assert index.parallel_mode == 1                      # the lone query's lists on both threads
            np.testing.assert_array_equal(r, ref[i][1])
            np.testing.assert_allclose(d, ref[i][0], rtol=1e-5)
        search_index(index, x[:50], 10, params)
        assert index.parallel_mode == 0                          # a batch: split over the queries
        faiss.omp_set_num_threads(1)
        search_index(index, x[:1], 10, params)
        assert index.parallel_mode == 0                          # one thread: as before
    finally:
        faiss.omp_set_num_threads(threads)


def test_vectors_that_do_not_fit_on_the_accelerator_are_searched_on_the_cpu(tmp_path, monkeypatch, caplog):
    from retrieval.index import torch_search

    vecs = data(300, 16)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[150, 150])

    class OutOfMemory(torch_search.TorchFlatSearcher):
        def __init__(self, *a, **kw):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(torch_search, "TorchFlatSearcher", OutOfMemory)
    with caplog.at_level("WARNING"):
        engine = Engine(out, device="cpu", search_device="torch-cpu")
    assert engine.shards.accelerated == {}
    assert "do not fit" in caplog.text and "Tried to allocate" in caplog.text
    assert [h.id for h in engine.search_vector("e", vecs[7], 3)][0] == \
        [h.id for h in Engine(out, device="cpu").search_vector("e", vecs[7], 3)][0]
