"""Deletion test for attribution maps, and the cost of an overlay on CPU.

Pairs (real images, ``/usr/share/tuxpaint/stamps``):

* image → image with ``effnet-lite0``: the query is a seeded hard transformation of a stamp (crop,
  rotation, overlay, pasted on a photo; see ``bench_rerank.transform``), the result is the stamp;
* text → image with ``conse-effnet-lite0``: the query is the stamp's caption (``NAME.txt``), the
  result is the stamp.

For each pair, the result image's similarity to the query is measured before and after masking
exactly 20 % of the image area, filled with the image's mean colour: the top-20 % attributed pixels of
each method's map (ties, e.g. the zeros of a ReLU'd map, are broken by a random order of 16-px
blocks, so the unattributed remainder is masked like the random baseline), 20 % in random 16-px
blocks inside the region the encoder sees (two draws per pair, averaged), a disc of the same area at
a random place in that region, and a centred disc. The random and centre masks are shared by all
methods of a pair (paired comparison). Reported: mean similarity drop for each mask, the ratio of
the attribution drop to the random-block drop (goal ≥ 2) and to the centre-disc drop (goal > 1), on
all pairs and on the held-out half (odd-numbered pairs; the per-encoder default is chosen on the
even-numbered half), and milliseconds per overlay (heatmap at the original size + PNG) on CPU.

    .venv/bin/python benchmarks/bench_attribution.py --pairs 200

``--fill inpaint`` fills the masks by harmonic inpainting from their border instead of the mean colour (issue
19: a flat mean-colour block adds edges a CNN reacts to wherever it lands, so the random baseline measures
damage as well as removed evidence; see ``inpaint``). ``mask_size(..., area="seen")`` sizes the masks to 20 %
of the encoder's centre crop instead of the whole image (``bench_attribution_legible.py`` reports both).
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
BLOCK = 16
RESULTS = ROOT / "benchmarks" / "results" / "attribution.md"


def caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        line = txt.read_text(errors="ignore").strip().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return line or None


def _inside(shape: tuple[int, int], box) -> np.ndarray:
    h, w = shape
    left, upper, right, lower = (int(round(v)) for v in box)
    inside = np.zeros((h, w), bool)
    inside[max(0, upper):lower, max(0, left):right] = True
    return inside


def _block_order(shape: tuple[int, int], box, rng: np.random.Generator) -> np.ndarray:
    """A random rank per pixel: 16-px blocks inside ``box`` in random order (raster order within a
    block), then the pixels outside the box; lower rank = masked first."""
    h, w = shape
    left, upper = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    yy, xx = np.mgrid[0:h, 0:w]
    by, bx = (yy - upper) // BLOCK, (xx - left) // BLOCK
    nby, nbx = by.max() + 1 - by.min(), bx.max() + 1 - bx.min()
    block_id = (by - by.min()) * nbx + (bx - bx.min())
    block_rank = rng.permutation(nby * nbx)[block_id]
    within = (yy - upper) % BLOCK * BLOCK + (xx - left) % BLOCK
    outside = ~_inside(shape, box)
    return (outside * (nby * nbx) + block_rank) * (BLOCK * BLOCK) + within


def _first(order: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(order.size, bool)
    mask[np.argsort(order.ravel(), kind="stable")[:n]] = True
    return mask.reshape(order.shape)


AREAS = ("image", "seen")


def mask_size(shape: tuple[int, int], box, fraction: float = FRACTION, area: str = "image") -> int:
    """Pixels a mask covers: ``fraction`` of the whole image (``"image"``, the issue-5 protocol) or of the
    part the encoder sees (``"seen"``: its centre crop ``box``). With ``"image"`` a wide picture's mask covers
    far more than ``fraction`` of what the encoder saw (39 % of it for a 3:2 photo, 68 % for skimage's
    448x172 ``text``), so every mask removes most of the evidence and the ratios collapse towards 1."""
    if area == "image":
        return int(round(fraction * shape[0] * shape[1]))
    if area != "seen":
        raise ValueError(f"unknown area {area!r}; use one of {AREAS}")
    return int(round(fraction * _inside(shape, box).sum()))


def top_mask(heat: np.ndarray, box, rng: np.random.Generator, fraction: float = FRACTION,
             area: str = "image") -> np.ndarray:
    """Exactly ``mask_size`` pixels: the highest heat inside the encoder's region first; ties broken by a
    random block order (as ``random_mask``)."""
    h, w = heat.shape
    n = mask_size((h, w), box, fraction, area)
    heat = np.asarray(heat, np.float64)
    order = _block_order((h, w), box, rng).astype(np.float64)
    rank_heat = np.unique(heat, return_inverse=True)[1].reshape(h, w)        # dense rank, ties equal
    inside = _inside((h, w), box)
    key = np.where(inside, 0, 1) * (h * w + 1.0) - rank_heat                 # inside first, then hot first
    idx = np.lexsort((order.ravel(), key.ravel()))[:n]
    mask = np.zeros(h * w, bool)
    mask[idx] = True
    return mask.reshape(h, w)


def random_mask(shape: tuple[int, int], box, rng: np.random.Generator, fraction: float = FRACTION,
                area: str = "image") -> np.ndarray:
    """Exactly ``mask_size`` pixels in random 16-px blocks inside ``box`` (the last block partly)."""
    return _first(_block_order(shape, box, rng), mask_size(shape, box, fraction, area))


def discs(shape: tuple[int, int], box, rng: np.random.Generator, fraction: float = FRACTION, area: str = "image"):
    """(centred disc, disc at a random place inside ``box``), each of about ``mask_size`` pixels."""
    h, w = shape
    n = mask_size(shape, box, fraction, area)
    left, upper, right, lower = (int(round(v)) for v in box)
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.sqrt(n / np.pi)
    centre = (yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2 <= radius ** 2
    cy = rng.uniform(max(0, upper) + radius, max(max(0, upper) + radius, min(h, lower) - radius))
    cx = rng.uniform(max(0, left) + radius, max(max(0, left) + radius, min(w, right) - radius))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    return centre, disc


FILLS = ("mean", "inpaint")


def inpaint(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Harmonic (Laplace) inpainting: every masked pixel becomes the mean of its 4 neighbours, the unmasked
    pixels fixed (one sparse solve per image, shared by the channels). The removed content leaves no trace
    (the fill depends only on the mask's border) and no artificial edges: the linear imputation of ROAD
    (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022)
    without its noise."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import splu

    h, w = mask.shape
    idx = -np.ones((h, w), np.int64)
    ys, xs = np.nonzero(mask)
    n = len(ys)
    if n == 0:
        return arr.copy()
    idx[ys, xs] = np.arange(n)
    img = arr.astype(np.float64)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.zeros(n)]
    rhs = np.zeros((n, img.shape[2]))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        vals[0][ok] += 1.0                                   # degree (in-image neighbours: Neumann edges)
        j = np.where(ok, idx[np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)], -1)
        unknown = ok & (j >= 0)
        rows.append(np.nonzero(unknown)[0])
        cols.append(j[unknown])
        vals.append(-np.ones(int(unknown.sum())))
        known = ok & (j < 0)
        rhs[known] += img[ny[known], nx[known]]
    a = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    sol = splu(a.tocsc()).solve(rhs)
    out = arr.copy()
    out[ys, xs] = np.clip(np.rint(sol), 0, 255).astype(arr.dtype)
    return out


def apply_mask(img: Image.Image, mask: np.ndarray, fill: str = "mean") -> Image.Image:
    """``img`` with ``mask`` removed: filled with the image's mean colour (``"mean"``, the protocol of the
    issue-5 figures) or harmonically inpainted from the mask's border (``"inpaint"``, see :func:`inpaint`)."""
    arr = np.asarray(img.convert("RGB")).copy()
    if fill == "inpaint":
        return Image.fromarray(inpaint(arr, mask))
    if fill != "mean":
        raise ValueError(f"unknown fill {fill!r}; use one of {FILLS}")
    arr[mask] = arr.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    return Image.fromarray(arr)


def summarise(d: np.ndarray) -> dict:
    """d: [n, 5] drops (top, random blocks 1, random blocks 2, centre, random disc)."""
    top, rnd, cen, disc = d[:, 0].mean(), d[:, 1:3].mean(), d[:, 3].mean(), d[:, 4].mean()
    return {"n": len(d), "top": top, "rnd": rnd, "centre": cen, "disc": disc,
            "r_rnd": top / max(rnd, 1e-9), "r_disc": top / max(disc, 1e-9), "r_centre": top / max(cen, 1e-9),
            "wins": float((d[:, 0] > d[:, 1:3].mean(axis=1)).mean() * 100)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="pairs per encoder (image→image and text→image)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--which", choices=("both", "image", "text"), default="both")
    ap.add_argument("--image-methods", default="gradcam,cam,eigencam,occlusion")
    ap.add_argument("--text-methods", default="cam,gradcam,occlusion")
    ap.add_argument("--out", default=str(RESULTS), help="markdown file whose benchmark block is replaced")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--dump", help="also save the per-pair drops to this .npz (method → [n, 5])")
    ap.add_argument("--every", type=int, default=10, help="write the (partial) table every N pairs")
    ap.add_argument("--tag", help="name of the block this run replaces in --out (default: --which)")
    ap.add_argument("--fill", choices=FILLS, default="mean",
                    help="how masked pixels are filled: the image's mean colour (the issue-5 protocol) or "
                         "harmonic inpainting from the mask's border (ROAD-style, issue 19)")
    args = ap.parse_args(argv)
    tag = args.tag or args.which
    begin, end = f"<!-- bench_attribution:{tag} -->", f"<!-- /bench_attribution:{tag} -->"

    from retrieval.device import set_cpu_threads

    # (not torch.set_num_threads: loading an encoder would set all cores again)
    set_cpu_threads(args.threads)
    import bench_rerank as br

    from retrieval.encoders import create_encoder
    from retrieval.explain.attribution import attribute
    from retrieval.explain.grid import crop_box
    from retrieval.explain.overlay import overlay_png

    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    paths = br.stamps()
    paths = [paths[i] for i in rng.permutation(len(paths))]
    photos = br.skimage_photos()

    setups = []
    img_pairs, txt_pairs = [], []
    for i, p in enumerate(paths[: args.pairs]):   # drawn even when unused, so both halves stay seeded alike
        ref = br.load_stamp(p)
        kind = ("crop", "rotate", "overlay", "paste")[i % 4]
        img_pairs.append((br.transform(ref, kind, rng, photos), ref))
    for p in paths:
        cap = caption(p)
        if cap:
            txt_pairs.append((cap, br.load_stamp(p)))
        if len(txt_pairs) >= args.pairs:
            break
    if args.which in ("both", "image"):
        setups.append(("effnet-lite0", "image→image", img_pairs, args.image_methods.split(","), "image"))
    if args.which in ("both", "text"):
        setups.append(("conse-effnet-lite0", "text→image", txt_pairs, args.text_methods.split(","), "text"))

    per_ms: dict = {}
    results: list = []        # (enc_name, kind, methods, drops, planned pairs)

    def render(done: bool) -> str:
        table = [
            "| encoder | pairs | method | n | drop top-20 % | drop random blocks | drop random disc | drop centre disc "
            "| top/random blocks | top/random disc | top/centre | top > random (% pairs) | tuning half top/random "
            "| held-out top/random | held-out top/centre | ms/overlay |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        best_lines = []
        for enc_name, kind, methods, drops, planned in results:
            if not drops[methods[0]]:
                continue
            tune = {}
            for m in methods:
                d = np.array(drops[m])
                s, t, h = summarise(d), summarise(d[0::2]), summarise(d[1::2] if len(d) > 1 else d)
                tune[m] = t["r_rnd"]
                ms = 1000 * float(np.median(per_ms[(enc_name, m)]))
                table.append(f"| {enc_name} | {kind} | {m} | {s['n']} | {s['top']:.4f} | {s['rnd']:.4f} "
                             f"| {s['disc']:.4f} | {s['centre']:.4f} | {s['r_rnd']:.2f} | {s['r_disc']:.2f} "
                             f"| {s['r_centre']:.2f} | {s['wins']:.0f} | {t['r_rnd']:.2f} | {h['r_rnd']:.2f} "
                             f"| {h['r_centre']:.2f} | {ms:.0f} |")
            best = max(tune, key=tune.get)
            n_done = len(drops[methods[0]])
            best_lines.append(f"- {enc_name} ({kind}): best of these methods on the tuning half (even pairs): "
                              f"`{best}`, {tune[best]:.2f}x the random-block drop there"
                              + ("" if n_done >= planned else f" (partial: {n_done} of {planned} pairs)"))
        status = "" if done else " — PARTIAL, the run was still going when this was written"
        return "\n".join([
            begin,
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
            f"{os.cpu_count()} cores shared with other jobs, torch threads {args.threads}, CPU only{status}",
            f"- command: `.venv/bin/python benchmarks/bench_attribution.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
            f"- pairs: {len(img_pairs)} image→image (transformed Tux Paint stamp → the stamp, effnet-lite0) and "
            f"{len(txt_pairs)} text→image (the stamp's caption → the stamp, conse-effnet-lite0); masks cover exactly "
            f"{int(FRACTION * 100)} % of the image, fill `{args.fill}` (mean: the image's mean colour; inpaint: "
            "harmonic inpainting from the mask's border); drops are mean similarity drops; "
            "ms/overlay is the median time for the heatmap at the original size + its PNG",
            "",
            *table,
            "",
            *best_lines,
            f"- total run {time.perf_counter() - t_start:.0f} s",
            end,
        ])

    def write(done: bool) -> None:
        text = render(done)
        if done:
            print(text)
        for enc_name, _kind, methods, drops, _planned in results:
            if args.dump and drops[methods[0]]:
                np.savez(f"{args.dump}-{enc_name}.npz", **{m: np.array(drops[m]) for m in methods},
                         **{f"ms_{m}": np.array(per_ms[(enc_name, m)]) for m in methods})
        if args.no_write:
            return
        out = Path(args.out)
        old = out.read_text() if out.is_file() else ""
        if begin in old and end in old:
            new = old[: old.index(begin)] + text + old[old.index(end) + len(end):]
        else:
            new = (old.rstrip() + "\n\n" if old.strip() else "") + text + "\n"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(new)

    for enc_name, kind, pairs, methods, modality in setups:
        enc = create_encoder(enc_name, device="cpu")
        t0 = time.perf_counter()
        if modality == "text":
            qvecs = enc.encode_texts([q for q, _ in pairs])
        else:
            qvecs = np.concatenate([enc.encode_images([q]) for q, _ in pairs])
        drops = {m: [] for m in methods}
        results.append((enc_name, kind, methods, drops, len(pairs)))
        mrng = np.random.default_rng(args.seed + 1)
        for n, ((_, result), qv) in enumerate(zip(pairs, qvecs)):
            box = crop_box(enc, result.size)
            shape = (result.size[1], result.size[0])
            tops = []
            for m in methods:
                t1 = time.perf_counter()
                heat = attribute(enc, result, qv, m)
                overlay_png(result, heat)
                per_ms.setdefault((enc_name, m), []).append(time.perf_counter() - t1)
                tops.append(top_mask(heat, box, mrng))
            centre, disc = discs(shape, box, mrng)
            shared = [random_mask(shape, box, mrng), random_mask(shape, box, mrng), centre, disc]
            sims = enc.encode_images([result, *(apply_mask(result, k, args.fill) for k in tops + shared)]) @ qv
            d = sims[0] - sims[1:]
            for k, m in enumerate(methods):
                drops[m].append((d[k], *d[len(methods):]))
            if (n + 1) % args.every == 0:
                print(f"  {enc_name}: {n + 1}/{len(pairs)} pairs ({time.perf_counter() - t0:.0f}s)", flush=True)
                write(False)
    write(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
