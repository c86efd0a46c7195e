"""The server on a damaged index: a 503 ``index_format`` JSON error and an error log line, never a 500; a
reload that finds the new version damaged keeps serving the previous one (``server/app.py``)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from _engine_helpers import build_index, unit

from retrieval.engine.engine import Engine
from retrieval.errors import IndexFormatError
from retrieval.index import store

N, DIM = 600, 16


@pytest.fixture(scope="module")
def vectors():
    return unit(np.random.default_rng(7).standard_normal((N, DIM)))


@pytest.fixture
def flat_index(tmp_path, vectors):
    return build_index(tmp_path / "flat", {"e": vectors}, shard_sizes=[N // 2, N - N // 2])


# -- reload: a damaged new version is not switched to -------------------------------------------------------
def test_reload_of_a_damaged_version_keeps_serving_the_previous_one(flat_index, vectors, tmp_path, caplog):
    from server.app import create_app

    engine = Engine(flat_index, device="cpu")
    app = create_app({"RELOAD_INTERVAL": 0.01}, engine=engine)
    client = app.test_client()
    q = {"vector": vectors[10].tolist(), "k": 3}
    before = client.post("/api/search", json=q).get_json()["results"]
    # a "new version": one more shard, whose vectors belong to another encoder
    manifest = store.read_manifest(flat_index)
    rng = np.random.default_rng(3)
    other = build_index(tmp_path / "other", {"e": unit(rng.standard_normal((5, 2 * DIM)))})
    shutil.copy(store.vectors_path(other, "e", "shard-00000"), store.vectors_path(flat_index, "e", "shard-00002"))
    shutil.copy(store.meta_path(other, "shard-00000"), store.meta_path(flat_index, "shard-00002"))
    manifest.shards.append(store.ShardEntry("shard-00002", 5))
    time.sleep(0.02)
    store.write_manifest(flat_index, manifest)
    assert engine.changed_on_disk()
    caplog.set_level("INFO", logger="loupe.server")
    for _ in range(3):
        time.sleep(0.02)
        resp = client.post("/api/search", json=q)
        assert resp.status_code == 200 and resp.get_json()["results"] == before
    health = client.get("/healthz").get_json()
    assert health["images"] == N
    damaged = [r for r in caplog.records if r.name == "loupe.server" and "new version is damaged" in r.getMessage()]
    assert len(damaged) == 1 and damaged[0].levelname == "ERROR" and "shard-00002.faiss" in damaged[0].getMessage()
    # a repaired version is picked up
    shutil.copy(store.vectors_path(flat_index, "e", "shard-00000"), store.vectors_path(flat_index, "e", "shard-00002"))
    rows = store.read_metadata(flat_index, "shard-00000").to_pylist()
    store.write_metadata(flat_index, "shard-00002", [{**r, "id": store.content_id(store.sha256_bytes(r["id"].encode()))}
                                                     for r in rows])
    manifest = store.read_manifest(flat_index)
    manifest.shards[-1] = store.ShardEntry("shard-00002", len(rows))
    for rel in ("e/shard-00002.faiss", "meta/shard-00002.parquet"):
        manifest.files.pop(rel, None)
    time.sleep(0.02)
    store.write_manifest(flat_index, manifest)
    time.sleep(0.02)
    client.get("/healthz")
    assert client.get("/healthz").get_json()["images"] == N + len(rows)


def test_index_format_error_is_a_503_json_with_a_log_line(flat_index, caplog):
    from server.app import create_app

    app = create_app({"RELOAD_INTERVAL": 0}, engine=Engine(flat_index, device="cpu"))

    @app.get("/damaged")
    def damaged():
        raise IndexFormatError(f"vector shard {flat_index}/e/shard-00000.faiss is unreadable")

    caplog.set_level("INFO", logger="loupe.server")
    resp = app.test_client().get("/damaged")
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "index_format"
    assert str(flat_index) not in resp.get_data(as_text=True)
    assert any(r.levelname == "ERROR" and "shard-00000.faiss" in r.getMessage() for r in caplog.records)
