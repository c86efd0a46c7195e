"""`loupe search`: query an index from the command line."""

from __future__ import annotations

import json
import sys

DESCRIPTION = """Search an index by text, by an image file, or by the id of an indexed image.

Text may be given several times as weighted terms (rclip style): "+a cat" adds, "-a dog" subtracts,
"0.5:snow" adds with weight 0.5. --instruction modifies an image query ("at night", "in red")."""

EPILOG = """examples:
  loupe search ~/idx --text "a dog on a beach" -k 10
  loupe search ~/idx --text "+a cat" --text "-a dog" --json
  loupe search ~/idx --image photo.jpg --instruction "in winter"
  loupe search ~/idx --id 3fa9c0d2e1b4a57 --filter '{"width": {"gte": 1000}}'
  loupe search ~/idx --image shirt.jpg --instruction "the same, but red"
  loupe search ~/idx --text "a dress" --filter '{"colour-names": ["red", "pink"]}'

On an index with the colour-names encoder, colour words count: "a red dress" must be red, "in red"
changes the colour of an image query, and the colour-names filter keeps only images of that colour.

exit status: 0 results found, 1 no results (e.g. a filter nothing passes), 2 usage or runtime error.
"""


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="index directory (built by `loupe index`)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", action="append", metavar="T",
                   help="text query; repeat for weighted terms (+T, -T, W:T)")
    q.add_argument("--image", metavar="PATH", help="image file to search with")
    q.add_argument("--id", metavar="ID", help="id of an indexed image (more like this)")
    p.add_argument("--instruction", metavar="T", help="text instruction applied to the image query")
    p.add_argument("--method", default="auto", choices=["auto", "fusion", "sum", "arithmetic", "caption", "fused"],
                   help="how --instruction is composed with the image (default auto = fusion: a text list and "
                        "an image list pooled and re-scored; see README)")
    p.add_argument("-k", type=int, default=10, help="number of results (1..1000, default 10)")
    p.add_argument("--rerank", action="store_true", help="re-rank the top candidates (local features)")
    p.add_argument("--encoder", help="encoder of the index to use for image queries")
    p.add_argument("--filter", metavar="JSON", help='metadata filter, e.g. \'{"caption": {"contains": "cat"}}\'')
    p.add_argument("--dedup", action="store_true", help="drop near-identical results")
    p.add_argument("--no-colour", action="store_true",
                   help="ignore colour words (on an index with colour-names, \"a red car\" and \"in red\" "
                        "are colour-aware)")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="search this part of the --image/--id picture (pixels)")
    p.add_argument("--regions", action="store_true",
                   help="also search the picture's object regions: results per region and a fused list")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print {\"results\": [...]} as JSON")


def search_request(args):
    """The command line's flags → a ``SearchRequest`` (the same type the HTTP API builds)."""
    from loupe.cli.common import read_image_file
    from retrieval.engine import SearchRequest
    from retrieval.errors import InvalidQueryError

    filt = None
    if args.filter:
        try:
            filt = json.loads(args.filter)
        except ValueError as exc:
            raise InvalidQueryError(f"--filter is not valid JSON: {exc}") from None
    text = args.text[0] if args.text and len(args.text) == 1 else args.text
    return SearchRequest(text=text, image=read_image_file(args.image) if args.image else None, image_id=args.id,
                         instruction=args.instruction, encoder=args.encoder, k=args.k, rerank=args.rerank,
                         filter=filt, dedup=args.dedup, method=args.method, colour=not args.no_colour,
                         box=getattr(args, "box", None), regions=getattr(args, "regions", False))


def run(args) -> int:
    from retrieval.engine import Engine

    request = search_request(args)            # validated before the index is opened
    engine = Engine(args.dir, device=args.device)
    resp = engine.search(request)     # a --filter field no image has: InvalidQueryError naming it (exit 2)
    from retrieval.regions.search import response_regions_json, with_box

    describe = with_box(engine.describe_hit)      # a hit found through a region says where ("box")
    results = [describe(h) for h in resp.hits]
    extras = response_regions_json(resp, describe)
    for note in resp.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        body = {"results": results, "encoder": resp.encoder, "score_kind": resp.score_kind,
                "took_ms": round(resp.took_ms, 2), **extras}
        print(json.dumps(body | ({"notes": resp.notes} if resp.notes else {})))
        return 0 if results else 1
    if not results:
        print("no results", file=sys.stderr)
        return 1
    # the score column's header says what its numbers are: cosine, fused_z (a sum of z-scores) or reranked;
    # on stderr, so that stdout stays one line per result for scripts (`| head -1`)
    print(f"{'#':>3}  {resp.score_kind:<6}  {'id':<15}  path", file=sys.stderr, flush=True)
    for i, r in enumerate(results, 1):
        where = r["path"] or (r["metadata"] or {}).get("source") or ""
        caption = f"  {r['caption']}" if r.get("caption") else ""
        box = f"  box {','.join(map(str, r['box']))}" if r.get("box") else ""
        print(f"{i:>3}. {r['score']:.4f}  {r['id']}  {where}{caption}{box}")
    for n, region in enumerate(extras.get("regions", []), 1):
        print(f"region {n} ({region['kind']}) box {','.join(map(str, region['box']))}:")
        for i, r in enumerate(region["results"][:5], 1):
            print(f"  {i:>3}. {r['score']:.4f}  {r['id']}  {r['path'] or ''}")
    return 0
