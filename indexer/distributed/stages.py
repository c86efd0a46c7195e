"""The Ray Data stages of ``loupe index --ray``: decode (CPU tasks) → embed (actor pool) → write (actor pool).

Rows carry one image each: ``item`` (the pickled ``indexer.sources.Item``) and, after decoding, the
record's ``id``/``sha256``/``size``/``width``/``height``, a ``status`` (``new``: to embed and store;
``alias``: content already indexed or claimed by another source of this run; ``error``) with its
``error`` text, and ``px`` (the pickled uint8 transforms of a ``new`` image). Embedding adds one
``v:<encoder>`` vector column (zeros for rows not ``new``) and drops ``px``. A writer batch of up to
``shard_size`` rows becomes one shard, written by the worker into the shared index folder with the same
atomic writes as a local run; the stage's output is one small row per batch (the shard's name, count,
file records, and the batch's aliases and failures) for the driver to commit: no vectors reach it.

``Claims`` (one actor) makes "first source of a content id wins" global across parallel decode tasks,
idempotently (a retried task gets the same answer for the same source).
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np

STATUS_NEW, STATUS_ALIAS, STATUS_ERROR = "new", "alias", "error"


class Claims:
    """A Ray actor: content id → the source that claimed it first in this run (ids already in the index
    are claimed by nobody and always answered as aliases by the decode stage)."""

    def __init__(self):
        self.owner: dict[str, str] = {}

    def claim(self, pairs: list[tuple[str, str]]) -> list[bool]:
        return [self.owner.setdefault(i, s) == s for i, s in pairs]


class ShardNumbers:
    """A Ray actor handing out shard numbers, so parallel writers never pick the same name."""

    def __init__(self, start: int):
        self.next = int(start)

    def take(self) -> int:
        self.next += 1
        return self.next - 1


_CACHE: dict[Any, Any] = {}


def _get(ref):
    """``ray.get`` once per worker process (the transforms, the known ids)."""
    import ray

    key = ref.hex() if hasattr(ref, "hex") else id(ref)
    if key not in _CACHE:
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def decode_batch(batch: dict[str, np.ndarray], *, transforms_ref, known_ref, claims, read_cfg,
                 max_pixels: int | None, min_side: int | None = None) -> dict[str, np.ndarray]:
    """Read, hash, decode and transform a batch of items (``indexer.decode.DecodeDataset``, as a local run)."""
    import ray

    from indexer.decode import DecodeDataset

    items = [pickle.loads(b) for b in batch["item"]]
    dataset = DecodeDataset(items, _get(transforms_ref), _get(known_ref), read_cfg, max_pixels, min_side=min_side)
    records = [dataset[j] for j in range(len(items))]
    fresh = [j for j, r in enumerate(records) if r.error is None and not r.duplicate]
    firsts = ray.get(claims.claim.remote([(records[j].id, items[j].source) for j in fresh])) if fresh else []
    first = {j for j, ok in zip(fresh, firsts) if ok}
    status, px = [], []
    for j, rec in enumerate(records):
        if rec.error is not None:
            status.append(STATUS_ERROR)
        elif j in first:
            status.append(STATUS_NEW)
        else:
            status.append(STATUS_ALIAS)
        keep = j in first and rec.tensors is not None
        px.append(pickle.dumps(tuple(t.numpy() for t in rec.tensors), protocol=5) if keep else b"")
    return {"item": batch["item"], "id": np.array([r.id or "" for r in records], dtype=object),
            "sha256": np.array([r.sha256 or "" for r in records], dtype=object),
            "size": np.array([r.size for r in records], np.int64),
            "width": np.array([r.width for r in records], np.int64),
            "height": np.array([r.height for r in records], np.int64),
            "status": np.array(status, dtype=object),
            "error": np.array([r.error or "" for r in records], dtype=object),
            "px": np.array(px, dtype=object)}


class EmbedActor:
    """The embed stage: builds the encoders once (one GPU each with ``--device cuda``), embeds ``new`` rows."""

    def __init__(self, specs: dict, names: list[str], device: str, precision: str):
        from indexer.embed import Embedder
        from retrieval.encoders import create_encoder, register_encoder

        for name, spec in specs.items():           # encoders registered in the driver (custom ones too)
            register_encoder(name, spec, replace=True)
        self.names = names
        self.embedder = Embedder({n: create_encoder(n, device=device, precision=precision) for n in names}, {})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        new = [j for j, s in enumerate(batch["status"]) if s == STATUS_NEW]
        n = len(batch["status"])
        out = {k: v for k, v in batch.items() if k != "px"}
        vectors: dict[str, np.ndarray] = {}
        if new:
            pixels = [pickle.loads(batch["px"][j]) for j in new]
            tensors = [torch.stack([torch.from_numpy(np.ascontiguousarray(p[g])) for p in pixels])
                       for g in range(len(pixels[0]))]
            vectors, _ = self.embedder.embed({"ok": new, "tensors": tensors}, new)
        for name in self.names:
            enc = self.embedder.encoders[name]
            dim = enc.dim // 8 if enc.binary else enc.dim
            dtype = np.uint8 if enc.binary else np.float32
            col = np.zeros((n, dim), dtype)
            if new:
                col[new] = np.asarray(vectors[name], dtype)
            out[f"v:{name}"] = col
        return out


class ShardWriter:
    """The write stage: each batch of rows becomes one shard in ``index_dir`` (atomic files), reported back."""

    def __init__(self, index_dir: str, encoders: dict[str, dict], numbers):
        self.dir, self.encoders, self.numbers = index_dir, encoders, numbers

    def _index(self, name: str):
        import faiss

        from indexer import index_types
        from indexer.writer import TRAINED_NAME

        entry = self.encoders[name]
        if entry["index_type"] == "ivfpq":
            index = faiss.read_index(f"{self.dir}/{name}/{TRAINED_NAME}")   # the shared quantizer
            index.reset()
            return index
        return index_types.new_index(entry["factory"], entry["dim"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        from indexer import index_types
        from indexer.decode import Record
        from indexer.runner import row_of
        from retrieval.index import store, vector_files

        items = [pickle.loads(b) for b in batch["item"]]
        status = list(batch["status"])
        new = [j for j, s in enumerate(status) if s == STATUS_NEW]
        aliases = [(str(batch["id"][j]), items[j].source) for j, s in enumerate(status) if s == STATUS_ALIAS]
        failures = [(items[j].source, str(batch["error"][j])) for j, s in enumerate(status) if s == STATUS_ERROR]
        shard, records = "", {}
        if new:
            shard = store.shard_name(ray.get(self.numbers.take.remote()))
            for name in self.encoders:
                index = self._index(name)
                index_types.add_vectors(index, np.ascontiguousarray(batch[f"v:{name}"][new]))
                records.update(vector_files.write_vectors(self.dir, name, shard, index))
            rows = [row_of(Record(index=j, id=str(batch["id"][j]), sha256=str(batch["sha256"][j]),
                                  size=int(batch["size"][j]), width=int(batch["width"][j]),
                                  height=int(batch["height"][j])), items[j]) for j in new]
            records.update(store.write_metadata(self.dir, shard, rows))
        files = {store.relative(self.dir, p): r for p, r in records.items()}
        return {"shard": np.array([shard], dtype=object), "count": np.array([len(new)], np.int64),
                "ids": np.array([json.dumps([str(batch["id"][j]) for j in new])], dtype=object),
                "files": np.array([json.dumps(files)], dtype=object),
                "aliases": np.array([json.dumps(aliases)], dtype=object),
                "failures": np.array([json.dumps(failures)], dtype=object),
                "done": np.array([len(status)], np.int64)}
