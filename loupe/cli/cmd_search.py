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
                         filter=filt, dedup=args.dedup, method=args.method, colour=not args.no_colour)


def index_fields(engine) -> set[str]:
    """Every field a filter can name on this index: metadata columns, the keys of any image's ``extra``
    metadata (also as ``extra.KEY``) and the colour-names filter when that encoder is indexed."""
    from retrieval.colour import FILTER_FIELD
    from retrieval.index.filters import COLUMNS

    fields: set[str] = set()
    for table in engine.records.tables:
        fields.update(c for c in table.column_names if c in COLUMNS)
        if "extra" in table.column_names:
            for raw in set(table.column("extra").to_pylist()):
                try:
                    extra = json.loads(raw) if raw else {}
                except (TypeError, ValueError):
                    continue
                if isinstance(extra, dict):
                    fields.update(extra)
                    fields.update(f"extra.{k}" for k in extra)
    fields.add(FILTER_FIELD)            # the engine says itself when colour-names is not indexed
    return fields


def check_filter_fields(engine, filt: dict) -> None:
    """A filter on a field no image of the index has would find nothing and look like "no results":
    say so, naming the field and the closest one the index has."""
    import difflib

    from retrieval.errors import InvalidQueryError

    known = index_fields(engine)
    for name in filt:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InvalidQueryError(f"--filter: no image of this index has a field {name!r}{hint} "
                                    f"(fields: {', '.join(sorted(k for k in known if not k.startswith('extra.')))})")


def run(args) -> int:
    from retrieval.engine import Engine

    request = search_request(args)            # validated before the index is opened
    engine = Engine(args.dir, device=args.device)
    if request.filter:
        check_filter_fields(engine, request.filter)
    resp = engine.search(request)
    results = [engine.describe_hit(h) for h in resp.hits]
    for note in resp.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        body = {"results": results, "encoder": resp.encoder, "took_ms": round(resp.took_ms, 2)}
        print(json.dumps(body | ({"notes": resp.notes} if resp.notes else {})))
        return 0 if results else 1
    if not results:
        print("no results", file=sys.stderr)
        return 1
    for i, r in enumerate(results, 1):
        where = r["path"] or (r["metadata"] or {}).get("source") or ""
        caption = f"  {r['caption']}" if r.get("caption") else ""
        print(f"{i:>3}. {r['score']:.4f}  {r['id']}  {where}{caption}")
    return 0
