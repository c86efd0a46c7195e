"""`loupe dedup`: near-duplicate pairs and groups across a whole index."""

from __future__ import annotations

import json
import sys

DESCRIPTION = """Find the images of an index that are copies of each other (resized, re-encoded, cropped) and
group them (connected components). Exact duplicates (identical bytes, indexed once with their other
sources as aliases) are listed too.

By default (--check pixels) every image's nearest neighbours in the index (similarity >= a loose
per-encoder threshold) are candidates, and a copy-specific check of the two files decides: the pair's
SSCD similarity when the index has sscd, PDQ hashes (stored, or computed from the files), else the two
pictures' thumbnails aligned one inside the other (crops). A general-purpose encoder alone cannot tell
a resized copy (cosine ~0.85) from a different picture that looks alike (~0.90). --check none keeps
the old behaviour: every pair whose vector similarity is >= --threshold (exact range search).

Output: a summary on stderr; the groups as tab-separated file paths on stdout (--to-remove: only the
files to delete, keeping the largest, then oldest, picture of each group), or --json, and/or --out
(.json, .parquet or .csv by suffix; tabular formats also write <stem>.groups.json)."""

EPILOG = """exit status: 0 duplicates found, 1 none found, 2 usage or runtime error.

examples:
  loupe dedup ~/loupe-index                              # groups of copies, one line of paths each
  loupe dedup ~/loupe-index --to-remove | xargs -d '\\n' rm --   # delete all but one of each group
  loupe dedup ~/loupe-index --json | jq '.remove'
  loupe dedup ~/loupe-index --check none --threshold 0.95 --out dupes.parquet
"""


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="index directory (built by `loupe index`)")
    p.add_argument("--check", choices=("pixels", "none"), default="pixels",
                   help="pixels (default): candidates from the vectors, decided by a copy check of the files; "
                        "none: vector similarity >= --threshold only")
    p.add_argument("--threshold", type=float, default=None, metavar="X",
                   help="also report every pair with vector similarity >= X (with --check none: only those; "
                        "default per encoder, see README)")
    p.add_argument("--candidate-threshold", type=float, default=None, metavar="X",
                   help="similarity at which a neighbour is checked (default per encoder: effnet-lite0 0.6)")
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="which of the index's encoders to compare with (default: the most copy-specific one)")
    p.add_argument("--method", choices=("range", "knn"), default="range",
                   help="with --check none: range = every pair above the threshold (exact); knn = at most -k "
                        "neighbours per image")
    p.add_argument("-k", type=int, default=None,
                   help="neighbours per image (candidates; default 10, or 32 for --check none --method knn)")
    p.add_argument("--batch-size", type=int, default=4096, metavar="N", help="query rows per FAISS call")
    p.add_argument("--candidates", choices=("auto", "exact", "index"), default="auto",
                   help="where candidate pairs come from: exact = all pairs (grows as N^2); index = each image's "
                        "-k nearest neighbours by the optimized layout (`loupe optimize`) or the GPU; auto = index "
                        "from 200,000 images when there is one")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="cpu (default), cuda[:N] or auto: search exact (flat) vectors on the GPU")
    p.add_argument("--out", default=None, metavar="FILE", help="write pairs/groups to FILE (.json/.parquet/.csv)")
    p.add_argument("--to-remove", action="store_true",
                   help="print only the files to remove (all but the largest/oldest of each group), one per line")
    p.add_argument("--json", action="store_true",
                   help='print {"pairs": [{"a", "b", "a_path", "b_path", "score", "check"}...], "groups": '
                        '[[id...]...], "group_paths", "exact", "remove": [path...], "summary"} on stdout')


def run(args) -> int:
    from retrieval.copydetect.collection import CopyCheckConfig, dedup_index, describe_files
    from retrieval.copydetect.dedup import write_result
    from retrieval.engine.engine import Engine

    engine = Engine(args.dir, device=args.device)
    k = args.k if args.k is not None else (32 if args.check == "none" else 10)
    config = CopyCheckConfig(check=args.check, threshold=args.threshold, candidate_threshold=args.candidate_threshold,
                             k=k, batch_size=args.batch_size, method=args.method, candidates=args.candidates)
    rows = _exact_candidate_rows(engine.records.tables)
    from loupe.cli.progress import Progress

    # knn candidates: every row queried once; range search: each shard pair's rows (unknown here)
    n = engine.manifest.count if args.check == "pixels" or args.method == "knn" or args.candidates == "index" \
        else None
    with Progress("dedup", n, unit="img") as bar:     # a bar on a terminal, log lines otherwise
        result = dedup_index(engine, args.encoder, config, metadata_rows=rows, progress=bar.update)
    describe_files(engine, result)
    if args.out:
        write_result(result, args.out)
    summary = result.summary()
    how = (f"pairs >= {summary.get('threshold')}" if args.check == "none" else
           f"copies among {summary.get('candidates')} candidate pairs >= {summary.get('candidate_threshold')}")
    print(f"loupe dedup: {summary['images']} images, {summary['pairs']} {how} ({summary['encoder']}), "
          f"{summary['groups']} groups covering {summary['images_in_groups']} images, "
          f"{summary['exact_duplicates']} exact duplicates, {summary['seconds']} s"
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    found = bool(len(result.pairs) or result.exact)
    if args.json:
        print(json.dumps(result.to_json()))
    elif args.to_remove:
        for path in result.to_remove():
            print(path)
    elif not args.out:
        for group in result.groups:
            print("\t".join(result.path(i) or result.ids[i] for i in group))
        for e in result.exact:
            print("\t".join(str(x) for x in e["sources"]))
    return 0 if found else 1


def _exact_candidate_rows(tables) -> list[dict]:
    """Metadata rows that can be exact duplicates: rows with aliases, or whose SHA-256 occurs more
    than once. Filtered column-wise, so a large index does not become a list of Python dicts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    cols_all = [[c for c in ("id", "sha256", "source", "path", "aliases") if c in t.column_names] for t in tables]
    shas = [t.column("sha256").to_numpy(zero_copy_only=False) if "sha256" in t.column_names else None
            for t in tables]
    known = [s for s in shas if s is not None]
    repeated: set = set()
    if known:
        values, counts = np.unique(np.concatenate(known).astype(str), return_counts=True)
        repeated = set(values[counts > 1].tolist())
    rows = []
    for table, cols, sha in zip(tables, cols_all, shas):
        mask = np.zeros(table.num_rows, bool)
        if "aliases" in table.column_names:
            aliases = table.column("aliases")
            has = pc.and_(pc.is_valid(aliases), pc.invert(pc.is_in(aliases, value_set=pa.array(["", "[]"]))))
            mask |= np.asarray(has.to_numpy(zero_copy_only=False), bool) & ~np.asarray(
                pc.is_null(aliases).to_numpy(zero_copy_only=False), bool)
        if sha is not None and repeated:
            mask |= np.isin(sha.astype(str), list(repeated))
        if mask.any():
            rows.extend(table.select(cols).filter(pa.array(mask)).to_pylist())
    return rows
