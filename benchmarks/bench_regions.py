"""Search by region, both directions, on real pictures (offline effnet-lite0 encoder, CPU), on two splits.

Data: Tux Paint stamps (``/usr/share/tuxpaint/stamps``, Debian ``tuxpaint-stamps-default``; photo cut-outs
and drawings with alpha) pasted on photos. Two splits that share nothing but the index:

* **tuning**: stamps of every topic but ``HELD_OUT_TOPICS``, pasted on the scikit-image photos, seed ``--seed``;
* **held-out**: stamps of ``HELD_OUT_TOPICS`` (food, plants, vehicles, sports), pasted on the scikit-learn
  photos (china, flower) and four crops of them, seed ``--seed + 1``.

One index (``loupe.build_index`` with ``--local-features --local-layer fine --regions``) holds, per split,
``--stamps`` stamps composited on white (the targets of direction 1), the split's photos (backgrounds: a
query pasted on one has a strong wrong-but-also-right match) and ``--queries`` posters (a photo with a stamp
that is not indexed on its own pasted on it: the targets of direction 2).

An object is a stamp cut out by its alpha, scaled so that its box covers ``--sizes`` of the picture's area
(cycled: 5, 10, 15, 25 %), rotated by 10–30° (either way; direction 1) and pasted at a random place.

* **query contains target**: query = a photo with an indexed stamp pasted on it, JPEG quality 75;
  target = that stamp. Methods: global search, re-ranking (``rerank``), the object's box (``box``: what a
  user draws), the proposed region nearest the object (largest IoU: the box a user clicks on the page; its
  own list), and the fused list of ``regions`` (top-level ``results``). The fused list is replayed offline for
  every rule of ``RULES`` (``retrieval.regions.fusion``) from the same lists; the rule with the best R@1 on
  the tuning split is reported on the held-out split. Metrics: R@1 / R@10 of the object's picture; "both@k":
  the object's picture *and* the background picture (itself indexed) are both in the top k.
* **target contains query**: query = a held-out stamp on white, rotated, JPEG quality 75; target = the
  poster it was pasted on. Methods: global search and re-ranking without the region index, and the default
  search with it (``loupe index --regions``).

R@1 / R@10 per object size; the proposals' best IoU with the object; the latency of ``regions`` against a
plain query (medians, same queries); index time and size with and without the region index.

    .venv/bin/python benchmarks/bench_regions.py --stamps 40 --queries 24
"""

from __future__ import annotations

import argparse
import io
import json
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

from retrieval.regions.fusion import FuseRule, fuse  # noqa: E402
from retrieval.regions.search import FUSE_RULE  # noqa: E402

STAMPS = Path("/usr/share/tuxpaint/stamps")


# -- data ------------------------------------------------------------------------------------------
HELD_OUT_TOPICS = ("food", "plants", "vehicles", "sports")
SPLITS = ("tuning", "held-out")


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


def held_out_photos() -> list[Image.Image]:
    """The scikit-learn sample photos and four crops of them (none of them used to tune anything)."""
    from sklearn.datasets import load_sample_image

    out = []
    for name in ("china.jpg", "flower.jpg"):
        img = Image.fromarray(load_sample_image(name)).convert("RGB")
        w, h = img.size
        out += [img, img.crop((0, 0, int(w * 0.6), int(h * 0.8))).resize((512, 512), Image.BICUBIC),
                img.crop((int(w * 0.4), int(h * 0.2), w, h))]
    return out


def topic(p: Path) -> str:
    return p.relative_to(STAMPS).parts[0]


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



# fused-list rules replayed on the saved lists (the tuning split picks one)
RULES = ([FuseRule("gain", gain=g, top=t) for g in (0.0, 0.5, 1.0, 2.0, 4.0) for t in (1, 2)]
         + [FuseRule("gain", gain=g, top=1, kinds=("segment", "salient")) for g in (1.0, 2.0, 4.0)]
         + [FuseRule("gain", gain=g, top=1, kinds=kinds) for kinds in (("residual",), ("residual", "segment"))
            for g in (1.0, 2.0, 4.0)]
         + [FuseRule("rrf", k_rrf=kk, w_global=w) for kk in (1.0, 10.0, 60.0) for w in (0.5, 1.0)]
         + [FuseRule("interleave")])


# -- the run ---------------------------------------------------------------------------------------
def build_pictures(args, folder: Path, rng_seed: int) -> dict:
    """Write the index's pictures; returns the splits' data."""
    rng = np.random.default_rng(rng_seed)
    paths = stamp_paths()
    splits = {}
    for split in SPLITS:
        pool = [p for p in paths if (topic(p) in HELD_OUT_TOPICS) == (split == "held-out")]
        order = rng.permutation(len(pool))
        indexed = [pool[i] for i in order[:args.stamps]]
        held = [pool[i] for i in order[args.stamps:args.stamps + args.queries]]
        bgs = photos() if split == "tuning" else held_out_photos()
        stamp_file = {}
        for p in indexed:
            name = f"stamp-{p.parent.name}-{p.stem}.png"
            on_white(load_rgba(p)).save(folder / name)
            stamp_file[p] = name
        bg_file = []
        for i, bg in enumerate(bgs):
            bg_file.append(f"photo-{split}-{i:02d}.png")
            bg.save(folder / bg_file[-1])
        posters = []
        prng = np.random.default_rng(rng_seed + (0 if split == "tuning" else 1) + 100)
        for j, p in enumerate(held):
            area = args.sizes[j % len(args.sizes)]
            picture, box = paste(bgs[int(prng.integers(len(bgs)))], load_rgba(p), area, 0.0, prng)
            name = f"poster-{split}-{j:03d}.png"
            picture.save(folder / name)
            posters.append((p, name, box, area))
        splits[split] = {"indexed": indexed, "stamp_file": stamp_file, "bgs": bgs, "bg_file": bg_file,
                         "posters": posters}
    return splits


def direction1(engine, region_sets, data, n_q, sizes, by_name, rng, plain_ms, regions_ms, with_rerank=True
               ) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for i in tqdm(range(n_q), desc="query contains target", file=sys.stderr):
        p = data["indexed"][int(rng.integers(len(data["indexed"])))]
        area = sizes[i % len(sizes)]
        angle = float(rng.uniform(10, 30) * rng.choice([-1, 1]))
        b = int(rng.integers(len(data["bgs"])))
        picture, box = paste(data["bgs"][b], load_rgba(p), area, angle, rng)
        q = jpeg(picture)
        target, background = by_name[data["stamp_file"][p]], by_name[data["bg_file"][b]]
        engine.region_sets = {}                   # without a region index
        t = time.perf_counter()
        plain = engine.search(image=q, k=10)
        plain_ms.append((time.perf_counter() - t) * 1e3)
        rerank = engine.search(image=q, k=10, rerank=True) if with_rerank else None
        engine.region_sets = region_sets
        boxed = engine.search(image=q, k=10, box=list(box))
        t = time.perf_counter()
        reg = engine.search(image=q, k=10, regions=True)
        regions_ms.append((time.perf_counter() - t) * 1e3)
        base = engine.search(image=q, k=10)       # the whole picture's list inside `regions` (for the replay)
        cands = {h.id: h for h in base.hits}
        for rr in reg.regions.regions:
            cands.update({h.id: h for h in rr.hits if h.id not in cands})
        g = engine.vectors("effnet-lite0", list(cands.values())) @ base.query.vector
        best = max(reg.regions.regions, key=lambda rr: iou(rr.box, box), default=None)
        res = next((rr for rr in reg.regions.regions if rr.region.kind == "residual"), None)
        rows.append({"size": area, "target": target, "background": background, "object_box": list(box),
                     "global": rank_of(plain.ids, target), "rerank": rank_of(rerank.ids, target) if rerank else 10**6,
                     "box": rank_of(boxed.ids, target), "regions": rank_of(reg.ids, target),
                     "region_of_object": rank_of([h.id for h in best.hits], target) if best else 10**6,
                     "object_iou": iou(best.box, box) if best else 0.0, "best_kind": best.region.kind if best else "",
                     "residual_region": rank_of([h.id for h in res.hits], target) if res else 10**6,
                     "residual_iou": iou(res.box, box) if res else None,
                     "g": {c: float(s) for c, s in zip(cands, g)},
                     "global_list": [(h.id, float(h.score)) for h in base.hits],
                     "region_lists": [(rr.region.kind, [(h.id, float(h.score)) for h in rr.hits])
                                      for rr in reg.regions.regions],
                     "region_boxes": [list(rr.box) for rr in reg.regions.regions]})
    return rows


def direction2(engine, region_sets, data, by_name, rng, with_rerank=True) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for p, name, box, area in tqdm(data["posters"], desc="target contains query", file=sys.stderr):
        angle = float(rng.uniform(10, 30) * rng.choice([-1, 1]))
        obj = load_rgba(p).rotate(angle, resample=Image.BICUBIC, expand=True)
        q = jpeg(on_white(obj))
        target = by_name[name]
        engine.region_sets = {}
        plain = engine.search(image=q, k=10)
        rerank = engine.search(image=q, k=10, rerank=True) if with_rerank else None
        engine.region_sets = region_sets
        withreg = engine.search(image=q, k=10)
        hit = next((h for h in withreg.hits if h.id == target), None)
        rows.append({"size": area, "global": rank_of(plain.ids, target),
                     "rerank": rank_of(rerank.ids, target) if rerank else 10**6,
                     "region_index": rank_of(withreg.ids, target),
                     "box_overlaps": bool(hit is not None and getattr(hit, "box", None) is not None
                                          and iou(hit.box, box) > 0)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stamps", type=int, default=40, help="indexed stamps per split (targets of direction 1)")
    ap.add_argument("--queries", type=int, default=24, help="queries per direction and split")
    ap.add_argument("--sizes", default="0.05,0.10,0.15,0.25", help="object area fractions (cycled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-proposals", action="store_true",
                    help="propose regions as before selective search (components + windows, 5 regions)")
    ap.add_argument("--max-with-residual", type=int, default=None,
                    help="regions per query when a residual region is found (default: ProposalConfig's)")
    ap.add_argument("--no-residual", action="store_true",
                    help="propose regions without the residual region (the previous session's proposals)")
    ap.add_argument("--splits", default=",".join(SPLITS),
                    help="splits to query (comma-separated; the index always holds both): tune with 'tuning'")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--skip-rerank", action="store_true", help="leave out the re-ranking baseline (slow on CPU)")
    ap.add_argument("--out", default=None, help="keep the index and the rows here (default: a temporary folder)")
    ap.add_argument("--reuse-index", action="store_true",
                    help="with --out: query the index already in OUT/idx (same --stamps/--queries/--seed) instead of "
                         "building it again; for tuning query-side settings (no index time or size reported)")
    args = ap.parse_args()
    args.sizes = [float(s) for s in args.sizes.split(",")]
    args.splits = [s for s in SPLITS if s in args.splits.split(",")]
    if not args.splits:
        ap.error(f"--splits: choose from {', '.join(SPLITS)}")

    from retrieval.device import set_cpu_threads

    # (not torch.set_num_threads: loading an encoder would set all cores again)
    set_cpu_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    from retrieval.device import one_query_per_thread

    one_query_per_thread()          # as `loupe serve`: faiss and the BLAS libraries at one thread
    import retrieval.regions.search as region_search
    from retrieval.regions.proposals import ProposalConfig

    if args.baseline_proposals:
        region_search.DEFAULT_PROPOSALS = ProposalConfig(max_regions=5, segments=0, min_windows=2, residual=None)
    elif args.no_residual:
        region_search.DEFAULT_PROPOSALS = ProposalConfig(residual=None)
    if args.max_with_residual is not None:
        from dataclasses import replace

        region_search.DEFAULT_PROPOSALS = replace(region_search.DEFAULT_PROPOSALS,
                                                  max_with_residual=args.max_with_residual)
    from indexer.pipeline import IndexConfig
    from loupe import Engine, build_index

    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-regions-"))
    folder = tmp / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    splits = build_pictures(args, folder, args.seed)
    n_images = len(list(folder.iterdir()))
    summary, index_seconds = None, 0.0
    if args.reuse_index and args.out and (tmp / "idx" / "manifest.json").is_file():
        print(f"querying the index already in {tmp / 'idx'}", file=sys.stderr)
    else:
        print(f"indexing {n_images} pictures in {tmp} ...", file=sys.stderr)
        t0 = time.perf_counter()
        summary = build_index(IndexConfig(sources=[str(folder)], out=tmp / "idx", encoders=["effnet-lite0"],
                                          local_features=True, local_layer="fine", regions=True, device="cpu",
                                          workers=0, batch_size=16))
        index_seconds = time.perf_counter() - t0
    engine = Engine(tmp / "idx", device="cpu")
    by_name = {}
    for table in engine.records.tables:
        for image_id, path in zip(table.column("id").to_pylist(), table.column("path").to_pylist()):
            by_name[Path(path).name] = image_id
    region_sets = engine.region_sets
    rows1, rows2, plain_ms, regions_ms = {}, {}, [], []
    for k, split in enumerate(SPLITS):
        if split not in args.splits:
            continue
        rng = np.random.default_rng(args.seed + k)
        rows1[split] = direction1(engine, region_sets, splits[split], args.queries, args.sizes, by_name, rng,
                                  plain_ms, regions_ms, not args.skip_rerank)
        rows2[split] = direction2(engine, region_sets, splits[split], by_name, rng, not args.skip_rerank)
    (tmp / "rows.json").write_text(json.dumps({"d1": rows1, "d2": rows2, "plain_ms": plain_ms,
                                               "regions_ms": regions_ms}))
    report(args, rows1, rows2, plain_ms, regions_ms, summary, index_seconds, engine, n_images)


def recall(rows, key, k, size=None) -> float:
    sel = [r for r in rows if size is None or r["size"] == size]
    return sum(r[key] <= k for r in sel) / len(sel) if sel else float("nan")


def replay(rows: list[dict], rule: FuseRule) -> list[dict]:
    """Each row with ``fused`` (rank of the object's picture) and ``both`` (the larger of the object's and
    the background's ranks) under ``rule``."""
    out = []
    for r in rows:
        ids = [c for c, _ in fuse(r["g"], r["global_list"], r["region_lists"], rule)]
        out.append({**r, "fused": rank_of(ids, r["target"]),
                    "both": max(rank_of(ids, r["target"]), rank_of(ids, r["background"]))})
    return out


def report(args, rows1, rows2, plain_ms, regions_ms, summary, index_seconds, engine, n_images):
    sizes = args.sizes
    load = os.getloadavg()[0]
    import torch

    from retrieval.encoders.passes import width

    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU only (load average {load:.1f}); "
             f"UTC {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; torch threads {torch.get_num_threads()}, "
             f"encoder passes side by side: {width(engine.encoder('effnet-lite0'))}",
             f"index: {n_images} pictures ({args.stamps} stamps, {args.queries} posters per split, photos); "
             f"{args.queries} queries per direction and split; seed {args.seed}; held-out topics "
             f"{', '.join(HELD_OUT_TOPICS)}", ""]

    def table(title, rows, methods):
        lines.append(title)
        lines.append("| method | " + " | ".join(f"R@1 {int(s * 100)}%" for s in sizes) + " | R@1 all | R@10 all |")
        lines.append("|---|" + "---|" * (len(sizes) + 2))
        for m in methods:
            cells = [f"{recall(rows, m, 1, s):.3f}" for s in sizes]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {recall(rows, m, 1):.3f} | {recall(rows, m, 10):.3f} |")
        lines.append("")

    def fused_stats(rows, rule):
        rep = replay(rows, rule)
        return (recall(rep, "fused", 1), recall(rep, "fused", 10), recall(rep, "both", 2), recall(rep, "both", 10))

    chosen = FUSE_RULE
    if "tuning" in rows1:
        tuned = {rule: fused_stats(rows1["tuning"], rule) for rule in RULES}
        chosen = max(RULES, key=lambda r: (tuned[r][0], tuned[r][3], tuned[r][1]))
        lines.append("fused-list rules on the tuning split (R@1 obj, R@10 obj, both@2, both@10):")
        lines += [f"- {r.describe()}: " + ", ".join(f"{v:.3f}" for v in tuned[r]) for r in RULES]
    lines += [f"chosen on tuning: {chosen.describe()}; shipped (FUSE_RULE): {FUSE_RULE.describe()}", ""]
    for split in rows1:
        rows = rows1[split]
        for r, rep in zip(rows, replay(rows, chosen)):
            r["fused_chosen"] = rep["fused"]
        methods = [m for m in ("global", "rerank", "box", "region_of_object", "residual_region", "regions",
                               "fused_chosen") if m != "rerank" or not args.skip_rerank]
        table(f"[{split}] query contains target ({len(rows)} queries; R@1 per object size = area fraction)",
              rows, methods)
        ious = [r["object_iou"] for r in rows]
        lines.append(f"[{split}] best proposed region's IoU with the object: median {statistics.median(ious):.3f}, "
                     f"mean {statistics.mean(ious):.3f}; kinds of the best region: "
                     + ", ".join(f"{k} {sum(r['best_kind'] == k for r in rows)}"
                                 for k in ("residual", "segment", "salient", "window")))
        res_ious = [r["residual_iou"] for r in rows if r.get("residual_iou") is not None]
        lines.append(f"[{split}] a residual region in {len(res_ious)}/{len(rows)} queries; its IoU with the object: "
                     + (f"median {statistics.median(res_ious):.3f}, mean {statistics.mean(res_ious):.3f}"
                        if res_ious else "-"))
        for name, rule in (("chosen", chosen), ("shipped", FUSE_RULE)):
            st = fused_stats(rows, rule)
            lines.append(f"[{split}] fused list, {name} rule ({rule.describe()}): R@1 obj {st[0]:.3f}, R@10 obj "
                         f"{st[1]:.3f}, both@2 {st[2]:.3f}, both@10 {st[3]:.3f}")
        glob = [{**r, "both": max(rank_of([c for c, _ in r["global_list"]], r["target"]),
                                  rank_of([c for c, _ in r["global_list"]], r["background"]))} for r in rows]
        lines += [f"[{split}] whole picture's list (with the region index): both@2 {recall(glob, 'both', 2):.3f}, "
                  f"both@10 {recall(glob, 'both', 10):.3f}", ""]
        table(f"[{split}] target contains query ({len(rows2[split])} queries; R@1 per object size of the target)",
              rows2[split], [m for m in ("global", "rerank", "region_index") if m != "rerank" or not args.skip_rerank])
        found = [r for r in rows2[split] if r["region_index"] <= 10]
        lines += [f"[{split}] hits of the target (top 10, region index) whose box overlaps the pasted object: "
                  f"{sum(r['box_overlaps'] for r in found)}/{len(found)}", ""]
    med_plain, med_reg = statistics.median(plain_ms), statistics.median(regions_ms)
    lines += [f"latency ({len(plain_ms)} direction-1 queries): plain query median {med_plain:.1f} ms, regions median "
              f"{med_reg:.1f} ms, ratio {med_reg / med_plain:.2f}x (load average at the end "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})"]
    rs = summary.regions if summary is not None else None
    shard_bytes = engine.index_bytes()
    if rs is not None:
        lines += [f"index: {index_seconds:.1f} s in all, of which the region index {rs['seconds']:.1f} s "
                  f"({rs['regions']} regions of {rs['images']} pictures); embedding stage {summary.stages.embed:.1f} s",
                  f"size: vector shards + metadata {shard_bytes / 1e6:.2f} MB, region index {rs['bytes'] / 1e6:.2f} MB "
                  f"({rs['bytes'] / max(shard_bytes, 1):.2f}x)"]
    if "held-out" not in rows1:
        print("\n".join(lines))
        return
    held1, held2 = rows1["held-out"], rows2["held-out"]
    r_obj, r_fused = recall(held1, "region_of_object", 1), recall(held1, "fused_chosen", 1)
    lines += ["", "goals (held-out split):",
              f"- query-contains-target R@1 >= 0.6: region nearest the object {r_obj:.3f}, fused list (rule chosen on "
              f"tuning) {r_fused:.3f}, drawn box {recall(held1, 'box', 1):.3f} "
              f"({'met' if max(r_obj, r_fused) >= 0.6 else 'not met'})",
              f"- target-contains-query R@10 >= 0.8: {recall(held2, 'region_index', 10):.3f}",
              f"- regions latency <= 5x plain: {med_reg / med_plain:.2f}x"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
