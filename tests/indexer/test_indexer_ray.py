"""`loupe index --ray`: decode + embed on Ray actors gives the same index as a local run."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from indexer.pipeline import IndexConfig, build_index, stored_vectors  # noqa: E402
from retrieval.index import store  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 1024 * 1024)
    yield
    ray.shutdown()


def test_ray_index_equals_local_index(tmp_path, photo_dir, tiny_clip, local_ray):
    # a corrupt file and a duplicate: the Ray path reports and aliases them like the local one
    (photo_dir / "broken.jpg").write_bytes(b"not an image")
    original = sorted(photo_dir.iterdir())[0]
    (photo_dir / ("copy" + original.suffix)).write_bytes(original.read_bytes())
    local = build_index(IndexConfig(sources=[str(photo_dir)], out=tmp_path / "local", encoders=[tiny_clip],
                                    device="cpu", batch_size=4, workers=0, local_features=True))
    dist = build_index(IndexConfig(sources=[str(photo_dir)], out=tmp_path / "ray", encoders=[tiny_clip],
                                   device="cpu", batch_size=4, workers=1, local_features=True,
                                   ray="local", ray_actors=1))
    assert dist.indexed == local.indexed > 5
    assert dist.skipped == local.skipped >= 1                      # duplicates, as aliases
    assert [f.source for f in dist.failed] == [f.source for f in local.failed]
    assert any("broken.jpg" in f.source for f in dist.failed)
    lv, lids = stored_vectors(tmp_path / "local", tiny_clip)
    rv, rids = stored_vectors(tmp_path / "ray", tiny_clip)
    assert sorted(lids) == sorted(rids)
    order = {i: k for k, i in enumerate(rids)}
    np.testing.assert_allclose(rv[[order[i] for i in lids]], lv, atol=1e-5)
    m = store.read_manifest(tmp_path / "ray")
    assert m.encoders[tiny_clip].local_features is not None and m.count == dist.indexed
    # the Ray-built index resumes like any other: nothing new to embed
    again = build_index(IndexConfig(sources=[str(photo_dir)], out=tmp_path / "ray", device="cpu",
                                    ray="local"))
    assert again.indexed == 0
