"""Vocabulary-free classification benchmark (CaSED-style metrics), offline.

Datasets (installed Debian packages, see ../shared/DATA.md):
* Tux Paint stamps: /usr/share/tuxpaint/stamps/**/NAME.png with NAME.txt; ground truth = the first noun
  phrase of the caption's first line ("A red apple." → "apple"; "A fire truck." → "fire truck").
  Alpha is composited on white. Letters/digits/money symbols are skipped (not object categories).
* Fashion-MNIST test set (/usr/share/datasets/fashion-mnist, IDX gz), 10 classes, N per class,
  upscaled to 224 px, inverted to dark-on-white product shots (--no-invert keeps white-on-black).

Methods, all with the same encoder (default conse-effnet-lite0):
* ``cased``: vocabulary-free CaSED over the ImageNet-21k vocabulary (retrieve K, score candidates);
* ``cased-img``: the same candidates ranked by image→name similarity only (alpha = 1);
* ``zeroshot-1k``: closed-vocabulary zero-shot over the 1,000 ImageNet class names.

Metrics (as CaSED defines them; top-1 prediction vs ground-truth name):
* semantic similarity: cosine of the MiniLM (all-MiniLM-L6-v2) sentence embeddings;
* semantic IoU: |words(pred) ∩ words(gt)| / |words(pred) ∪ words(gt)|;
* exact: normalised strings equal; synonym: exact, or both are lemmas of one ImageNet-21k synset;
* head: the ground truth's head noun (last word) is a word of the prediction (or vice versa).

Run: ``.venv/bin/python benchmarks/bench_vocabfree.py --tux 200 --fmnist-per-class 20``
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.classify.classifier import ClassifyConfig, VocabularyFreeClassifier, zero_shot_classify
from retrieval.classify.names import NameEmbedder
from retrieval.classify.vocab import extract_noun_phrases, imagenet21k_entries, normalize_name, open_vocabulary
from retrieval.encoders import create_encoder
from retrieval.images import load_image  # noqa: E402

TUX = Path("/usr/share/tuxpaint/stamps")
FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SKIP_TOPICS = ("symbols/alphabets", "symbols/math", "symbols/money", "symbols/chess")


def tux_samples(limit: int, seed: int = 0) -> list[tuple[Image.Image, str, str]]:
    items = []
    for png in sorted(TUX.rglob("*.png")):
        txt = png.with_suffix(".txt")
        rel = str(png.relative_to(TUX))
        if not txt.is_file() or any(rel.startswith(s) for s in SKIP_TOPICS):
            continue
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0]
        sentence = re.split(r"(?<=[.!?])\s", first)[0]
        phrases = extract_noun_phrases(sentence)
        if phrases:
            items.append((png, phrases[0]))
    random.Random(seed).shuffle(items)
    out = []
    for png, gt in items[:limit]:
        out.append((load_image(png), gt, str(png.relative_to(TUX))))  # alpha composited on white
    return out


def read_idx(path: Path) -> np.ndarray:
    from retrieval.testing.samples import read_idx as _read_idx

    return _read_idx(path)


def fmnist_samples(per_class: int, *, invert: bool = True, seed: int = 0):
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(10):
        idx = rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for i in idx:
            arr = 255 - images[i] if invert else images[i]
            img = Image.fromarray(arr).convert("RGB").resize((224, 224), Image.BICUBIC)
            out.append((img, FMNIST_NAMES[c], f"fmnist-test-{i}"))
    return out


# -- metrics -----------------------------------------------------------------------------------------
def words(s: str) -> set[str]:
    return set("".join(c for c in s.lower() if c.isalnum() or c == " ").split())


def synonym_sets() -> dict[str, set[int]]:
    entries = imagenet21k_entries()
    index: dict[str, set[int]] = {}
    for i, names in enumerate(entries.names):
        for n in names:
            index.setdefault(normalize_name(n), set()).add(i)
    return index


def score_predictions(preds: list[str], gts: list[str], minilm, synonyms) -> dict[str, float]:
    p_vec = minilm.encode(preds)
    g_vec = minilm.encode(gts)
    sim = (p_vec * g_vec).sum(axis=1)
    iou, exact, syn, head = [], [], [], []
    for p, g in zip(preds, gts):
        pw, gw = words(p), words(g)
        iou.append(len(pw & gw) / max(1, len(pw | gw)))
        pn, gn = normalize_name(p), normalize_name(g)
        exact.append(pn == gn)
        syn.append(pn == gn or bool(synonyms.get(pn, set()) & synonyms.get(gn, set())))
        ph, gh = pn.split()[-1:] , gn.split()[-1:]
        head.append(bool(gh) and (gh[0] in pw or (bool(ph) and ph[0] in gw)))
    return {"sim": float(np.mean(sim)), "iou": float(np.mean(iou)), "exact": float(np.mean(exact)),
            "synonym": float(np.mean(syn)), "head": float(np.mean(head))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="conse-effnet-lite0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tux", type=int, default=200, help="Tux Paint stamps (0 = skip)")
    ap.add_argument("--fmnist-per-class", type=int, default=20, help="Fashion-MNIST images per class (0 = skip)")
    ap.add_argument("--no-invert", action="store_true")
    ap.add_argument("--k-retrieve", type=int, default=10)
    ap.add_argument("--extra-k", default="", help="more K values to compare (comma-separated), alpha = first")
    ap.add_argument("--alphas", default="0.7,1.0,0.5", help="CaSED alpha values; the first is reported as cased")
    ap.add_argument("--prompts", choices=("encoder", "single"), default="encoder")
    ap.add_argument("--out", help="append the markdown table to this file")
    ap.add_argument("--examples", type=int, default=8)
    args = ap.parse_args(argv)

    t0 = time.time()
    enc = create_encoder(args.encoder, device=args.device)
    db = open_vocabulary("imagenet21k", enc, progress=lambda d, n: print(f"\rvocabulary {d}/{n}", end="",
                                                                       file=sys.stderr) if d % 4096 < 128 else None)
    print(f"# encoder {enc.name}; vocabulary {len(db)} entries ready after {time.time() - t0:.0f}s", file=sys.stderr)
    from retrieval.encoders.minilm import MiniLMTextEncoder

    minilm = MiniLMTextEncoder.shared(enc.device) if hasattr(enc, "device") else None
    synonyms = synonym_sets()
    prompts = None if args.prompts == "encoder" else ("a photo of a {}.",)
    names = NameEmbedder(enc, prompts)
    alphas = [float(a) for a in args.alphas.split(",")]

    from retrieval.encoders.conse import imagenet_classnames

    classnames = imagenet_classnames()
    class_vecs = (enc.class_embeddings if hasattr(enc, "class_embeddings") and prompts is None
                  else names(classnames))

    datasets = []
    if args.tux:
        datasets.append(("tuxpaint", tux_samples(args.tux)))
    if args.fmnist_per_class:
        datasets.append(("fashion-mnist", fmnist_samples(args.fmnist_per_class, invert=not args.no_invert)))

    rows = []
    examples = {}
    for dname, samples in datasets:
        t1 = time.time()
        gts = [g for _, g, _ in samples]
        clf = VocabularyFreeClassifier(enc, db, ClassifyConfig(k_retrieve=args.k_retrieve, alpha=alphas[0]))
        clf.names = names
        vecs = clf.embed_images([img for img, _, _ in samples])
        t_embed = time.time() - t1
        results = {}
        for a in alphas:
            clf.config.alpha = a
            t2 = time.time()
            preds = clf.classify_vectors(vecs, top=1)
            label = "cased" if a == alphas[0] else f"cased (alpha={a:g})"
            if a == 1.0:
                label = "cased-img (alpha=1)"
            results[label] = ([p[0].label if p else "" for p in preds], time.time() - t2)
        for k in [int(x) for x in args.extra_k.split(",") if x.strip()]:
            clf.config.alpha, clf.config.k_retrieve = alphas[0], k
            t2 = time.time()
            preds = clf.classify_vectors(vecs, top=1)
            results[f"cased (K={k})"] = ([p[0].label if p else "" for p in preds], time.time() - t2)
        clf.config.k_retrieve = args.k_retrieve
        t2 = time.time()
        zs = zero_shot_classify(enc, vecs, classnames, top=1, name_vectors=class_vecs)
        results["zeroshot-1k"] = ([p[0].label for p in zs], time.time() - t2)
        for label, (preds, secs) in results.items():
            m = score_predictions(preds, gts, minilm, synonyms)
            rows.append((dname, len(samples), label, m, secs / max(1, len(samples)) * 1e3))
        examples[dname] = [(src, g, results["cased"][0][i], results["zeroshot-1k"][0][i])
                           for i, (_, g, src) in enumerate(samples[:args.examples])]
        print(f"# {dname}: {len(samples)} images, embedding {t_embed:.0f}s", file=sys.stderr)

    lines = ["| dataset | n | method | sem. similarity | sem. IoU | exact | synonym | head noun | ms/img (scoring) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dname, n, label, m, ms in rows:
        lines.append(f"| {dname} | {n} | {label} | {m['sim']:.3f} | {m['iou']:.3f} | {m['exact']:.3f} | "
                     f"{m['synonym']:.3f} | {m['head']:.3f} | {ms:.1f} |")
    lines.append("")
    lines.append("examples (source, ground truth, cased, zeroshot-1k):")
    for dname, ex in examples.items():
        for src, g, p, z in ex:
            lines.append(f"- {dname} `{src}`: gt **{g}** → cased *{p}*, zero-shot-1k *{z}*")
    header = (f"\n### bench_vocabfree — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
              f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores (shared), device "
              f"{getattr(enc.device, 'device', '?')}; encoder {enc.name}; K={args.k_retrieve}; prompts={args.prompts}; "
              f"command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_vocabfree.py'] + (argv or sys.argv[1:]))}`; "
              f"total {time.time() - t0:.0f}s\n\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
