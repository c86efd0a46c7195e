"""The pure parts of sharded serving, without a Ray cluster: partition planning, the fan-out + merge of
``RemoteShardSet`` over in-process searchers, filters pushed down, and a missing partition reported."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from indexer.pipeline import IndexConfig, build_index  # noqa: E402
from retrieval.engine.engine import Engine  # noqa: E402
from retrieval.index import store  # noqa: E402
from server.ray_serve.deployments import Searcher  # noqa: E402
from server.ray_serve.engine import RemoteShardSet  # noqa: E402
from server.ray_serve.partitions import begin_request, end_request, plan_partitions  # noqa: E402


class _Response:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self, timeout_s=None):
        return self.fn(*self.args)

    def cancel(self):
        pass


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Response(self.fn, *args)


class _Handle:
    """A DeploymentHandle stand-in calling a searcher in this process (or failing like a dead replica)."""

    def __init__(self, searcher=None):
        def dead(*_):
            raise RuntimeError("ActorDiedError: the replica was killed")

        self.search = _Method(searcher.search if searcher else dead)
        self.vectors = _Method(searcher.vectors if searcher else dead)


@pytest.fixture(scope="module")
def index(corpus, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("parts") / "index"
    build_index(IndexConfig(sources=[str(corpus)], out=out, encoders=[tiny_clip], device="cpu", batch_size=8,
                            workers=0, shard_size=5, index_type="flat", optimize="never"))
    return out


def test_plan_partitions_contiguous_and_balanced(index):
    m = store.read_manifest(index)
    for n in (1, 2, 3, 5, 9):
        parts = plan_partitions(m, n)
        assert len(parts) == min(n, len(m.shards))
        assert [s for p in parts for s in p.shards] == [s.name for s in m.shards]
        assert all(p.shards for p in parts) and parts[0].first == 0
        assert all(a.stop == b.first for a, b in zip(parts, parts[1:]))
    two = plan_partitions(m, 2)
    assert abs(sum(two[0].counts) - sum(two[1].counts)) <= max(s.count for s in m.shards)


def _remote(index, engine, dead=()):
    m = store.read_manifest(index)
    parts = plan_partitions(m, 2)
    handles = [_Handle(None if p.number in dead else Searcher.func_or_class(str(index), m.to_json(), p))
               for p in parts]
    return RemoteShardSet(m, engine.records.shard_ids, parts, handles), parts


def test_fan_out_and_merge_equal_exact_search(index, tiny_clip):
    engine = Engine(index, device="cpu", search_device="cpu")
    remote, _ = _remote(index, engine)
    rng = np.random.default_rng(3)
    for k in (1, 5, 24):
        q = rng.standard_normal(32).astype(np.float32)
        q /= np.linalg.norm(q)
        want = engine.shards.search(tiny_clip, q, k, engine.search_defaults)
        got = remote.search(tiny_clip, q, k, engine.search_defaults)
        assert [(h.id, h.shard, h.row) for h in got] == [(h.id, h.shard, h.row) for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-6)
    # a filter pushed down: same hits as the engine's masks give, all matching
    masks = engine._masks({"height": {"lt": 60}})
    want = engine.shards.search(tiny_clip, q, 6, engine.search_defaults, masks)
    got = remote.search(tiny_clip, q, 6, engine.search_defaults, masks)
    assert [h.id for h in got] == [h.id for h in want] and got
    assert all(engine.metadata(h.id)["height"] < 60 for h in got)
    # stored vectors come from the partition holding them
    np.testing.assert_allclose(remote.vectors(tiny_clip, got), engine.shards.vectors(tiny_clip, got), atol=1e-6)


def test_missing_partition_is_reported_and_the_rest_is_exact(index, tiny_clip):
    engine = Engine(index, device="cpu", search_device="cpu")
    remote, parts = _remote(index, engine, dead={0})
    q = engine.shards.reconstruct(tiny_clip, 0, 0)
    cov = begin_request(len(parts))
    got = remote.search(tiny_clip, q, 5, engine.search_defaults)
    assert end_request() is cov
    assert cov.partial and cov.to_json()["partitions"] == {"answered": [1], "missing": [0], "total": 2}
    alive = set(range(parts[1].first, parts[1].stop))
    full = engine.shards.search(tiny_clip, q, engine.count, engine.search_defaults)
    assert [h.id for h in got] == [h.id for h in full if h.shard in alive][:5]
    assert all(h.shard in alive for h in got)
    cov = begin_request(len(parts))
    remote_ok, _ = _remote(index, engine)
    remote_ok.search(tiny_clip, q, 5, engine.search_defaults)
    assert not end_request().partial
