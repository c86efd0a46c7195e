"""Issue 19 follow-up: the effnet-lite0 image→image deletion test under four protocols, for the per-pixel
integrated-gradients map, the legible default and two region-level maps, on tuning and held-out sets.

Protocols (``bench_attribution.py``'s masks; the map's top X % vs X % in random 16-px blocks, two draws; a
centred and a random disc): X = 20 % of the whole image (``image``, the issue-5 protocol) or of the encoder's
centre crop (``seen``), and the masked pixels filled with the image's mean colour (``mean``, issue 5) or
inpainted harmonically from the mask's border (``inpaint``, ROAD-style). Maps, all from one
integrated-gradients pass per pair (``attribute_grid(..., AttributionConfig(relu=False, ig_smooth=0))``):

* ``raw`` — the per-pixel map's positive part (``integrated-raw``);
* ``blend8`` — the library default (``integrated``: ``grid.legible_map(signed, 8 px, 0.5)``);
* ``smooth8`` — the signed map blurred (σ 8 px on the 224-px input), positive part;
* ``cell16`` — the signed map summed per 16-px cell (14×14, integrated gradients aggregated per cell),
  positive part, upsampled bilinearly.

Sets: ``stamps`` (``bench_attribution_legible.stamp_pairs``; ``--half even`` = tuning, ``odd`` = held-out),
``sklearn`` (8 tuning photo pairs), ``photos`` (held-out scikit-image photo pairs, ``photo_pairs``). One run per
set; per-pair drops are saved after every pair (``--out``), and ``--summarise`` prints the tables of all runs:

    .venv/bin/python benchmarks/bench_attribution_protocols.py stamps --pairs 48 --half even --limit 10
    .venv/bin/python benchmarks/bench_attribution_protocols.py sklearn
    .venv/bin/python benchmarks/bench_attribution_protocols.py stamps --pairs 48 --half odd --limit 10
    .venv/bin/python benchmarks/bench_attribution_protocols.py photos --pairs 13
    .venv/bin/python benchmarks/bench_attribution_protocols.py --summarise
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

MAPS = ("raw", "blend8", "smooth8", "cell16")
PROTOCOLS = (("image", "mean"), ("image", "inpaint"), ("seen", "mean"), ("seen", "inpaint"))
OUT = ROOT / "benchmarks" / "out" / "attribution_protocols"
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
               "page", "text", "moon", "horse", "brick", "grass")


def candidate_maps(signed: np.ndarray) -> dict[str, np.ndarray]:
    from PIL import Image

    from retrieval.explain.grid import legible_map, smooth_map

    side = signed.shape[0]
    cells = np.maximum(signed.reshape(side // 16, 16, side // 16, 16).sum((1, 3)), 0.0).astype(np.float32)
    cell16 = np.asarray(Image.fromarray(cells, mode="F").resize((side, side), Image.BILINEAR), np.float64)
    return {"raw": np.maximum(signed, 0.0), "blend8": legible_map(signed, 8 * side / 224, 0.5),
            "smooth8": np.maximum(smooth_map(signed, 8 * side / 224), 0.0), "cell16": cell16}


def tagged_pairs(which: str, pairs: int, half: str, limit: int | None, seed: int):
    import bench_attribution_legible as bl
    import bench_rerank as br

    if which == "stamps":
        kinds = ("crop", "rotate", "overlay", "paste")
        out = [(q, r, f"{kinds[i % 4]}:stamp{i}") for i, (q, r) in enumerate(bl.stamp_pairs(pairs, seed))]
        out = out[0::2] if half == "even" else out[1::2]
    elif which == "sklearn":
        out = [(q, r, f"{('crop', 'rotate', 'overlay', 'paste')[i // 2]}:{('china', 'flower')[i % 2]}")
               for i, (q, r) in enumerate(bl.sklearn_pairs(seed))]
    else:
        photos = br.skimage_photos()
        out = []
        for q, r in bl.photo_pairs(pairs, seed):
            name = next((n for p, n in zip(photos, PHOTO_NAMES) if p.size == r.size and p.tobytes() == r.tobytes()),
                        "?")
            out.append((q, r, name))
    return out[:limit] if limit else out


def run(args) -> None:
    from retrieval.device import set_cpu_threads

    # (not torch.set_num_threads: loading an encoder would set all cores again)
    set_cpu_threads(args.threads)
    import bench_attribution as ba

    from retrieval.encoders import create_encoder
    from retrieval.explain.attribution import attribute_grid
    from retrieval.explain.config import AttributionConfig
    from retrieval.explain.grid import crop_box, smoothness, to_image_map

    enc = create_encoder("effnet-lite0", device="cpu")
    pairs = tagged_pairs(args.set, args.pairs, args.half, args.limit, args.seed)
    out = Path(args.out) / f"{args.set}{'-' + args.half if args.set == 'stamps' else ''}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    signed_cfg = AttributionConfig(relu=False, ig_smooth=0.0)
    mrng = np.random.default_rng(args.seed + 1)
    rows, t0 = [], time.perf_counter()
    for i, (query, result, tag) in enumerate(pairs):
        qv = enc.encode_images([query])[0]
        grids = candidate_maps(attribute_grid(enc, result, qv, "integrated", signed_cfg))
        box = crop_box(enc, result.size)
        heats = [to_image_map(grids[m], result.size, box) for m in MAPS]
        shape = (result.size[1], result.size[0])
        drops = []
        for area in ("image", "seen"):
            tops = [ba.top_mask(h, box, mrng, area=area) for h in heats]
            centre, disc = ba.discs(shape, box, mrng, area=area)
            shared = [ba.random_mask(shape, box, mrng, area=area), ba.random_mask(shape, box, mrng, area=area),
                      centre, disc]
            for fill in ("mean", "inpaint"):
                sims = enc.encode_images([result, *(ba.apply_mask(result, k, fill) for k in tops + shared)]) @ qv
                drops.append(sims[0] - sims[1:])
        rows.append((tag, np.concatenate(drops), [smoothness(h) for h in heats]))
        np.save(out, np.array(rows, dtype=object), allow_pickle=True)
        print(f"{args.set}: {i + 1}/{len(pairs)} {tag} ({time.perf_counter() - t0:.0f}s)", flush=True)


def summarise(folder: Path) -> None:
    """Per protocol: top / random-block drop (top / centre-disc drop) [mean random-block drop] per set."""
    labels = {"stamps-even": "tuning: even stamps", "sklearn": "tuning: sklearn photos",
              "stamps-odd": "held-out: odd stamps", "photos": "held-out: skimage photos"}
    data = {lab: np.load(folder / f"{key}.npy", allow_pickle=True) for key, lab in labels.items()
            if (folder / f"{key}.npy").is_file()}
    nc = len(MAPS)
    for p, (area, fill) in enumerate(PROTOCOLS):
        print(f"\n20 % of the {area} area, {fill} fill: top/random blocks (top/centre disc) [random-block drop]")
        print("| map | " + " | ".join(f"{lab} (n {len(rows)})" for lab, rows in data.items()) + " |")
        print("|---|" + "---:|" * len(data))
        for k, m in enumerate(MAPS):
            cells = []
            for rows in data.values():
                d = np.array([r[1] for r in rows], np.float64)[:, p * (nc + 4):(p + 1) * (nc + 4)]
                rnd = d[:, nc:nc + 2].mean()
                cells.append(f"{d[:, k].mean() / rnd:.2f} ({d[:, k].mean() / d[:, nc + 2].mean():.2f}) [{rnd:.3f}]")
            print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nsmoothness (mean): " + "; ".join(
        f"{lab}: " + ", ".join(f"{m} {np.mean([r[2][k] for r in rows]):.3f}" for k, m in enumerate(MAPS))
        for lab, rows in data.items()))
    for lab, rows in data.items():
        print(f"{lab}: {', '.join(str(r[0]) for r in rows)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", nargs="?", choices=("stamps", "sklearn", "photos"))
    ap.add_argument("--pairs", type=int, default=48, help="stamps: pairs drawn (then halved); photos: pairs")
    ap.add_argument("--half", choices=("even", "odd"), default="even", help="stamps: tuning (even) or held-out (odd)")
    ap.add_argument("--limit", type=int, help="only the first N pairs of the set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
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
