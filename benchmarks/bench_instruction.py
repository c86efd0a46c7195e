"""Instruction-conditioned retrieval benchmark, GeneCIS-style, built from labelled images (offline).

Gallery: Fashion-MNIST test images (10 classes), inverted to dark-on-white and tinted in one of
``--colours`` (the object's pixels take the colour, the background stays white), 224 px. Each image
thus has two labels: class and colour.

Tasks (query = a gallery image + an instruction; the query image itself is never relevant):
* ``change-object``: image of class A, colour c + "as a B" (B ≠ A) → relevant: class B *in colour c*
  (the instruction changes the object and keeps the colour, as GeneCIS "change object" keeps the scene).
* ``change-colour``: image of class A, colour c + "in c2" → relevant: class A in colour c2.

Methods: image-only (with the text encoder, and with the image-only ``--image-encoder``), text-only (the
instruction's target as "a photo of a B." / "a photo of a c2 A-name" — note text-only gets the *true*
class name for change-colour, an oracle advantage), and each composition of :mod:`retrieval.compose`
(sum, arithmetic, caption, fused; fusion with the image side as :func:`retrieval.compose.fusion_plan`
picks it — ``--image-encoder`` for object changes, the text encoder for attribute changes — and
``fusion (text enc.)`` with the image side always from the text encoder, as on an index without an
image-only encoder; ``fusion (not centred)``: plain image cosines and no colour, the centring ablation;
``fusion (no colour)``: without the ``colour-names`` encoder), the query image named by
vocabulary-free classification over ImageNet-21k. ``fusion`` runs as the engine runs it on an index with
``colour-names``: the top ``FUSION_CANDIDATES`` of the text list, of the image list (``COLOUR_CANDIDATES``
deep for colour changes) and, for colour changes, of the colour list are pooled (query image excluded) and
re-scored by :func:`retrieval.compose.fuse_candidates` with the colour score :func:`retrieval.compose.colour_plan`
picks. Queries are split in two halves: weights are tuned on the first (``--tune``; criterion R@1 + R@10),
R@1/R@10 reported on the second. ``--query-seed`` draws a fresh query set and ``--gallery-seed`` a fresh
gallery (held out from all tuning). ``--tux-colours`` adds colour naming on real pictures: the Tux Paint
stamps whose caption names a basic colour, ``colour-names`` vs the text encoder's zero-shot colour naming.

Gallery vectors and query-image names are cached under ``--cache`` (default
``$LOUPE_CACHE_DIR/bench-instruction``), keyed by encoder, gallery size and colours.

Run: ``.venv/bin/python benchmarks/bench_instruction.py --per-class-colour 10 --queries 400 --tune``
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vocabfree import FMNIST, FMNIST_NAMES, read_idx  # noqa: E402

from retrieval.classify.classifier import ClassifyConfig, VocabularyFreeClassifier
from retrieval.classify.vocab import open_vocabulary
from retrieval.compose.compose import (
    ARITHMETIC_WEIGHT,
    CAPTION_WEIGHT,
    DEFAULT_INSTRUCTION_WEIGHT,
    OLD_WEIGHT,
    _TextVectors,
    compose_instruction,
)
from retrieval.compose.fusion import (
    COLOUR_CANDIDATES,
    FUSION_ATTRIBUTE_WEIGHT,
    FUSION_CANDIDATES,
    FUSION_COLOUR_WEIGHT,
    FUSION_IMAGE_WEIGHT,
    FUSION_KEEP_COLOUR_WEIGHT,
    colour_plan,
    fuse_candidates,
    fusion_plan,
)
from retrieval.encoders import create_encoder

COLOURS = {"red": (210, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 210), "yellow": (230, 200, 20)}
DISPLAY = {"t-shirt": "t-shirt", "trouser": "pair of trousers", "pullover": "pullover", "dress": "dress",
           "coat": "coat", "sandal": "sandal", "shirt": "shirt", "sneaker": "sneaker", "bag": "bag",
           "ankle boot": "ankle boot"}


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def tinted_gallery(per_class_colour: int, colours: list[str], seed: int = 0):
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(10):
        idx = rng.choice(np.flatnonzero(labels == c), per_class_colour * len(colours), replace=False)
        for j, i in enumerate(idx):
            colour = colours[j % len(colours)]
            g = images[i].astype(np.float32)[..., None] / 255.0
            rgb = 255.0 - g * (255.0 - np.array(COLOURS[colour], np.float32))
            img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((224, 224), Image.BICUBIC)
            out.append((img, c, colour))
    return out


def tux_colour_naming(enc, cenc) -> str:
    """Colour naming on real pictures: the Tux Paint stamps whose caption's first line names a basic colour
    ("A red apple.", "A blue and yellow flag."); a stamp counts as named right when the encoder's top
    colour term is one its caption names. colour-names ranks the 11 terms by its own distribution; the
    text encoder ranks them by zero-shot similarity to "a photo of a {term} object."."""
    import re

    from bench_vocabfree import TUX

    from retrieval.colour.naming import BASIC_TERMS
    from retrieval.images import load_image

    items = []
    for png in sorted(TUX.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        words = set(re.findall(r"[a-z]+", txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].lower()))
        named = {"grey" if w == "gray" else w for w in words} & set(BASIC_TERMS)
        if named:
            items.append((load_image(png), named))
    if not items:
        return "(no Tux Paint stamps: apt-get install tuxpaint-stamps-default)\n"
    imgs = [im for im, _ in items]
    cv = np.concatenate([cenc.encode_images(imgs[s:s + 64]) for s in range(0, len(imgs), 64)])
    ev = np.concatenate([enc.encode_images(imgs[s:s + 32]) for s in range(0, len(imgs), 32)])
    tq = enc.encode_texts([f"a photo of a {t} object." for t in BASIC_TERMS])
    rows = []
    for label, scores in (("colour-names", cv @ cenc.encode_texts(list(BASIC_TERMS)).T),
                          (f"{enc.name} zero-shot", ev @ tq.T)):
        order = np.argsort(-scores, axis=1)
        top1 = np.mean([BASIC_TERMS[order[n, 0]] in named for n, (_, named) in enumerate(items)])
        top3 = np.mean([bool({BASIC_TERMS[j] for j in order[n, :3]} & named) for n, (_, named) in enumerate(items)])
        rows.append(f"| {label} | {len(items)} | {top1:.3f} | {top3:.3f} |")
    chance = np.mean([len(named) / len(BASIC_TERMS) for _, named in items])
    return ("\nColour naming on real pictures (Tux Paint stamps whose caption names a basic colour; top colour "
            "term among the 11 is one the caption names):\n\n| method | stamps | top-1 | top-3 |\n|---|---|---|---|\n"
            + "\n".join(rows) + f"\n| chance | {len(items)} | {chance:.3f} | – |\n")


def recall(scores: np.ndarray, relevant: np.ndarray, exclude: int, ks=(1, 10)) -> dict[int, float]:
    s = scores.copy()
    s[exclude] = -np.inf
    order = np.argsort(-s)
    return {k: float(relevant[order[:k]].any()) for k in ks}


def fusion_ranking(text_q, text_vecs, image_q, image_vecs, exclude: int, weight: float,
                   candidates: int = FUSION_CANDIDATES, centre: bool = True, colour_q=None, colour_vecs=None,
                   colour_weight: float = 0.0, colour_change: bool = False) -> np.ndarray:
    """Scores over the gallery as ``retrieval.compose.fusion_search`` computes them over an index: the
    pooled top-``candidates`` of each list (the image list ``COLOUR_CANDIDATES`` deep and a colour list
    added for colour changes) re-scored, everything else -inf."""
    t = text_vecs @ text_q
    i = image_vecs @ (image_q / np.linalg.norm(image_q))
    t[exclude] = i[exclude] = -np.inf
    tops = [np.argsort(-t)[:candidates], np.argsort(-i)[:max(candidates, COLOUR_CANDIDATES) if colour_change
                                                       else candidates]]
    use_colour = colour_q is not None and colour_weight
    if use_colour and colour_change:
        c = colour_vecs @ colour_q
        c[exclude] = -np.inf
        tops.append(np.argsort(-c)[:candidates])
    pool = np.unique(np.concatenate(tops))
    pool = pool[pool != exclude]
    out = np.full(len(t), -np.inf)
    out[pool] = fuse_candidates(text_q, text_vecs[pool], image_q, image_vecs[pool], weight=weight, centre=centre,
                                colour_query=colour_q if use_colour else None,
                                colour_vectors=colour_vecs[pool] if use_colour else None, colour_weight=colour_weight)
    return out


def cached(path: Path, compute):
    if path.is_file():
        return np.load(path, allow_pickle=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, value, allow_pickle=True)
    return np.load(path, allow_pickle=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="conse-effnet-lite0")
    ap.add_argument("--image-encoder", default="effnet-lite0", help="image side of `fusion` (image-only encoder)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("LOUPE_CACHE_DIR") or
                                                    os.path.expanduser("~/.cache/loupe"), "bench-instruction"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--per-class-colour", type=int, default=10)
    ap.add_argument("--colours", default="red,green,blue")
    ap.add_argument("--queries", type=int, default=200, help="queries per task (half tune, half test)")
    ap.add_argument("--gallery-seed", type=int, default=0, help="which Fashion-MNIST test images are tinted")
    ap.add_argument("--query-seed", type=int, default=1, help="a fresh seed draws a query set held out from tuning")
    ap.add_argument("--tune", action="store_true", help="grid-search weights on the tuning half")
    ap.add_argument("--tux-colours", action="store_true",
                    help="also measure colour naming on the Tux Paint stamps whose caption names a colour")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    t0 = time.time()
    colours = args.colours.split(",")
    enc = create_encoder(args.encoder, device=args.device)
    db = open_vocabulary("imagenet21k", enc)
    clf = VocabularyFreeClassifier(enc, db, ClassifyConfig())
    gallery = tinted_gallery(args.per_class_colour, colours, seed=args.gallery_seed)
    cls = np.array([c for _, c, _ in gallery])
    col = np.array([colours.index(c) for _, _, c in gallery])
    key = f"{args.per_class_colour}-{'_'.join(colours)}" + (f"-g{args.gallery_seed}" if args.gallery_seed else "")
    cache = Path(args.cache)
    vecs = cached(cache / f"{enc.name}-{key}.npy", lambda: clf.embed_images([img for img, _, _ in gallery]))
    ienc = None

    def image_vectors():
        nonlocal ienc
        ienc = create_encoder(args.image_encoder, device=args.device)
        return np.concatenate([ienc.encode_images([g[0] for g in gallery[s:s + 32]])
                               for s in range(0, len(gallery), 32)])

    ivecs = cached(cache / f"{args.image_encoder}-{key}.npy", image_vectors).astype(np.float32)
    ivecs /= np.linalg.norm(ivecs, axis=1, keepdims=True)
    cenc = create_encoder("colour-names", device=args.device)     # cheap: not cached
    cvecs = np.concatenate([cenc.encode_images([g[0] for g in gallery[s:s + 64]]) for s in range(0, len(gallery), 64)])
    colour_acc = float(np.mean([colours[j] == max(colours, key=lambda c: cvecs[n] @ cenc.encode_texts([c])[0])
                                for n, j in enumerate(col)]))
    t_embed = time.time() - t0
    rng = np.random.default_rng(args.query_seed)
    tasks = {}
    q_obj = []
    for _ in range(args.queries):
        i = int(rng.integers(len(gallery)))
        b = int(rng.choice([c for c in range(10) if c != cls[i]]))
        q_obj.append((i, f"as {article(DISPLAY[FMNIST_NAMES[b]])}", (cls == b) & (col == col[i]),
                      f"a photo of {article(DISPLAY[FMNIST_NAMES[b]])}."))
    tasks["change-object"] = q_obj
    q_col = []
    for _ in range(args.queries):
        i = int(rng.integers(len(gallery)))
        c2 = int(rng.choice([c for c in range(len(colours)) if c != col[i]]))
        q_col.append((i, f"in {colours[c2]}", (cls == cls[i]) & (col == c2),
                      f"a photo of {article(colours[c2] + ' ' + DISPLAY[FMNIST_NAMES[cls[i]]])}."))
    tasks["change-colour"] = q_col

    # name every query image once (vocabulary-free), as the caption route does
    used = sorted({i for qs in tasks.values() for i, *_ in qs})
    t1 = time.time()
    all_names = cached(cache / f"{enc.name}-{key}-names.npy", lambda: np.array(
        [lab[0].label if lab else "" for lab in clf.classify_vectors(vecs, top=1)], dtype=object))
    names = {i: (all_names[i] or None) for i in used}
    t_classify = time.time() - t1
    tv = _TextVectors(enc)

    def scores(m, i, instruction, text, w):
        if m == "text-only":
            return vecs @ tv(text, prompt=False)
        if m == "image-only":
            return vecs @ vecs[i]
        if m == "image-only (image enc.)":
            return ivecs @ ivecs[i]
        if m.startswith("fusion"):
            q = compose_instruction(enc, vecs[i], instruction, method="fusion", weights=w, text_vectors=tv).vector
            appearance, weight = fusion_plan(instruction, w)
            img_vecs = vecs if m == "fusion (text enc.)" or not appearance else ivecs
            phrase, cw = colour_plan(instruction, w)
            cq = cenc.encode_texts([phrase])[0] if phrase else cvecs[i]
            if m in ("fusion (no colour)", "fusion (not centred)"):
                cw = 0.0
            return fusion_ranking(q, vecs, img_vecs[i], img_vecs, i, weight, centre=m != "fusion (not centred)",
                                  colour_q=cq, colour_vecs=cvecs, colour_weight=cw, colour_change=bool(phrase))
        q = compose_instruction(enc, vecs[i], instruction, method=m, label=names[i], weights=w,
                                text_vectors=tv).vector
        return vecs @ q

    def evaluate(queries, m, w):
        r = {1: [], 10: []}
        for i, instruction, rel, text in queries:
            for k, v in recall(scores(m, i, instruction, text, w), rel, i).items():
                r[k].append(v)
        return {k: float(np.mean(v)) for k, v in r.items()}

    def crit(queries, m, w):
        r = evaluate(queries, m, w)
        return r[1] + r[10]

    defaults = {"sum": DEFAULT_INSTRUCTION_WEIGHT, "arithmetic": ARITHMETIC_WEIGHT, "old": OLD_WEIGHT,
                "caption": CAPTION_WEIGHT, "fusion": FUSION_IMAGE_WEIGHT, "fusion_attribute": FUSION_ATTRIBUTE_WEIGHT,
                "colour": FUSION_COLOUR_WEIGHT, "keep_colour": FUSION_KEEP_COLOUR_WEIGHT}
    tuned = dict(defaults)
    tune_lines = []
    if args.tune:
        tune_q = [q for qs in tasks.values() for q in qs[: len(qs) // 2]]
        grid = {"sum": [0.3, 0.5, 0.7, 0.8, 0.9], "arithmetic": [0.5, 1.0, 1.5, 2.0], "old": [0.0, 0.25, 0.5, 1.0],
                "caption": [0.5, 0.7, 0.85, 0.95], "fusion": [0.15, 0.25, 0.35, 0.5, 0.75, 1.0],
                "fusion_attribute": [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], "colour": [0.5, 1.0, 2.0, 3.0, 4.0, 6.0],
                "keep_colour": [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]}
        tuned["sum"] = max(grid["sum"], key=lambda s: crit(tune_q, "sum", defaults | {"sum": s}))
        best = max(itertools.product(grid["arithmetic"], grid["old"]),
                   key=lambda p: crit(tune_q, "arithmetic", defaults | {"arithmetic": p[0], "old": p[1]}))
        tuned["arithmetic"], tuned["old"] = best
        tuned["caption"] = max(grid["caption"], key=lambda c: crit(tune_q, "caption", tuned | {"caption": c}))
        # the two fusion weights act on disjoint queries (object vs attribute instructions)
        tuned["fusion"] = max(grid["fusion"], key=lambda f: crit(tune_q, "fusion", tuned | {"fusion": f}))
        tuned["fusion_attribute"], tuned["colour"] = max(
            itertools.product(grid["fusion_attribute"], grid["colour"]),
            key=lambda p: crit(tune_q, "fusion", tuned | {"fusion_attribute": p[0], "colour": p[1]}))
        tuned["keep_colour"] = max(grid["keep_colour"],
                                   key=lambda f: crit(tune_q, "fusion", tuned | {"keep_colour": f}))
        tune_lines.append(f"tuned on {len(tune_q)} queries (R@1 + R@10): {tuned} (defaults {defaults})")
        for tname, queries in tasks.items():
            tq = queries[: len(queries) // 2]
            for m in ("image-only", "image-only (image enc.)", "text-only", "sum", "fused", "fusion",
                      "fusion (no colour)"):
                r = evaluate(tq, m, tuned)
                tune_lines.append(f"tuning half, {tname}, {m}: R@1 {r[1]:.3f} R@10 {r[10]:.3f}")

    rows = []
    for tname, queries in tasks.items():
        test_q = queries[len(queries) // 2:]
        for m in ("image-only", "image-only (image enc.)", "text-only", "sum", "arithmetic", "caption", "fused",
                  "fusion", "fusion (no colour)", "fusion (text enc.)", "fusion (not centred)"):
            t2 = time.time()
            r = evaluate(test_q, m, defaults)
            rt = evaluate(test_q, m, tuned) if args.tune and not m.startswith(("image-only", "text-only")) else None
            rows.append((tname, len(test_q), m, r, rt, (time.time() - t2) / len(test_q) * 1e3))
    acc = np.mean([FMNIST_NAMES[cls[i]].split()[-1] in (names[i] or "").lower() for i in used])
    lines = ["| task | queries | method | R@1 | R@10 | R@1 (tuned) | R@10 (tuned) |", "|---|---|---|---|---|---|---|"]
    for tname, n, m, r, rt, _ms in rows:
        t_cols = f"{rt[1]:.3f} | {rt[10]:.3f}" if rt else "– | –"
        lines.append(f"| {tname} | {n} | {m} | {r[1]:.3f} | {r[10]:.3f} | {t_cols} |")
    header = (f"\n### bench_instruction — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
              f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores (shared); encoder "
              f"{enc.name}, image side of fusion {args.image_encoder}; gallery {len(gallery)} tinted Fashion-MNIST "
              f"images ({args.per_class_colour} per class × "
              f"colour, colours {colours}); command: `.venv/bin/python benchmarks/bench_instruction.py "
              f"{' '.join(argv or sys.argv[1:])}`; embedding {t_embed:.0f}s, naming {len(used)} query images "
              f"{t_classify:.0f}s, total {time.time() - t0:.0f}s. Query images named correctly (class word in "
              f"the vocabulary-free label): {acc:.2f}. Gallery images whose tint the colour-names encoder ranks "
              f"first among the {len(colours)} colours: {colour_acc:.3f}. Reported on the held-out half of the "
              f"queries.\n\n")
    text = header + "\n".join(lines) + "\n" + ("\n" + "\n".join(tune_lines) + "\n" if tune_lines else "")
    if args.tux_colours:
        text += tux_colour_naming(enc, cenc)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
