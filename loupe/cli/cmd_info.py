"""`loupe info`: what an index holds and how it is searched."""

from __future__ import annotations

import json

DESCRIPTION = """Describe an index: images, shards, encoders (dimension, index type, modalities, local
features), disk size, and per encoder the searchable layout made by `loupe optimize` — its index, the
search parameters chosen for the target recall and the recall@10 measured with them, and how many
shards are searched beside it (indexed since)."""

EPILOG = """examples:
  loupe info ~/loupe-index
  loupe info ~/loupe-index --json"""


def add_arguments(p) -> None:
    p.add_argument("index", metavar="DIR", help="index directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def describe(index_dir) -> dict:
    from pathlib import Path

    from retrieval.index import store
    from retrieval.index.layout import layouts_of

    index_dir = Path(index_dir).expanduser()
    manifest = store.read_manifest(index_dir)
    layouts = layouts_of(manifest)
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    encoders = {}
    for name, enc in manifest.encoders.items():
        info = {"dim": enc.dim, "index_type": enc.index_type, "factory": enc.factory, "modalities": enc.modalities,
                "local_features": bool(enc.local_features)}
        layout = layouts.get(name)
        if layout is not None:
            covered = {(s, c) for s, c in layout.shards}
            delta = [s.name for s in manifest.shards if (s.name, s.count) not in covered]
            current = {(s.name, s.count) for s in manifest.shards}
            gone = sum(c for s, c in layout.shards if (s, c) not in current)
            tuned = layout.tuned or {}
            info["layout"] = {"index_type": layout.index_type, "factory": layout.factory, "images": layout.count,
                              "params": tuned.get("params", {}), "recall@10": tuned.get("recall"),
                              "target_recall": tuned.get("target"), "reached": tuned.get("reached"),
                              "latency_ms": tuned.get("latency_ms"), "built": layout.built,
                              "measured_on": {"queries": tuned.get("queries"), "method": tuned.get("method") or None},
                              "shards_searched_beside": len(delta), "images_masked": gone}
        else:
            info["layout"] = None
        encoders[name] = info
    return {"index": str(index_dir), "images": manifest.count, "shards": len(manifest.shards),
            "created": manifest.created, "updated": manifest.updated, "bytes": size,
            "default_encoder": manifest.default_encoder, "text_encoder": manifest.text_encoder,
            "encoders": encoders}


def run(args) -> int:
    info = describe(args.index)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['index']}: {info['images']:,} images in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB; "
          f"updated {info['updated']}")
    for name, enc in info["encoders"].items():
        text = " (answers text queries)" if name == info["text_encoder"] else ""
        print(f"  {name}: {enc['dim']}-d {enc['index_type']} ({enc['factory']}), {'+'.join(enc['modalities'])}"
              f"{', local features' if enc['local_features'] else ''}{text}")
        layout = enc["layout"]
        if layout is None:
            print("    searched shard by shard (no layout: run `loupe optimize` to search one index)")
            continue
        recall = layout["recall@10"]
        on = layout["measured_on"]
        how = f" on {on['queries']} {on['method'].replace('_', '-')} queries" if on["method"] and on["queries"] else ""
        print(f"    layout: {layout['index_type']} ({layout['factory']}) over {layout['images']:,} images, params "
              f"{layout['params'] or 'exact'}, recall@10 {recall:.4f}{how} (target {layout['target_recall']}), "
              f"{layout['latency_ms']:.2f} ms/query; built {layout['built']}")
        if layout["shards_searched_beside"] or layout["images_masked"]:
            print(f"    since: {layout['shards_searched_beside']} shard(s) searched beside it, "
                  f"{layout['images_masked']} image(s) masked; `loupe optimize` folds them in")
    return 0
