"""Stored feature maps ("views") of the indexed pictures, for the residual region.

The residual region (``residual.py``) compares the query's feature map with the feature maps of its top
whole-picture hits (``saliency.canvas_tokens``: each picture padded to the square the encoder keeps). At
query time that meant reading, decoding and encoding two more pictures: two of the seven encoder passes
of a ``regions`` query. ``loupe index --regions`` computes every picture's map anyway (for its own
residual region), so it keeps them, per encoder:

* ``regions/<encoder>.views.npy``: float16 ``[rows, gh, gw, C]``, each cell's token a unit row;
* ``regions/<encoder>.views.parquet``: ``id``, ``row``, and the map's frame: ``w, h`` (the picture's
  size), ``side`` and ``ox, oy`` (``CanvasTokens.side`` / ``origin``).

Both are recorded in the manifest like the region files. A map is kept only when it takes at most
``VIEW_BYTES_MAX`` bytes (effnet-lite0's 14 x 14 x 112 fine map: 43,904 B a picture); for larger maps
(ViT patch tokens) hits are encoded at query time as before. A stored map gives the same residual
regions as a freshly encoded one (float16 rounding aside: tested on the region tests' pictures).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index import store
from retrieval.regions.saliency import CanvasTokens

VIEW_BYTES_MAX = 96 * 1024      # float16 bytes of one picture's map, at most
FRAME_COLUMNS = ("w", "h", "side", "ox", "oy")


def view_paths(index_dir, encoder: str) -> tuple[Path, Path]:
    base = Path(index_dir) / "regions"
    return base / f"{encoder}.views.npy", base / f"{encoder}.views.parquet"


def clean_stray(index_dir) -> int:
    """Delete temporary files a killed ``--regions`` run left in ``regions/`` (the caller holds the writer
    lock); returns how many."""
    folder = Path(index_dir) / "regions"
    removed = 0
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".") and ".tmp" in path.name and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def fits(shape: tuple[int, ...]) -> bool:
    """True when a map of ``shape = (gh, gw, C)`` is small enough to keep (``VIEW_BYTES_MAX``)."""
    return int(np.prod(shape)) * 2 <= VIEW_BYTES_MAX


@dataclass
class StoredViews:
    """One encoder's stored maps: ``tokens`` (memory-mapped float16 ``[rows, gh, gw, C]``), ``rows`` (image
    id → row) and ``frames`` (image id → ``(w, h, side, ox, oy)``)."""

    tokens: np.ndarray
    rows: dict[str, int]
    frames: dict[str, tuple[float, ...]]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.rows

    def get(self, image_id: str) -> CanvasTokens | None:
        row = self.rows.get(image_id)
        if row is None:
            return None
        w, h, side, ox, oy = self.frames[image_id]
        return CanvasTokens(np.asarray(self.tokens[row], np.float32), (int(w), int(h)), float(side),
                            (float(ox), float(oy)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tokens.shape[1:])


def read_views(index_dir, manifest: store.Manifest, encoder: str, info: dict[str, Any],
               known=None) -> StoredViews | None:
    """The stored maps the manifest lists for ``encoder`` (None when it lists none), rows of images
    ``known`` to the index; a damaged file is an ``IndexFormatError``."""
    import pyarrow.parquet as pq

    if not isinstance(info.get("views"), dict):
        return None
    npy, table_path = view_paths(index_dir, encoder)
    for path in (npy, table_path):
        store.check_size(index_dir, manifest, path)
    try:
        tokens = np.load(npy, mmap_mode="r", allow_pickle=False)
        cols = pq.read_table(table_path).to_pydict()
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"the stored feature maps of {encoder} are unreadable ({exc}); "
                               "rebuild them with `loupe index ... --regions`") from None
    rows = [int(r) for r in cols.get("row", [])]
    if tokens.ndim != 4 or tokens.dtype != np.float16 or any(r < 0 or r >= len(tokens) for r in rows) \
            or any(c not in cols for c in ("id",) + FRAME_COLUMNS):
        raise IndexFormatError(f"the stored feature maps of {encoder} do not match their table; "
                               "rebuild them with `loupe index ... --regions`")
    out_rows, frames = {}, {}
    for i, image_id in enumerate(cols["id"]):
        if known is not None and not known(image_id):
            continue
        out_rows[str(image_id)] = rows[i]
        frames[str(image_id)] = tuple(float(cols[c][i]) for c in FRAME_COLUMNS)
    return StoredViews(tokens, out_rows, frames)


class ViewWriter:
    """Writes an encoder's maps: the kept rows of ``old`` copied, new maps added one by one, then
    ``commit`` renames the files into place and records them (``abort`` removes the temporary file)."""

    def __init__(self, index_dir, encoder: str, shape: tuple[int, ...], capacity: int,
                 old: StoredViews | None = None):
        self.index_dir, self.encoder, self.shape = Path(index_dir), encoder, tuple(int(s) for s in shape)
        npy, _ = view_paths(index_dir, encoder)
        npy.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{npy.name}.", suffix=".tmp.npy", dir=npy.parent)
        os.close(fd)
        keep = old if old is not None and old.shape == self.shape else None
        total = capacity + (len(keep.rows) if keep is not None else 0)
        self.tokens = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16,
                                                shape=(max(total, 1),) + self.shape)
        self.rows: dict[str, int] = {}
        self.frames: dict[str, tuple[float, ...]] = {}
        if keep is not None:
            for image_id, row in keep.rows.items():
                self._put(image_id, keep.tokens[row], keep.frames[image_id])

    def _put(self, image_id: str, tokens: np.ndarray, frame: tuple[float, ...]) -> None:
        row = len(self.rows)
        self.tokens[row] = tokens
        self.rows[image_id] = row
        self.frames[image_id] = tuple(float(v) for v in frame)

    def add(self, image_id: str, view: CanvasTokens) -> None:
        self._put(image_id, np.asarray(view.tokens, np.float16),
                  (view.size[0], view.size[1], view.side, view.origin[0], view.origin[1]))

    def views(self) -> StoredViews:
        """What is written so far (for the pictures' residual regions while the index is built)."""
        return StoredViews(self.tokens, self.rows, self.frames)

    def commit(self, manifest: store.Manifest) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.tokens.flush()
        del self.tokens
        npy, table_path = view_paths(self.index_dir, self.encoder)
        manifest.record(self.index_dir, npy, store.atomic_write_with(npy, lambda tmp: os.replace(self.tmp, tmp)))
        ids = list(self.rows)
        table = pa.table({"id": pa.array(ids, pa.string()), "row": pa.array([self.rows[i] for i in ids], pa.int64()),
                          **{c: pa.array([self.frames[i][k] for i in ids], pa.float64())
                             for k, c in enumerate(FRAME_COLUMNS)}})
        manifest.record(self.index_dir, table_path,
                        store.atomic_write_with(table_path, lambda tmp: pq.write_table(table, tmp)))
        return {"tokens": store.relative(self.index_dir, npy), "table": store.relative(self.index_dir, table_path),
                "count": len(ids), "shape": list(self.shape)}

    def abort(self) -> None:
        Path(self.tmp).unlink(missing_ok=True)
