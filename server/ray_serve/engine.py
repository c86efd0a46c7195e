"""The ingress side of ``loupe serve --ray``: an ``Engine`` whose shards and text encoder are Serve deployments.

``RayEngine`` is the single-process ``Engine`` with two parts swapped:

* ``shards``: a ``RemoteShardSet`` with ``ShardSet``'s interface. A search embeds once (in the ingress),
  sends the vector to every partition's searcher deployment at once (the filter pushed down as each
  partition's bit masks, applied inside FAISS), asks each for k' candidates (``partitions.partition_k``)
  and merges with ``faiss.ResultHeap`` over the ingress's global rows. Every hit's id is checked against
  the ingress's records; a partition that does not answer in ``timeout_s`` (a killed replica that Ray is
  restarting) is left out and the request is marked partial (``partitions.Coverage``), never answered
  as if complete.
* ``embedder``: text goes to the ``QueryEncoder`` deployment (batched across requests, ``@serve.batch``);
  image queries, re-ranking's local features and attribution run in the ingress process, which holds the
  records, local features and re-ranking PCA (it loads an image encoder on first use).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Sequence

import numpy as np

from retrieval.engine.embed import Embedder
from retrieval.engine.engine import Engine, _stamp
from retrieval.errors import IndexFormatError, LoupeError
from retrieval.index import store
from retrieval.index.records import RecordStore
from retrieval.index.shards import SearchConfig, merge_topk
from retrieval.types import Hit
from server.ray_serve.partitions import Partition, current_coverage, pack_masks, partition_k

log = logging.getLogger("loupe.ray_serve")


class PartitionUnavailableError(LoupeError, code="partition_unavailable", status=503):
    """A stored vector lives on a partition with no live replica right now (retry shortly)."""


class RemoteShardSet:
    """``ShardSet``'s interface over searcher deployments (module docstring)."""

    def __init__(self, manifest: store.Manifest, ids: Sequence[Sequence[str]], partitions: list[Partition],
                 handles: list, *, timeout_s: float = 10.0):
        self.manifest, self.ids, self.partitions, self.handles = manifest, ids, partitions, handles
        self.timeout_s = float(timeout_s)
        counts = [len(x) for x in ids]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) if counts else np.zeros(1, np.int64)
        self.layouts: dict = {}
        self.accelerated: dict = {}
        self._exact = {name: e.index_type in ("flat", "binary") for name, e in manifest.encoders.items()}

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def split(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shards = np.searchsorted(self.offsets, global_rows, side="right") - 1
        return shards, global_rows - self.offsets[shards]

    def partition_of(self, shard: int) -> Partition:
        return next(p for p in self.partitions if p.first <= shard < p.stop)

    def search(self, encoder: str, query: np.ndarray, k: int, params: SearchConfig,
               masks: list[np.ndarray] | None = None) -> list[Hit]:
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1))
        kk = partition_k(k, self._exact[encoder])
        cfg = {"nprobe": params.nprobe, "ef_search": params.ef_search, "k_factor": params.k_factor}
        pending = []
        for p, handle in zip(self.partitions, self.handles):
            if not p.shards or (masks is not None and not any(masks[i].any() for i in range(p.first, p.stop))):
                continue                                    # nothing to find there: answered, empty
            pending.append((p, handle.search.remote(encoder, q, kk, cfg, pack_masks(masks, p))))
        deadline = time.monotonic() + self.timeout_s
        parts, missing = [], set()
        for p, response in pending:
            try:
                out = response.result(timeout_s=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - a dead/restarting replica, a timeout: the partition is missing
                log.warning("partition %d did not answer (%s: %s); the answer is partial", p.number,
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                try:
                    response.cancel()
                except Exception:  # noqa: BLE001
                    pass
                missing.add(p.number)
                continue
            parts.append(self._checked(p, out))
        cov = current_coverage()
        if cov is not None:
            cov.missing |= missing
            cov.searched = True
        if not parts:
            return []
        d, lab = merge_topk(parts, [0] * len(parts), 1, k)
        keep = (lab[0] >= 0) & np.isfinite(d[0])
        shards, rows = self.split(lab[0][keep])
        return [Hit(self.ids[sh][r], s, sh, r) for s, sh, r in zip(d[0][keep].tolist(), shards.tolist(), rows.tolist())]

    def _checked(self, p: Partition, out: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """A partition's answer as (scores [1, n], global rows [1, n]); its ids must be the ingress's."""
        shards, rows = np.asarray(out["shards"], np.int64), np.asarray(out["rows"], np.int64)
        if len(shards) and ((shards < p.first) | (shards >= p.stop)).any():
            raise IndexFormatError(f"partition {p.number} answered rows of shards it does not hold")
        for sh, r, image_id in zip(shards.tolist(), rows.tolist(), out["ids"]):
            if r >= len(self.ids[sh]) or self.ids[sh][r] != image_id:
                raise IndexFormatError(f"partition {p.number} serves another version of shard {sh} "
                                       "(ids differ); restart `loupe serve --ray` after re-indexing")
        glob = self.offsets[shards] + rows if len(shards) else np.zeros(0, np.int64)
        return np.asarray(out["scores"], np.float32)[None], glob[None]

    # -- stored vectors ------------------------------------------------------------------------------
    def _fetch(self, encoder: str, pairs: list[tuple[int, int]]) -> np.ndarray:
        out = np.empty((len(pairs), self.manifest.encoders[encoder].dim), np.float32)
        by_part: dict[int, list[int]] = {}
        for j, (sh, _) in enumerate(pairs):
            by_part.setdefault(self.partition_of(sh).number, []).append(j)
        calls = [(pn, at, self.handles[pn].vectors.remote(encoder, [pairs[j][0] for j in at],
                                                           [pairs[j][1] for j in at])) for pn, at in by_part.items()]
        for pn, at, response in calls:
            try:
                out[at] = response.result(timeout_s=self.timeout_s)
            except Exception as exc:  # noqa: BLE001
                raise PartitionUnavailableError(f"partition {pn} holding these vectors is not available right "
                                                f"now ({type(exc).__name__}); retry in a few seconds") from exc
        return out

    def reconstruct(self, encoder: str, shard: int, row: int) -> np.ndarray:
        return self._fetch(encoder, [(int(shard), int(row))])[0]

    def vectors(self, encoder: str, hits: Sequence[Hit]) -> np.ndarray:
        if not hits:
            return np.zeros((0, self.manifest.encoders[encoder].dim), dtype=np.float32)
        return self._fetch(encoder, [(h.shard, h.row) for h in hits])

    def vectors_at(self, encoder: str, global_rows: np.ndarray) -> np.ndarray:
        sh, rows = self.split(np.asarray(global_rows, np.int64).reshape(-1))
        return self._fetch(encoder, list(zip(sh.tolist(), rows.tolist())))

    def all_vectors(self, encoder: str) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        """Every shard's vectors, fetched from its partition (whole-index tools: small indexes only)."""
        for i, ids in enumerate(self.ids):
            yield i, self._fetch(encoder, [(i, r) for r in range(len(ids))]), list(ids)

    def close(self) -> None:
        self.handles = []


class RemoteEmbedder(Embedder):
    """``Embedder`` whose text vectors come from the ``QueryEncoder`` deployment (cached as locally)."""

    def __init__(self, *args, encoder_handle=None, timeout_s: float = 60.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_handle, self.timeout_s = encoder_handle, timeout_s

    def embed_texts(self, encoder: str, texts: Sequence[str]) -> np.ndarray:
        name = self.manifest.entry(encoder).name
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for t in texts:
                if (name, t) in self.text_cache:
                    self.text_cache.move_to_end((name, t))
                    out[t] = self.text_cache[(name, t)]
        missing = [t for t in dict.fromkeys(texts) if t not in out]
        responses = [(t, self.encoder_handle.encode_text.remote((name, t))) for t in missing]
        for t, response in responses:
            v = np.asarray(response.result(timeout_s=self.timeout_s), np.float32)
            if v.shape != (self.manifest.encoders[name].dim,):
                raise IndexFormatError(f"the query encoder gave {v.shape} vectors for {name}")
            out[t] = v
        with self._lock:
            for t in missing:
                self.text_cache[(name, t)] = out[t]
            while len(self.text_cache) > 2048:
                self.text_cache.popitem(last=False)
        return np.stack([out[t] for t in texts]).astype(np.float32)


class RayEngine(Engine):
    """``Engine`` over partitions served by Ray Serve (module docstring). Built by ``deploy.serve_index``."""

    def __init__(self, index_dir, *, partitions: list[Partition], handles: list, encoder_handle,
                 device: str = "auto", timeout_s: float = 10.0):
        self._ray = {"partitions": partitions, "handles": handles, "timeout_s": timeout_s}
        super().__init__(index_dir, device=device, search_device="cpu")
        self.embedder = RemoteEmbedder(self.manifest, device=device, index_dir=self.index_dir,
                                       stored_vector=self.stored_vector, load_image=self.records.load_image,
                                       composer=self.embedder._composer, encoder_handle=encoder_handle)

    def _open_version(self):
        path = self.index_dir / store.MANIFEST
        stamp = _stamp(path)
        manifest = store.read_manifest(self.index_dir)
        if not manifest.encoders:
            raise IndexFormatError(f"{self.index_dir}: the manifest lists no encoders")
        names = [s for p in self._ray["partitions"] for s in p.shards]
        if names != [s.name for s in manifest.shards]:
            raise IndexFormatError(f"{self.index_dir} changed while it was deployed; start `loupe serve --ray` again")
        records = RecordStore(self.index_dir, manifest)
        shards = RemoteShardSet(manifest, records.shard_ids, self._ray["partitions"], self._ray["handles"],
                                timeout_s=self._ray["timeout_s"])
        return stamp, manifest, records, shards

    def changed_on_disk(self) -> bool:
        return False        # searchers hold this version: re-indexing needs a restart (docs/distributed.md)
