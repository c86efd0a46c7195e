"""Helpers for the indexer tests, and a driver that runs ``build_index`` in a subprocess and crashes it.

``python tests/_indexer_helpers.py SPECS_JSON CONFIG_JSON [--crash POINT:K] [--slow SECONDS]`` registers
every encoder of the JSON file ``{name: registry row}`` (e.g. the conftest's tiny CLIP), runs
``build_index(IndexConfig(**CONFIG_JSON))`` and prints its JSON summary line, as ``loupe index`` does.
Its ``checkpoint`` callback (``indexer.writer``) SIGKILLs the process the K-th time the writer reaches
POINT (``--crash``), and sleeps SECONDS at every point (``--slow``: wider windows for random kills).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from typing import Callable

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


def crash_checkpoint(crash: str | None, slow: float | None) -> Callable[[str], None]:
    """A ``build_index`` checkpoint that SIGKILLs this process the k-th time it reaches ``crash``
    (``"point:k"``), after sleeping ``slow`` seconds at every point."""
    point, _, nth = (crash or "").partition(":")
    reached: Counter[str] = Counter()

    def checkpoint(name: str) -> None:
        if slow:
            time.sleep(slow)
        reached[name] += 1
        if name == point and reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)      # called in the writer's thread: kills the whole process

    return checkpoint


def main() -> int:
    sys.path.insert(0, ROOT)
    parser = argparse.ArgumentParser()
    parser.add_argument("specs_file")
    parser.add_argument("config", help="IndexConfig fields as JSON")
    parser.add_argument("--crash", metavar="POINT:K")
    parser.add_argument("--slow", type=float, metavar="SECONDS")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from indexer.pipeline import IndexConfig, build_index
    from retrieval.encoders import register_encoder
    from retrieval.encoders.clip import _register_arch

    for name, row in json.loads(open(args.specs_file).read()).items():
        if row.get("family") == "clip" and row.get("model_config"):
            _register_arch(row["arch"], row["model_config"])
        register_encoder(name, row, replace=True)
    summary = build_index(IndexConfig(**json.loads(args.config)), checkpoint=crash_checkpoint(args.crash, args.slow))
    print(json.dumps(summary.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
