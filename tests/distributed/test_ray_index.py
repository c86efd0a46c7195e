"""`loupe index --ray`: Ray Data stages whose workers write the shards give the same index as a local run;
a killed driver resumes with no image lost or stored twice; IVF-PQ shards share one trained quantizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from indexer.pipeline import IndexConfig, build_index, stored_vectors
from retrieval.index import store

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _same_index(a, b, encoder):
    av, aids = stored_vectors(a, encoder)
    bv, bids = stored_vectors(b, encoder)
    assert len(aids) == len(set(aids)) and len(bids) == len(set(bids))   # no image stored twice
    assert sorted(aids) == sorted(bids)
    order = {i: k for k, i in enumerate(bids)}
    np.testing.assert_allclose(bv[[order[i] for i in aids]], av, atol=1e-5)


@pytest.fixture(scope="module")
def local_index(corpus, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "index"
    summary = build_index(IndexConfig(sources=[str(corpus)], out=out, encoders=[tiny_clip], device="cpu",
                                      batch_size=4, workers=0, shard_size=5, optimize="never"))
    return out, summary


def test_ray_index_equals_local_index(corpus, tiny_clip, local_index, local_ray, tmp_path):
    # a duplicate under another name and a broken file: aliased and reported as in a local run
    dup = tmp_path / "extra"
    dup.mkdir()
    (dup / "copy.png").write_bytes((corpus / "img00.png").read_bytes())
    (dup / "broken.jpg").write_bytes(b"not an image")
    local = build_index(IndexConfig(sources=[str(corpus), str(dup)], out=tmp_path / "local", encoders=[tiny_clip],
                                    device="cpu", batch_size=4, workers=0, shard_size=5, optimize="never"))
    dist = build_index(IndexConfig(sources=[str(corpus), str(dup)], out=tmp_path / "ray", encoders=[tiny_clip],
                                   device="cpu", batch_size=4, shard_size=5, optimize="never", ray="local",
                                   ray_actors=1, ray_writers=2))
    assert dist.indexed == local.indexed == 24
    assert dist.skipped == local.skipped == 1
    assert [f.source for f in dist.failed] == [f.source for f in local.failed] and len(dist.failed) == 1
    _same_index(tmp_path / "local", tmp_path / "ray", tiny_clip)
    m = store.read_manifest(tmp_path / "ray")
    assert m.count == 24 and all(s.count <= 5 for s in m.shards)
    rows = [r for s in m.shards for r in store.read_metadata(tmp_path / "ray", s.name).to_pylist()]
    aliased = [r for r in rows if r["aliases"] and json.loads(r["aliases"])]
    assert len(aliased) == 1 and aliased[0]["source"].endswith("img00.png")
    # every file the manifest lists checks out, and no unlisted shard file is left
    from retrieval.index.verify import verify_index

    report = verify_index(tmp_path / "ray")
    assert report.ok, report.problems
    listed = {s.name for s in m.shards}
    on_disk = {p.name.split(".")[0] for p in (tmp_path / "ray" / tiny_clip).glob("shard-*")}
    assert on_disk == listed
    again = build_index(IndexConfig(sources=[str(corpus), str(dup)], out=tmp_path / "ray", device="cpu",
                                    ray="local"))
    assert again.indexed == 0


def test_killed_driver_resumes_without_loss_or_duplicates(corpus, tiny_clip, local_index, local_ray, tmp_path):
    from retrieval.encoders import get_spec

    spec = get_spec(tiny_clip)
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({tiny_clip: dict(spec.options, family=spec.family, dim=spec.dim,
                                                 modalities=list(spec.modalities), image_size=spec.image_size,
                                                 local=spec.local, offline=True)}))
    out = tmp_path / "ray"
    cfg = {"sources": [str(corpus)], "out": str(out), "encoders": [tiny_clip], "device": "cpu", "batch_size": 4,
           "shard_size": 5, "optimize": "never", "ray": local_ray.get_runtime_context().gcs_address,
           "ray_writers": 2}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_indexer_helpers.py"), str(specs),
                           json.dumps(cfg), "--crash", "manifest:2"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]             # killed after the 2nd shard's commit
    m = store.read_manifest(out)
    assert len(m.shards) == 2
    resumed = build_index(IndexConfig(**{**cfg, "ray": "local"}))
    assert resumed.indexed == 24 - m.count                          # only what was not committed
    _same_index(local_index[0], out, tiny_clip)


def test_ivfpq_shards_share_one_quantizer(corpus, tiny_clip, local_ray, tmp_path):
    import faiss

    from indexer.writer import TRAINED_NAME

    out = tmp_path / "pq"
    summary = build_index(IndexConfig(sources=[str(corpus)], out=out, encoders=[tiny_clip], device="cpu",
                                      batch_size=4, shard_size=8, index_type="ivfpq", optimize="never",
                                      ray="local", ray_writers=2))
    assert summary.indexed == 24
    trained = faiss.read_index(str(out / tiny_clip / TRAINED_NAME))
    def centroids(index):
        quantizer = faiss.extract_index_ivf(index).quantizer
        return quantizer.reconstruct_n(0, quantizer.ntotal)

    m = store.read_manifest(out)
    assert m.encoders[tiny_clip].index_type == "ivfpq" and len(m.shards) >= 3
    assert all(s.count <= 8 for s in m.shards) and m.count == 24       # each writer's last batch may be short
    for s in m.shards:
        ix = faiss.read_index(str(store.vectors_path(out, tiny_clip, s.name)))
        assert ix.ntotal == s.count
        np.testing.assert_array_equal(centroids(ix), centroids(trained))
