"""`loupe dedup`: near-duplicate pairs and groups across a whole index."""

from __future__ import annotations

import json
import sys

DESCRIPTION = """Find every pair of near-duplicate images in an index (score >= --threshold) and group them
(connected components). Exact duplicates (identical bytes, indexed once with their other sources as
aliases) are listed too. Uses exact FAISS range search over the shards in batches (or a bounded
k-NN graph with --method knn): memory grows with the number of images, never with its square.

Scores are cosines of the encoder's vectors; for pdq, 1 - 2*hamming/256 (0.95 = at most 6 of 256
bits differ). Output: a summary on stderr, pairs and groups on stdout (--json) and/or in --out
(.json, .parquet or .csv by suffix; tabular formats also write <stem>.groups.json)."""

EPILOG = """examples:
  loupe dedup ~/loupe-index --threshold 0.95 --out dupes.parquet
  loupe dedup ~/loupe-index --encoder pdq --threshold 0.9 --json | jq '.groups | length'
"""


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="index directory (built by `loupe index`)")
    p.add_argument("--threshold", type=float, default=None, metavar="X",
                   help="keep pairs with similarity >= X (default: per encoder, see README; 0.95 otherwise)")
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="which of the index's encoders to compare with (default: the most copy-specific one)")
    p.add_argument("--method", choices=("range", "knn"), default="range",
                   help="range: every pair above the threshold (exact); knn: at most -k neighbours per image")
    p.add_argument("-k", type=int, default=32, help="neighbours per image for --method knn (default 32)")
    p.add_argument("--batch-size", type=int, default=4096, metavar="N", help="query rows per FAISS call")
    p.add_argument("--out", default=None, metavar="FILE", help="write pairs/groups to FILE (.json/.parquet/.csv)")
    p.add_argument("--json", action="store_true",
                   help='print {"pairs": [{"a", "b", "score"}...], "groups": [[id...]...]} on stdout')


def run(args) -> int:
    from retrieval.copydetect.dedup import DedupConfig, deduplicate, default_dedup_threshold, pair_work, write_result
    from retrieval.copydetect.match import binary_blocks, choose_encoder
    from retrieval.engine.engine import Engine

    engine = Engine(args.dir, device="cpu")
    name = choose_encoder(engine, args.encoder)
    config = DedupConfig(threshold=default_dedup_threshold(name) if args.threshold is None else args.threshold,
                         method=args.method, k=args.k, batch_size=args.batch_size)
    binary = engine.manifest.encoders[name].index_type == "binary" or name == "pdq"
    blocks, ids = [], []
    for _, vecs, vids in (binary_blocks(engine, name) if binary else engine.all_vectors(name)):
        blocks.append(vecs)
        ids.extend(vids)
    rows = _exact_candidate_rows(engine.records.tables)
    bar = None
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=pair_work(blocks, config.method), unit="img", desc="dedup", file=sys.stderr,
                   dynamic_ncols=True)
        progress = bar.update
    try:
        result = deduplicate(blocks, ids, config, metadata_rows=rows, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    result.stats["encoder"] = name
    if args.out:
        write_result(result, args.out)
    summary = result.summary()
    print(f"loupe dedup: {summary['images']} images, {summary['pairs']} pairs >= {config.threshold} "
          f"({name}), {summary['groups']} groups covering {summary['images_in_groups']} images, "
          f"{summary['exact_duplicates']} exact duplicates, {summary['seconds']} s"
          + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json()))
    elif not args.out:
        for group in result.to_json()["groups"]:
            print(" ".join(group))
    return 0


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
