"""Helpers for the indexer tests: run `loupe index` in a subprocess with test encoders registered.

``python tests/_indexer_helpers.py SPECS_JSON -- ARGS...`` registers every encoder of the JSON file
``{name: registry row}`` (e.g. the conftest's tiny CLIP) and then runs ``loupe ARGS...``.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def index(sources, out, encoders, **kw):
    """``build_index`` in-process, single-process decode and small batches unless told otherwise."""
    from indexer.pipeline import IndexConfig, build_index

    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return build_index(IndexConfig(sources=[str(s) for s in sources], out=str(out), encoders=encoders, **kw))


def all_rows(out) -> list[dict]:
    """Every metadata row of every shard the manifest lists."""
    from retrieval.index import store

    m = store.read_manifest(out)
    return [r for s in m.shards for r in store.read_metadata(out, s.name).to_pylist()]


def cos(a, b) -> float:
    """Cosine similarity of two vectors."""
    import numpy as np

    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> int:
    sys.path.insert(0, ROOT)
    specs_file, sep, *argv = sys.argv[1:]
    assert sep == "--"
    import torch

    torch.set_num_threads(1)
    from retrieval.encoders import register_encoder
    from retrieval.encoders.clip import _register_arch

    for name, row in json.loads(open(specs_file).read()).items():
        if row.get("family") == "clip" and row.get("model_config"):
            _register_arch(row["arch"], row["model_config"])
        register_encoder(name, row, replace=True)
    from loupe.cli.main import main as loupe_main

    return loupe_main(argv)


if __name__ == "__main__":
    sys.exit(main())
