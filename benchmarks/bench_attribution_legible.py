"""Issue 19: the deletion test for the legible (smoothed) integrated-gradients map vs the per-pixel one.

Same test as ``bench_attribution.py`` (its masks, fill and pairs): the result image's similarity to the
query before and after masking exactly 20 % of its area (mean colour): the map's top 20 % vs 20 % in
random 16-px blocks (two draws), a random disc and a centred disc, shared by all variants of a pair.

Variants, all from one integrated-gradients pass per pair (``effnet-lite0``, 8 steps, mean-colour
baseline, input layer; the signed map is computed once):

* ``integrated-raw`` — the per-pixel map, positive part (the default before issue 19);
* ``smooth σ`` — the signed map blurred with a Gaussian of σ px on the 224-px input, then its positive
  part;
* ``blend σ w`` — ``w`` × the per-pixel map + ``(1 - w)`` × the smooth one, each scaled by its 99th
  percentile (``retrieval.explain.grid.legible_map``): what ``method="integrated"`` draws with
  ``AttributionConfig(ig_smooth=σ / 224, ig_blend=w)`` (the script checks on its first pair that the
  library's default map equals the derived one of the same settings).

Sets: **tuning** = the even-numbered pairs of ``bench_attribution.py``'s image→image pairs (Tux Paint
stamps, seeded hard transformations; the library's σ is chosen there), **held-out** = its odd-numbered
pairs, and **photos** = the scikit-image photos (13 real photos × 4 transformations, other photos as
paste backgrounds; never used for tuning). Smoothness = correlation of each map with a Gaussian-blurred
copy of itself (σ 3 % of the shorter side), as ``retrieval.explain.grid.smoothness``.

    .venv/bin/python benchmarks/bench_attribution_legible.py --pairs 80 --photos 52

Issue 19 follow-up: ``--sets`` adds ``sklearn`` (8 tuning photo pairs from scikit-learn's two sample photos,
never held out) and ``--fills mean,inpaint`` reports each set under the mean-colour fill (the issue-5
protocol) and the harmonic inpainting fill (``bench_attribution.inpaint``) side by side.
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


def stamp_pairs(n: int, seed: int):
    """Exactly ``bench_attribution.py``'s image→image pairs (same seed, same draws)."""
    import bench_rerank as br

    rng = np.random.default_rng(seed)
    paths = br.stamps()
    paths = [paths[i] for i in rng.permutation(len(paths))]
    photos = br.skimage_photos()
    pairs = []
    for i, p in enumerate(paths[:n]):
        ref = br.load_stamp(p)
        pairs.append((br.transform(ref, ("crop", "rotate", "overlay", "paste")[i % 4], rng, photos), ref))
    return pairs


def sklearn_pairs(seed: int):
    """Tuning photos: scikit-learn's two sample photos (china, flower), each under the four transformations
    (the other photo as the paste background): 8 pairs, never in a held-out set."""
    import bench_rerank as br
    import sklearn.datasets
    from PIL import Image

    folder = Path(sklearn.datasets.__file__).parent / "images"
    ims = [Image.open(folder / f).convert("RGB") for f in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed + 200)
    return [(br.transform(ph, kind, rng, [ims[1 - j]]), ph) for kind in ("crop", "rotate", "overlay", "paste")
            for j, ph in enumerate(ims)]


def photo_pairs(n: int, seed: int):
    import bench_rerank as br

    rng = np.random.default_rng(seed + 100)
    photos = br.skimage_photos()
    pairs = []
    for kind in ("crop", "rotate", "overlay", "paste"):
        for j, ph in enumerate(photos):
            pairs.append((br.transform(ph, kind, rng, [p for k, p in enumerate(photos) if k != j]), ph))
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order[:n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=80, help="stamp pairs (tuning = even, held-out = odd)")
    ap.add_argument("--photos", type=int, default=52, help="scikit-image photo pairs (held-out set)")
    ap.add_argument("--variants", default="4:0,8:0,12:0,8:0.5,12:0.5,8:0.3",
                    help="sigma:weight pairs (sigma in px on the 224-px input; weight = the per-pixel map's share)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="stamps,photos",
                    help="which sets: stamps (even = tuning, odd = held-out), sklearn (tuning photos), "
                         "photos (held-out scikit-image photos)")
    ap.add_argument("--fills", default="mean,inpaint", help="deletion fills to report (bench_attribution.FILLS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", default=str(ROOT / "benchmarks" / "out" / "attribution_legible.npz"))
    args = ap.parse_args(argv)

    from retrieval.device import set_cpu_threads

    # (not torch.set_num_threads: loading an encoder would set all cores again)
    set_cpu_threads(args.threads)
    import bench_attribution as ba

    from retrieval.encoders import create_encoder
    from retrieval.explain.attribution import attribute, attribute_grid
    from retrieval.explain.config import AttributionConfig
    from retrieval.explain.grid import crop_box, legible_map, smoothness, to_image_map

    variants = [(float(v.split(":")[0]), float(v.split(":")[1])) for v in args.variants.split(",") if v]
    names = ["integrated-raw"] + [f"smooth {s:g}" if w <= 0 else f"blend {s:g} w{w:g}" for s, w in variants]
    default = AttributionConfig()
    lib_k = next((k + 1 for k, (s, w) in enumerate(variants)
                  if abs(s - default.ig_smooth * 224) < 1e-6 and abs(w - default.ig_blend) < 1e-6), None)
    enc = create_encoder("effnet-lite0", device="cpu")
    t0 = time.perf_counter()
    wanted = args.sets.split(",")
    fills = args.fills.split(",")
    sets = {}
    if "stamps" in wanted:
        sets["stamps"] = stamp_pairs(args.pairs, args.seed)
    if "sklearn" in wanted:
        sets["sklearn"] = sklearn_pairs(args.seed)
    if "photos" in wanted:
        sets["photos"] = photo_pairs(args.photos, args.seed)
    print(f"pairs ready ({time.perf_counter() - t0:.0f}s): " + ", ".join(f"{len(v)} {k}" for k, v in sets.items()),
          flush=True)
    signed_cfg = AttributionConfig(relu=False, ig_smooth=0.0)
    drops = {(s, f): {m: [] for m in names} for s in sets for f in fills}
    smooth = {s: {m: [] for m in names} for s in sets}
    mrng = np.random.default_rng(args.seed + 1)
    checked = False
    for set_name, pairs in sets.items():
        for n, (query, result) in enumerate(pairs):
            qv = enc.encode_images([query])[0]
            signed = attribute_grid(enc, result, qv, "integrated", signed_cfg)        # one IG pass, signed
            grids = [np.maximum(signed, 0.0)] + [legible_map(signed, s, w) for s, w in variants]
            box = crop_box(enc, result.size)
            heats = [to_image_map(g, result.size, box) for g in grids]
            if not checked:
                if lib_k is not None:
                    lib = attribute(enc, result, qv, "integrated")
                    assert np.allclose(lib, heats[lib_k], atol=1e-4), "library map != derived map"
                    print(f"library default = {names[lib_k]} (checked)", flush=True)
                raw = attribute(enc, result, qv, "integrated-raw")
                assert np.allclose(raw, heats[0], atol=1e-4), "library raw map != derived map"
                checked = True
            shape = (result.size[1], result.size[0])
            tops = [ba.top_mask(h, box, mrng) for h in heats]
            centre, disc = ba.discs(shape, box, mrng)
            shared = [ba.random_mask(shape, box, mrng), ba.random_mask(shape, box, mrng), centre, disc]
            for fill in fills:
                sims = enc.encode_images([result, *(ba.apply_mask(result, k, fill) for k in tops + shared)]) @ qv
                d = sims[0] - sims[1:]
                for k, m in enumerate(names):
                    drops[(set_name, fill)][m].append((d[k], *d[len(names):]))
            for k, m in enumerate(names):
                smooth[set_name][m].append(smoothness(heats[k]))
            if (n + 1) % 10 == 0 or n + 1 == len(pairs):
                print(f"  {set_name}: {n + 1}/{len(pairs)} ({time.perf_counter() - t0:.0f}s)", flush=True)
                report(ba, drops, smooth, names, fills)
    Path(args.dump).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.dump, **{f"{s}|{f}|{m}": np.array(v) for (s, f) in drops for m, v in drops[(s, f)].items()},
             **{f"smooth|{s}|{m}": np.array(v) for s in smooth for m, v in smooth[s].items()})
    print(f"total {time.perf_counter() - t0:.0f}s; per-pair drops in {args.dump}")
    return 0


def report(ba, drops, smooth, names, fills) -> None:
    parts = [("tuning: even stamps", "stamps", slice(0, None, 2)),
             ("held-out: odd stamps", "stamps", slice(1, None, 2)), ("tuning: sklearn photos", "sklearn", slice(None)),
             ("held-out: skimage photos", "photos", slice(None))]
    parts = [p for p in parts if any(k[0] == p[1] for k in drops)]
    for fill in fills:
        print(f"fill {fill}: top-20 % drop / random-block drop (n pairs); top / centre disc")
        print("| variant | " + " | ".join(p[0] for p in parts) + " | smoothness (" + ", ".join(smooth) + ") |")
        for m in names:
            cells = []
            for _, s, part in parts:
                d = np.array(drops[(s, fill)][m])[part]
                if len(d):
                    r = ba.summarise(d)
                    cells.append(f"{r['r_rnd']:.2f} (n {len(d)}); {r['r_centre']:.2f}")
                else:
                    cells.append("-")
            sm = [f"{np.mean(smooth[s][m]):.3f}" if smooth[s][m] else "-" for s in smooth]
            print(f"| {m} | {' | '.join(cells)} | {', '.join(sm)} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
