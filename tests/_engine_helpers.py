"""Build small Loupe indexes directly with ``retrieval.store`` (no indexer needed).

Used by the engine, server and browser tests (and handy for anyone who needs an index fixture).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrieval.index import store, vector_files


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fake_id(i: int) -> str:
    return store.content_id(store.sha256_bytes(f"image-{i}".encode()))


def make_index(factory: str, vectors: np.ndarray):
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


def build_index(out: str | Path, vectors: dict[str, np.ndarray], *, shard_sizes: Sequence[int] | None = None,
                rows: list[dict[str, Any]] | None = None, modalities: dict[str, list[str]] | None = None,
                factory: str = "Flat", index_type: str = "flat") -> Path:
    """Write an index of ``vectors`` (encoder -> [n, d]) split into shards of ``shard_sizes``."""
    out = Path(out)
    n = len(next(iter(vectors.values())))
    shard_sizes = list(shard_sizes or [n])
    assert sum(shard_sizes) == n
    rows = rows or [{"id": fake_id(i), "source": f"/nowhere/{i}.jpg", "path": None, "caption": f"image {i}",
                     "width": 100 + i, "height": 50, "sha256": "0" * 64, "size": 1000 + i, "mtime": 0.0,
                     "aliases": [], "extra": {"group": "even" if i % 2 == 0 else "odd"}} for i in range(n)]
    encoders = {}
    for name, vecs in vectors.items():
        mods = (modalities or {}).get(name, ["image", "text"])
        encoders[name] = store.EncoderEntry(name=name, dim=vecs.shape[1], index_type=index_type, factory=factory,
                                            modalities=mods)
    shards = []
    start = 0
    for s, size in enumerate(shard_sizes):
        name = store.shard_name(s)
        store.write_metadata(out, name, rows[start:start + size])
        for enc, vecs in vectors.items():
            index = make_index(factory, np.ascontiguousarray(vecs[start:start + size]))
            vector_files.write_vectors(out, enc, name, index)
        shards.append(store.ShardEntry(name=name, count=size))
        start += size
    store.write_manifest(out, store.Manifest(encoders=encoders, shards=shards))
    return out


def image_rows(paths: Sequence[Path], captions: dict[str, str] | None = None) -> list[dict[str, Any]]:
    from retrieval.images import image_size

    out = []
    for p in paths:
        data = Path(p).read_bytes()
        sha = store.sha256_bytes(data)
        w, h = image_size(data)
        out.append({"id": store.content_id(sha), "source": str(p), "path": str(Path(p).resolve()),
                    "caption": (captions or {}).get(Path(p).stem, Path(p).stem), "width": w, "height": h,
                    "sha256": sha, "size": len(data), "mtime": Path(p).stat().st_mtime, "aliases": [],
                    "extra": {"name": Path(p).stem}})
    return out


def build_photo_index(out: str | Path, photo_paths: Sequence[Path], encoders: Sequence[str], *,
                      shard_sizes: Sequence[int] | None = None, device: str = "cpu") -> Path:
    """Embed real image files with the named encoders and write an index (what the indexer does)."""
    from retrieval.encoders import create_encoder

    paths = sorted(Path(p) for p in photo_paths)
    rows = image_rows(paths)
    vectors, mods = {}, {}
    for name in encoders:
        enc = create_encoder(name, device=device)
        vectors[name] = enc.encode_images([str(p) for p in paths])
        mods[name] = list(enc.modalities)
    return build_index(out, vectors, shard_sizes=shard_sizes, rows=rows, modalities=mods)


def all_vectors(engine, name: str) -> tuple[list[str], np.ndarray]:
    """Every indexed id and its stored vector for encoder ``name``, in shard order (brute-force references)."""
    ids, vecs = [], []
    for _, v, shard_ids in engine.all_vectors(name):
        ids += shard_ids
        vecs.append(v)
    return ids, np.concatenate(vecs)


def png_bytes(img, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def dump(obj) -> str:
    return json.dumps(obj)


def save_photos(folder: Path, photos: dict, names: Sequence[str]) -> list[Path]:
    """Save the named photos as ``folder/NAME.png``; returns their paths in ``names`` order."""
    paths = []
    for name in names:
        p = Path(folder) / f"{name}.png"
        photos[name].save(p)
        paths.append(p)
    return paths


def photo_folder_and_crop_query(root: Path, names: Sequence[str]) -> tuple[Path, dict]:
    """``root/photos`` with the named scikit-image photos as PNGs, and ``root/query.jpg``: a rotated crop of
    the astronaut (not indexed), the copy query of the re-ranking tests. Returns (folder, photos)."""
    from tests.conftest import skimage_photos

    src = Path(root) / "photos"
    src.mkdir()
    photos = skimage_photos()
    for name in names:
        if name in photos:
            photos[name].save(src / f"{name}.png")
    w, h = photos["astronaut"].size
    crop = photos["astronaut"].crop((int(w * .15), int(h * .2), int(w * .75), int(h * .8))).rotate(
        15, fillcolor=(255, 255, 255))
    crop.save(Path(root) / "query.jpg")
    return src, photos


class BagOfWordsEncoder:
    """A fake text(+image) encoder for classification tests: bag-of-words vectors over ``WORDS``
    (deterministic, instant); counts its calls and records every text it embeds. "Images" are words."""

    name = "fake-bow"
    modalities = ("image", "text")
    supports_text = True
    WORDS: tuple[str, ...] = ("cat", "dog", "coffee", "cup", "rocket", "sky", "photo", "red", "boot", "sandal")

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name
        self.dim = len(self.WORDS)
        self.calls = 0
        self.texts: list[str] = []

    def encode_texts(self, texts):
        self.calls += 1
        self.texts.extend(texts)
        out = np.full((len(texts), self.dim), 1e-3, np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").split():
                if w in self.WORDS:
                    out[i, self.WORDS.index(w)] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def encode_images(self, images):
        return self.encode_texts(images)
