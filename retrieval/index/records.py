"""Ids, metadata, source images and stored vectors of an opened index: the part of
:class:`retrieval.engine.Engine` that reads what the index holds about its images.

* An image id maps to ``(shard number, row)`` through a sorted array of the ids' integer values.
* Metadata rows come from the Parquet shards (``aliases`` and ``extra`` are JSON columns); an image's
  bytes from its source file, or from a webdataset tar member (``/abs/shard.tar#KEY.jpg``).
* Stored vectors are reconstructed from the FAISS shards (binary codes as ±1/sqrt(d) vectors; an IVF
  index gets its direct map once, at first use); local descriptors come from ``store.LocalShard``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from retrieval.errors import UnknownIdError, UnsupportedModalityError
from retrieval.index import store
from retrieval.types import Hit


class EngineRecords:
    """Engine methods over ids, metadata and stored vectors. Uses the attributes ``Engine.__init__``
    sets (``index_dir``, ``tables``, ``offsets``, ``shard_ids``, ``indexes``, ``_id_sorted`` ...) and
    ``Engine._entry``."""

    # -- ids and metadata ---------------------------------------------------------------------------
    def locate(self, image_id: str) -> tuple[int, int]:
        """(shard number, row) of an indexed image; raises ``UnknownIdError``."""
        if not isinstance(image_id, str) or len(image_id) != store.ID_HEX:
            raise UnknownIdError(f"unknown image id {image_id!r}")
        try:
            value = store.id_to_int(image_id)
        except ValueError:
            raise UnknownIdError(f"unknown image id {image_id!r}") from None
        pos = int(np.searchsorted(self._id_sorted, value))
        if pos >= len(self._id_sorted) or self._id_sorted[pos] != value:
            raise UnknownIdError(f"unknown image id {image_id!r}")
        g = int(self._id_order[pos])
        return self._split(g)

    def _split(self, global_row: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, global_row, side="right") - 1)
        return shard, int(global_row - self.offsets[shard])

    def has_id(self, image_id: str) -> bool:
        try:
            self.locate(image_id)
            return True
        except UnknownIdError:
            return False

    def hit_for_id(self, encoder: str, image_id: str) -> Hit:
        """A ``Hit`` for an indexed image, scored against nothing (score 0)."""
        self._entry(encoder)
        shard, row = self.locate(image_id)
        return Hit(image_id, 0.0, shard, row)

    def row_metadata(self, shard: int, row: int) -> dict[str, Any]:
        rec = self.tables[shard].slice(row, 1).to_pylist()[0]
        rec["aliases"] = _json_field(rec.get("aliases"), [])
        rec["extra"] = _json_field(rec.get("extra"), {})
        return rec

    def metadata(self, image_id: str) -> dict[str, Any]:
        """Every metadata column of an indexed image (``aliases`` and ``extra`` parsed)."""
        return self.row_metadata(*self.locate(image_id))

    def describe_hit(self, hit: Hit) -> dict[str, Any]:
        """The JSON shape of a result: ``{id, score, path, caption, metadata}``."""
        rec = self.row_metadata(hit.shard, hit.row)
        meta = {k: rec.get(k) for k in ("source", "width", "height", "size", "mtime", "sha256")}
        if rec.get("aliases"):
            meta["aliases"] = rec["aliases"]
        if isinstance(rec.get("extra"), dict):
            for key, value in rec["extra"].items():
                meta.setdefault(key, value)
        return {"id": hit.id, "score": round(float(hit.score), 6), "path": rec.get("path"),
                "caption": rec.get("caption"), "metadata": meta}

    def source_file(self, image_id: str) -> Path:
        """The readable local file of an indexed image; raises ``UnknownIdError`` if gone."""
        rec = self.metadata(image_id)
        for cand in (rec.get("path"), rec.get("source"), *(rec.get("aliases") or [])):
            if isinstance(cand, str) and cand and "://" not in cand and os.path.isfile(cand):
                return Path(cand)
        raise UnknownIdError(f"image {image_id} is indexed but its source file is gone ({rec.get('source')})")

    def source_bytes(self, image_id: str) -> bytes:
        """The indexed image's encoded bytes: from its file, or from a webdataset tar member
        (source ``/abs/shard.tar#KEY.jpg``)."""
        try:
            return self.source_file(image_id).read_bytes()
        except UnknownIdError:
            rec = self.metadata(image_id)
            for cand in (rec.get("source"), *(rec.get("aliases") or [])):
                data = _read_tar_member(cand) if isinstance(cand, str) else None
                if data is not None:
                    return data
            raise

    def load_image(self, image_id: str) -> Image.Image:
        """The indexed image as RGB, decoded from its source file (or tar member)."""
        from retrieval.images import load_image

        try:
            return load_image(self.source_file(image_id))
        except UnknownIdError:
            return load_image(self.source_bytes(image_id))

    # -- vectors ------------------------------------------------------------------------------------
    def _reconstruct(self, encoder: str, shard: int, row: int) -> np.ndarray:
        import faiss

        entry = self._entry(encoder)
        index = self.indexes[entry.name][shard]
        if entry.index_type == "binary":
            bits = np.unpackbits(index.reconstruct(int(row)))
            return (np.where(bits > 0, 1.0, -1.0) / np.sqrt(bits.size)).astype(np.float32)
        try:
            return np.asarray(index.reconstruct(int(row)), dtype=np.float32)
        except RuntimeError:
            key = (entry.name, shard)
            with self._lock:
                if key not in self._direct_map_done:
                    ivf = faiss.try_extract_index_ivf(index)
                    if ivf is None:
                        raise
                    ivf.make_direct_map()   # once, at first use; never per request
                    self._direct_map_done.add(key)
            return np.asarray(index.reconstruct(int(row)), dtype=np.float32)

    def vectors(self, encoder: str, hits: Sequence[Hit]) -> np.ndarray:
        """Stored vectors of ``hits`` in ``encoder``'s space, [n, d] float32."""
        entry = self._entry(encoder)
        if not hits:
            return np.zeros((0, entry.dim), dtype=np.float32)
        return np.stack([self._reconstruct(entry.name, h.shard, h.row) for h in hits]).astype(np.float32)

    def all_vectors(self, encoder: str | None = None) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        """Every shard's vectors: ``(shard number, [n, d] float32, ids)`` (for de-duplication)."""
        entry = self._entry(encoder)
        for i, index in enumerate(self.indexes[entry.name]):
            if entry.index_type == "binary":
                codes = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d // 8), np.uint8)
                bits = np.unpackbits(codes, axis=1)
                vecs = (np.where(bits > 0, 1.0, -1.0) / np.sqrt(max(bits.shape[1], 1))).astype(np.float32)
            else:
                vecs = store.reconstruct_all(index)
            yield i, vecs, list(self.shard_ids[i])

    def local_features(self, encoder: str, hits: Sequence[Hit]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Stored local descriptors of ``hits``: ``(desc [p, c] float32, pos [p, 2] (row, col))`` each."""
        entry = self._entry(encoder)
        if not entry.local_features:
            raise UnsupportedModalityError(
                f"the index has no local features for {entry.name}; rebuild with `loupe index --local-features`")
        out = []
        for h in hits:
            key = (entry.name, h.shard)
            shard = self._local.get(key)
            if shard is None:
                with self._lock:
                    shard = self._local.get(key) or store.LocalShard(self.index_dir, entry.name,
                                                                     self.shard_names[h.shard])
                    self._local[key] = shard
            out.append(shard.get(h.row))
        return out


def _json_field(raw: Any, default: Any) -> Any:
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return default


def _read_tar_member(source: str) -> bytes | None:
    import tarfile

    tar_path, sep, member = source.partition("#")
    if not sep or not tar_path.lower().endswith(".tar") or not os.path.isfile(tar_path):
        return None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            fh = tar.extractfile(member)
            return fh.read() if fh is not None else None
    except (tarfile.TarError, OSError, KeyError):
        return None
