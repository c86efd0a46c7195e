"""Dedup at scale: candidate pairs from the index's own k-NN search (the optimized layout, or exact search on
an accelerator), batched, then the same threshold — checked against exact range search (the reference)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _engine_helpers import build_index, unit

from retrieval.copydetect import collection
from retrieval.copydetect.collection import CopyCheckConfig, dedup_index
from retrieval.copydetect.dedup import DedupConfig, find_pairs, knn_pairs
from retrieval.engine.engine import Engine
from retrieval.errors import InvalidQueryError
from retrieval.index.optimize import optimize

ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 0.95


def planted(n: int = 3000, dim: int = 32, copies: int = 120, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors + near-duplicates: single copies, and groups of three (a copy of a copy)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((12, dim)))
    base = unit(centres[rng.integers(0, 12, n)] + 0.45 * rng.standard_normal((n, dim)))
    orig = rng.choice(n, copies, replace=False)
    dup = unit(base[orig] + 0.03 * rng.standard_normal((copies, dim)))
    third = unit(dup[:20] + 0.03 * rng.standard_normal((20, dim)))
    return np.concatenate([base, dup, third]).astype(np.float32)


def exact_pairs(vecs: np.ndarray) -> set[tuple[int, int]]:
    return find_pairs([vecs], DedupConfig(threshold=THRESHOLD, method="range")).as_set()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    vecs = planted()
    sizes = [1000, 1000, 1000, len(vecs) - 3000]
    return vecs, sizes, tmp_path_factory.mktemp("dedup-scale")


@pytest.fixture(scope="module")
def optimized(indexed):
    """The planted set in four write shards, optimized into each layout kind once (shared by the tests)."""
    vecs, sizes, root = indexed
    made = {}

    def get(layout: str) -> Path:
        if layout not in made:
            made[layout] = build_index(root / layout, {"e": vecs}, shard_sizes=sizes)
            optimize(made[layout], layout=layout, queries=60)
        return made[layout]
    return get


@pytest.mark.parametrize("layout", ["hnsw", "ivfpq"])
def test_layout_candidates_find_the_pairs_exact_range_search_finds(indexed, optimized, layout):
    vecs, sizes, root = indexed
    engine = Engine(optimized(layout), device="cpu")
    reference = exact_pairs(vecs)
    assert len(reference) >= 140                     # the planted pairs (and the triangles of the groups of 3)
    seen = []
    result = dedup_index(engine, "e", CopyCheckConfig(check="none", threshold=THRESHOLD, k=16, batch_size=500,
                                                       candidates="index"), progress=seen.append)
    assert result.stats["candidates_from"] == "layout" and result.stats["method"] == "knn"
    assert result.pairs.as_set() == reference
    assert sum(seen) == len(vecs) and max(seen) <= 500            # every row queried, in batches
    for a, b, s in zip(result.pairs.a, result.pairs.b, result.pairs.score):   # exact scores, not PQ estimates
        assert s == pytest.approx(float(vecs[a] @ vecs[b]), abs=1e-5)
    exact = dedup_index(engine, "e", CopyCheckConfig(check="none", threshold=THRESHOLD, candidates="exact"))
    assert exact.stats["candidates_from"] == "exact" and exact.pairs.as_set() == reference
    assert [sorted(g) for g in result.groups] == [sorted(g) for g in exact.groups]
    engine.close()


def test_layout_candidates_include_shards_written_after_the_optimize(indexed):
    vecs, sizes, root = indexed
    head = sum(sizes[:3])
    out = build_index(root / "delta", {"e": vecs[:head]}, shard_sizes=sizes[:3])
    optimize(out, layout="hnsw", queries=40)
    # a later `loupe index` run adds the copies as a fourth shard, outside the layout
    from _engine_helpers import fake_id, make_index

    from retrieval.index import store, vector_files
    manifest = store.read_manifest(out)
    rows = [{"id": fake_id(i), "source": f"/x/{i}.jpg"} for i in range(head, len(vecs))]
    store.write_metadata(out, "shard-00003", rows)
    vector_files.write_vectors(out, "e", "shard-00003", make_index("Flat", vecs[head:]))
    manifest.shards.append(store.ShardEntry("shard-00003", len(vecs) - head))
    store.write_manifest(out, manifest)
    engine = Engine(out, device="cpu")
    assert len(engine.shards.layouts["e"].covered) == 3
    result = dedup_index(engine, "e", CopyCheckConfig(check="none", threshold=THRESHOLD, k=16, candidates="index"))
    assert result.pairs.as_set() == exact_pairs(vecs)


def test_gpu_path_candidates_equal_exact_search(indexed):
    """The torch exact search an engine uses on a GPU, run here on the CPU (``torch-cpu``)."""
    vecs, sizes, root = indexed
    out = build_index(root / "flat", {"e": vecs}, shard_sizes=sizes)
    engine = Engine(out, device="cpu", search_device="torch-cpu")
    assert "e" in engine.shards.accelerated
    result = dedup_index(engine, "e", CopyCheckConfig(check="none", threshold=THRESHOLD, k=16, candidates="index"))
    assert result.stats["candidates_from"] == "gpu"
    assert result.pairs.as_set() == exact_pairs(vecs)


def test_auto_switches_at_the_size_threshold_and_index_needs_a_layout(indexed, optimized, monkeypatch):
    vecs, sizes, root = indexed
    out = build_index(root / "auto", {"e": vecs}, shard_sizes=sizes)
    engine = Engine(out, device="cpu")
    cfg = CopyCheckConfig(check="none", threshold=THRESHOLD, k=16)
    assert dedup_index(engine, "e", cfg).stats["candidates_from"] == "exact"          # small: exact
    monkeypatch.setattr(collection, "SCALE_MIN", 3000)
    result = dedup_index(engine, "e", cfg)                 # large but no layout: exact, and says why
    assert result.stats["candidates_from"].startswith("exact (no optimized layout")
    with pytest.raises(InvalidQueryError, match="loupe optimize"):
        dedup_index(engine, "e", CopyCheckConfig(check="none", candidates="index"))
    with pytest.raises(InvalidQueryError, match="candidates"):
        CopyCheckConfig(candidates="fast")
    engine.close()
    engine = Engine(optimized("hnsw"), device="cpu")
    result = dedup_index(engine, "e", cfg)
    assert result.stats["candidates_from"] == "layout" and result.pairs.as_set() == exact_pairs(vecs)


def test_knn_pairs_keeps_each_pair_once_with_its_best_score():
    vecs = planted(300, 16, 20, seed=3)

    def search(q, k):                                       # an "approximate" search: b->a scored a bit lower
        scores = q @ vecs.T
        rows = np.argsort(-scores, axis=1)[:, :k]
        got = np.take_along_axis(scores, rows, 1)
        return np.where(rows < np.arange(len(q))[:, None], got - 0.002, got).astype(np.float32), rows

    pairs = knn_pairs(search, [vecs], THRESHOLD, 8, batch_size=len(vecs))
    assert pairs.as_set() == exact_pairs(vecs)
    assert len(pairs) == len(pairs.as_set())
    for a, b, s in zip(pairs.a, pairs.b, pairs.score):
        assert s == pytest.approx(float(vecs[a] @ vecs[b]), abs=1e-5)


def test_cli_dedup_candidates_from_the_layout(indexed, optimized):
    vecs, _, _ = indexed
    out = optimized("hnsw")
    run = subprocess.run([sys.executable, "-m", "loupe", "dedup", str(out), "--check", "none", "--threshold",
                          str(THRESHOLD), "--candidates", "index", "-k", "16", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["summary"]["candidates_from"] == "layout"
    assert len(data["pairs"]) == len(exact_pairs(vecs))
