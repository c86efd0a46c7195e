"""`loupe index`: embed images into an index directory (resumable, incremental)."""

from __future__ import annotations

import json

DESCRIPTION = """Embed images into an index directory of FAISS shards + Parquet metadata.

SOURCE is a folder (recursive), a manifest (.parquet/.csv/.jsonl with a `path` or `url` column,
optional `caption`, other columns kept as metadata), a webdataset .tar, or an image file.
Re-running the same command resumes an interrupted run and embeds only new images; --prune drops
images whose source is gone. Bad files are skipped and listed in the summary. The last line on
stdout is a JSON summary: {"indexed", "skipped", "failed", "shards", "seconds", "stages"}
(seconds spent reading, embedding and writing)."""

EPILOG = """examples:
  loupe index ~/Pictures --out ~/loupe-index --encoder conse-effnet-lite0
  loupe index photos.parquet --out idx --encoder clip-vit-b-32 --encoder dinov2-small --local-features
  loupe index ~/Pictures --out ~/loupe-index --prune        # after deleting photos
  loupe index embeddings.parquet --vectors emb --encoder clip-vit-b-32 --out idx   # vectors made elsewhere
  loupe index ~/shop --out ~/shop.loupe --encoder conse-effnet-lite0 --encoder effnet-lite0 \\
      --encoder colour-names     # + colour names: instructions such as: the same, but red"""


def add_arguments(p) -> None:
    from indexer.defaults import DEFAULT_BATCH_SIZE, DEFAULT_COMMIT_SECONDS, DEFAULT_SHARD_SIZE

    p.add_argument("sources", nargs="+", metavar="SOURCE", help="folder, manifest, webdataset .tar or image")
    p.add_argument("--out", required=True, metavar="DIR", help="index directory (created or updated)")
    p.add_argument("--encoder", action="append", dest="encoders", metavar="NAME", default=[],
                   help="encoder to embed with (repeat for several; default clip-vit-b-32, or the "
                        "existing index's encoders; `loupe encoders` lists them; add colour-names for colour "
                        "instructions)")
    p.add_argument("--index-type", choices=("auto", "flat", "ivfpq", "hnsw"), default="auto",
                   help="FAISS index per shard (auto: flat for small corpora, HNSW/IVF-PQ for large ones)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"images per shard (default {DEFAULT_SHARD_SIZE:,}); a shard is the unit of commit")
    p.add_argument("--commit-every", type=float, default=DEFAULT_COMMIT_SECONDS, metavar="SECONDS",
                   help=f"also commit the shard being filled every SECONDS (default {DEFAULT_COMMIT_SECONDS:.0f}), "
                        "so a crash loses at most that much work; it stays open until it holds --shard-size images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="autocast precision on CUDA (auto: fp16); CPU always runs fp32")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="DataLoader decode processes (default: cores - 1, at most 32; 0 decodes in-process)")
    p.add_argument("--local-features", action="store_true",
                   help="also store PCA-reduced local descriptors (<=128-d fp16, <=256 per image) for re-ranking")
    p.add_argument("--local-layer", choices=("final", "fine"), default="final",
                   help="which feature map --local-features stores: final (the last map, 7x7 for effnet-lite0) or "
                        "fine (effnet-lite0: the 14x14 stage-4 map; better re-ranking of crops and pasted objects, "
                        "3.5x the bytes); encoders without a fine map store their final one")
    p.add_argument("--regions", action="store_true",
                   help="also store vectors of a few object regions of each picture (with their boxes), so a "
                        "query of a small object finds the picture that contains it; see docs/regions.md")
    p.add_argument("--prune", action="store_true", help="remove images whose source file is gone")
    p.add_argument("--allow-download", action="store_true", help="fetch `url` manifest rows (off by default)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget for the index (e.g. 4G); auto index type fits it")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="skip images larger than N pixels (decompression-bomb guard; default 100,000,000 "
                        "or $LOUPE_MAX_PIXELS)")
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: decode and resize JPEGs in batches on the encoder's device (nvJPEG on CUDA); "
                        "vectors are close to, not identical with, CPU decoding — use one per index")
    p.add_argument("--wait", action="store_true", help="wait for another `loupe index` on DIR instead of failing")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="index on a Ray cluster with Ray Data (ADDRESS, e.g. ray://head:10001; alone: a local "
                        "Ray): decode tasks, encoder actors, shard writers on the workers; this process commits the "
                        "manifest (docs/distributed.md). Needs the 'ray' extra")
    p.add_argument("--vectors", default=None, metavar="COLUMN",
                   help="bring your own embeddings: SOURCE is a Parquet file whose COLUMN holds each row's vector "
                        "(list of floats); --encoder NAME is the model that made them (same dimension: text "
                        "queries work) or a new name for a vector-only index")
    p.add_argument("--optimize", choices=("auto", "always", "never"), default="auto",
                   help="build the searchable layout at the end (`loupe optimize`): auto = when it pays off "
                        "(>= 20,000 images and >= 2 shards outside the current layout)")
    p.add_argument("--target-recall", type=float, default=0.95, metavar="R",
                   help="recall@10 the optimized layout's search parameters must reach (default 0.95)")
    p.add_argument("--ray-actors", type=int, default=1, metavar="N",
                   help="encoder actors on Ray (one GPU each with --device cuda; default 1)")
    p.add_argument("--ray-writers", type=int, default=2, metavar="N",
                   help="shard-writer actors on Ray (each writes its own shards; default 2)")


def check_weights_first(args) -> None:
    """Missing weights and no model hub: fail within a second, with one line, before torch is imported and
    before ``--out`` is created (``retrieval.encoders.weights.check_weights``). Not for ``--vectors`` (no
    model) nor an existing index (a run with nothing new loads none; its encoders are checked on loading)."""
    from pathlib import Path

    from retrieval.encoders import DEFAULT_ENCODER
    from retrieval.encoders.weights import check_weights

    if args.vectors or (Path(args.out) / "manifest.json").is_file():
        return
    check_weights(args.encoders or [DEFAULT_ENCODER])


def run(args) -> int:
    check_weights_first(args)
    from indexer.index_types import parse_memory
    from indexer.pipeline import IndexConfig, build_index
    from retrieval.errors import LoupeError
    from retrieval.index.tuning import check_target_recall

    if args.shard_size < 1 or args.batch_size < 1:
        raise LoupeError("--shard-size and --batch-size must be at least 1")
    cfg = IndexConfig(
        sources=args.sources, out=args.out, encoders=args.encoders, index_type=args.index_type,
        shard_size=args.shard_size, device=args.device, precision=args.precision, batch_size=args.batch_size,
        workers=args.workers, local_features=args.local_features, local_layer=args.local_layer, prune=args.prune,
        allow_download=args.allow_download, max_memory=parse_memory(args.max_memory),
        max_pixels=args.max_pixels, wait=args.wait, decode=args.decode, commit_seconds=args.commit_every,
        ray=args.ray, ray_actors=max(1, args.ray_actors), ray_writers=max(1, args.ray_writers),
        optimize=args.optimize, vectors=args.vectors,
        target_recall=check_target_recall(args.target_recall), regions=args.regions)
    from loupe.cli.progress import Progress

    bar = Progress("indexing", unit="img")     # a bar on a terminal, log lines (every 10 s) otherwise

    def progress(done: int, indexed: int) -> None:
        bar.set(done)

    try:
        summary = build_index(cfg, progress=progress, progress_total=bar.set_total)
    finally:
        bar.close()
    out = summary.to_json()
    if getattr(summary, "regions", None) is not None:     # --regions: {"images", "regions", "seconds", "bytes"}
        out["regions"] = summary.regions
    print(json.dumps(out), flush=True)
    return 0
