"""Regenerate ``docs/gallery/``: attribution pair views for real pairs, to judge at a glance.

Image→image (``effnet-lite0``, the library's default map): a seeded hard transformation of a real
picture (crop, rotation, overlaid shapes and text, pasted on another photo; ``bench_rerank.transform``)
is the query, the picture is the result; each PNG shows both with their maps, the locally matched
regions linked by lines, and the legend, exactly as ``loupe explain --pair`` draws them. Text→image
(``conse-effnet-lite0``): a Tux Paint stamp's caption against the stamp, with the "approximate" note.
One extra picture compares the per-pixel map (the old default) with the smoothed one.

    .venv/bin/python benchmarks/make_gallery.py            # ~12 image pairs + 2 text pairs, a few minutes on CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "docs" / "gallery"

PHOTOS = (("chelsea", "crop"), ("coffee", "rotate"), ("astronaut", "paste"), ("rocket", "crop"),
          ("camera", "overlay"), ("hubble_deep_field", "rotate"))
STAMP_KINDS = ("crop", "rotate", "overlay", "paste", "crop", "rotate")
TEXT_STAMPS = 2


def _pairs(seed: int):
    import bench_rerank as br

    from retrieval.testing.samples import skimage_photos

    rng = np.random.default_rng(seed)
    named = skimage_photos()
    backgrounds = list(named.values())
    out = []
    for name, kind in PHOTOS:
        if name in named:
            others = [p for k, p in named.items() if k != name]
            out.append((f"photo-{name}-{kind}", br.transform(named[name], kind, rng, others), named[name], kind))
    paths = br.stamps()
    paths = [paths[i] for i in np.random.default_rng(seed + 7).permutation(len(paths))]
    for path, kind in zip(paths, STAMP_KINDS):
        ref = br.load_stamp(path)
        out.append((f"stamp-{path.stem}-{kind}", br.transform(ref, kind, rng, backgrounds), ref, kind))
    texts = []
    for path in paths[len(STAMP_KINDS):]:
        txt = path.with_suffix(".txt")
        if txt.is_file():
            cap = txt.read_text(errors="ignore").strip().splitlines()[0].strip()
            if cap:
                texts.append((f"text-{path.stem}", cap, br.load_stamp(path)))
        if len(texts) >= TEXT_STAMPS:
            break
    return out, texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--height", type=int, default=260, help="panel height in px")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from retrieval.encoders import create_encoder
    from retrieval.explain.attribution import TEXT_NOTE, Explanation, attribute, default_method
    from retrieval.explain.grid import crop_box
    from retrieval.explain.matching import match_maps
    from retrieval.explain.overlay import overlay_image
    from retrieval.explain.pair import pair_image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    enc = create_encoder("effnet-lite0", device="cpu")
    image_pairs, text_pairs = _pairs(args.seed)
    rows = []
    for name, query, result, kind in image_pairs:
        qv, rv = enc.encode_images([query])[0], enc.encode_images([result])[0]
        rmap, qmap = attribute(enc, result, qv), attribute(enc, query, rv)
        info = match_maps(enc, query, result)[2]
        ex = Explanation(rmap, default_method(enc), enc.name, qmap, info, result, query,
                         crop_box(enc, result.size), crop_box(enc, query.size))
        pair_image(ex, height=args.height).save(out / f"{name}.png", optimize=True)
        rows.append((name, f"{kind} → original", float(qv @ rv), info["inliers"]))
        if name.startswith("photo-chelsea"):      # before / after: the per-pixel map next to the smoothed one
            raw = attribute(enc, result, qv, "integrated-raw")
            box = crop_box(enc, result.size)
            a = overlay_image(result, raw, box=box, legend=True, label="integrated gradients, per pixel (old default)")
            b = overlay_image(result, rmap, box=box, legend=True, label=ex.label + " (new default)")
            both = Image.new("RGB", (a.size[0] + b.size[0] + 16, max(a.size[1], b.size[1])), (255, 255, 255))
            both.paste(a, (0, 0))
            both.paste(b, (a.size[0] + 16, 0))
            both.save(out / "before-after-chelsea.png", optimize=True)
        print(f"  {name}: similarity {float(qv @ rv):.3f}, {info['inliers']} inliers ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    conse = create_encoder("conse-effnet-lite0", device="cpu")
    for name, caption, result in text_pairs:
        tv = conse.encode_texts([caption])[0]
        rmap = attribute(conse, result, tv)
        ex = Explanation(rmap, default_method(conse), conse.name, None, {}, result, None,
                         crop_box(conse, result.size), None, TEXT_NOTE)
        pair_image(ex, height=args.height).save(out / f"{name}.png", optimize=True)
        rows.append((name, f"text “{caption}”", float(conse.encode_images([result])[0] @ tv), None))
        print(f"  {name}: {caption!r} ({time.perf_counter() - t0:.0f}s)", flush=True)
    lines = ["# Attribution gallery", "",
             "Generated by `benchmarks/make_gallery.py` (do not edit by hand; rerun it). Each picture is what",
             "`loupe explain --pair` and the page's **Why?** draw: the query (left) and the result (right), each",
             "with its map (inferno: brighter = more of the match; white outline: the top 20 % of what the",
             "encoder saw; hatched: outside the encoder's centre crop), lines between locally matched regions",
             "(strongest first), and the legend. Text queries have no query picture and carry the note that",
             "the offline encoder's text maps are approximate. See `docs/attribution.md`.", "",
             "Before / after (same pair): the per-pixel map (old default) and the smoothed map (new default):", "",
             "![before and after](before-after-chelsea.png)", "",
             "| pair | query | cosine | RANSAC inliers |", "|---|---|---:|---:|"]
    for name, what, sim, inl in rows:
        lines.append(f"| [{name}]({name}.png) | {what} | {sim:.3f} | {'' if inl is None else inl} |")
    lines.append("")
    for name, what, _, _ in rows:
        lines += [f"### {name}: {what}", "", f"![{name}]({name}.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    print(f"wrote {len(rows)} pictures to {out} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
