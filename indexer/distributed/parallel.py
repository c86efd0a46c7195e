"""``loupe index ... --ray [ADDRESS]``: Ray Data stages, shards written by the workers, the driver commits.

The run (planned by ``indexer.pipeline`` exactly as a local run: lock, manifest, sources to read, index
types) is one Ray Data pipeline, streamed (``indexer.distributed.stages``)::

    from_items(items) → map_batches(decode_batch)       read bytes, hash, decode, transform: CPU tasks
                      → map_batches(EmbedActor)         encoders on an actor pool (one GPU each on cuda)
                      → map_batches(ShardWriter)        one shard per batch, written by the worker
                      → iter_rows() in the driver       commit: manifest += shard (atomic), aliases

No vector passes through the driver: it receives one small row per shard (its name, count, ids and
file records) and replaces ``manifest.json`` after each (``store.write_manifest``, atomic). Until then
the shard's files are unlisted; a killed driver's next run deletes them (``clean_stray_files``) and
reads their images again, and skips every image a listed shard holds: none is lost, none stored twice.
A killed worker's task is retried by Ray Data; the shard it may have half-written is never listed and
is deleted at the end of the run.

IVF-PQ: the driver trains each IVF-PQ encoder's quantizer once, on the vectors of a sample of the images
(``train_sample``: the same pipeline's decode + embed on the first items, vectors collected), writes it as
``<encoder>/trained.faiss``, and every writer adds its shard's vectors to a copy of it (shared quantizer:
the shards merge into one searchable index, see ``retrieval.index.optimize``).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from indexer.sources import Failure
from retrieval.errors import MissingExtraError
from retrieval.index import store

log = logging.getLogger(__name__)

TRAIN_SAMPLE = 20_000      # images embedded to train an IVF-PQ quantizer (at most)
DECODE_CPUS = 0.5          # logical CPUs per decode task
WRITER_CPUS = 0.5          # logical CPUs per shard-writer actor


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("--ray needs the optional extra 'ray': pip install 'loupe-search[ray]'") from exc
    return ray


def init_ray(address: str | None) -> None:
    ray = require_ray()
    if not ray.is_initialized():
        kwargs = {"address": address} if address and address != "local" else {}
        ray.init(include_dashboard=False, log_to_driver=False, **kwargs)


def _embedded(ray, items, plan, cfg, *, actors: int, uses_gpu: bool, claims, known_ref, transforms_ref):
    """The decode → embed part of the pipeline over ``items``."""
    from indexer.distributed.stages import EmbedActor, decode_batch
    from indexer.embed import decode_side
    from indexer.sources import ReadConfig
    from retrieval.encoders import get_spec

    bsz = max(1, cfg.batch_size)
    ds = ray.data.from_items([{"item": pickle.dumps(it, protocol=5)} for it in items],
                             override_num_blocks=max(1, min(len(items) // bsz + 1, 4 * max(1, actors) * 4)))
    # decode: CPU tasks (half a CPU each: reading is I/O-bound), a separate operator from the encoders
    ds = ds.map_batches(decode_batch, batch_size=bsz, batch_format="numpy", num_cpus=DECODE_CPUS,
                        fn_kwargs=dict(transforms_ref=transforms_ref, known_ref=known_ref, claims=claims,
                                       read_cfg=ReadConfig(allow_download=cfg.allow_download),
                                       max_pixels=cfg.max_pixels, min_side=decode_side(plan.encoders)))
    return ds.map_batches(EmbedActor, batch_size=bsz, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
                          num_gpus=1 if uses_gpu else 0, num_cpus=0 if uses_gpu else 1,
                          fn_constructor_kwargs=dict(specs={n: get_spec(n) for n in plan.encoders},
                                                     names=list(plan.encoders), device=cfg.device,
                                                     precision=cfg.precision))


def train_quantizers(ray, plan, cfg, embedded_sample) -> None:
    """IVF-PQ encoders without a trained quantizer: train each once on the sample's vectors (driver)."""
    import faiss

    from indexer import index_types
    from indexer.writer import TRAINED_NAME

    writer = plan.writer
    todo = [n for n, e in writer.manifest.encoders.items()
            if e.index_type == "ivfpq" and not (writer.dir / n / TRAINED_NAME).is_file()]
    if not todo:
        return
    vecs: dict[str, list[np.ndarray]] = {n: [] for n in todo}
    for batch in embedded_sample.iter_batches(batch_size=256, batch_format="numpy"):
        new = batch["status"] == "new"
        for n in todo:
            vecs[n].append(batch[f"v:{n}"][new])
    for n in todo:
        sample = np.concatenate(vecs[n]) if vecs[n] else np.zeros((0, writer.manifest.encoders[n].dim), np.float32)
        entry = writer.manifest.encoders[n]
        if len(sample) < 2:
            log.warning("%s: too few vectors (%d) to train IVF-PQ; using a flat index", n, len(sample))
            entry.index_type, entry.factory = "flat", "Flat"
            continue
        entry.factory = index_types.fit_factory(entry.factory, len(sample))
        index = index_types.new_index(entry.factory, entry.dim)
        index_types.train(index, sample, use_gpu=writer.use_gpu)
        path = writer.dir / n / TRAINED_NAME
        record = store.atomic_write_with(path, lambda tmp, index=index: faiss.write_index(index, tmp))
        writer.manifest.record(writer.dir, path, record)
        log.info("%s: IVF-PQ quantizer trained once on %d sampled vectors", n, len(sample))
    store.write_manifest(writer.dir, writer.manifest)


def index_on_ray(cfg, plan, summary, progress: Callable[[int, int], None] | None = None) -> None:
    """Run the pipeline of the module docstring for ``plan.todo``; counts and stage times go to ``summary``."""
    import time

    from indexer.distributed.stages import Claims, ShardNumbers, ShardWriter
    from indexer.embed import Embedder
    from indexer.writer import clean_stray_files
    from retrieval.device import resolve_device

    ray = require_ray()
    init_ray(cfg.ray)
    writer = plan.writer
    items = list(plan.todo)
    if not items:
        writer.finish()
        return
    if cfg.decode == "gpu":
        log.warning("--decode gpu applies to local runs; with --ray the decode tasks decode on the CPU")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    uses_gpu = resolve_device(cfg.device, cfg.precision).is_cuda
    actors = max(1, cfg.ray_actors)
    claims = ray.remote(Claims).options(num_cpus=0).remote()
    known_ref = ray.put(frozenset(plan.known_ids))
    transforms_ref = ray.put(Embedder(plan.encoders, {}).transforms)
    t0 = time.perf_counter()
    if any(e.index_type == "ivfpq" for e in writer.manifest.encoders.values()):
        sample_claims = ray.remote(Claims).options(num_cpus=0).remote()
        sample = _embedded(ray, items[:TRAIN_SAMPLE], plan, cfg, actors=actors, uses_gpu=uses_gpu,
                           claims=sample_claims, known_ref=known_ref, transforms_ref=transforms_ref)
        train_quantizers(ray, plan, cfg, sample)
    numbers = ray.remote(ShardNumbers).options(num_cpus=0).remote(writer.next_no)
    encoders = {n: {"index_type": e.index_type, "factory": e.factory, "dim": e.dim}
                for n, e in writer.manifest.encoders.items()}
    ds = _embedded(ray, items, plan, cfg, actors=actors, uses_gpu=uses_gpu, claims=claims, known_ref=known_ref,
                   transforms_ref=transforms_ref)
    ds = ds.map_batches(ShardWriter, batch_size=max(1, cfg.shard_size), batch_format="numpy", num_cpus=WRITER_CPUS,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.ray_writers)),
                        fn_constructor_kwargs=dict(index_dir=str(writer.dir), encoders=encoders, numbers=numbers))
    pending: list[tuple[str, str]] = []
    done = 0
    for out in ds.iter_rows():
        commit_shard(writer, out, summary, pending)
        done += int(out["done"])
        if progress:
            progress(done, summary.indexed)
    summary.stages.embed += time.perf_counter() - t0        # decode + embed + write, overlapped on the cluster
    for image_id, source in pending:                        # an alias of an image no shard holds
        log.warning("%s has the content of %s, which was not stored; it is indexed on the next run", source,
                    image_id)
    with summary.stages.timing("write"):
        writer.finish()
        clean_stray_files(writer.dir, writer.manifest, list(writer.manifest.encoders))   # killed workers' files
    for actor in (claims, numbers):
        ray.kill(actor)


def commit_shard(writer, out: dict, summary, pending: list[tuple[str, str]]) -> None:
    """The driver's part: list one written shard in the manifest (atomic), then record aliases/failures."""
    shard, count = str(out["shard"]), int(out["count"])
    summary.failed.extend(Failure(s, r) for s, r in json.loads(out["failures"]))
    aliases = [tuple(a) for a in json.loads(out["aliases"])]
    summary.skipped += len(aliases)
    if shard:
        ids = json.loads(out["ids"])
        for rel, record in json.loads(out["files"]).items():
            writer.manifest.record(writer.dir, Path(writer.dir) / rel, record)
        writer.manifest.shards.append(store.ShardEntry(shard, count))
        for image_id in ids:
            writer.state.ids[image_id] = shard
        store.write_manifest(writer.dir, writer.manifest)
        writer.checkpoint("manifest")
        writer.next_no = max(writer.next_no, int(shard.split("-")[1]) + 1)
        summary.indexed += count
    still = []
    for image_id, source in pending + aliases:
        if image_id in writer.state.ids:
            writer.add_alias(image_id, source)
        else:
            still.append((image_id, source))
    pending[:] = still
