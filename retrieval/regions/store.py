"""The region index: a few object regions of every indexed picture, with their boxes and vectors.

``loupe index --regions`` (``build_region_index``, run by the indexer under its lock once the shards are
written) proposes regions in each picture (``retrieval.regions.proposals``, ``INDEX_PROPOSALS``: up to 4),
crops and embeds them with each image encoder of the index, and writes per encoder:

* ``regions/<encoder>.npy``: float32 ``[R, d]`` unit rows;
* ``regions/<encoder>.parquet``: ``id`` (the image), ``x0, y0, x1, y1`` (the box in pixels of the picture).

Both are written atomically and recorded in the manifest's ``files`` (size + SHA-256) and in
``manifest.extra["regions"][encoder] = {"vectors", "boxes", "count", "images", "dim"}``. A later run
with ``--regions`` embeds only pictures without regions and drops the rows of pictures no longer indexed;
a run without it leaves the files as they are (new pictures then have no regions; queries still work).

With ``INDEX_PROPOSALS.residual`` set, each picture's proposals start with its residual region
(``retrieval.regions.residual``): the part of it that its nearest indexed pictures (by the stored whole-picture
vectors, itself left out) do not explain, e.g. an object pasted on a picture the index also holds.

``RegionSet`` is the reader: the rows of images the index still holds, searched exactly (one product).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index import store
from retrieval.regions.views import ViewWriter, clean_stray, fits, read_views, view_paths

log = logging.getLogger("loupe.regions")

REGION_DIR = "regions"
EXTRA_KEY = "regions"


def region_paths(index_dir, encoder: str) -> tuple[Path, Path]:
    base = Path(index_dir) / REGION_DIR
    return base / f"{encoder}.npy", base / f"{encoder}.parquet"


@dataclass
class RegionSet:
    """One encoder's region vectors: ``vectors [R, d]``, ``ids`` (the image of each row) and ``boxes [R, 4]``."""

    encoder: str
    vectors: np.ndarray
    ids: list[str]
    boxes: np.ndarray
    views: Any = None          # ``views.StoredViews``: the pictures' feature maps (None: not stored)

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.boxes.nbytes + 16 * len(self.ids))

    def search(self, query: np.ndarray, k: int, allowed: Callable[[str], bool] | None = None
               ) -> list[tuple[str, float, tuple[int, int, int, int]]]:
        """The best region of each of the top-``k`` images: ``[(image id, score, box)]``, best first."""
        if len(self) == 0:
            return []
        scores = self.vectors @ np.asarray(query, np.float32).reshape(-1)
        out: dict[str, tuple[float, tuple[int, int, int, int]]] = {}
        for row in np.argsort(-scores, kind="stable"):
            image_id = self.ids[row]
            if image_id in out or (allowed is not None and not allowed(image_id)):
                continue
            out[image_id] = (float(scores[row]), tuple(int(v) for v in self.boxes[row]))
            if len(out) >= k:
                break
        return [(i, s, b) for i, (s, b) in out.items()]


def _read(index_dir, manifest: store.Manifest, encoder: str, info: dict[str, Any]) -> RegionSet:
    import pyarrow.parquet as pq

    vec_path, box_path = region_paths(index_dir, encoder)
    for path in (vec_path, box_path):
        store.check_size(index_dir, manifest, path)
    try:
        vectors = np.load(vec_path, allow_pickle=False)
        table = pq.read_table(box_path)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"the region index of {encoder} is unreadable ({exc}); "
                               "rebuild it with `loupe index ... --regions`") from None
    entry = manifest.encoders.get(encoder)
    if vectors.ndim != 2 or len(vectors) != table.num_rows or (entry is not None and vectors.shape[1] != entry.dim):
        raise IndexFormatError(f"the region index of {encoder} has {vectors.shape} vectors for {table.num_rows} "
                               "boxes; rebuild it with `loupe index ... --regions`")
    cols = table.to_pydict()
    boxes = np.stack([np.asarray(cols[c], np.int32) for c in ("x0", "y0", "x1", "y1")], axis=1) \
        if table.num_rows else np.zeros((0, 4), np.int32)
    return RegionSet(encoder, np.ascontiguousarray(vectors, np.float32), [str(i) for i in cols["id"]], boxes)


def open_region_sets(index_dir, manifest: store.Manifest, known: Callable[[str], bool] | None = None
                     ) -> dict[str, RegionSet]:
    """Every encoder's region set the manifest lists, keeping only rows of images ``known`` to the index."""
    listed = manifest.extra.get(EXTRA_KEY) if isinstance(manifest.extra, dict) else None
    out = {}
    for encoder, info in (listed or {}).items():
        if encoder not in manifest.encoders or not isinstance(info, dict):
            continue
        rs = _read(index_dir, manifest, encoder, info)
        if known is not None and len(rs):
            keep = np.array([known(i) for i in rs.ids], bool)
            if not keep.all():
                rs = RegionSet(encoder, rs.vectors[keep], [i for i, k in zip(rs.ids, keep) if k], rs.boxes[keep])
        rs.views = read_views(index_dir, manifest, encoder, info, known)
        out[encoder] = rs
    return out


def _write(index_dir, manifest: store.Manifest, rs: RegionSet, images: int, views: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vec_path, box_path = region_paths(index_dir, rs.encoder)
    vec_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rs.vectors, np.float32), allow_pickle=False)
    manifest.record(index_dir, vec_path, store.atomic_write_bytes(vec_path, buf.getvalue()))
    table = pa.table({"id": pa.array(rs.ids, pa.string()),
                      **{c: pa.array(rs.boxes[:, i].astype(np.int32)) for i, c in enumerate(("x0", "y0", "x1", "y1"))}})
    manifest.record(index_dir, box_path, store.atomic_write_with(box_path, lambda tmp: pq.write_table(table, tmp)))
    manifest.extra.setdefault(EXTRA_KEY, {})[rs.encoder] = {
        "vectors": store.relative(index_dir, vec_path), "boxes": store.relative(index_dir, box_path),
        "count": len(rs), "images": images, "dim": int(rs.vectors.shape[1]), **({"views": views} if views else {})}


class _Neighbours:
    """The pictures of an indexed picture's nearest indexed pictures (whole-picture vectors, itself left out):
    what may explain its background (the residual region)."""

    def __init__(self, index_dir, device: str, count: int):
        from retrieval.engine import Engine

        self.count = count
        self.engine = Engine(index_dir, device=device) if count > 0 else None
        if self.engine is not None:
            self.engine.region_sets = {}          # whole pictures only

    def ids(self, encoder: str, image_id: str) -> list[str]:
        if self.engine is None:
            return []
        vector = self.engine.stored_vector(encoder, image_id)
        hits = self.engine.search(vector=vector, encoder=encoder, k=self.count + 1).hits
        return [h.id for h in hits if h.id != image_id][:self.count]

    def pictures(self, encoder: str, image_id: str, views=None) -> list:
        """The neighbours' stored maps where ``views`` has them, else their pictures."""
        from retrieval.errors import LoupeError

        out = []
        for hit_id in self.ids(encoder, image_id):
            view = views.get(hit_id) if views is not None else None
            if view is not None:
                out.append(view)
                continue
            try:
                out.append(self.engine.load_image(hit_id))
            except (LoupeError, OSError) as exc:
                log.warning("no picture for %s: %s", hit_id, exc)
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def build_region_index(index_dir, *, device: str = "auto", encoders: Sequence[str] | None = None,
                       batch_size: int = 16, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Add region vectors for every indexed picture that has none (see module docstring); the caller holds
    the index's writer lock. Returns ``{"images", "regions", "seconds", "bytes"}`` (what this run added,
    and the region files' size)."""
    from retrieval.index.records import RecordStore
    from retrieval.regions.proposals import INDEX_PROPOSALS

    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    clean_stray(index_dir)                      # a killed run's temporary files
    manifest = store.read_manifest(index_dir)
    records = RecordStore(index_dir, manifest)
    all_ids = [str(i) for t in records.tables for i in t.column("id").to_pylist()]
    known = set(all_ids)
    existing = open_region_sets(index_dir, manifest, known.__contains__)
    names = [n for n in (encoders or manifest.encoders) if "image" in manifest.encoders[n].modalities]
    added_images = added_regions = 0
    neighbours = _Neighbours(index_dir, device, INDEX_PROPOSALS.residual.hits if INDEX_PROPOSALS.residual else 0)
    try:
        for name in names:
            added_images, added_regions = _add_regions(index_dir, manifest, records, existing, all_ids, name, device,
                                                       batch_size, progress, neighbours, added_images, added_regions)
    finally:
        neighbours.close()
    store.write_manifest(index_dir, manifest)
    size = sum(p.stat().st_size for n in names for p in (*region_paths(index_dir, n), *view_paths(index_dir, n))
               if p.exists())
    return {"images": added_images, "regions": added_regions, "seconds": round(time.perf_counter() - t0, 3),
            "bytes": size}


def _add_regions(index_dir, manifest, records, existing, all_ids, name, device, batch_size, progress, neighbours,
                 added_images: int, added_regions: int) -> tuple[int, int]:
    """Regions for ``name``'s pictures that have none; returns the running (images, regions) counts."""
    from retrieval.encoders import create_encoder
    from retrieval.errors import LoupeError
    from retrieval.regions.box import crop_to_box
    from retrieval.regions.proposals import INDEX_PROPOSALS, propose_regions

    try:
        enc = create_encoder(name, device=device)
    except LoupeError as exc:
        log.warning("no region index for %s: %s", name, exc)
        return added_images, added_regions
    if getattr(enc, "binary", False):
        return added_images, added_regions
    old = existing.get(name, RegionSet(name, np.zeros((0, manifest.encoders[name].dim), np.float32), [],
                                       np.zeros((0, 4), np.int32)))
    done = set(old.ids)
    todo = [i for i in all_ids if i not in done]
    # maps for the new pictures, and for older ones without a stored map (a region index from before maps)
    unmapped = [i for i in dict.fromkeys(old.ids) if old.views is None or i not in old.views]
    # nothing to map and every kept picture mapped: the maps' files stay as they are (not rewritten)
    kept = ((manifest.extra.get(EXTRA_KEY) or {}).get(name) or {}).get("views") \
        if old.views is not None and not todo and not unmapped else None
    views = _map_pictures(index_dir, records, enc, name, todo + unmapped, old.views, batch_size) \
        if INDEX_PROPOSALS.residual and kept is None else None
    vecs, ids, boxes = [old.vectors], list(old.ids), [old.boxes]
    try:
        for start in range(0, len(todo), batch_size):
            crops, owners = [], []
            for image_id in todo[start:start + batch_size]:
                try:
                    image = records.load_image(image_id)
                except LoupeError as exc:
                    log.warning("no regions for %s: %s", image_id, exc)
                    continue
                stored = views.views() if views is not None else None
                explain_by = neighbours.pictures(name, image_id, stored) if INDEX_PROPOSALS.residual else []
                own = stored.get(image_id) if stored is not None else None
                for region in propose_regions(image, enc, INDEX_PROPOSALS, explain_by, view=own):
                    crops.append(crop_to_box(image, region.box))
                    owners.append((image_id, region.box))
            if crops:
                vecs.append(np.asarray(enc.encode_images(crops), np.float32))
                ids += [o[0] for o in owners]
                boxes.append(np.asarray([o[1] for o in owners], np.int32).reshape(-1, 4))
                added_regions += len(crops)
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo))
        added_images = max(added_images, len(todo))
        rs = RegionSet(name, np.concatenate(vecs), ids, np.concatenate(boxes))
        _write(index_dir, manifest, rs, len(set(ids)), views.commit(manifest) if views is not None else kept)
    except BaseException:
        if views is not None:
            views.abort()
        raise
    return added_images, added_regions


def _map_pictures(index_dir, records, enc, name: str, todo: list[str], old, batch_size: int):
    """A ``views.ViewWriter`` holding every picture's feature map (``old``'s kept, ``todo``'s computed in
    batches), or None when the encoder has no map or its maps are too large to keep (``views.fits``)."""
    from retrieval.errors import LoupeError
    from retrieval.regions.proposals import work_picture
    from retrieval.regions.saliency import canvas_tokens

    writer = None
    for start in range(0, max(len(todo), 1), batch_size):
        batch, pictures = [], []
        for image_id in todo[start:start + batch_size]:
            try:
                pictures.append(work_picture(records.load_image(image_id)))
                batch.append(image_id)
            except LoupeError:
                continue                      # reported by the regions pass
        maps = canvas_tokens(enc, pictures) if pictures else []
        if maps is None:
            return None
        if writer is None:
            shape = maps[0].tokens.shape if maps else (old.shape if old is not None else None)
            if shape is None or not fits(shape):
                return None
            writer = ViewWriter(index_dir, name, shape, len(todo), old)
        for image_id, view in zip(batch, maps):
            writer.add(image_id, view)
    return writer
