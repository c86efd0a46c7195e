"""The indexing run: read → decode (DataLoader workers) → encode (batches) → write (background thread).

``build_index(IndexConfig(...))`` is the library entry point behind ``loupe index``:

1. take the index lock, read the manifest (if any) and the ids/sources already indexed, delete files a
   killed run left behind;
2. enumerate the SOURCEs; unchanged sources already in the index are skipped without being read;
   ``--prune`` (and changed files) drop the old rows first;
3. DataLoader workers read each item's bytes, hash them (SHA-256 → stable id), skip content already
   indexed (recorded as an alias), decode once with ``retrieval.images.load_image`` and apply every
   encoder's ``preprocess`` (encoders with the same transform share it);
4. the main thread embeds each batch with every encoder (global + local features in one forward pass);
5. a background thread writes shards (``indexer.writer``) and commits the manifest after each one.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from indexer import index_types
from indexer.decode import (
    DecodeDataset,
    Record,
    assemble,
    batch_bytes,
    iter_batches,
    prefetch_factor,
    split_transform,
    worker_errors_in_iteration,
)
from indexer.lock import IndexLock
from indexer.sources import Failure, Item, ReadConfig, enumerate_sources
from indexer.writer import BackgroundWriter, IndexState, IndexWriter, clean_stray_files, load_state
from retrieval.errors import LoupeError
from retrieval.index import store

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 100_000
DEFAULT_BATCH_SIZE = 64
DEFAULT_COMMIT_SECONDS = 300.0


def default_workers() -> int:
    return max(1, min(32, (os.cpu_count() or 2) - 1))


@dataclass
class IndexConfig:
    sources: Sequence[str]
    out: str | os.PathLike
    encoders: Sequence[str] = ()            # empty: the existing index's encoders, else the default
    index_type: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None              # None: default_workers()
    local_features: bool = False
    local_layer: str = "final"              # "final" map, or "fine" (effnet-lite0: 14x14 stage-4 map) for re-ranking
    prune: bool = False
    allow_download: bool = False
    max_memory: int | None = None           # bytes, for the index-type choice
    max_pixels: int | None = None           # None: retrieval.images.MAX_PIXELS
    wait: bool = False                      # wait for another writer's lock instead of failing
    decode: str = "cpu"                     # "gpu": JPEGs decoded on the encoder's device (indexer.gpu_batch)
    commit_seconds: float | None = DEFAULT_COMMIT_SECONDS   # also commit a (smaller) shard this often
    ray: str | None = None                  # "local" or a Ray cluster address: decode + embed on Ray actors
    ray_actors: int = 1                     # encoder actors (one GPU each with device cuda)


@dataclass
class IndexSummary:
    indexed: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    shards: int = 0
    seconds: float = 0.0
    pruned: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The summary line of ``loupe index`` (keys fixed by INTERFACE.md)."""
        return {"indexed": self.indexed, "skipped": self.skipped, "failed": [f.to_json() for f in self.failed],
                "shards": self.shards, "seconds": round(self.seconds, 3)}


# -- helpers ------------------------------------------------------------------------------------
def _is_unchanged(item: Item, known: tuple[str, int, float | None]) -> bool:
    _, size, mtime = known
    if item.size < 0 or size is None or item.size != size:
        return False
    return mtime is None or item.mtime is None or abs(float(item.mtime) - float(mtime)) < 1e-6


def _source_gone(source: str, seen: set[str], read_tars: set[str]) -> bool:
    if source in seen:
        return False
    if source.startswith(("http://", "https://")):
        return True                      # a URL no manifest of this run lists
    if "#" in source:
        tar = source.split("#", 1)[0]
        if tar.lower().endswith(".tar") and (tar in read_tars or not os.path.exists(tar)):
            return True                  # the tar is gone, or was read and no longer has the member
    return not os.path.exists(source)


def _resolve_encoders(cfg: IndexConfig, manifest: store.Manifest | None) -> list[str]:
    from retrieval.encoders import DEFAULT_ENCODER

    if manifest is None:
        return list(dict.fromkeys(cfg.encoders)) or [DEFAULT_ENCODER]
    existing = list(manifest.encoders)
    if cfg.encoders and set(cfg.encoders) != set(existing):
        raise LoupeError(f"{cfg.out} was built with encoders {', '.join(existing)}; "
                         f"an index cannot change encoders (asked: {', '.join(cfg.encoders)}) — use a new --out")
    return existing


def _embed(enc, x: torch.Tensor, local: str | None):
    """Global vectors, and with ``local`` (a layer: "final" or "fine") the local tokens + grid to store."""
    if enc.binary:
        return enc.hash_bits(x), None
    if local == "fine":
        vecs, _, _, tokens, grid = enc.encode_images_and_fine(x)
        return vecs, (tokens, grid)
    if local:
        vecs, tokens, grid = enc.encode_images_and_local(x)
        return vecs, (tokens, grid)
    return enc.encode_images(x), None


def _plan_manifest(cfg: IndexConfig, manifest: store.Manifest | None, encoders: dict, expected: int
                   ) -> store.Manifest:
    """A new index: choose each encoder's index type. An existing one: refuse another index type."""
    if manifest is None:
        entries = {}
        for n, enc in encoders.items():
            # an encoder may fix its index type (colour-names: 11-d vectors, always exact)
            choice = index_types.choose_index_type(expected, enc.dim, requested=enc.spec.get("index_type")
                                                   or cfg.index_type,
                                                   max_memory=cfg.max_memory, binary=enc.binary,
                                                   shard_size=cfg.shard_size)
            entries[n] = store.EncoderEntry(name=n, dim=enc.dim, index_type=choice.index_type,
                                            factory=choice.factory, modalities=list(enc.modalities))
        return store.Manifest(encoders=entries)
    if cfg.index_type != "auto":
        for entry in manifest.encoders.values():
            fixed = entry.name in encoders and encoders[entry.name].spec.get("index_type")
            if entry.index_type not in (cfg.index_type, "binary") and not fixed:
                raise LoupeError(f"{cfg.out} holds {entry.index_type} shards for {entry.name}; --index-type "
                                 f"{cfg.index_type} would need a new index (use a new --out)")
    return manifest


def _local_encoders(cfg: IndexConfig, manifest: store.Manifest, encoders: dict) -> dict[str, str]:
    """Encoders that store local features → their layer: asked for on a new index (``cfg.local_layer``
    where the encoder has it, else its final map), or as already in the manifest."""
    local: dict[str, str] = {}
    if cfg.local_layer not in ("final", "fine"):
        raise LoupeError(f"unknown --local-layer {cfg.local_layer!r}; use final or fine")
    if cfg.local_features:
        if manifest.shards and all(e.local_features is None for e in manifest.encoders.values()):
            raise LoupeError(f"{cfg.out} was built without --local-features; build a new index to add them")
        if not manifest.shards:
            for n, enc in encoders.items():
                if enc.has_local_features and not enc.binary:
                    layer = cfg.local_layer if cfg.local_layer in enc.local_layers else "final"
                    if layer != cfg.local_layer:
                        log.warning("encoder %s has no %s local layer; storing its final map", n, cfg.local_layer)
                    local[n] = layer
                else:
                    log.warning("encoder %s has no local features; indexing its global vectors only", n)
    for n, e in manifest.encoders.items():
        if e.local_features is not None:
            local[n] = e.local_features.get("layer", "final")
    return local


def _transform_groups(encoders: dict) -> tuple[list, list, dict[str, int]]:
    """Worker transforms, their normalisation stats, and each encoder's group: encoders with the same
    preprocessing share one decode + transform."""
    transforms, stats, group_of, keys = [], [], {}, []
    for n, enc in encoders.items():
        head, norm = split_transform(enc.preprocess) if not enc.binary else (enc.preprocess, None)
        key = repr(head) + repr(None if norm is None else (norm[0].flatten().tolist(), norm[1].flatten().tolist()))
        if key in keys and "object at 0x" not in key:
            group_of[n] = keys.index(key)
        else:
            group_of[n] = len(transforms)
            keys.append(key)
            transforms.append(head)
            stats.append(norm)
    return transforms, stats, group_of


def _triage(records: list[Record], todo: list[Item], seen_ids: set[str], summary: IndexSummary
            ) -> tuple[list[int], list[dict[str, Any]], list[tuple[str, str]]]:
    """Split a batch's records into (kept record indices, their metadata rows, aliases): failures go
    to the summary; content already indexed (or seen earlier in this run) becomes an alias."""
    kept, rows, aliases = [], [], []
    for rec in records:
        item = todo[rec.index]
        if rec.error is not None:
            summary.failed.append(Failure(item.source, rec.error))
        elif rec.duplicate or rec.id in seen_ids:
            aliases.append((rec.id, item.source))   # sent after this batch's rows
            summary.skipped += 1
        else:
            seen_ids.add(rec.id)
            kept.append(rec.index)
            rows.append(_row(rec, item))
    return kept, rows, aliases


def _select_embedded(batch: dict[str, Any], kept: list[int]) -> tuple[dict, dict]:
    """Rows of remotely embedded vectors (one per record in ``batch["ok"]``) for the kept records."""
    position = {idx: i for i, idx in enumerate(batch["ok"])}
    sel = np.asarray([position[idx] for idx in kept], dtype=np.int64)
    vectors = {n: v[sel] for n, v in batch["vectors"].items()}
    local = {n: (tokens[sel], grid) for n, (tokens, grid) in batch["local"].items()}
    return vectors, local


def _row(rec: Record, item: Item) -> dict[str, Any]:
    return {"id": rec.id, "source": item.source, "path": item.path if item.kind == "file" else None,
            "caption": item.caption, "width": rec.width, "height": rec.height, "sha256": rec.sha256,
            "size": rec.size, "mtime": item.mtime, "aliases": [], "extra": item.extra}


# -- the run ------------------------------------------------------------------------------------
def build_index(cfg: IndexConfig, *, progress: Callable[[int, int], None] | None = None,
                progress_total: Callable[[int], None] | None = None) -> IndexSummary:
    """Index ``cfg.sources`` into ``cfg.out`` (see module docstring). ``progress(done, indexed)`` is
    called after every batch, ``progress_total(n)`` once with the number of items to read."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = IndexSummary()
    with IndexLock(out, wait=cfg.wait), worker_errors_in_iteration():
        manifest = store.read_manifest(out) if (out / store.MANIFEST).is_file() else None
        names = _resolve_encoders(cfg, manifest)
        clean_stray_files(out, manifest, names)
        state = load_state(out, manifest) if manifest else IndexState()

        # 1. enumerate; skip what is already indexed and unchanged
        t = time.perf_counter()
        listing = enumerate_sources(cfg.sources)
        summary.failed.extend(listing.failures)
        todo: list[Item] = []
        changed: set[str] = set()
        for item in listing.items:
            known = state.sources.get(item.source)
            if known is not None and _is_unchanged(item, known):
                summary.skipped += 1
                continue
            if known is not None:
                changed.add(item.source)
            todo.append(item)
        summary.timings["enumerate"] = time.perf_counter() - t

        # 2. encoders and their manifest entries
        from retrieval.encoders import create_encoder

        need_models = manifest is None or bool(todo)   # a run with nothing new loads no model
        encoders = ({n: create_encoder(n, device=cfg.device, precision=cfg.precision) for n in names}
                    if need_models else {})
        manifest = _plan_manifest(cfg, manifest, encoders, expected=len(state.ids) + len(todo))
        local = _local_encoders(cfg, manifest, encoders)

        if encoders:
            dev = next(iter(encoders.values())).device
        else:
            from retrieval.device import resolve_device

            dev = resolve_device(cfg.device, cfg.precision)
        writer = IndexWriter(out, manifest, state, shard_size=cfg.shard_size, local=local,
                             use_gpu=dev.is_cuda and _faiss_gpu(), commit_seconds=cfg.commit_seconds)

        # 3. drop sources that disappeared (--prune) or whose content changed
        seen = {it.source for it in listing.items}
        gone = set(changed)
        if cfg.prune:
            read_tars = {it.path for it in listing.items if it.kind == "tar"}
            gone |= {s for s in state.sources if _source_gone(s, seen, read_tars)}
        if gone:
            summary.pruned = writer.drop_sources(gone)
            log.info("removed %d images whose source is gone or changed", summary.pruned)

        # 4. read/decode → encode → write
        transforms, stats, group_of = _transform_groups(encoders)
        gpu_decode = cfg.decode == "gpu" and bool(encoders)
        if cfg.decode not in ("cpu", "gpu"):
            raise LoupeError(f"unknown --decode {cfg.decode!r}: use cpu or gpu")
        if gpu_decode and any(not gpu_decodable(n, e, stats, group_of) for n, e in encoders.items()):
            log.warning("--decode gpu applies to encoders with a resize/crop/normalise preprocess (CLIP, DINOv2, "
                        "effnet, ConSE, colour-names); %s decode on the CPU, so the whole run does",
                        ", ".join(n for n, e in encoders.items() if not gpu_decodable(n, e, stats, group_of)))
            gpu_decode = False
        if gpu_decode:
            from indexer.gpu_batch import decode_raw
        workers = default_workers() if cfg.workers is None else max(0, int(cfg.workers))
        dataset = DecodeDataset(todo, transforms, frozenset(state.ids), ReadConfig(allow_download=cfg.allow_download),
                                cfg.max_pixels, gpu_jpeg=gpu_decode)
        if progress_total:
            progress_total(len(todo))
        seen_ids = set(state.ids)
        t_read = t_encode = 0.0
        done = 0
        if cfg.ray:
            from indexer.distributed import ray_batches

            batches = ray_batches(dataset, encoders, writer.local_layers, batch_size=max(1, cfg.batch_size),
                                  address=cfg.ray, actors=cfg.ray_actors, device=cfg.device,
                                  precision=cfg.precision, threads=max(1, workers))
        else:
            bsz = max(1, cfg.batch_size)
            prefetch = prefetch_factor(batch_bytes(encoders, bsz, gpu_decode), workers)
            batches = iter_batches(dataset, batch_size=bsz, workers=workers, pin=dev.is_cuda, prefetch=prefetch or 1)
            first = next(batches, None)         # the first workers fork before the writer thread starts
            batches = itertools.chain([first] if first is not None else [], batches)
        background = BackgroundWriter(writer)
        finished = False
        try:
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                t_read += time.perf_counter() - t
                if batch is None:
                    break
                embedded = "vectors" in batch     # embedded remotely (--ray)
                decoded, fallback = {}, {}
                if gpu_decode and not embedded:
                    decoded, fallback = decode_raw(batch["records"], encoders, transforms, cfg.max_pixels,
                                                   dev.device)
                kept, rows, aliases = _triage(batch["records"], todo, seen_ids, summary)
                if rows:
                    t = time.perf_counter()
                    if embedded:
                        vectors, local_out = _select_embedded(batch, kept)
                    else:
                        vectors, local_out = {}, {}
                        for n, enc in encoders.items():
                            x = assemble(batch, kept, decoded, fallback, group_of[n], stats, enc)
                            vectors[n], loc = _embed(enc, x, writer.local_layers.get(n))
                            if loc is not None:
                                local_out[n] = loc
                    t_encode += time.perf_counter() - t
                    background.add(rows, vectors, local_out)
                    summary.indexed += len(rows)
                for image_id, source in aliases:
                    background.add_alias(image_id, source)
                done += len(batch["records"])
                if progress:
                    progress(done, summary.indexed)
            t = time.perf_counter()
            background.close()
            finished = True
            summary.timings["write_wait"] = time.perf_counter() - t
        except KeyboardInterrupt:
            background.close()   # commit what was embedded, then stop
            finished = True
            raise
        finally:
            if not finished:
                background.close(finish=False)
        summary.timings.update(read_wait=t_read, encode=t_encode)
        summary.shards = len(manifest.shards)
    summary.seconds = time.perf_counter() - t0
    return summary


def gpu_decodable(name: str, enc, stats: list, group_of: dict[str, int]) -> bool:
    """Whether ``--decode gpu`` can stand in for this encoder's CPU preprocess: a ``[..., ToTensor,
    Normalize]`` transform (resize + crop + normalise, done on the GPU), or colour-names (the whole image in
    [0, 1]); not SSCD's or PDQ's uint8 HWC inputs."""
    return enc.spec.family == "colour" or (not enc.binary and stats[group_of[name]] is not None)


def _faiss_gpu() -> bool:
    from retrieval.device import faiss_gpu_available

    return faiss_gpu_available()


def stored_vectors(index_dir, encoder: str) -> tuple[np.ndarray, list[str]]:
    """All vectors of ``encoder`` and their ids, in shard order (tests, benchmarks, small tools)."""
    manifest = store.read_manifest(index_dir)
    entry = manifest.encoders[encoder]
    vecs, ids = [], []
    for shard in manifest.shards:
        index = store.read_vectors(index_dir, encoder, shard.name, mmap=False, binary=entry.index_type == "binary")
        vecs.append(index_types.all_codes(index))
        ids.extend(store.read_metadata(index_dir, shard.name).column("id").to_pylist())
    dim = entry.dim // 8 if entry.index_type == "binary" else entry.dim
    return (np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)), ids

