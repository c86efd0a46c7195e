"""Deletion test for attribution maps, and the cost of an overlay on CPU.

Pairs (real images, ``/usr/share/tuxpaint/stamps``):

* image → image with ``effnet-lite0``: the query is a seeded hard transformation of a stamp (crop,
  rotation, overlay, pasted on a photo; see ``bench_rerank.transform``), the result is the stamp;
* text → image with ``conse-effnet-lite0``: the query is the stamp's caption (``NAME.txt``), the
  result is the stamp.

For each pair and method, the result image's similarity to the query is measured before and after
masking (filling with the image's mean colour) 20 % of the image area: the top-20 % attributed
pixels, 20 % in random 16-px blocks inside the region the encoder sees, a disc of the same area at
a random place in that region, or a centred disc. Reported: mean similarity drop for each mask, and
the ratio of the attribution drop to the random drops (goal ≥ 2) and to the centre-blob drop.
Also: milliseconds per overlay (heatmap + PNG render) on CPU.

    .venv/bin/python benchmarks/bench_attribution.py --pairs 200
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FRACTION = 0.2


def caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        line = txt.read_text(errors="ignore").strip().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return line or None


def masks(heat: np.ndarray, box, rng: np.random.Generator, fraction: float = FRACTION):
    """(top-attributed, random blocks within the crop box, centred disc) boolean masks."""
    h, w = heat.shape
    n = int(round(fraction * h * w))
    left, upper, right, lower = (int(round(v)) for v in box)
    inside = np.zeros((h, w), bool)
    inside[max(0, upper):lower, max(0, left):right] = True
    # ties (zero heat) are broken at random, inside the region the encoder sees first (as for random)
    key = heat + 1e-6 * rng.random((h, w)) + np.where(inside, 0.0, -1.0)
    top = np.zeros(h * w, bool)
    top[np.argsort(-key.ravel(), kind="stable")[:n]] = True
    top = top.reshape(h, w)
    rnd = np.zeros((h, w), bool)
    block = 16
    cells = [(y, x) for y in range(max(0, upper), min(h, lower), block)
             for x in range(max(0, left), min(w, right), block)]
    for k in rng.permutation(len(cells)):
        if rnd.sum() >= n:
            break
        y, x = cells[k]
        rnd[y:y + block, x:x + block] = True
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.sqrt(n / np.pi)
    centre = (yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2 <= radius ** 2
    cy = rng.uniform(max(0, upper) + radius, max(max(0, upper) + radius, min(h, lower) - radius))
    cx = rng.uniform(max(0, left) + radius, max(max(0, left) + radius, min(w, right) - radius))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    return top, rnd, centre, disc


def apply_mask(img: Image.Image, mask: np.ndarray) -> Image.Image:
    arr = np.asarray(img).copy()
    fill = arr.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    arr[mask] = fill
    return Image.fromarray(arr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="pairs per encoder (image→image and text→image)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import bench_rerank as br

    from retrieval import create_encoder
    from retrieval.attribution import attribute, crop_box
    from retrieval.overlay import overlay_png

    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    paths = br.stamps()
    paths = [paths[i] for i in rng.permutation(len(paths))]
    photos = br.skimage_photos()

    setups = []
    effnet = create_encoder("effnet-lite0", device="cpu")
    img_pairs = []
    for i, p in enumerate(paths[: args.pairs]):
        ref = br.load_stamp(p)
        kind = ("crop", "rotate", "overlay", "paste")[i % 4]
        img_pairs.append((br.transform(ref, kind, rng, photos), ref))
    setups.append(("effnet-lite0", "image→image", effnet, img_pairs, ("gradcam", "cam", "eigencam"), None))
    conse = create_encoder("conse-effnet-lite0", device="cpu")
    txt_pairs = []
    for p in paths:
        cap = caption(p)
        if cap:
            txt_pairs.append((cap, br.load_stamp(p)))
        if len(txt_pairs) >= args.pairs:
            break
    setups.append(("conse-effnet-lite0", "text→image", conse, txt_pairs, ("cam", "gradcam"), "text"))

    rows, timings = [], []
    for enc_name, kind, enc, pairs, methods, modality in setups:
        t0 = time.perf_counter()
        if modality == "text":
            qvecs = enc.encode_texts([q for q, _ in pairs])
        else:
            qvecs = np.concatenate([enc.encode_images([q]) for q, _ in pairs])
        drops = {m: [] for m in methods}
        for n, ((_, result), qv) in enumerate(zip(pairs, qvecs)):
            box = crop_box(enc, result.size)
            base = None
            for m in methods:
                t1 = time.perf_counter()
                heat = attribute(enc, result, qv, m)
                png = overlay_png(result, heat)
                timings.append((enc_name, m, time.perf_counter() - t1, len(png)))
                top, rnd, centre, disc = masks(heat, box, rng)
                batch = [result, *(apply_mask(result, m_) for m_ in (top, rnd, centre, disc))]
                if base is not None:
                    batch = batch[1:]
                v = enc.encode_images(batch) @ qv
                if base is None:
                    base, v = float(v[0]), v[1:]
                drops[m].append((base - v[0], base - v[1], base - v[2], base - v[3]))
            if (n + 1) % 25 == 0:
                print(f"  {enc_name}: {n + 1}/{len(pairs)} pairs ({time.perf_counter() - t0:.0f}s)", flush=True)
        for m in methods:
            d = np.array(drops[m])
            top_d, rnd_d, cen_d, disc_d = d.mean(axis=0)
            wins = float((d[:, 0] > d[:, 3]).mean() * 100)
            rows.append((enc_name, kind, m, len(d), top_d, rnd_d, disc_d, cen_d, top_d / max(rnd_d, 1e-9),
                         top_d / max(disc_d, 1e-9), top_d / max(cen_d, 1e-9), wins))

    per_ms = {}
    for enc_name, m, dt, _size in timings:
        per_ms.setdefault((enc_name, m), []).append(dt)
    lines = [
        "<!-- bench_attribution -->",
        "## Attribution: deletion test and overlay cost",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs, torch threads {args.threads}, CPU only",
        f"- command: `.venv/bin/python benchmarks/bench_attribution.py --pairs {args.pairs}`",
        f"- pairs: {len(img_pairs)} image→image (transformed Tux Paint stamp → the stamp, effnet-lite0) and "
        f"{len(txt_pairs)} text→image (the stamp's caption → the stamp, conse-effnet-lite0); masks cover "
        f"{int(FRACTION * 100)} % of the image, filled with its mean colour",
        "",
        "| encoder | pairs | method | n | drop top-20 % | drop random blocks | drop random disc | "
        "drop centre disc | top/random blocks | top/random disc | top/centre | top > random disc (% pairs) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {e} | {k} | {m} | {n} | {a:.4f} | {b:.4f} | {dd:.4f} | {c:.4f} | {r:.2f} | {rd:.2f} | {rc:.2f} "
          f"| {w:.0f} |" for e, k, m, n, a, b, dd, c, r, rd, rc, w in rows],
        "",
        "Milliseconds per overlay (heatmap at the original size + PNG), median, CPU: "
        + "; ".join(f"{e} {m} {1000 * float(np.median(v)):.0f} ms" for (e, m), v in per_ms.items()) + ".",
        f"Total run {time.perf_counter() - t_start:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks" / "results" / "rerank.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.is_file() else ""
    marker = "<!-- bench_attribution -->"
    head = old[: old.index(marker)] if marker in old else old
    out.write_text((head.rstrip() + "\n\n" if head.strip() else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
