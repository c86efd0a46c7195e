"""`loupe classify`: name what is in images without a fixed label list (CaSED-style)."""

from __future__ import annotations

import json
import logging
import sys

DESCRIPTION = """Name what is in images without a fixed label list (vocabulary-free classification,
after CaSED, Conti et al. 2023): retrieve the texts nearest to each image from a text database,
extract candidate names from them, and rank the candidates by image→name similarity fused with the
support of the retrieved texts.

Text databases: the captions of an index (DIR), the built-in ImageNet-21k vocabulary
(--vocabulary imagenet21k: 21,843 WordNet lemmas with definitions), or your own file
(--vocabulary FILE: .txt one entry per line, or .parquet/.csv/.jsonl with --column). A database is
embedded once per encoder and cached (under $LOUPE_CACHE_DIR/vocab, default ~/.cache/loupe/vocab)."""

EPILOG = """examples:
  loupe classify --vocabulary imagenet21k cat.jpg dog.png --encoder conse-effnet-lite0
  loupe classify ~/idx photo.jpg -k 3 --json        # candidates from the index's captions
  loupe classify --vocabulary labels.txt *.jpg      # your own names, one per line
"""

log = logging.getLogger("loupe.classify")
OFFLINE_ENCODER = "conse-effnet-lite0"


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", nargs="?", help="index directory whose captions are the text database")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files to classify")
    p.add_argument("--vocabulary", metavar="NAME", help="imagenet21k, or a text/Parquet/CSV/JSONL file "
                                                        "(instead of DIR)")
    p.add_argument("--column", help="text column of a table --vocabulary (default caption/text/label/name)")
    p.add_argument("-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--retrieve", type=int, default=None, metavar="K",
                   help="texts retrieved per image (CaSED's K, default 20)")
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of image→name vs retrieved-text→name scores (default 0.7)")
    p.add_argument("--encoder", help="text-capable encoder (default: the index's text encoder; with "
                                     "--vocabulary: clip-vit-b-32 if its weights are cached, else "
                                     "conse-effnet-lite0)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--precompute-names", action="store_true",
                   help="embed every candidate name of the vocabulary once and store them next to it "
                        "(imagenet21k: minutes on a CPU, once; `loupe serve` does it in the background), "
                        "so later runs embed no names")
    p.add_argument("--json", action="store_true",
                   help='print {"predictions": [{"image", "labels": [{"label", "score"}...], '
                        '"colours": [{"colour", "score"}...]}...]}')


def _clip_weights_cached(name: str) -> bool:
    """Whether the CLIP checkpoint is available without the network (hub cache or LOUPE_WEIGHTS_DIR)."""
    from retrieval.encoders import weights_available

    return weights_available(name)


def _pick_encoder(args) -> str:
    from retrieval.encoders import DEFAULT_ENCODER
    from retrieval.errors import InvalidQueryError
    from retrieval.index import store

    if args.encoder:
        return args.encoder
    if args.dir and not args.vocabulary:
        name = store.read_manifest(args.dir).text_encoder
        if name is None:
            raise InvalidQueryError(f"index {args.dir} has no text-capable encoder; classify with "
                                    "--vocabulary imagenet21k --encoder conse-effnet-lite0")
        return name
    if _clip_weights_cached(DEFAULT_ENCODER):
        return DEFAULT_ENCODER
    log.warning("%s weights are not cached; using the offline encoder %s", DEFAULT_ENCODER, OFFLINE_ENCODER)
    return OFFLINE_ENCODER


def run(args) -> int:
    from retrieval.classify.classifier import ClassifyConfig, Prediction, make_classifier
    from retrieval.colour.naming import describe_colours
    from retrieval.encoders import create_encoder
    from retrieval.errors import InvalidImageError, InvalidQueryError
    from retrieval.images import load_image

    images = list(args.images)
    if args.vocabulary and args.dir:
        images.insert(0, args.dir)   # `classify --vocabulary V a.jpg b.jpg`: DIR slot holds an image
        args.dir = None
    if not args.vocabulary and not args.dir:
        raise InvalidQueryError("give an index DIR (its captions) or --vocabulary NAME|FILE")
    if not 1 <= args.k <= 1000:
        raise InvalidQueryError(f"-k must be in 1..1000, got {args.k}")
    loaded = []
    for path in images:
        try:
            loaded.append(load_image(path))
        except InvalidImageError as exc:
            raise InvalidImageError(f"{path}: {exc}") from None
        except OSError as exc:
            raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    encoder = create_encoder(_pick_encoder(args), device=args.device)
    config = ClassifyConfig(top=args.k)
    if args.retrieve:
        config.k_retrieve = args.retrieve
    if args.alpha is not None:
        if not 0.0 <= args.alpha <= 1.0:
            raise InvalidQueryError("--alpha must be in [0, 1]")
        config.alpha = args.alpha

    def progress(done, total):
        if sys.stderr.isatty():
            print(f"\rembedding the text database: {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    clf = make_classifier(encoder, args.vocabulary or args.dir, column=args.column, config=config,
                          progress=progress, precompute_names=True if args.precompute_names else None)
    labels = clf.classify(loaded, top=args.k)
    preds = [Prediction(str(p), lab) for p, lab in zip(images, labels)]
    colours = describe_colours(loaded)     # the main colours too (retrieval.colour.naming; no model, no index)
    if args.json:
        print(json.dumps({"predictions": [p.to_json() | {"colours": c} for p, c in zip(preds, colours)]}))
        return 0
    for p, c in zip(preds, colours):
        print(p.image)
        for lab in p.labels:
            print(f"  {lab.score:6.3f}  {lab.label}")
        print("  colours: " + ", ".join(f"{x['colour']} {x['score']:.2f}" for x in c))
    return 0
