"""Data for the re-ranking benchmark (``bench_rerank.py``): the references, distractors and photos
(Tux Paint stamps, Fashion-MNIST, scikit-image), the hard transformations that make its queries, and the
index it writes with ``retrieval.index.store``."""

from __future__ import annotations

import gzip
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAMPS = Path("/usr/share/tuxpaint/stamps")
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TRANSFORMS = ("crop", "rotate", "perspective", "overlay", "paste")


# -- data --------------------------------------------------------------------------------------
def fashion_mnist(n: int, seed: int = 0) -> list[Image.Image]:
    with gzip.open(FMNIST) as fh:
        raw = fh.read()
    total = int.from_bytes(raw[4:8], "big")
    arr = np.frombuffer(raw, np.uint8, offset=16).reshape(total, 28, 28)
    idx = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    return [Image.fromarray(255 - arr[i]).convert("RGB").resize((112, 112), Image.BICUBIC) for i in idx]


def stamps() -> list[Path]:
    return sorted(p for p in STAMPS.rglob("*.png") if "-mirror" not in p.name and "_mirror" not in p.name)


def load_stamp(path: Path, max_side: int = 400) -> Image.Image:
    from retrieval.images import load_image

    img = load_image(path)
    img.thumbnail((max_side, max_side), Image.BICUBIC)
    return img


def skimage_photos() -> list[Image.Image]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import skimage_photos as photos

    seen, out = set(), []
    for img in photos().values():
        key = hashlib.sha1(img.tobytes()).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append(img)
    return out


# -- transformations ---------------------------------------------------------------------------
def _crop(img, rng, area_lo, area_hi):
    w, h = img.size
    area = rng.uniform(area_lo, area_hi)
    aspect = rng.uniform(0.8, 1.25)
    cw = int(min(w, w * np.sqrt(area * aspect)))
    ch = int(min(h, h * np.sqrt(area / aspect)))
    x0 = int(rng.integers(0, max(1, w - cw + 1)))
    y0 = int(rng.integers(0, max(1, h - ch + 1)))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def transform(img: Image.Image, kind: str, rng: np.random.Generator, backgrounds: list[Image.Image]) -> Image.Image:
    w, h = img.size
    if kind == "crop":
        return _crop(img, rng, 0.30, 0.45)
    if kind == "rotate":
        angle = float(rng.uniform(20, 45) * rng.choice([-1, 1]))
        return _crop(img, rng, 0.55, 0.75).rotate(angle, Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    if kind == "perspective":
        d = 0.18
        src = [(0, 0), (w, 0), (w, h), (0, h)]
        dst = [(x + rng.uniform(-d, d) * w, y + rng.uniform(-d, d) * h) for x, y in src]
        a = []
        for (x, y), (u, v) in zip(dst, src):   # coefficients map output (dst) to input (src)
            a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
            a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        coeffs = np.linalg.solve(np.array(a, float), np.array(src, float).reshape(8))
        return img.transform((w, h), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC, fillcolor=(255, 255, 255))
    if kind == "overlay":
        out = _crop(img, rng, 0.65, 0.75).copy()
        draw = ImageDraw.Draw(out)
        ow, oh = out.size
        for _ in range(3):
            x0, y0 = rng.uniform(0, 0.8) * ow, rng.uniform(0, 0.8) * oh
            x1, y1 = x0 + rng.uniform(0.15, 0.35) * ow, y0 + rng.uniform(0.15, 0.35) * oh
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=color)
        draw.text((0.05 * ow, 0.85 * oh), "LOUPE (c) 2026", fill=(255, 0, 0))
        return out
    if kind == "paste":
        bg = backgrounds[int(rng.integers(len(backgrounds)))].copy().resize((448, 448), Image.BICUBIC)
        s = rng.uniform(0.35, 0.55)
        scale = s * 448 / max(w, h)
        obj = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)
        x0 = int(rng.integers(0, 448 - obj.size[0] + 1))
        y0 = int(rng.integers(0, 448 - obj.size[1] + 1))
        bg.paste(obj, (x0, y0))
        return bg
    raise ValueError(kind)


# -- index -------------------------------------------------------------------------------------
def build_index(out: Path, enc, images: list[Image.Image], keys: list[str], batch: int = 32,
                layer: str = "final") -> None:
    import faiss

    from indexer.writer import LOCAL_DIM  # the dimension `loupe index --local-features` uses
    from retrieval.index import descriptors, store, vector_files

    suffix = "" if layer == "final" else f"-{layer}"
    cache = out.parent / f"{out.name}-encoded{suffix}.npz"     # the encoder's outputs, reused by later runs
    if cache.is_file():
        with np.load(cache) as z:
            vecs, toks, grid = z["vecs"], z["toks"], tuple(int(x) for x in z["grid"])
        print(f"  encodings reused from {cache}", flush=True)
    else:
        vecs, toks = [], []
        grid = None
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            if layer == "fine":       # the stored descriptors come from the fine map (same forward pass)
                g, _, _, t, grid = enc.encode_images_and_fine(images[i:i + batch])
            else:
                g, t, grid = enc.encode_images_and_local(images[i:i + batch])
            vecs.append(g)
            toks.append(t.astype(np.float16))
            if (i // batch) % 20 == 0:
                print(f"  encoded {i + len(g)}/{len(images)} ({time.perf_counter() - t0:.0f}s)", flush=True)
        vecs = np.concatenate(vecs)
        toks = np.concatenate(toks)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, vecs=vecs, toks=toks, grid=np.array(grid))
    rng = np.random.default_rng(0)
    sample = toks[rng.choice(len(toks), size=min(len(toks), 1000), replace=False)].reshape(-1, toks.shape[-1])
    reducer = descriptors.LocalReducer.fit(sample.astype(np.float32), dim=LOCAL_DIM)
    reducer.save(store.pca_path(out, enc.name))
    h, w = grid
    pos = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    per_image = [(reducer.transform(t.astype(np.float32)), pos) for t in toks]
    shard = store.shard_name(0)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    vector_files.write_vectors(out, enc.name, shard, index)
    descriptors.write_local(out, enc.name, shard, per_image)
    rows = []
    for key, img in zip(keys, images):
        sha = hashlib.sha256(key.encode()).hexdigest()
        rows.append({"id": store.content_id(sha), "source": key, "path": None, "caption": None,
                     "width": img.size[0], "height": img.size[1], "sha256": sha, "size": 0, "mtime": 0.0,
                     "aliases": "[]", "extra": "{}"})
    store.write_metadata(out, shard, rows)
    entry = store.EncoderEntry(name=enc.name, dim=int(vecs.shape[1]), modalities=list(enc.modalities),
                               local_features={"dim": reducer.dim, "grid": [h, w], "per_image": h * w,
                                               "dtype": "float16", "layer": layer})
    manifest = store.Manifest(encoders={enc.name: entry}, shards=[store.ShardEntry(shard, len(images))])
    store.write_manifest(out, manifest)
