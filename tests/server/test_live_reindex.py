"""Serving while ``loupe index`` runs: every kind of query, polled during many commits and a prune, is a 2xx.

Each timed commit of the indexer (``--commit-every``) writes the shard being filled under a new number,
replaces the manifest, then deletes the previous version's files; a prune rewrites shards the same way.
The server reopens the index when the manifest changes (``RELOAD_INTERVAL``). A view that opened some
files only when a query needed them (local features for re-ranking, ...) failed with 500 ``index_format``
once the indexer deleted them (issue 18); an engine now opens every file of its manifest version when it
is built (``Engine.reopen``), and the server switches only to a fully opened one.

The indexer runs in this process (``build_index`` in the test's thread, slowed at every commit step so
that many versions go by: the files it deletes are the same as in a separate ``loupe index``); the
server is the Flask app in this process, polled by two threads.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.engine.engine import Engine
from retrieval.index import store
from server.app import create_app
from server.common import state

pytestmark = pytest.mark.slow   # two slowed indexing runs


def _variants(photos: dict[str, Image.Image], n: int, seed: int) -> list[Image.Image]:
    """``n`` distinct small images: random crops of the sample photos, tinted."""
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out = []
    for i in range(n):
        img = photos[names[i % len(names)]].convert("RGB")
        w, h = img.size
        s = int(min(w, h) * rng.uniform(0.4, 0.9))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        arr = np.asarray(img.crop((x, y, x + s, y + s)).resize((72, 72)), np.float32)
        arr = np.clip(arr * rng.uniform(0.6, 1.3, 3) + rng.uniform(-20, 20, 3), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr))
    return out


SLOW = 0.03          # seconds slept at every step of every commit


def _index_slowly(source, out, **config):
    """``build_index`` (in this process, in the calling thread) committing every batch, slowed at every
    step of each commit (``tests/_indexer_helpers.py``'s checkpoint) so that many versions go by."""
    from _indexer_helpers import crash_checkpoint

    from indexer.pipeline import IndexConfig, build_index

    config = {"sources": [str(source)], "out": str(out), "encoders": ["test-clip-tiny"], "shard_size": 6,
              "batch_size": 2, "workers": 0, "commit_seconds": 0, "local_features": True, **config}
    return build_index(IndexConfig(**config), checkpoint=crash_checkpoint(None, SLOW))


def _file_id(path: Path) -> str:
    return store.content_id(store.sha256_bytes(path.read_bytes()))


def test_every_query_kind_answers_while_the_index_is_committed_and_pruned(tmp_path, tiny_clip, photos):
    from _indexer_helpers import index

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    images = _variants(photos, 56, seed=0)
    seed_files = []
    for i, img in enumerate(images[:8]):               # indexed first; never deleted: the ids queries name
        img.save(corpus / f"a{i:03d}.jpg")
        seed_files.append(corpus / f"a{i:03d}.jpg")
    out = tmp_path / "idx"
    index([corpus], out, [tiny_clip], local_features=True, shard_size=6, commit_seconds=None)
    for i, img in enumerate(images[8:44]):
        img.save(corpus / f"b{i:03d}.jpg")

    app = create_app({"RELOAD_INTERVAL": 0.05}, engine=Engine(out, device="cpu"))
    a, b = _file_id(seed_files[0]), _file_id(seed_files[1])
    upload = base64.b64encode(seed_files[2].read_bytes()).decode()
    queries = [
        ("/api/search", {"text": "a cat on a sofa", "k": 5}),
        ("/api/search", {"text": "a cat on a sofa", "k": 5, "rerank": True}),
        ("/api/search", {"image": upload, "k": 5}),
        ("/api/search", {"image": upload, "k": 5, "rerank": True}),
        ("/api/search", {"image_id": a, "k": 5}),
        ("/api/search", {"image_id": a, "k": 8, "rerank": True}),
        ("/api/attribution", {"text": "a cat", "result_id": b, "format": "json", "max_side": 8}),
        ("/api/attribution", {"image_id": a, "result_id": b, "rerank": True, "format": "json", "max_side": 8}),
        ("/api/duplicates", {"image_id": a, "k": 5}),
        ("/api/duplicates", {"image": upload, "k": 5}),
    ]
    codes: Counter[int] = Counter()
    spent: Counter[str] = Counter()
    failures: list[str] = []
    engines: set[tuple] = set()          # the versions served: their shard lists
    images_seen: set[int] = set()
    stop = threading.Event()

    def poll():
        client = app.test_client()
        i = 0
        while not stop.is_set():
            path, body = queries[i % len(queries)]
            i += 1
            t = time.perf_counter()
            try:
                resp = client.post(path, json=body)
                status, text = resp.status_code, resp.get_data(as_text=True)[:300]
            except Exception as exc:  # noqa: BLE001 - an exception out of the app is a failure too
                status, text = 599, repr(exc)
            codes[status] += 1
            spent[path + ("+rerank" if body.get("rerank") else "")] += time.perf_counter() - t
            if not 200 <= status < 300:
                shown = {k: v for k, v in body.items() if k != "image"}
                failures.append(f"{status} {path} {json.dumps(shown)}: {text}")
            eng = state(app)["engine"]
            engines.add(tuple(eng.shard_names))
            images_seen.add(eng.count)
            time.sleep(0.01)                # leave the indexer some of the CPU

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        _index_slowly(corpus, out)                                  # 36 new images, a commit every batch
        first_engines = len(engines)
        for path in sorted(corpus.glob("b*.jpg"))[::2]:             # the prune rewrites most shards
            path.unlink()
        for i, img in enumerate(images[44:]):
            img.save(corpus / f"c{i:03d}.jpg")
        summary = _index_slowly(corpus, out, prune=True).to_json()
        time.sleep(0.3)                                             # the final version gets served too
        took = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    final = Engine(out, device="cpu")
    print(f"\n{sum(codes.values())} queries in {took:.1f} s: {dict(codes)}; {len(engines)} index versions served "
          f"({first_engines} during the first run); image counts seen {sorted(images_seen)}; prune run: {summary}; "
          f"seconds per route: { {k: round(v, 1) for k, v in spent.items()} }")
    assert not failures, f"{len(failures)} non-2xx answers, e.g.:\n" + "\n".join(failures[:10])
    assert len(engines) >= 10, "too few reloads: the race was not exercised"
    assert final.count == 8 + 18 + 12 and state(app)["engine"].count == final.count
