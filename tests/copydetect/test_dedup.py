"""Whole-collection dedup: range search equals brute force, groups are connected components,
binary (PDQ) Hamming search equals brute-force Hamming, exact duplicates from metadata, output files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.copydetect.dedup import (
    DedupConfig,
    Pairs,
    connected_groups,
    deduplicate,
    exact_duplicates,
    find_pairs,
    pair_work,
    write_result,
)
from retrieval.errors import InvalidQueryError
from retrieval.numeric import hamming_to_score, pack_signs, score_to_max_hamming
from retrieval.testing.oracles import brute_force_pairs


def clustered_vectors(n_clusters=12, per=(1, 5), d=24, noise=0.08, n_single=40, seed=0):
    """Unit vectors: tight clusters (near-duplicates) plus unrelated singletons."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for c in range(n_clusters):
        centre = rng.normal(size=d)
        for _ in range(rng.integers(per[0], per[1] + 1)):
            rows.append(centre / np.linalg.norm(centre) + noise * rng.normal(size=d) / np.sqrt(d))
            truth.append(c)
    for s in range(n_single):
        rows.append(rng.normal(size=d))
        truth.append(n_clusters + s)
    v = np.asarray(rows, np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    perm = rng.permutation(len(v))
    return v[perm], np.asarray(truth)[perm]


def split(v, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(v[start:start + s])
        start += s
    out.append(v[start:])
    return out


@pytest.mark.parametrize("threshold", [0.9, 0.97, 0.5])
@pytest.mark.parametrize("batch_size", [7, 4096])
def test_range_search_equals_brute_force(threshold, batch_size):
    v, _ = clustered_vectors()
    blocks = split(v, [13, 30, 1])           # uneven shards, one with a single row
    got = find_pairs(blocks, DedupConfig(threshold=threshold, batch_size=batch_size))
    ref = brute_force_pairs(v, threshold)
    assert got.as_set() == ref.as_set()
    assert len(ref) > 0
    assert np.all(got.a < got.b)
    ref_scores = {(a, b): s for a, b, s in zip(ref.a.tolist(), ref.b.tolist(), ref.score.tolist())}
    for a, b, s in zip(got.a.tolist(), got.b.tolist(), got.score.tolist()):
        assert s == pytest.approx(ref_scores[(a, b)], abs=1e-5)
        assert s >= threshold


def test_knn_graph_keeps_at_most_k_and_matches_when_k_is_large():
    v, _ = clustered_vectors(seed=1)
    blocks = split(v, [20, 20])
    full = find_pairs(blocks, DedupConfig(threshold=0.9, method="knn", k=len(v)))
    assert full.as_set() == brute_force_pairs(v, 0.9).as_set()
    small = find_pairs(blocks, DedupConfig(threshold=0.0, method="knn", k=2))
    degree_out = np.bincount(np.concatenate([small.a, small.b]), minlength=len(v))
    # each row contributes at most k edges (undirected edges may come from the other end too)
    assert len(small) <= 2 * len(v)
    assert degree_out.max() <= 2 * len(v)


def test_progress_counts_all_query_rows():
    v, _ = clustered_vectors()
    blocks = split(v, [10, 10])
    seen = []
    find_pairs(blocks, DedupConfig(threshold=0.9, batch_size=4), progress=seen.append)
    assert sum(seen) == pair_work(blocks) == len(v) + (len(v) - 10) + (len(v) - 20)


def test_groups_are_connected_components():
    # chain 0-1, 1-2 (one group), 5-6 (another), 3 and 4 alone
    pairs = Pairs(np.array([0, 1, 5]), np.array([1, 2, 6]), np.array([0.99, 0.98, 0.97], np.float32))
    assert connected_groups(8, pairs) == [[0, 1, 2], [5, 6]]
    assert connected_groups(8, Pairs.empty()) == []


def test_groups_recover_planted_clusters():
    v, truth = clustered_vectors(noise=0.02)
    res = deduplicate(split(v, [25]), [f"{i:015x}" for i in range(len(v))], DedupConfig(threshold=0.95))
    got = sorted(sorted(g) for g in res.groups)
    expected = []
    for c in np.unique(truth):
        rows = np.nonzero(truth == c)[0].tolist()
        if len(rows) >= 2:
            expected.append(sorted(rows))
    assert got == sorted(expected)
    # brute-force union-find over the brute-force pairs gives the same components
    ref = brute_force_pairs(v, 0.95)
    parent = list(range(len(v)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in zip(ref.a.tolist(), ref.b.tolist()):
        parent[find(a)] = find(b)
    comps = {}
    for i in range(len(v)):
        comps.setdefault(find(i), []).append(i)
    assert sorted(sorted(c) for c in comps.values() if len(c) > 1) == got


def test_binary_pdq_range_search_equals_brute_force_hamming():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2, size=(30, 256)).astype(bool)
    rows = [base]
    for flips in (3, 10, 20, 40):   # copies at known Hamming distances
        c = base[:8].copy()
        idx = rng.choice(256, size=flips, replace=False)
        c[:, idx] = ~c[:, idx]
        rows.append(c)
    bits = np.concatenate(rows)
    codes = np.packbits(bits, axis=1)
    for threshold in (0.95, 0.85, 0.7):
        got = find_pairs(split(codes, [17, 40]), DedupConfig(threshold=threshold, batch_size=9))
        # brute force Hamming with numpy (independent of faiss)
        ham = (bits[:, None, :] != bits[None, :, :]).sum(-1)
        a, b = np.nonzero(np.triu(ham <= score_to_max_hamming(threshold, 256), k=1))
        assert got.as_set() == set(zip(a.tolist(), b.tolist()))
        np.testing.assert_allclose(np.sort(got.score), np.sort(hamming_to_score(ham[a, b], 256)))
    # the ±1/16 float form (PdqEncoder.encode_images) packs to the same codes and cosine agrees
    floats = np.where(bits, 1.0, -1.0).astype(np.float32) / 16
    assert np.array_equal(pack_signs(floats), codes)
    f_pairs = find_pairs([floats], DedupConfig(threshold=0.85))
    assert f_pairs.as_set() == find_pairs([codes], DedupConfig(threshold=0.85)).as_set()


def test_score_to_hamming_edges():
    assert score_to_max_hamming(1.0, 256) == 0
    assert score_to_max_hamming(0.95, 256) == 6       # 1 - 12/256 = 0.953 >= .95; 7 -> 0.945
    assert hamming_to_score(6, 256) >= 0.95 > hamming_to_score(7, 256)


def test_exact_duplicates_from_metadata_and_repeated_ids():
    rows = [
        {"id": "a" * 15, "sha256": "a" * 64, "source": "/x/a.jpg", "aliases": json.dumps(["/y/a-copy.jpg"])},
        {"id": "b" * 15, "sha256": "b" * 64, "source": "/x/b.jpg", "aliases": None},
        {"id": "c" * 15, "sha256": "c" * 64, "source": "/x/c.jpg", "aliases": "[]"},
        {"id": "c" * 15, "sha256": "c" * 64, "source": "/z/c.jpg", "aliases": "[]"},
    ]
    ex = exact_duplicates(rows)
    assert {e["id"]: sorted(e["sources"]) for e in ex} == {
        "a" * 15: ["/x/a.jpg", "/y/a-copy.jpg"], "c" * 15: ["/x/c.jpg", "/z/c.jpg"]}
    # the repeated id is compared once (not embedded/compared twice)
    v = np.eye(4, dtype=np.float32)
    v[3] = v[2]
    res = deduplicate([v[:2], v[2:]], [r["id"] for r in rows], DedupConfig(threshold=0.9), metadata_rows=rows)
    assert res.ids == ["a" * 15, "b" * 15, "c" * 15]
    assert len(res.pairs) == 0 and res.summary()["exact_duplicates"] == 2


def test_write_result_formats(tmp_path):
    import pyarrow.parquet as pq

    v, _ = clustered_vectors(noise=0.02)
    ids = [f"{i:015x}" for i in range(len(v))]
    res = deduplicate([v], ids, DedupConfig(threshold=0.95))
    js = json.loads(write_result(res, tmp_path / "d.json").read_text())
    assert set(js) >= {"pairs", "groups"} and len(js["pairs"]) == len(res.pairs)
    assert all(set(p) == {"a", "b", "a_path", "b_path", "score"} for p in js["pairs"])
    tbl = pq.read_table(write_result(res, tmp_path / "d.parquet"))
    assert tbl.num_rows == len(res.pairs)
    assert tbl.column_names == ["a", "b", "score", "group", "a_path", "b_path"]
    csv_text = write_result(res, tmp_path / "d.csv").read_text().splitlines()
    assert csv_text[0] == "a,b,score,group,a_path,b_path" and len(csv_text) == len(res.pairs) + 1
    assert json.loads((tmp_path / "d.groups.json").read_text())["groups"] == js["groups"]
    with pytest.raises(InvalidQueryError):
        write_result(res, tmp_path / "d.xlsx")


def test_config_validation():
    with pytest.raises(InvalidQueryError):
        DedupConfig(method="dense")
    with pytest.raises(InvalidQueryError):
        DedupConfig(threshold=1.5)
    assert len(find_pairs([], DedupConfig())) == 0
