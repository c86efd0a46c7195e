"""Pure parts of sharded serving: which shards each partition holds, and merging partitions' answers.

A *partition* is a contiguous group of the index's shards (in manifest order), held by one Ray Serve
searcher deployment (``server.ray_serve.deployments.Searcher``). Global row numbers are the ingress's
(``offsets`` over every shard), so partitions' answers merge with ``faiss.ResultHeap`` exactly as
``ShardSet.search`` merges shards: with exact (flat) shards the merged top-k equals one exact search.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from retrieval.index import store

#: per-partition candidates k' = ceil(k * OVERSAMPLE) (+1): more than k, so approximate partitions
#: (IVF-PQ, HNSW) hand the merge enough candidates; exact partitions need only k
OVERSAMPLE = 1.5


@dataclass(frozen=True)
class Partition:
    number: int
    first: int                  # the global number of its first shard
    shards: tuple[str, ...]     # shard names, in manifest order
    counts: tuple[int, ...]     # images per shard

    @property
    def stop(self) -> int:
        return self.first + len(self.shards)


def plan_partitions(manifest: store.Manifest, partitions: int) -> list[Partition]:
    """Split the manifest's shards into ``partitions`` contiguous groups of about equal image counts
    (fewer when there are fewer shards; an empty index has one empty partition)."""
    shards = list(manifest.shards)
    n = max(1, min(int(partitions), len(shards) or 1))
    total = sum(s.count for s in shards)
    out, start = [], 0
    for p in range(n):
        if p == n - 1:
            stop = len(shards)
        else:
            target = total * (p + 1) / n
            stop, acc = start, sum(s.count for s in shards[:start])
            # take shards until the running count reaches the target, leaving one shard per later partition
            while stop < len(shards) - (n - 1 - p) and (stop == start or acc + shards[stop].count <= target):
                acc += shards[stop].count
                stop += 1
        group = shards[start:stop]
        out.append(Partition(p, start, tuple(s.name for s in group), tuple(s.count for s in group)))
        start = stop
    return out


def partition_manifest(manifest_json: dict, partition: Partition) -> store.Manifest:
    """The manifest a searcher opens: the same encoders and file records, only its shards, and no
    optimized layout (a partition searches its own shards; the layout spans the whole index)."""
    manifest = store.Manifest.from_json(manifest_json)
    by_name = {s.name: s for s in manifest.shards}
    missing = [s for s in partition.shards if s not in by_name]
    if missing:
        raise ValueError(f"partition {partition.number}: shards {missing} are not in the manifest")
    manifest.shards = [by_name[s] for s in partition.shards]
    from retrieval.index.layout import LAYOUT_KEY

    manifest.extra = {k: v for k, v in manifest.extra.items() if k != LAYOUT_KEY}
    return manifest


def partition_k(k: int, exact: bool) -> int:
    """Candidates asked of each partition: k for exact shards, more than k for approximate ones."""
    return int(k) if exact else int(math.ceil(int(k) * OVERSAMPLE)) + 1


def pack_masks(masks: list[np.ndarray] | None, partition: Partition) -> list[bytes] | None:
    """The filter pushed down to a partition: its shards' boolean masks as bits (1 bit per image)."""
    if masks is None:
        return None
    return [np.packbits(masks[i], bitorder="little").tobytes() for i in range(partition.first, partition.stop)]


def unpack_masks(packed: list[bytes] | None, counts: tuple[int, ...]) -> list[np.ndarray] | None:
    if packed is None:
        return None
    return [np.unpackbits(np.frombuffer(b, np.uint8), count=n, bitorder="little").astype(bool)
            for b, n in zip(packed, counts)]


# -- which partitions answered a request ---------------------------------------------------------
@dataclass
class Coverage:
    """Partitions that answered every fan-out of one request (a request may search several times:
    fusion, re-ranking's regions)."""

    total: int
    missing: set[int] = field(default_factory=set)
    searched: bool = False

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def to_json(self) -> dict:
        return {"partial": self.partial,
                "partitions": {"answered": sorted(set(range(self.total)) - self.missing),
                               "missing": sorted(self.missing), "total": self.total}}


_local = threading.local()


def begin_request(total: int) -> Coverage:
    """Start tracking one request's coverage in this thread (the WSGI server runs a request per thread)."""
    _local.coverage = Coverage(total)
    return _local.coverage


def current_coverage() -> Coverage | None:
    return getattr(_local, "coverage", None)


def end_request() -> Coverage | None:
    cov = getattr(_local, "coverage", None)
    _local.coverage = None
    return cov
