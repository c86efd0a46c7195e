"""Issue 19, second follow-up: can a *legible* image→image map reach 2× random on the original deletion test, and
what is the best any map could do? effnet-lite0, the protocol of ``bench_attribution.py`` unchanged (mask
exactly 20 % of the result image, the image's mean colour; the map's top 20 % vs 20 % in random 16-px blocks,
two draws; a centred and a random disc; masks shared by all maps of a pair).

Maps (``--variants``, comma-separated; all but ``r*`` derived from one integrated-gradients pass per pair):

* ``raw`` — per-pixel integrated gradients, positive part (``integrated-raw``);
* ``blend8`` — the library default (``integrated``: ``grid.legible_map(signed, 8 px, 0.5)``);
* ``B<σ>_<w>`` — ``legible_map(signed, σ px, w/10)`` (the per-pixel map's share ``w/10``);
* ``P<σ>`` — the positive part blurred (σ px); ``Q<σ>_<w>`` — ``w/10`` per pixel + ``P<σ>``;
* ``M<k>_<σ>`` — the positive part dilated (max filter, k px) then blurred (σ px);
* ``N<k>_<σ>_<w>`` — ``w/10`` × ``M<k>_<σ>`` + the signed map blurred σ 8 px;
* ``r<g>_<n>`` — the RISE deletion map (``method="rise"``: ``n`` random masks on a ``g``×``g`` lattice, p 0.3);
* ``b<w>_r<g>_<n>`` — ``w/10`` per-pixel integrated gradients + the RISE map.

``--oracle`` adds the greedy deletion oracle: on the encoder's 224-px input, 16-px cells (14×14) are added to
the deletion mask greedily, each round trying every remaining cell (after the first round only the ``--pool``
best of the previous round: lazy greedy) and keeping the ``--chunk`` best, until the cells cover the protocol's
20 % of the image; its map is the cells' greedy rank, evaluated by the same protocol as every other map. It
chooses the mask by the measured drop itself, so it bounds what a map can reach here (up to the greedy's
approximation and the cell size).

Sets: ``even`` / ``odd`` — ``bench_attribution.py``'s stamp pairs (even = tuning, odd = held-out);
``photos`` — the held-out scikit-image photo pairs (``bench_attribution_legible.photo_pairs``); ``fmnist`` —
Fashion-MNIST products (112 px, dark on white) under the same four transformations (seed 300; no map was tuned
on them); ``sklearn`` — the 8 photo tuning pairs.

    .venv/bin/python benchmarks/bench_attribution_oracle.py even --limit 24 --variants raw,blend8,B8_6
    .venv/bin/python benchmarks/bench_attribution_oracle.py photos --limit 8 --oracle --variants raw,blend8
    .venv/bin/python benchmarks/bench_attribution_oracle.py --summarise
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "out" / "attribution_oracle"
KINDS = ("crop", "rotate", "overlay", "paste")


def pairs_for(name: str, start: int, limit: int, seed: int = 0):
    import bench_attribution_legible as bl
    import rerank_data as rd

    if name in ("even", "odd"):
        ps = bl.stamp_pairs(2 * (start + limit) + 2, seed)
        ps = ps[0::2] if name == "even" else ps[1::2]
    elif name == "photos":
        ps = bl.photo_pairs(52, seed)
    elif name == "sklearn":
        ps = bl.sklearn_pairs(seed)
    elif name == "fmnist":
        rng = np.random.default_rng(seed + 300)
        refs = rd.fashion_mnist(max(200, start + limit), seed=seed + 300)   # the same 200 whatever the limit
        photos = rd.skimage_photos()
        ps = [(rd.transform(r, KINDS[i % 4], rng, photos), r) for i, r in enumerate(refs)]
    else:
        raise ValueError(name)
    return ps[start:start + limit]


def _unit(m: np.ndarray) -> np.ndarray:
    from retrieval.explain.grid import _unit_q

    return _unit_q(np.maximum(m, 0.0))


def variant_map(v: str, signed: np.ndarray, rise) -> np.ndarray:
    """The grid map [224, 224] of variant ``v`` from the signed integrated-gradients map (``rise(g, n)``: RISE)."""
    from scipy.ndimage import maximum_filter

    from retrieval.explain.grid import legible_map, smooth_map

    pos = np.maximum(signed, 0.0)
    if v == "raw":
        return pos
    if v == "blend8":
        return legible_map(signed, 8.0, 0.5)
    head, args = v[0], v[1:].split("_")
    if head == "B":
        return legible_map(signed, float(args[0]), int(args[1]) / 10)
    if head == "P":
        return smooth_map(pos, float(args[0]))
    if head == "Q":
        w = int(args[1]) / 10
        return w * _unit(pos) + (1 - w) * _unit(smooth_map(pos, float(args[0])))
    if head == "M":
        return smooth_map(maximum_filter(pos, int(args[0])), float(args[1]))
    if head == "N":
        w = int(args[2]) / 10
        dil = smooth_map(maximum_filter(pos, int(args[0])), float(args[1]))
        return w * _unit(dil) + (1 - w) * _unit(smooth_map(signed, 8.0))
    if head == "r":
        return np.maximum(rise(int(args[0]), int(args[1])), 0.0)
    if head == "b":
        w = int(args[0]) / 10
        g, n = v.split("_r", 1)[1].split("_")
        return w * _unit(pos) + (1 - w) * _unit(rise(int(g), int(n)))
    raise ValueError(f"unknown variant {v!r}")


def greedy_oracle(enc, x, fill, qv, n_cells: int, chunk: int, pool_size: int, grid: int = 14) -> list[int]:
    """Cells (row-major on a ``grid``² lattice of the input) in the order the lazy greedy deletes them."""
    import torch

    cell = x.shape[-1] // grid
    base = float(enc.encode_images(x)[0] @ qv)
    chosen: list[int] = []
    cur = torch.zeros(1, 1, x.shape[-2], x.shape[-1])
    pool = list(range(grid * grid))
    while len(chosen) < n_cells:
        cand = [c for c in pool if c not in chosen]
        cand = cand[:pool_size] if chosen else cand
        drops = []
        for i in range(0, len(cand), 32):
            b = cur.repeat(len(cand[i:i + 32]), 1, 1, 1)
            for j, c in enumerate(cand[i:i + 32]):
                y, xx = divmod(c, grid)
                b[j, 0, y * cell:(y + 1) * cell, xx * cell:(xx + 1) * cell] = 1
            drops.append(base - enc.encode_images(x * (1 - b) + fill * b) @ qv)
        order = np.argsort(-np.concatenate(drops), kind="stable")
        best = [cand[i] for i in order[:min(chunk, n_cells - len(chosen))]]
        pool = [cand[i] for i in order] + [c for c in pool if c not in cand]
        for c in best:
            y, xx = divmod(c, grid)
            cur[0, 0, y * cell:(y + 1) * cell, xx * cell:(xx + 1) * cell] = 1
        chosen += best
    return chosen


def oracle_heat(chosen: list[int], size: tuple[int, int], box, grid: int = 14) -> np.ndarray:
    """The oracle's map at the image's size: each cell's greedy rank (first = highest), 0 elsewhere (nearest)."""
    w, h = size
    side = box[2] - box[0]
    yy, xx = np.mgrid[0:h, 0:w]
    cy = np.floor((yy - box[1]) / side * grid).astype(int)
    cx = np.floor((xx - box[0]) / side * grid).astype(int)
    inside = (cy >= 0) & (cy < grid) & (cx >= 0) & (cx < grid)
    val = np.zeros(grid * grid)
    val[chosen] = np.arange(len(chosen), 0, -1)
    return np.where(inside, val[np.clip(cy, 0, grid - 1) * grid + np.clip(cx, 0, grid - 1)], 0.0)


class RiseCache:
    """``rise(g, n)``: the RISE map of the first ``n`` of 64 masks on a ``g``-cell lattice (masks drawn once)."""

    def __init__(self, enc, x, fill, qv):
        self.enc, self.x, self.fill, self.qv, self.cache = enc, x, fill, qv, {}

    def __call__(self, g: int, n: int) -> np.ndarray:
        from retrieval.explain.rise import deletion_score, masked_drops, random_masks

        if g not in self.cache:
            t = time.perf_counter()
            masks = random_masks(64, self.x.shape[-1], g, 0.3, np.random.default_rng(0))
            self.cache[g] = (masks, masked_drops(self.enc, self.x, self.fill, self.qv, masks), time.perf_counter() - t)
        masks, drops, _ = self.cache[g]
        return deletion_score(masks[:n], drops[:n])


def run(args) -> None:
    from retrieval.device import set_cpu_threads

    # (not torch.set_num_threads: loading an encoder would set all cores again)
    set_cpu_threads(args.threads)
    import bench_attribution as ba

    from retrieval.encoders import create_encoder
    from retrieval.explain.attribution import attribute_grid
    from retrieval.explain.config import AttributionConfig, fill_image
    from retrieval.explain.grid import crop_box, smoothness, to_image_map

    enc = create_encoder("effnet-lite0", device="cpu")
    set_cpu_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v] + (["oracle"] if args.oracle else [])
    pairs = pairs_for(args.set, args.start, args.limit, args.seed)
    out = Path(args.out) / f"{args.set}_{args.start}_{args.tag}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    signed_cfg = AttributionConfig(relu=False, ig_smooth=0.0)
    mrng = np.random.default_rng(args.seed + 1)
    rows, t0 = [], time.perf_counter()
    for n, (query, result) in enumerate(pairs):
        qv = enc.encode_images([query])[0]
        t1 = time.perf_counter()
        signed = attribute_grid(enc, result, qv, "integrated", signed_cfg)
        t_ig = time.perf_counter() - t1
        x, fill = enc.to_batch([result]), enc.to_batch([fill_image(result, "mean")])
        rise = RiseCache(enc, x, fill, qv)
        box = crop_box(enc, result.size)
        shape = (result.size[1], result.size[0])
        heats = [to_image_map(variant_map(v, signed, rise), result.size, box) for v in variants if v != "oracle"]
        t_or = 0.0
        if args.oracle:
            side = box[2] - box[0]
            n_cells = int(min(196, np.ceil(ba.mask_size(shape, box) * (x.shape[-1] / side) ** 2 / 256)))
            t3 = time.perf_counter()
            heats.append(oracle_heat(greedy_oracle(enc, x, fill, qv, n_cells, args.chunk, args.pool),
                                     result.size, box))
            t_or = time.perf_counter() - t3
        tops = [ba.top_mask(h, box, mrng) for h in heats]
        centre, disc = ba.discs(shape, box, mrng)
        shared = [ba.random_mask(shape, box, mrng), ba.random_mask(shape, box, mrng), centre, disc]
        sims = enc.encode_images([result, *(ba.apply_mask(result, k, "mean") for k in tops + shared)]) @ qv
        rows.append({"variants": variants, "drops": sims[0] - sims[1:], "smooth": [smoothness(h) for h in heats],
                     "t_ig": t_ig, "t_rise": {g: c[2] for g, c in rise.cache.items()}, "t_oracle": t_or,
                     "kind": KINDS[(2 * (args.start + n) + (args.set == "odd")) % 4] if args.set in ("even", "odd")
                     else ""})
        np.save(out, np.array(rows, dtype=object), allow_pickle=True)
        d = np.array([r["drops"] for r in rows])
        rnd = d[:, len(variants):len(variants) + 2].mean()
        print(f"{args.set} {n + 1}/{len(pairs)} ({time.perf_counter() - t0:.0f}s) random drop {rnd:.3f} | "
              + " ".join(f"{v} {d[:, k].mean() / rnd:.2f}" for k, v in enumerate(variants)), flush=True)


def summarise(folder: Path) -> None:
    """Per saved run: pairs, top / random-block drop, top / centre-disc drop, smoothness, seconds per map."""
    for f in sorted(folder.glob("*.npy")):
        rows = list(np.load(f, allow_pickle=True))
        variants = rows[0]["variants"]
        nv = len(variants)
        d = np.array([r["drops"] for r in rows], np.float64)
        rnd, cen = d[:, nv:nv + 2].mean(), d[:, nv + 2].mean()
        sm = np.array([r["smooth"] for r in rows]).mean(axis=0)
        t_ig = np.median([r["t_ig"] for r in rows])
        print(f"\n{f.stem}: {len(rows)} pairs, mean random-block drop {rnd:.4f}, centre-disc drop {cen:.4f}, "
              f"median integrated-gradients pass {t_ig:.1f} s")
        print("| map | top/random blocks | top/centre disc | smoothness | top > random (% pairs) |")
        print("|---|---:|---:|---:|---:|")
        for k, v in enumerate(variants):
            wins = 100 * float((d[:, k] > d[:, nv:nv + 2].mean(axis=1)).mean())
            print(f"| {v} | {d[:, k].mean() / rnd:.2f} | {d[:, k].mean() / cen:.2f} | {sm[k]:.3f} | {wins:.0f} |")
        extra = [f"{g}: {np.median([r['t_rise'][g] for r in rows]):.1f} s" for g in rows[0]["t_rise"]]
        if extra:
            print("median RISE (64 masks) per lattice " + ", ".join(extra))
        if any(r["t_oracle"] for r in rows):
            print(f"median oracle {np.median([r['t_oracle'] for r in rows]):.0f} s per pair")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", nargs="?", choices=("even", "odd", "photos", "fmnist", "sklearn"))
    ap.add_argument("--limit", type=int, default=24, help="pairs of the set")
    ap.add_argument("--start", type=int, default=0, help="skip the set's first N pairs")
    ap.add_argument("--variants", default="raw,blend8")
    ap.add_argument("--oracle", action="store_true", help="add the greedy deletion oracle (slow)")
    ap.add_argument("--chunk", type=int, default=12, help="oracle: cells added per greedy round")
    ap.add_argument("--pool", type=int, default=64, help="oracle: cells re-tried per round after the first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="run", help="name of the saved run (file suffix)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--summarise", action="store_true", help="print the tables of the saved runs")
    args = ap.parse_args(argv)
    if args.summarise or not args.set:
        summarise(Path(args.out))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
