"""`loupe explain`: an attribution overlay — why a result matched a query."""

from __future__ import annotations

import json

DESCRIPTION = """Draw why an indexed image (--result ID) matched a query, as a heatmap blended on the image
at its original size (PNG): a perceptual colour map (inferno: brighter = more of the match), the top
20 % outlined, and the parts the encoder did not see (outside its centre crop) greyed and hatched;
--legend adds a legend band under it; --pair draws the query and the result side by side, each with its
map, the locally matched regions linked by lines, and the legend. ViT encoders (CLIP, DINOv2): the
query's similarity decomposed over the patch tokens (CLIP: CLIP-Surgery-style removal of the patches'
shared component); effnet-lite0: integrated gradients of the cosine similarity from the image's blank
(mean-colour) version to the image, smoothed at the scale of the encoder's receptive field
(--method integrated-raw: per pixel); conse-effnet-lite0: occlusion, and its text maps are marked
approximate (they are weak on the deletion test);
--method gradinput: one-step gradient x activation at the input and two finer stages;
--method gradcam: Grad-CAM on the last 7x7 map; --method cam: its exact decomposition;
--method occlusion: the measured similarity drop when each region is hidden (any encoder, one forward
pass per window, slower); --method eigencam needs no gradients; --method matches (image queries) shows
the locally matched regions that spatial verification keeps."""

EPILOG = """examples:
  loupe explain ~/idx --text "a cat on a sofa" --result 3fa9c0d2e1b4a57 --out why.png
  loupe explain ~/idx --image query.jpg --result 3fa9c0d2e1b4a57 --out why.png --query-out q.png
  loupe explain ~/idx --image crop.jpg --result 3fa9c0d2e1b4a57 --method matches --out m.png --json heat.json
  loupe explain ~/idx --image query.jpg --result 3fa9c0d2e1b4a57 --out why.png --pair side-by-side.png
"""


def add_arguments(p) -> None:
    from retrieval.explain.config import METHODS
    from retrieval.explain.overlay import COLORMAPS, DEFAULT_COLORMAP

    p.add_argument("dir", metavar="DIR", help="index directory (built by `loupe index`)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", metavar="T", help="the text query")
    q.add_argument("--image", metavar="PATH", help="the query image file")
    q.add_argument("--id", metavar="ID", help="an indexed image as the query")
    p.add_argument("--result", required=True, metavar="ID", help="id of the result to explain")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the overlay PNG")
    p.add_argument("--method", default="auto", choices=METHODS, help="attribution method (default auto)")
    p.add_argument("--query-out", metavar="FILE.png", help="image queries: also write the query image's overlay")
    p.add_argument("--pair", metavar="FILE.png", help="also write the pair view: query and result side by side, "
                   "each with its map, matched regions linked by lines, and a legend (text queries: the result)")
    p.add_argument("--legend", action="store_true", help="add a legend band under --out / --query-out")
    p.add_argument("--colormap", default=DEFAULT_COLORMAP, choices=COLORMAPS, help="default inferno (perceptual)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="like every --json: the summary on stdout with the raw heatmap added (\"width\", "
                        "\"height\", \"heatmap\"); --json FILE writes the heatmap to FILE instead")
    p.add_argument("--instruction", metavar="T", help="text instruction applied to the image query")
    p.add_argument("--encoder", help="encoder of the index to use for image queries")
    p.add_argument("--rerank", action="store_true", help="explain as a re-ranked query (auto → matched regions)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity 0..1 (default 0.5)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")


def run(args) -> int:
    from loupe.cli.common import read_image_file
    from retrieval.engine.engine import Engine
    from retrieval.errors import InvalidQueryError
    from retrieval.explain.attribution import explain
    from retrieval.explain.overlay import heatmap_json, overlay_png
    from retrieval.explain.pair import pair_png
    from retrieval.index.store import atomic_write_bytes

    if not 0.0 <= args.alpha <= 1.0:
        raise InvalidQueryError("--alpha must be in 0..1")
    image = read_image_file(args.image) if args.image else None
    engine = Engine(args.dir, device=args.device)
    engine.locate(args.result)
    ctx = engine.embed(text=args.text, image=image, image_id=args.id, instruction=args.instruction,
                       encoder=args.encoder)
    ex = explain(engine, ctx, args.result, method=args.method, rerank=args.rerank,
                 query_side=bool(args.query_out), pair=bool(args.pair))
    look = {"alpha": args.alpha, "colormap": args.colormap}
    legend = {"legend": True, "label": ex.label, "note": ex.note} if args.legend else {}
    atomic_write_bytes(args.out, overlay_png(ex.result_image, ex.result, box=ex.result_box, **look, **legend))
    summary = {"out": args.out, "result": args.result, "method": ex.method, "label": ex.label, "encoder": ex.encoder,
               "width": int(ex.result.shape[1]), "height": int(ex.result.shape[0]),
               **{k: v for k, v in ex.extra.items() if k != "lines"}}
    if ex.note:
        summary["note"] = ex.note
    if args.query_out:
        if ex.query is None:
            raise InvalidQueryError("--query-out needs an image query (--image or --id)")
        atomic_write_bytes(args.query_out, overlay_png(ex.query_image, ex.query, box=ex.query_box, **look, **legend))
        summary["query_out"] = args.query_out
    if args.pair:
        atomic_write_bytes(args.pair, pair_png(ex, **look))
        summary["pair"] = args.pair
    if args.json == "-":
        summary.update(heatmap_json(ex.result))
    elif args.json:
        atomic_write_bytes(args.json, json.dumps(heatmap_json(ex.result)).encode())
        summary["json"] = args.json
    print(json.dumps(summary))
    return 0
