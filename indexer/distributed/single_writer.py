"""``--ray`` with ``--local-features``: decode + embed on Ray actors, the driver alone writes.

Local features are reduced with a PCA fitted on the first shard's descriptors by the one writer that
then uses it for every shard (``indexer.local_features``), so this mode keeps the local writer: Ray Data
feeds batches to a pool of actors (``--ray-actors``, one GPU each with ``--device cuda``); each builds the
encoders once, reads and decodes its batch with a thread pool, embeds it with ``indexer.embed.Embedder``
and sends back the records and vectors; the driver's mapper (``select_embedded``) picks the rows of the
records it keeps and the usual writer commits them (same resume and lock semantics as a local run).
Without local features, ``indexer.distributed.parallel`` writes shards on the workers instead.
"""

from __future__ import annotations

import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from retrieval.errors import MissingExtraError

if TYPE_CHECKING:
    from indexer.runner import ReadBatch

log = logging.getLogger(__name__)


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("--ray needs the optional extra 'distributed': pip install 'loupe-search[distributed]'"
                                ) from exc
    return ray


class EmbedActor:
    """A Ray Data actor: decode + embed whole batches, return pickled records and vectors."""

    def __init__(self, items_ref, known_ids_ref, specs: dict, names: list[str], local: dict[str, str], device: str,
                 precision: str, batch_size: int, read_cfg, max_pixels: int | None, threads: int):
        import ray

        from indexer.decode import DecodeDataset
        from indexer.embed import Embedder
        from retrieval.encoders import create_encoder, register_encoder

        for name, spec in specs.items():           # encoders registered in the driver (custom ones too)
            register_encoder(name, spec, replace=True)
        items = ray.get(items_ref) if isinstance(items_ref, ray.ObjectRef) else items_ref
        known = ray.get(known_ids_ref) if isinstance(known_ids_ref, ray.ObjectRef) else known_ids_ref
        self.embedder = Embedder({n: create_encoder(n, device=device, precision=precision) for n in names}, local)
        self.dataset = DecodeDataset(items, self.embedder.transforms, frozenset(known), read_cfg, max_pixels,
                                     min_side=self.embedder.min_side)
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))

    def embed_batch(self, number: int) -> dict[str, Any]:
        from indexer.decode import collate

        n = len(self.dataset)
        indices = range(number * self.batch_size, min(n, (number + 1) * self.batch_size))
        records = list(self.pool.map(self.dataset.__getitem__, indices))
        batch = collate(records)
        vectors, local = self.embedder.embed(batch, batch["ok"]) if batch["ok"] else ({}, {})
        return {"records": batch["records"], "ok": batch["ok"], "vectors": vectors, "local": local}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [pickle.dumps(self.embed_batch(int(b)), protocol=pickle.HIGHEST_PROTOCOL) for b in batch["id"]]
        return {"payload": np.array(out, dtype=object)}


def ray_batches(dataset, encoders: dict, local: dict[str, str], *, batch_size: int, address: str | None,
                actors: int, device: str, precision: str, threads: int) -> Iterator[dict[str, Any]]:
    """Embedded batches computed on a Ray cluster, in order: ``{"records", "ok", "vectors", "local"}``.

    ``vectors[name]`` / ``local[name]`` hold one row per record index in ``ok`` (decoded without error).
    """
    ray = _require_ray()
    from retrieval.device import resolve_device
    from retrieval.encoders import get_spec

    n = len(dataset)
    if n == 0:
        return
    if not ray.is_initialized():
        kwargs = {"address": address} if address and address != "local" else {}
        ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    uses_gpu = resolve_device(device, precision).is_cuda
    specs = {name: get_spec(name) for name in encoders}
    n_batches = (n + batch_size - 1) // batch_size
    ds = ray.data.range(n_batches, override_num_blocks=min(n_batches, max(1, actors) * 4))
    ds = ds.map_batches(
        EmbedActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
        num_gpus=1 if uses_gpu else 0, num_cpus=max(1, threads),
        fn_constructor_kwargs=dict(
            items_ref=ray.put(list(dataset.items)), known_ids_ref=ray.put(sorted(dataset.known_ids)),
            specs=specs, names=list(encoders), local=dict(local), device=device, precision=precision,
            batch_size=batch_size, read_cfg=dataset.read_cfg, max_pixels=dataset.max_pixels, threads=threads))
    log.info("ray: %d batches of %d on %d actor(s)%s", n_batches, batch_size, actors, " with GPUs" if uses_gpu else "")
    for out in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
        for payload in out["payload"]:
            yield pickle.loads(payload)


def select_embedded(batch: ReadBatch) -> tuple[dict, dict]:
    """The mapper of a Ray run: the rows of the actors' vectors (one per record in ``ok``, decoded without
    error) that belong to the kept records, in order."""
    position = {idx: i for i, idx in enumerate(batch.data["ok"])}
    sel = np.asarray([position[idx] for idx in batch.kept], dtype=np.int64)
    vectors = {n: v[sel] for n, v in batch.data["vectors"].items()}
    local = {n: (tokens[sel], grid) for n, (tokens, grid) in batch.data["local"].items()}
    return vectors, local
