"""Real sample images that ship inside packages (no network): for the demo, tests and benchmarks.

* ``skimage_photo_array`` / ``skimage_photos``: the photos bundled in the scikit-image wheel (others
  are fetched by pooch and are skipped offline);
* ``tuxpaint_stamps``: Debian ``tuxpaint-stamps-default`` PNG stamps with the first line of their
  ``NAME.txt`` caption;
* ``read_idx`` / ``fashion_mnist``: Debian ``dataset-fashion-mnist`` (IDX gz files).
"""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import numpy as np
from PIL import Image

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "immunohistochemistry",
                  "hubble_deep_field", "motorcycle_left", "page", "text", "moon", "horse", "brick", "grass")


def skimage_photo_array(name: str) -> np.ndarray | None:
    """One bundled scikit-image photo as uint8 (H, W[, C]); None when it is not bundled."""
    from skimage import data

    try:
        arr = getattr(data, name)()
    except Exception:  # noqa: BLE001 - some are downloaded by pooch, not bundled: skip offline
        return None
    arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
    return arr


def skimage_photos(names=SKIMAGE_PHOTOS, *, max_side: int | None = None) -> dict[str, Image.Image]:
    """Bundled scikit-image photos as RGB images (name -> image), optionally thumbnailed."""
    out = {}
    for name in names:
        arr = skimage_photo_array(name)
        if arr is None:
            continue
        img = Image.fromarray(arr).convert("RGB")
        if max_side:
            img.thumbnail((max_side, max_side))
        out[name] = img
    return out


def tuxpaint_stamps(root: Path = TUXPAINT_DIR) -> list[tuple[Path, str]]:
    """Every stamp PNG under ``root`` with its caption (first line of NAME.txt; "" if none), sorted."""
    if not root.is_dir():
        return []
    items = []
    for png in sorted(root.rglob("*.png")):
        caption = ""
        txt = png.with_suffix(".txt")
        if txt.is_file():
            try:
                caption = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
            except (OSError, IndexError):
                caption = ""
        items.append((png, caption))
    return items


def read_idx(path: str | Path, limit: int | None = None) -> np.ndarray:
    """An IDX file (``.gz``, ``.xz`` or plain) as a uint8 array, e.g. [n, 28, 28] images or [n] labels."""
    opener = gzip.open if str(path).endswith(".gz") else lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return arr[:limit] if limit is not None else arr


def fashion_mnist(split: str = "all", root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) for ``train`` (60k), ``test`` (10k) or ``all`` (70k,
    train then test). Raises FileNotFoundError with the install command when the package is missing."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: apt-get install dataset-fashion-mnist")
    parts = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    images = [read_idx(root / f"{p}-images-idx3-ubyte.gz") for p in parts]
    labels = [read_idx(root / f"{p}-labels-idx1-ubyte.gz") for p in parts]
    return np.concatenate(images), np.concatenate(labels)
