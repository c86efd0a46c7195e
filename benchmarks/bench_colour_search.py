"""Text queries that name a colour ("a red sandal") on an index with ``colour-names``, vs the text encoder alone.

What ``Engine.search`` does for such a query (:func:`retrieval.compose.fusion.colour_text_search`): the
text list (``COLOUR_CANDIDATES`` deep) and the colour list of the query's colour words are pooled and
re-scored ``zscore(text cosine) + w * zscore(colour match)``; mirrored here over precomputed vectors.

1. **Tinted Fashion-MNIST** (``bench_instruction.tinted_gallery``): one query per class × colour, "a
   photo of a red sandal."; relevant = the gallery's red sandals. R@1, R@10 and P@10. ``w`` is picked on
   the first gallery (``--gallery-seed``), then reported on a second, held-out gallery with another
   colour set (``--heldout-colours``).
2. **Tux Paint stamps** (real pictures): every captioned stamp is the gallery; the captions that name a
   basic colour are the queries ("A red apple."); relevant = the stamp itself. R@1 / R@10. Captions
   without a colour word are unaffected by construction (plain text search).
3. **"The same, but C" on Tux Paint stamps** (:func:`tux_recolour`): stamps whose captions differ only in
   the colour word; each + "in C" must find its sibling of colour C — instruction ``fusion`` with and
   without colour-names vs image-only and text-only.

    python benchmarks/bench_colour_search.py
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_instruction import DISPLAY, article, cached, tinted_gallery  # noqa: E402
from bench_vocabfree import FMNIST_NAMES, TUX  # noqa: E402

from retrieval.compose.fusion import (
    COLOUR_CANDIDATES,
    FUSION_CANDIDATES,
    TEXT_COLOUR_WEIGHT,
    colour_text_scores,
    colour_words,
)
from retrieval.encoders import create_encoder
from retrieval.images import load_image  # noqa: E402

WEIGHTS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def ranking(text_q, text_vecs, colour_q, colour_vecs, weight: float | None) -> np.ndarray:
    """Gallery scores as the engine computes them (pool of both lists; others -inf); weight None: text only."""
    t = text_vecs @ text_q
    if weight is None or colour_q is None:
        return t
    c = colour_vecs @ colour_q
    pool = np.union1d(np.argsort(-t)[:max(FUSION_CANDIDATES, COLOUR_CANDIDATES)], np.argsort(-c)[:FUSION_CANDIDATES])
    out = np.full(len(t), -np.inf)
    out[pool] = colour_text_scores(t[pool], c[pool], weight=weight)
    return out


def metrics(scores: np.ndarray, relevant: np.ndarray) -> tuple[float, float, float]:
    order = np.argsort(-scores, kind="stable")
    return float(relevant[order[0]]), float(relevant[order[:10]].any()), float(relevant[order[:10]].mean())


def fmnist_queries(enc, cenc, per_class_colour: int, colours: list[str], seed: int, cache: Path):
    gallery = tinted_gallery(per_class_colour, colours, seed=seed)
    key = f"{per_class_colour}-{'_'.join(colours)}" + (f"-g{seed}" if seed else "")
    vecs = cached(cache / f"{enc.name}-{key}.npy", lambda: np.concatenate(
        [enc.encode_images([g[0] for g in gallery[s:s + 32]]) for s in range(0, len(gallery), 32)]))
    cvecs = np.concatenate([cenc.encode_images([g[0] for g in gallery[s:s + 64]]) for s in range(0, len(gallery), 64)])
    cls = np.array([c for _, c, _ in gallery])
    col = np.array([c for _, _, c in gallery])
    queries = []
    for c in range(10):
        for colour in colours:
            text = f"a photo of {article(colour + ' ' + DISPLAY[FMNIST_NAMES[c]])}."
            queries.append((text, (cls == c) & (col == colour)))
    return vecs, cvecs, queries


def evaluate(enc, cenc, vecs, cvecs, queries, weight):
    rows = []
    for text, rel in queries:
        phrase = colour_words(text)
        cq = cenc.encode_texts([phrase])[0] if phrase else None
        rows.append(metrics(ranking(enc.encode_texts([text])[0], vecs, cq, cvecs, weight), rel))
    return np.mean(rows, axis=0)


def tux_recolour(enc, cenc, items, tvecs, tc) -> list[str]:
    """"The same, but blue" on real pictures: Tux Paint stamps whose captions differ only in a basic colour
    word ("A green fedora." / "A blue fedora.", the red / green / yellow / white flags, the red / green
    apples) form groups; each stamp + "in C" for another colour C of its group is a query, relevant = the
    group's stamp of colour C. ``fusion`` as the engine runs it for a colour change (text list, the text
    encoder's image list, colour list; ``bench_instruction.fusion_ranking``) with and without colour-names,
    against image-only and text-only given the target's own caption (an oracle)."""
    from bench_instruction import fusion_ranking

    from retrieval.compose.compose import compose_instruction
    from retrieval.compose.fusion import colour_plan, fusion_plan

    basic = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey"}
    groups: dict[str, list[tuple[int, str]]] = {}
    for n, (_, cap) in enumerate(items):
        words = re.findall(r"[a-z]+", cap.lower())
        cols = [w for w in words if w in basic]
        if len(cols) == 1:
            groups.setdefault(" ".join(w for w in words if w not in basic), []).append((n, cols[0]))
    queries = [(n, c2, [m for m, c in members if c == c2]) for members in groups.values()
               if len({c for _, c in members}) > 1 for n, c1 in members for c2 in {c for _, c in members} - {c1}]
    if not queries:
        return []
    rows: dict[str, list] = {m: [] for m in ("image-only", "text-only (target caption)", "fusion (no colour)",
                                             "fusion")}
    for n, c2, targets in queries:
        rel = np.zeros(len(items), bool)
        rel[targets] = True
        instruction = f"in {c2}"
        q = compose_instruction(enc, tvecs[n], instruction, method="fusion").vector
        _, weight = fusion_plan(instruction)
        phrase, cw = colour_plan(instruction)
        img = tvecs @ tvecs[n]
        img[n] = -np.inf
        rows["image-only"].append(metrics(img, rel)[:2])
        text = tvecs @ enc.encode_texts([items[targets[0]][1]])[0]
        text[n] = -np.inf
        rows["text-only (target caption)"].append(metrics(text, rel)[:2])
        for m, w in (("fusion (no colour)", 0.0), ("fusion", cw)):
            scores = fusion_ranking(q, tvecs, tvecs[n], tvecs, n, weight, colour_q=cenc.encode_texts([phrase])[0],
                                    colour_vecs=tc, colour_weight=w, colour_change=True)
            rows[m].append(metrics(scores, rel)[:2])
    n_groups = sum(1 for g in groups.values() if len({c for _, c in g}) > 1)
    out = ["", f'"The same, but C" on Tux Paint stamps: {len(queries)} queries from {n_groups} groups of stamps '
           "whose captions differ only in the colour word (relevant = the group's stamp of colour C; gallery "
           f"{len(items)}):", "", "| method | R@1 | R@10 |", "|---|---|---|"]
    for m, r in rows.items():
        r = np.mean(r, axis=0)
        out.append(f"| {m} | {r[0]:.3f} | {r[1]:.3f} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="conse-effnet-lite0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--per-class-colour", type=int, default=10)
    ap.add_argument("--colours", default="red,green,blue")
    ap.add_argument("--gallery-seed", type=int, default=0)
    ap.add_argument("--heldout-colours", default="red,green,blue,yellow")
    ap.add_argument("--heldout-seed", type=int, default=3)
    ap.add_argument("--heldout-per-class-colour", type=int, default=8)
    ap.add_argument("--cache", default=os.path.join(os.environ.get("LOUPE_CACHE_DIR") or
                                                    os.path.expanduser("~/.cache/loupe"), "bench-instruction"))
    ap.add_argument("--no-tux", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    enc = create_encoder(args.encoder, device=args.device)
    cenc = create_encoder("colour-names", device=args.device)
    cache = Path(args.cache)
    out = [f"### bench_colour_search — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
           f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores; text encoder {enc.name}; "
           f"command: `.venv/bin/python benchmarks/bench_colour_search.py {' '.join(sys.argv[1:])}`\n"]

    vecs, cvecs, queries = fmnist_queries(enc, cenc, args.per_class_colour, args.colours.split(","),
                                          args.gallery_seed, cache)
    tuning = {w: evaluate(enc, cenc, vecs, cvecs, queries, w) for w in WEIGHTS}
    best = max(WEIGHTS, key=lambda w: tuning[w][0] + tuning[w][1] + tuning[w][2])
    out.append(f"Tinted Fashion-MNIST, tuning gallery ({len(vecs)} images, colours {args.colours}, "
               f"{len(queries)} queries):\n")
    out.append("| method | R@1 | R@10 | P@10 |\n|---|---|---|---|")
    r = evaluate(enc, cenc, vecs, cvecs, queries, None)
    out.append(f"| text only | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} |")
    for w in WEIGHTS:
        r = tuning[w]
        out.append(f"| text + colour, w = {w}{' (default)' if w == TEXT_COLOUR_WEIGHT else ''} | {r[0]:.3f} | "
                   f"{r[1]:.3f} | {r[2]:.3f} |")
    out.append(f"\nbest w on this gallery (R@1 + R@10 + P@10): {best}; default TEXT_COLOUR_WEIGHT = "
               f"{TEXT_COLOUR_WEIGHT}\n")

    hcol = args.heldout_colours.split(",")
    vecs, cvecs, queries = fmnist_queries(enc, cenc, args.heldout_per_class_colour, hcol, args.heldout_seed, cache)
    out.append(f"Held-out gallery ({len(vecs)} images, seed {args.heldout_seed}, colours {args.heldout_colours}, "
               f"{len(queries)} queries):\n")
    out.append("| method | R@1 | R@10 | P@10 |\n|---|---|---|---|")
    for label, w in (("text only", None), (f"text + colour, w = {TEXT_COLOUR_WEIGHT} (default)", TEXT_COLOUR_WEIGHT)):
        r = evaluate(enc, cenc, vecs, cvecs, queries, w)
        out.append(f"| {label} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} |")

    if not args.no_tux and TUX.is_dir():
        items = []
        for png in sorted(TUX.rglob("*.png")):
            txt = png.with_suffix(".txt")
            if txt.is_file():
                first = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
                if first:
                    items.append((png, first))

        def embed_tux():
            imgs = [load_image(p) for p, _ in items]
            return np.concatenate([enc.encode_images(imgs[s:s + 32]) for s in range(0, len(imgs), 32)])

        tvecs = cached(cache / f"{enc.name}-tux-{len(items)}.npy", embed_tux)
        tc = np.concatenate([cenc.encode_images([load_image(p) for p, _ in items[s:s + 64]])
                             for s in range(0, len(items), 64)])
        named = [(n, cap) for n, (_, cap) in enumerate(items)
                 if set(re.findall(r"[a-z]+", cap.lower())) & {"red", "orange", "yellow", "green", "blue", "purple",
                                                                  "pink", "brown", "black", "white", "grey", "gray"}]
        out.append(f"\nTux Paint stamps: gallery {len(items)} captioned stamps, {len(named)} queries (captions naming "
                   "a basic colour; relevant = the stamp itself):\n")
        out.append("| method | R@1 | R@10 |\n|---|---|---|")
        for label, w in (("text only", None), (f"text + colour, w = {TEXT_COLOUR_WEIGHT} (default)",
                                               TEXT_COLOUR_WEIGHT)):
            rows = []
            for n, cap in named:
                rel = np.zeros(len(items), bool)
                rel[n] = True
                phrase = colour_words(cap)
                cq = cenc.encode_texts([phrase])[0] if phrase else None
                rows.append(metrics(ranking(enc.encode_texts([cap])[0], tvecs, cq, tc, w), rel)[:2])
            r = np.mean(rows, axis=0)
            out.append(f"| {label} | {r[0]:.3f} | {r[1]:.3f} |")
        out.extend(tux_recolour(enc, cenc, items, tvecs, tc))
    out.append(f"\ntotal {time.time() - t0:.0f} s\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
