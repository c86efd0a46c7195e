"""The Ray Serve deployments of ``loupe serve DIR --ray``: searchers (one per partition) and the query encoder.

* ``Searcher``: one partition of the index (``partitions.Partition``: a contiguous group of shards),
  opened as a ``ShardSet`` over a manifest that lists only those shards (same files, same checks as a
  single-process engine). ``search`` returns the partition's top-k' with global shard numbers and the
  image ids, so the ingress can check every hit against its own records (never a silently wrong row).
  ``num_replicas`` copies answer in parallel; Ray Serve's controller restarts a killed replica.
* ``QueryEncoder``: text queries batched across concurrent requests with ``@serve.batch`` (one forward
  pass per batch), on a GPU when the replica has one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger("loupe.ray_serve")


@serve.deployment(name="searcher", max_ongoing_requests=32, health_check_period_s=2, health_check_timeout_s=10)
class Searcher:
    def __init__(self, index_dir: str, manifest_json: dict, partition):
        from retrieval.device import one_query_per_thread
        from retrieval.index import store
        from retrieval.index.shards import ShardSet
        from server.ray_serve.partitions import partition_manifest

        one_query_per_thread()      # one query per call: parallelism comes from replicas and requests
        self.partition = partition
        manifest = partition_manifest(manifest_json, partition)
        ids = [store.read_metadata(index_dir, s.name, manifest).column("id").to_pylist() for s in manifest.shards]
        self.shards = ShardSet(index_dir, manifest, ids)
        log.info("partition %d: %d shards, %d images", partition.number, len(ids), self.shards.count)

    def search(self, encoder: str, query: np.ndarray, k: int, params: dict[str, Any],
               masks: list[bytes] | None) -> dict[str, Any]:
        """Top-``k`` of this partition: ``{"partition", "scores", "shards" (global numbers), "rows", "ids"}``."""
        from retrieval.index.shards import SearchConfig
        from server.ray_serve.partitions import unpack_masks

        hits = self.shards.search(encoder, np.asarray(query, np.float32), int(k), SearchConfig(**params),
                                  unpack_masks(masks, self.partition.counts))
        return {"partition": self.partition.number,
                "scores": np.array([h.score for h in hits], np.float32),
                "shards": np.array([h.shard + self.partition.first for h in hits], np.int64),
                "rows": np.array([h.row for h in hits], np.int64),
                "ids": [h.id for h in hits]}

    def vectors(self, encoder: str, shards: list[int], rows: list[int]) -> np.ndarray:
        """Stored vectors of (global shard, row) pairs of this partition, ``[n, d]`` float32."""
        return np.stack([self.shards.reconstruct(encoder, int(s) - self.partition.first, int(r))
                         for s, r in zip(shards, rows)]).astype(np.float32)

    def check_health(self) -> None:
        """Called by the Serve controller: a replica whose mapped shard changed size is replaced."""
        for (name, shard) in list(self.shards._mapped):
            self.shards.check_mapped(name, shard)


@serve.deployment(name="query-encoder", max_ongoing_requests=64)
class QueryEncoder:
    def __init__(self, specs: dict[str, dict], device: str = "auto"):
        from retrieval.encoders import register_encoder

        for name, spec in specs.items():          # encoders registered in the driver (custom ones too)
            register_encoder(name, spec, replace=True)
        self.device = device
        self.encoders: dict[str, Any] = {}

    def _encoder(self, name: str):
        if name not in self.encoders:
            from retrieval.encoders import create_encoder

            self.encoders[name] = create_encoder(name, device=self.device)
        return self.encoders[name]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_text(self, items: list[tuple[str, str]]) -> list[np.ndarray]:
        """``(encoder, text)`` items of concurrent requests → one vector each (one pass per encoder)."""
        out: list[np.ndarray | None] = [None] * len(items)
        by_encoder: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(items):
            by_encoder.setdefault(name, []).append(i)
        for name, at in by_encoder.items():
            vecs = self._encoder(name).encode_texts([items[i][1] for i in at])
            for i, v in zip(at, vecs):
                out[i] = np.asarray(v, np.float32)
        return out
