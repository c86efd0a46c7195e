"""`loupe match`: is each image a copy of something in the index?"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DESCRIPTION = """For each IMAGE, list the indexed images it is a copy of (crops, re-encodes, edits, screenshots).

Each IMAGE is embedded whole and, when it looks like a picture inside a larger canvas (a screenshot, a
padded or bordered copy), also its content boxes; a candidate keeps its best score over these views.
Candidates come from the global vector; the score is normalised against a background set of
unrelated images (similarity minus the query's similarity to its nearest background image), and,
when the index has local features (`loupe index --local-features`), raised by a spatial-verification
score, so that one threshold serves every query. Background: DIR/<encoder>/background.npy (make it
with --build-background FOLDER of unrelated images), else a sample of the index itself."""

EPILOG = """exit status: 0 a copy was found for at least one IMAGE, 1 none found, 2 usage or runtime error.

examples:
  loupe match ~/loupe-index suspicious.jpg meme.png --json
  loupe match ~/loupe-index --build-background ~/unrelated-photos     # once, optional
"""


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="index directory (built by `loupe index`)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="query image files")
    p.add_argument("--threshold", type=float, default=None, metavar="X",
                   help="report matches with score >= X (default: calibrated per scoring mode, see "
                        "docs/copy-detection.md)")
    p.add_argument("--encoder", default=None, metavar="NAME", help="which of the index's encoders to use")
    p.add_argument("-k", type=int, default=10, help="global candidates per query (default 10)")
    p.add_argument("--no-normalize", action="store_true", help="raw similarities (no background normalisation)")
    p.add_argument("--no-verify", action="store_true", help="skip local (spatial) verification")
    p.add_argument("--no-pixel-check", action="store_true",
                   help="report only what the scores find (by default, with no --threshold, the top candidates "
                        "are also compared from pixels, as `loupe dedup` does: PDQ, aligned thumbnails)")
    p.add_argument("--no-regions", action="store_true",
                   help="embed only the whole query image (no content-box / border-trim views)")
    p.add_argument("--build-background", metavar="FOLDER", default=None,
                   help="embed the images of FOLDER (unrelated to the collection) as DIR/<encoder>/background.npy")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--json", action="store_true", help='print {"matches": [{"query", "id", "path", "score"}...]}')


def run(args) -> int:
    from loupe.cli.common import read_image_file
    from retrieval.copydetect.match import background_path, build_background, choose_encoder, match_images
    from retrieval.copydetect.scores import MatchConfig
    from retrieval.engine.engine import Engine
    from retrieval.errors import InvalidQueryError
    from retrieval.images import IMAGE_EXTENSIONS

    engine = Engine(args.dir, device=args.device)
    name = choose_encoder(engine, args.encoder)
    if args.build_background:
        folder = Path(args.build_background)
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InvalidQueryError(f"no images found in {folder}")
        path = background_path(engine.index_dir, name)
        from loupe.cli.progress import Progress

        with Progress(f"embedding the background ({name})", total=len(files), unit="img") as bar:
            vecs = build_background(engine.encoder(name), files, path, progress=bar.update)
        print(f"loupe match: background of {len(vecs)} images written to {path}", file=sys.stderr)
        if not args.images:
            return 0
    if not args.images:
        raise InvalidQueryError("give one or more IMAGE files to match (or --build-background FOLDER)")
    config = MatchConfig(k=args.k, threshold=args.threshold, normalize=not args.no_normalize,
                         verify=False if args.no_verify else None, regions=not args.no_regions,
                         pixel_check=not args.no_pixel_check)
    images = [read_image_file(p) for p in args.images]
    results = match_images(engine, images, config, encoder=name)
    def path_of(image_id: str) -> str | None:
        meta = engine.metadata(image_id)
        return meta.get("path") or meta.get("source")

    matches = [{"query": q, "id": m.id, "path": path_of(m.id), "score": round(m.score, 6)}
               | {k: v for k, v in m.to_json().items() if k not in ("id", "score")}
               for q, found in zip(args.images, results) for m in found]
    if args.json:
        print(json.dumps({"matches": matches}))
        return 0 if matches else 1
    by_query = {q: [m for m in matches if m["query"] == q] for q in args.images}
    for q, found in by_query.items():
        if not found:
            print(f"{q}\t(no copy found)", file=sys.stderr)
        for m in found:
            where = "" if m.get("region") is None else "\tregion " + ",".join(str(v) for v in m["region"])
            print(f"{q}\t{m['path'] or m['id']}\t{m['score']:.3f}\t{m['id']}{where}")
    return 0 if matches else 1
