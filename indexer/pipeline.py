"""The indexing run behind ``loupe index``: plan it, then reader → mapper → writer (``indexer.runner``).

``build_index(IndexConfig(...))``:

1. plan: take the index lock, read the manifest (if any) and the ids/sources already indexed, delete
   files a killed run left behind; enumerate the SOURCEs (``indexer.sources``): unchanged sources
   already in the index are skipped without being read; load the encoders, choose each one's index
   type; ``--prune`` (and changed files) drop the old rows first;
2. reader (``indexer.decode``): DataLoader workers read each item's bytes, hash them (SHA-256 → stable
   id), skip content already indexed, decode once with ``retrieval.images.load_image`` and apply every
   encoder group's transform (``--decode gpu``: JPEGs are decoded on the device, ``indexer.gpu_batch``);
   ``runner.triage`` sorts the records into new images, aliases and failures;
3. mapper (``indexer.embed``): every encoder embeds each batch (global + local features in one pass);
4. writer (``indexer.writer``): a background thread writes shards and commits the manifest after each.

``runner.run_stages`` joins the three and times each (the summary's ``stages``). With ``--ray`` the
three run as Ray Data stages on the cluster and workers write the shards; this process only commits the
manifest (``indexer.distributed.parallel``); with ``--ray --local-features`` the reader and the embedding
run on Ray actors and the writer here is the same (``indexer.distributed.single_writer``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from indexer import index_types
from indexer.decode import DecodeDataset, batch_bytes, iter_batches, prefetch_factor, worker_errors_in_iteration
from indexer.defaults import DEFAULT_BATCH_SIZE, DEFAULT_COMMIT_SECONDS, DEFAULT_SHARD_SIZE, default_workers
from indexer.embed import Embedder, gpu_decodable
from indexer.lock import IndexLock
from indexer.runner import IndexSummary, Mapper, ReadBatch, run_stages, triage
from indexer.sources import Item, ReadConfig, enumerate_sources
from indexer.writer import BackgroundWriter, IndexState, IndexWriter, clean_stray_files, load_state
from retrieval.device import DeviceConfig, resolve_device
from retrieval.errors import LoupeError
from retrieval.index import store, vector_files

log = logging.getLogger(__name__)

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
    max_pixels: int | None = None           # None: LOUPE_MAX_PIXELS (retrieval.settings.max_pixels)
    wait: bool = False                      # wait for another writer's lock instead of failing
    decode: str = "cpu"                     # "gpu": JPEGs decoded on the encoder's device (indexer.gpu_batch)
    commit_seconds: float | None = DEFAULT_COMMIT_SECONDS   # also commit a (smaller) shard this often
    ray: str | None = None                  # "local" or a Ray cluster address: decode + embed on Ray actors
    ray_actors: int = 1                     # encoder actors (one GPU each with device cuda)
    ray_writers: int = 2                    # shard-writer actors (--ray without --local-features)
    optimize: str = "auto"                  # auto | always | never: build the searchable layout at the end
    vectors: str | None = None              # bring your own embeddings: this column of a Parquet SOURCE
    target_recall: float = 0.95             # recall@10 the layout's search parameters must reach
    regions: bool = False                   # also store a few object regions per picture (retrieval.regions)


@dataclass
class _Plan:
    """What a run reads, with what, into what (the result of ``_plan``)."""

    todo: list[Item]                        # items to read, in order
    known_ids: frozenset[str]               # content already in the index
    encoders: dict                          # name -> Encoder (empty when there is nothing to embed)
    writer: IndexWriter
    device: DeviceConfig                    # the encoders' device


# -- the run ------------------------------------------------------------------------------------
def build_index(cfg: IndexConfig, *, progress: Callable[[int, int], None] | None = None,
                progress_total: Callable[[int], None] | None = None,
                checkpoint: Callable[[str], None] | None = None) -> IndexSummary:
    """Index ``cfg.sources`` into ``cfg.out`` (see module docstring). ``progress(done, indexed)`` is
    called after every batch, ``progress_total(n)`` once with the number of items to read, and
    ``checkpoint(point)`` at each named point of the writer's commit protocol (``indexer.writer``;
    tests crash the run there)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _build(cfg, out, t0, progress, progress_total, checkpoint)
    except BaseException:
        if created:
            _remove_if_empty(out)       # a run that failed before writing anything leaves no folder behind
        raise


def _remove_if_empty(out: Path) -> None:
    """Delete ``out`` when it holds nothing but the writer's lock file (and empty folders)."""
    from indexer.lock import LOCK_NAME

    try:
        if any(p.is_file() and p.name != LOCK_NAME for p in out.rglob("*")):
            return
        (out / LOCK_NAME).unlink(missing_ok=True)
        for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        out.rmdir()
    except OSError:
        pass


def _build(cfg: IndexConfig, out: Path, t0: float, progress, progress_total, checkpoint) -> IndexSummary:
    summary = IndexSummary()
    if cfg.vectors:                         # bring your own embeddings: no decoding, no model
        from indexer.vectors import index_vectors

        with IndexLock(out, wait=cfg.wait):
            with summary.stages.timing("write"):
                index_vectors(cfg, out, summary, checkpoint, progress)
            _maybe_optimize(cfg, out, summary)
        summary.seconds = time.perf_counter() - t0
        return summary
    with IndexLock(out, wait=cfg.wait), worker_errors_in_iteration():
        plan = _plan(cfg, out, summary, checkpoint)
        if progress_total:
            progress_total(len(plan.todo))
        if cfg.ray and not plan.writer.local:   # Ray Data stages, shards written by the workers
            from indexer.distributed import index_on_ray

            index_on_ray(cfg, plan, summary, progress)
        else:
            reader, mapper = _stages(cfg, plan)
            run_stages(reader, mapper, lambda: BackgroundWriter(plan.writer), summary, progress)
        summary.shards = len(plan.writer.manifest.shards)
        if cfg.regions and (out / store.MANIFEST).is_file():   # the region index (retrieval/regions/store.py)
            from retrieval.regions.store import build_region_index

            summary.regions = build_region_index(out, device=cfg.device, batch_size=cfg.batch_size)   # + seconds
        _maybe_optimize(cfg, out, summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def _maybe_optimize(cfg: IndexConfig, out: Path, summary: IndexSummary) -> None:
    """Build the searchable layout (``retrieval.index.optimize``) when it pays off (``auto``: enough images
    and shards outside the current layout), always, or never; the writer's lock is still held."""
    from retrieval.index.optimize import needs_optimize, optimize

    if cfg.optimize == "never" or not (out / store.MANIFEST).is_file():
        return
    manifest = store.read_manifest(out)
    if manifest.count == 0 or (cfg.optimize != "always" and not needs_optimize(manifest)):
        return
    with summary.stages.timing("optimize"):
        summary.optimized = optimize(out, target_recall=cfg.target_recall, max_memory=cfg.max_memory,
                                     locked=True).to_json()


def _plan(cfg: IndexConfig, out: Path, summary: IndexSummary, checkpoint: Callable[[str], None] | None) -> _Plan:
    """Step 1 of the module docstring: what to read, the encoders, and a writer with gone sources dropped."""
    manifest = store.read_manifest(out) if (out / store.MANIFEST).is_file() else None
    names = _resolve_encoders(cfg, manifest)
    clean_stray_files(out, manifest, names)
    state = load_state(out, manifest) if manifest else IndexState()

    # enumerate (the reader's first step); skip what is already indexed and unchanged
    with summary.stages.timing("read"):
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

    # encoders and their manifest entries; a run with nothing new loads no model
    from retrieval.encoders import create_encoder

    need_models = manifest is None or bool(todo)
    encoders = ({n: create_encoder(n, device=cfg.device, precision=cfg.precision) for n in names}
                if need_models else {})
    manifest = _plan_manifest(cfg, manifest, encoders, expected=len(state.ids) + len(todo))
    local = _local_encoders(cfg, manifest, encoders)
    dev = next(iter(encoders.values())).device if encoders else resolve_device(cfg.device, cfg.precision)
    writer = IndexWriter(out, manifest, state, shard_size=cfg.shard_size, local=local,
                         use_gpu=dev.is_cuda and _faiss_gpu(), commit_seconds=cfg.commit_seconds,
                         checkpoint=checkpoint)

    # drop sources that disappeared (--prune) or whose content changed
    gone = set(changed)
    if cfg.prune:
        seen = {it.source for it in listing.items}
        read_tars = {it.path for it in listing.items if it.kind == "tar"}
        gone |= {s for s in state.sources if _source_gone(s, seen, read_tars)}
    if gone:
        summary.pruned = writer.drop_sources(gone)
        log.info("removed %d images whose source is gone or changed", summary.pruned)
    return _Plan(todo, frozenset(state.ids), encoders, writer, dev)


def _stages(cfg: IndexConfig, plan: _Plan) -> tuple[Iterator[ReadBatch], Mapper]:
    """The reader and the mapper: DataLoader workers + ``Embedder`` here, or Ray actors (``--ray``)."""
    embedder = Embedder(plan.encoders, plan.writer.local_layers)
    gpu_decode = _use_gpu_decode(cfg, embedder)
    workers = default_workers() if cfg.workers is None else max(0, int(cfg.workers))
    dataset = DecodeDataset(plan.todo, embedder.transforms, plan.known_ids,
                            ReadConfig(allow_download=cfg.allow_download), cfg.max_pixels, gpu_jpeg=gpu_decode,
                            min_side=embedder.min_side)
    bsz = max(1, cfg.batch_size)
    if cfg.ray:
        from indexer.distributed.single_writer import ray_batches, select_embedded

        batches = ray_batches(dataset, plan.encoders, plan.writer.local_layers, batch_size=bsz, address=cfg.ray,
                              actors=cfg.ray_actors, device=cfg.device, precision=cfg.precision,
                              threads=max(1, workers))
        return triage(batches, plan.todo, plan.known_ids), select_embedded
    prefetch = prefetch_factor(batch_bytes(plan.encoders, bsz, gpu_decode), workers)
    batches = iter_batches(dataset, batch_size=bsz, workers=workers, pin=plan.device.is_cuda, prefetch=prefetch or 1)
    if gpu_decode:
        batches = _decode_on_device(batches, embedder, cfg.max_pixels, plan.device.device)
    return triage(batches, plan.todo, plan.known_ids), embedder


def _use_gpu_decode(cfg: IndexConfig, embedder: Embedder) -> bool:
    """``--decode gpu`` when every encoder's preprocess can run on the GPU (else a warning: CPU decode)."""
    if cfg.decode not in ("cpu", "gpu"):
        raise LoupeError(f"unknown --decode {cfg.decode!r}: use cpu or gpu")
    if cfg.decode != "gpu" or not embedder.encoders:
        return False
    cpu_only = [n for n, e in embedder.encoders.items() if not gpu_decodable(n, e, embedder.stats, embedder.group_of)]
    if cpu_only:
        log.warning("--decode gpu applies to encoders with a resize/crop/normalise preprocess (CLIP, DINOv2, "
                    "effnet, ConSE, colour-names); %s decode on the CPU, so the whole run does", ", ".join(cpu_only))
        return False
    return True


def _decode_on_device(batches: Iterator[dict], embedder: Embedder, max_pixels: int | None, device
                      ) -> Iterator[dict]:
    """``--decode gpu``: each batch's raw JPEGs decoded on the encoders' device (``decoded``), and the
    JPEGs it refused on the CPU (``fallback``); records that fail on both get their ``error``."""
    from indexer.gpu_batch import decode_raw

    for batch in batches:
        batch["decoded"], batch["fallback"] = decode_raw(batch["records"], embedder.encoders, embedder.transforms,
                                                         max_pixels, device)
        yield batch


# -- planning helpers ---------------------------------------------------------------------------------
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


def _faiss_gpu() -> bool:
    from retrieval.device import faiss_gpu_available

    return faiss_gpu_available()


def stored_vectors(index_dir, encoder: str) -> tuple[np.ndarray, list[str]]:
    """All vectors of ``encoder`` and their ids, in shard order (tests, benchmarks, small tools)."""
    manifest = store.read_manifest(index_dir)
    entry = manifest.encoders[encoder]
    vecs, ids = [], []
    for shard in manifest.shards:
        index = vector_files.read_vectors(index_dir, encoder, shard.name, mmap=False,
                                          binary=entry.index_type == "binary")
        vecs.append(index_types.all_codes(index))
        ids.extend(store.read_metadata(index_dir, shard.name).column("id").to_pylist())
    dim = entry.dim // 8 if entry.index_type == "binary" else entry.dim
    return (np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)), ids

