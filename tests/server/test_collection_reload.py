"""The page's duplicate groups belong to one index version: when the server switches to a re-indexed
version, the old version's background de-duplication stops at its next progress step instead of running
to the end for groups nobody can be shown."""

from __future__ import annotations

import numpy as np
from _engine_helpers import build_index, unit


def _engine(tmp_path, n=300):
    from retrieval.engine.engine import Engine

    vecs = unit(np.random.default_rng(3).normal(size=(n, 16)))
    vecs[1] = unit(vecs[0] + 0.01 * np.random.default_rng(4).normal(size=16))     # one near-copy pair
    return Engine(build_index(tmp_path, {"vec": vecs}, shard_sizes=[n // 2, n - n // 2]), device="cpu")


def test_a_cancelled_computation_stops_and_keeps_no_groups(tmp_path):
    from server.routes_collection import cancel_collection_dedup, collection_dedup

    engine = _engine(tmp_path)
    cancel_collection_dedup(engine)                  # nothing cached yet: creates nothing
    assert engine.cached("server.collection-dedup") is None
    job = collection_dedup(engine)
    cancel_collection_dedup(engine)
    job._run()                                       # the thread's body, run here
    assert job.result is None and job.error is None and job.done == 0


def test_the_reload_cancels_the_old_versions_computation(tmp_path, monkeypatch):
    from server.app import create_app
    from server.routes_collection import collection_dedup

    engine = _engine(tmp_path)
    client = create_app({"RELOAD_INTERVAL": 0.001}, engine=engine).test_client()
    job = collection_dedup(engine)
    new = _engine(tmp_path / "v2")
    monkeypatch.setattr(engine, "changed_on_disk", lambda: True)
    monkeypatch.setattr(engine, "reopen", lambda: new)
    assert not job.cancelled.is_set()
    assert client.get("/healthz").status_code == 200   # any request checks for a new version
    assert job.cancelled.is_set()
    assert collection_dedup(new) is not job and not collection_dedup(new).cancelled.is_set()


def test_exit_stops_a_running_computation(tmp_path, monkeypatch):
    """The exit hook cancels a running de-duplication and waits for its thread, so the process does not
    finalize while a daemon thread is inside faiss."""
    import threading

    from server import routes_collection
    from server.routes_collection import collection_dedup, stop_running_dedups

    engine = _engine(tmp_path)
    job = collection_dedup(engine)
    entered, release = threading.Event(), threading.Event()
    real_progress = job._progress

    def slow_progress(n):                            # the computation's next progress step waits
        entered.set()
        release.wait(5)
        real_progress(n)

    monkeypatch.setattr(job, "_progress", slow_progress)
    job.start()
    assert entered.wait(30) and job in set(routes_collection._RUNNING)
    threading.Timer(0.2, release.set).start()
    stop_running_dedups(timeout=30)
    assert job.cancelled.is_set() and not job.thread.is_alive()
    assert job.result is None and job.error is None
