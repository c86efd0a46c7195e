"""Data for the copy-detection benchmark (``bench_copydetect.py``): the DISC21-style set built from
real images (Tux Paint stamps, scikit-image photos, Fashion-MNIST), its transformation families, the
reference equivalence groups, the query views, and the embedding cache."""

from __future__ import annotations

import io
import os
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.images import load_image  # noqa: E402
from retrieval.testing.samples import fashion_mnist  # noqa: E402
from retrieval.testing.samples import skimage_photos as sample_photos  # noqa: E402

STAMPS = Path("/usr/share/tuxpaint/stamps")
FMNIST = Path("/usr/share/datasets/fashion-mnist")
FAMILIES = (
    "crop",
    "rotate",
    "flip",
    "jpeg",
    "blur",
    "color",
    "grey",
    "overlay",
    "border",
    "canvas",
    "combo_crop_jpeg_color",
    "combo_overlay_flip_blur",
)
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "cat",
    "immunohistochemistry",
    "hubble_deep_field",
    "motorcycle_left",
    "page",
    "text",
    "moon",
    "horse",
    "brick",
    "grass",
)


# -- data ------------------------------------------------------------------------------------------
def load_fmnist() -> np.ndarray:
    """All 70,000 Fashion-MNIST images, uint8 [70000, 28, 28] (train then test)."""
    return fashion_mnist("all", FMNIST)[0]


def fmnist_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(255 - arr).convert("RGB")  # dark object on white, like the stamps


def load_stamp(path: Path) -> Image.Image:
    img = load_image(path)  # transparency composited on white
    img.thumbnail((512, 512))
    return img


def skimage_photos() -> dict[str, Image.Image]:
    return sample_photos(PHOTO_NAMES, max_side=512)


def split_stamps(seed: int = 0) -> dict[str, list[Path]]:
    """Whole leaf folders go to one split (variants of one stamp never straddle splits)."""
    folders: dict[Path, list[Path]] = {}
    for p in sorted(STAMPS.rglob("*.png")):
        folders.setdefault(p.parent, []).append(p)
    keys = sorted(folders)
    random.Random(seed).shuffle(keys)
    total = sum(len(v) for v in folders.values())
    splits = {"reference": [], "holdout": [], "background": []}
    for k in keys:
        done = sum(len(v) for v in splits.values())
        name = "reference" if done < 0.6 * total else "holdout" if done < 0.8 * total else "background"
        splits[name].extend(folders[k])
    return splits


# -- transformations ----------------------------------------------------------------------------------
def _font(size: int):
    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf",
    ):
        if os.path.isfile(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def t_crop(img, rng):
    w, h = img.size
    frac = rng.uniform(0.55, 0.8)
    cw, ch = int(w * frac), int(h * frac)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def t_rotate(img, rng):
    return img.rotate(
        rng.choice([-1, 1]) * rng.uniform(10, 30),
        expand=True,
        fillcolor=(255, 255, 255),
        resample=Image.Resampling.BILINEAR,
    )


def t_flip(img, rng):
    return ImageOps.mirror(img)


def t_jpeg(img, rng):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(8, 30))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def t_blur(img, rng):
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.5, 3.5) * max(img.size) / 512))


def t_color(img, rng):
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.8))
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(-30, 30)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def t_grey(img, rng):
    return ImageOps.grayscale(img).convert("RGB")


def t_overlay(img, rng):
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    words = rng.choice(["LOL", "so true", "when you see it", "#repost", "mood", "© 2026", "ha ha"])
    font = _font(max(12, int(h * rng.uniform(0.1, 0.18))))
    y = rng.choice([int(h * 0.02), int(h * 0.8)])
    d.text(
        (int(w * 0.05), y),
        words,
        fill=rng.choice([(255, 0, 0), (0, 0, 0), (255, 255, 0)]),
        font=font,
        stroke_width=2,
        stroke_fill=(255, 255, 255),
    )
    for _ in range(rng.randint(1, 3)):  # emoji-like stickers: yellow faces
        r = int(min(w, h) * rng.uniform(0.06, 0.12))
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 210, 0), outline=(0, 0, 0))
        d.ellipse((cx - r // 3, cy - r // 3, cx - r // 6, cy), fill=(0, 0, 0))
        d.ellipse((cx + r // 6, cy - r // 3, cx + r // 3, cy), fill=(0, 0, 0))
        d.arc((cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 2), 20, 160, fill=(0, 0, 0), width=2)
    return img


def t_border(img, rng):
    w, h = img.size
    b = int(max(w, h) * rng.uniform(0.08, 0.25))
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    return ImageOps.expand(img, border=(b, rng.randint(0, b), b, rng.randint(0, b)), fill=colour)


def t_canvas(img, rng):
    """Embedded in a larger "screenshot": title bar, side panel, text lines."""
    W, H = 800, 600
    canvas = Image.new("RGB", (W, H), (240, 240, 245))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, W, 40), fill=(60, 90, 160))
    d.rectangle((0, 40, 160, H), fill=(220, 222, 230))
    font = _font(16)
    for i in range(8):
        d.text((10, 60 + 30 * i), f"menu item {i}", fill=(40, 40, 40), font=font)
    scale = rng.uniform(0.5, 0.7)
    im = img.copy()
    im.thumbnail((int((W - 200) * scale * 1.4), int((H - 80) * scale * 1.4)))
    x = rng.randint(180, max(180, W - im.width - 10))
    y = rng.randint(50, max(50, H - im.height - 10))
    canvas.paste(im, (x, y))
    return canvas


def apply_family(img, family: str, rng: random.Random) -> Image.Image:
    fns = {
        "crop": t_crop,
        "rotate": t_rotate,
        "flip": t_flip,
        "jpeg": t_jpeg,
        "blur": t_blur,
        "color": t_color,
        "grey": t_grey,
        "overlay": t_overlay,
        "border": t_border,
        "canvas": t_canvas,
    }
    if family == "combo_crop_jpeg_color":
        return t_jpeg(t_color(t_crop(img, rng), rng), rng)
    if family == "combo_overlay_flip_blur":
        return t_blur(t_flip(t_overlay(img, rng), rng), rng)
    return fns[family](img, rng)


# -- the data set -----------------------------------------------------------------------------------
class CopySet:
    def __init__(self, n_copies: int, n_distractors: int, seed: int = 0):
        self.seed = seed
        splits = split_stamps(seed)
        photos = skimage_photos()
        self.ref_images = [load_stamp(p) for p in splits["reference"]] + list(photos.values())
        self.ref_names = [str(p.relative_to(STAMPS)) for p in splits["reference"]] + [f"skimage:{n}" for n in photos]
        holdout = [load_stamp(p) for p in splits["holdout"]]
        fm = load_fmnist()
        self.fmnist = fm
        self.n_distractors = n_distractors
        self.bg_images = [load_stamp(p) for p in splits["background"]] + [fmnist_image(a) for a in fm[-500:]]
        rng = random.Random(seed)
        n_copies = min(n_copies, len(self.ref_images), len(holdout))
        copy_src = rng.sample(range(len(self.ref_images)), n_copies)
        neg_src = rng.sample(range(len(holdout)), n_copies)
        self.queries, self.gt, self.family = [], [], []
        for i, r in enumerate(copy_src):
            fam = FAMILIES[i % len(FAMILIES)]
            self.queries.append(apply_family(self.ref_images[r], fam, random.Random(seed * 1000 + i)))
            self.gt.append(r)
            self.family.append(fam)
        for i, h in enumerate(neg_src):
            fam = FAMILIES[i % len(FAMILIES)]
            self.queries.append(apply_family(holdout[h], fam, random.Random(seed * 1000 + 500 + i)))
            self.gt.append(-1)
            self.family.append(fam)
        self.gt = np.asarray(self.gt)

    @property
    def n_refs(self) -> int:
        return len(self.ref_images)

    def db_image(self, row: int) -> Image.Image:
        if row < self.n_refs:
            return self.ref_images[row]
        return fmnist_image(self.fmnist[row - self.n_refs])


# -- embedding with a cache ------------------------------------------------------------------------
class Embedder:
    """Global vectors (float, or packed codes for PDQ) and, for effnet, PCA-128 local features."""

    def __init__(self, name: str, cache: Path, tag: str):
        from retrieval.encoders import create_encoder

        self.name = name
        self.enc = create_encoder(name, device="cpu")
        self.cache = cache
        self.tag = tag
        self.local = name == "effnet-lite0"
        self.reducer = None

    def _embed(self, images):
        if self.enc.binary:
            return self.enc.hash_bits(images), None
        if self.local:
            g, tokens, _ = self.enc.encode_images_and_local(images)
            return g, tokens
        return self.enc.encode_images(images), None

    def group(self, key: str, n: int, get_image, batch: int = 32, chunk: int = 1000):
        """Vectors (and reduced local tokens) of images 0..n-1 of a group, cached in chunks."""
        vecs, locs = [], []
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            path = self.cache / f"{self.name}-{key}-{start}-{stop}.npz"
            if path.is_file():
                with np.load(path) as z:
                    vecs.append(z["v"])
                    if self.local:
                        locs.append(z["l"])
                continue
            v_parts, l_parts = [], []
            t0 = time.perf_counter()
            for b in range(start, stop, batch):
                imgs = [get_image(i) for i in range(b, min(stop, b + batch))]
                v, tok = self._embed(imgs)
                v_parts.append(v)
                if self.local:
                    if self.reducer is None:
                        self.fit_reducer(tok)
                    l_parts.append(self.reducer.transform(tok).astype(np.float16))
            v = np.concatenate(v_parts)
            payload = {"v": v}
            if self.local:
                payload["l"] = np.concatenate(l_parts)
                locs.append(payload["l"])
            vecs.append(v)
            self.cache.mkdir(parents=True, exist_ok=True)
            np.savez(path, **payload)
            print(
                f"  {self.name} {key} {start}-{stop}: {(stop - start) / (time.perf_counter() - t0):.1f} img/s",
                flush=True,
            )
        v = np.concatenate(vecs) if vecs else np.zeros((0, self.enc.dim))
        return v, (np.concatenate(locs) if self.local and locs else None)

    def fit_reducer(self, tokens):
        from retrieval.index.descriptors import LocalReducer

        path = self.cache / f"{self.name}-pca.npz"
        if path.is_file():
            self.reducer = LocalReducer.load(path)
            return
        self.reducer = LocalReducer.fit(tokens.reshape(-1, tokens.shape[-1]), dim=128)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.reducer.save(path)

    def load_reducer(self):
        path = self.cache / f"{self.name}-pca.npz"
        if self.local and path.is_file():
            from retrieval.index.descriptors import LocalReducer

            self.reducer = LocalReducer.load(path)


def embed_all(data: CopySet, name: str, cache: Path):
    e = Embedder(name, cache, "")
    e.load_reducer()
    refs, ref_l = e.group(f"ref-s{data.seed}", data.n_refs, lambda i: data.ref_images[i])
    dis, dis_l = e.group("fmnist", data.n_distractors, lambda i: fmnist_image(data.fmnist[i]))
    bg, _ = e.group(f"bg-s{data.seed}", len(data.bg_images), lambda i: data.bg_images[i])
    q, q_l = e.group(f"query-s{data.seed}-n{len(data.queries)}", len(data.queries), lambda i: data.queries[i])
    db = np.concatenate([refs, dis])
    db_l = np.concatenate([ref_l, dis_l]) if ref_l is not None else None
    return db, bg, q, db_l, q_l




# -- ground truth: equivalent references ------------------------------------------------------------
def reference_groups(images, tol: float = 4.0, size: int = 32) -> np.ndarray:
    """Group id per reference: references that are the same picture, or each other's mirror image
    (Tux Paint ships ``X.png`` and ``X_mirror.png``; ``b``/``d``, ``<``/``>``; one stamp in two folders;
    scikit-image's ``cat`` is ``chelsea``), by mean absolute grey-level difference <= ``tol`` at
    ``size`` x ``size``. Since "flip" is a transformation family, a copy of X is a copy of X's mirror
    twin too: the ground truth accepts either (see ``bench_copydetect.evaluate``)."""

    def small(im):
        return np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), np.float32).ravel()

    a = np.stack([small(im) for im in images])
    m = np.stack([small(ImageOps.mirror(im)) for im in images])
    group = np.arange(len(images))
    for i in range(len(images)):
        d = np.minimum(np.abs(a[i + 1:] - a[i]).mean(axis=1), np.abs(m[i + 1:] - a[i]).mean(axis=1))
        for j in np.nonzero(d <= tol)[0] + i + 1:
            group[group == group[j]] = group[i]
    return group


def stratified_split(families, gt, seed: int = 0) -> np.ndarray:
    """True for the tuning half: within each (family, copy / non-copy) cell, a seeded half of the queries."""
    rng = random.Random(seed)
    half = np.zeros(len(families), bool)
    for fam in sorted(set(families)):
        for is_copy in (True, False):
            idx = [i for i, f in enumerate(families) if f == fam and (gt[i] >= 0) == is_copy]
            rng.shuffle(idx)
            half[idx[: len(idx) // 2]] = True
    return half


# -- query views (regions) -------------------------------------------------------------------------
def region_views(data: CopySet, name: str, cache: Path, max_regions: int, local: bool = False):
    """Region views of every query (``retrieval.copydetect.regions.query_regions``, whole image excluded):
    ``owner [r]``, ``boxes [r, 4]``, vectors ``[r, d]`` and (``local``) PCA-reduced effnet-lite0 local
    features of the crops, cached per encoder and region settings. Also the seconds spent per query."""
    from retrieval.copydetect.regions import RegionConfig, query_regions

    cfg = RegionConfig(max_regions=max_regions)
    key = f"{name}-views-s{data.seed}-n{len(data.queries)}-{zlib.crc32(repr(cfg).encode()):08x}.npz"
    path = cache / key
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    t_regions = np.zeros(len(data.queries))
    owner, boxes = [], []
    for qi, im in enumerate(data.queries):
        t0 = time.perf_counter()
        regs = query_regions(im, cfg)[1:]
        t_regions[qi] = time.perf_counter() - t0
        owner += [qi] * len(regs)
        boxes += regs
    crops = [data.queries[qi].crop(b) for qi, b in zip(owner, boxes)]
    e = Embedder(name, cache, "")
    e.load_reducer()
    t_embed = np.zeros(len(data.queries))
    vecs, locs = [], []
    for qi, crop in zip(owner, crops):   # one crop at a time: per-query embedding time, as a server sees it
        t0 = time.perf_counter()
        v, tok = e._embed([crop])
        t_embed[qi] += time.perf_counter() - t0
        vecs.append(v)
        if local and tok is not None:
            locs.append(e.reducer.transform(tok).astype(np.float16))
    dim = e.enc.dim if not e.enc.binary else 32
    out = {
        "owner": np.asarray(owner, np.int64),
        "boxes": np.asarray(boxes, np.int64).reshape(-1, 4),
        "v": np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32),
        "t_regions": t_regions,
        "t_embed": t_embed,
    }
    if local:
        out["l"] = np.concatenate(locs) if locs else np.zeros((0, 49, 128), np.float16)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out
