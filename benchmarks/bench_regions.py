"""Search by region, both directions, on real pictures (offline effnet-lite0 encoder, CPU).

Data: Tux Paint stamps (``/usr/share/tuxpaint/stamps``, Debian ``tuxpaint-stamps-default``; photo cut-outs
and drawings with alpha) and the scikit-image photos. One index (``loupe.build_index`` with
``--local-features --local-layer fine --regions``) holds:

* ``--stamps`` stamps composited on white (the targets of direction 1);
* the photos (backgrounds; they are in the index, so a query pasted on one has a strong wrong match);
* ``--queries`` posters: a photo with a *held-out* stamp pasted on it (the targets of direction 2).

An object is a stamp cut out by its alpha, scaled so that its box covers ``--sizes`` of the picture's area
(cycled: 5, 10, 15, 25 %), rotated by 10–30° (either way) and pasted at a random place.

* **query contains target**: query = a photo with an indexed stamp pasted on it, JPEG quality 75;
  target = that stamp. Methods: global search, today's re-ranking (``rerank``), the object's box
  (``box`` = the pasted object's bounding box, what a user draws), ``regions`` (the fused list), and
  the results of the proposed region that overlaps the object most (what a user clicks on the page).
* **target contains query**: query = a held-out stamp on white, rotated, JPEG quality 75; target = the
  poster it was pasted on (unrotated). Methods: global search and re-ranking without the region index,
  and the default search with it (``loupe index --regions``).

R@1 / R@10 per object size; the latency of ``regions`` against a plain query (medians, same queries);
index time and size with and without the region index.

    .venv/bin/python benchmarks/bench_regions.py --stamps 160 --queries 48
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STAMPS = Path("/usr/share/tuxpaint/stamps")


# -- data ------------------------------------------------------------------------------------------
def stamp_paths() -> list[Path]:
    if not STAMPS.is_dir():
        sys.exit(f"{STAMPS} is missing: apt-get install -y tuxpaint-stamps-default")
    return sorted(p for p in STAMPS.rglob("*.png") if "mirror" not in p.name)


def load_rgba(path: Path, max_side: int = 320) -> Image.Image:
    img = Image.open(path).convert("RGBA")
    bbox = img.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    if bbox:
        img = img.crop(bbox)
    img.thumbnail((max_side, max_side), Image.BICUBIC)
    return img


def on_white(rgba: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgba.size, "white")
    out.paste(rgba, (0, 0), rgba)
    return out


def photos() -> list[Image.Image]:
    from retrieval.testing.samples import skimage_photos

    seen, out = set(), []
    for img in skimage_photos().values():
        key = img.tobytes()[:4096]
        if key not in seen:
            seen.add(key)
            out.append(img.convert("RGB"))
    return out


def paste(background: Image.Image, obj: Image.Image, area: float, angle: float, rng: np.random.Generator
          ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``obj`` (RGBA) scaled so its box covers ``area`` of ``background``, rotated by ``angle``, pasted at a
    random place; returns the picture and the pasted object's box."""
    W, H = background.size
    scale = np.sqrt(area * W * H / (obj.width * obj.height))
    o = obj.resize((max(8, round(obj.width * scale)), max(8, round(obj.height * scale))), Image.BICUBIC)
    if angle:
        o = o.rotate(angle, resample=Image.BICUBIC, expand=True)
    o.thumbnail((W - 2, H - 2), Image.BICUBIC)
    x = int(rng.integers(0, W - o.width + 1))
    y = int(rng.integers(0, H - o.height + 1))
    out = background.copy()
    out.paste(o, (x, y), o)
    bx = o.getchannel("A").getbbox() or (0, 0, o.width, o.height)
    return out, (x + bx[0], y + bx[1], x + bx[2], y + bx[3])


def jpeg(img: Image.Image, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def iou(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def rank_of(ids: list[str], target: str) -> int:
    return ids.index(target) + 1 if target in ids else 10**6


# -- the run ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stamps", type=int, default=160, help="indexed stamps (targets of direction 1)")
    ap.add_argument("--queries", type=int, default=48, help="queries per direction")
    ap.add_argument("--sizes", default="0.05,0.10,0.15,0.25", help="object area fractions (cycled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the index here (default: a temporary folder)")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)

    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from indexer.pipeline import IndexConfig
    from loupe import Engine, build_index

    paths = stamp_paths()
    order = rng.permutation(len(paths))
    n_idx, n_q = args.stamps, args.queries
    indexed_paths = [paths[i] for i in order[:n_idx]]
    held_out = [paths[i] for i in order[n_idx:n_idx + n_q]]
    backgrounds = photos()

    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-regions-"))
    folder = tmp / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    stamp_file = {}
    for p in indexed_paths:
        name = f"stamp-{p.parent.name}-{p.stem}.png"
        on_white(load_rgba(p)).save(folder / name)
        stamp_file[p] = name
    for i, bg in enumerate(backgrounds):
        bg.save(folder / f"photo-{i:02d}.png")
    posters = []                       # direction 2: (held-out stamp path, poster file, box, size)
    for j, p in enumerate(held_out):
        area = sizes[j % len(sizes)]
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        picture, box = paste(bg, load_rgba(p), area, 0.0, rng)
        name = f"poster-{j:03d}.png"
        picture.save(folder / name)
        posters.append((p, name, box, area))
    n_images = len(list(folder.iterdir()))

    print(f"indexing {n_images} pictures in {tmp} ...", file=sys.stderr)
    t0 = time.perf_counter()
    summary = build_index(IndexConfig(sources=[str(folder)], out=tmp / "idx", encoders=["effnet-lite0"],
                                      local_features=True, local_layer="fine", regions=True, device="cpu",
                                      workers=0, batch_size=16))
    index_seconds = time.perf_counter() - t0
    regions_summary = summary.regions
    engine = Engine(tmp / "idx", device="cpu")
    by_name = {}
    for table in engine.records.tables:
        for image_id, path in zip(table.column("id").to_pylist(), table.column("path").to_pylist()):
            by_name[Path(path).name] = image_id
    region_sets = engine.region_sets

    # -- direction 1: the query contains the target ----------------------------------------------------
    rows1 = []
    plain_ms, regions_ms = [], []
    for i in range(n_q):
        p = indexed_paths[int(rng.integers(len(indexed_paths)))]
        area = sizes[i % len(sizes)]
        angle = float(rng.uniform(10, 30) * rng.choice([-1, 1]))
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        picture, box = paste(bg, load_rgba(p), area, angle, rng)
        q = jpeg(picture)
        target = by_name[stamp_file[p]]
        engine.region_sets = {}                   # today's search: no region index
        t = time.perf_counter()
        plain = engine.search(image=q, k=10)
        plain_ms.append((time.perf_counter() - t) * 1e3)
        rerank = engine.search(image=q, k=10, rerank=True)
        engine.region_sets = region_sets
        boxed = engine.search(image=q, k=10, box=list(box))
        t = time.perf_counter()
        reg = engine.search(image=q, k=10, regions=True)
        regions_ms.append((time.perf_counter() - t) * 1e3)
        best = max(reg.regions.regions, key=lambda rr: iou(rr.box, box), default=None)
        rows1.append({"size": area, "global": rank_of(plain.ids, target), "rerank": rank_of(rerank.ids, target),
                      "box": rank_of(boxed.ids, target), "regions": rank_of(reg.ids, target),
                      "region_of_object": rank_of([h.id for h in best.hits], target) if best else 10**6,
                      "object_iou": iou(best.box, box) if best else 0.0})
        print(f"q1 {i}: {rows1[-1]}", file=sys.stderr)

    # -- direction 2: the target contains the query ----------------------------------------------------
    rows2 = []
    for j, (p, name, box, area) in enumerate(posters):
        angle = float(rng.uniform(10, 30) * rng.choice([-1, 1]))
        obj = load_rgba(p).rotate(angle, resample=Image.BICUBIC, expand=True)
        q = jpeg(on_white(obj))
        target = by_name[name]
        engine.region_sets = {}
        plain = engine.search(image=q, k=10)
        rerank = engine.search(image=q, k=10, rerank=True)
        engine.region_sets = region_sets
        withreg = engine.search(image=q, k=10)
        hit = next((h for h in withreg.hits if h.id == target), None)
        rows2.append({"size": area, "global": rank_of(plain.ids, target), "rerank": rank_of(rerank.ids, target),
                      "region_index": rank_of(withreg.ids, target),
                      "box_overlaps": bool(hit is not None and getattr(hit, "box", None) is not None
                                           and iou(hit.box, box) > 0)})
        print(f"q2 {j}: {rows2[-1]}", file=sys.stderr)

    report(args, rows1, rows2, plain_ms, regions_ms, summary, regions_summary, index_seconds, engine, n_images)


def recall(rows, key, k, size=None) -> tuple[float, int]:
    sel = [r for r in rows if size is None or r["size"] == size]
    return (sum(r[key] <= k for r in sel) / len(sel) if sel else float("nan")), len(sel)


def report(args, rows1, rows2, plain_ms, regions_ms, summary, regions_summary, index_seconds, engine, n_images):
    sizes = sorted({r["size"] for r in rows1})
    load = os.getloadavg()[0]
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU only (load average {load:.1f}); "
             f"UTC {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}",
             f"index: {n_images} pictures ({args.stamps} stamps, posters {args.queries}, photos); "
             f"{args.queries} queries per direction; seed {args.seed}", ""]

    def table(title, rows, methods):
        lines.append(f"{title}")
        lines.append("| method | " + " | ".join(f"R@1 {int(s * 100)}%" for s in sizes) + " | R@1 all | R@10 all |")
        lines.append("|---|" + "---|" * (len(sizes) + 2))
        for m in methods:
            cells = [f"{recall(rows, m, 1, s)[0]:.3f}" for s in sizes]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {recall(rows, m, 1)[0]:.3f} | "
                         f"{recall(rows, m, 10)[0]:.3f} |")
        lines.append("")

    table("query contains target (R@1 per object size = area fraction of the query)", rows1,
          ["global", "rerank", "box", "regions", "region_of_object"])
    lines.append(f"median IoU of the best proposed region with the pasted object: "
                 f"{statistics.median(r['object_iou'] for r in rows1):.3f}")
    lines.append("")
    table("target contains query (R@1 per object size = area fraction of the target)", rows2,
          ["global", "rerank", "region_index"])
    found = [r for r in rows2 if r["region_index"] <= 10]
    lines.append(f"hits of the target (top 10, region index) whose box overlaps the pasted object: "
                 f"{sum(r['box_overlaps'] for r in found)}/{len(found)}")
    med_plain, med_reg = statistics.median(plain_ms), statistics.median(regions_ms)
    lines += ["", f"latency: plain query median {med_plain:.1f} ms, regions median {med_reg:.1f} ms, "
              f"ratio {med_reg / med_plain:.2f}x"]
    shard_bytes = engine.index_bytes()
    region_bytes = regions_summary["bytes"]
    lines += [f"index: {index_seconds:.1f} s in all, of which the region index {regions_summary['seconds']:.1f} s "
              f"({regions_summary['regions']} regions of {regions_summary['images']} pictures); "
              f"embedding stage {summary.stages.embed:.1f} s",
              f"size: vector shards + metadata {shard_bytes / 1e6:.2f} MB, region index {region_bytes / 1e6:.2f} MB "
              f"({region_bytes / max(shard_bytes, 1):.2f}x)"]
    r1 = recall(rows1, "region_of_object", 1)[0]
    rf = recall(rows1, "regions", 1)[0]
    rb = recall(rows1, "box", 1)[0]
    r10 = recall(rows2, "region_index", 10)[0]
    ratio = med_reg / med_plain
    lines += ["", "goals:",
              f"- query-contains-target R@1 >= 0.6: region of the object {r1:.3f}, fused regions list {rf:.3f}, "
              f"drawn box {rb:.3f}",
              f"- target-contains-query R@10 >= 0.8: {r10:.3f} ({'met' if r10 >= 0.8 else 'not met'})",
              f"- regions latency <= 5x plain: {ratio:.2f}x ({'met' if ratio <= 5 else 'not met'})"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
