"""Stored candidate-name embeddings (``retrieval.classify.NameStore``) and the caption classifier's
refresh after an index reload. Fast: a bag-of-words fake encoder, the tiny random CLIP, no network."""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np

from retrieval.classify.classifier import ClassifyConfig, VocabularyFreeClassifier, make_classifier
from retrieval.classify.names import NameStore, database_names
from retrieval.classify.vocab import TextDatabase
from retrieval.index import store
from retrieval.numeric import l2_normalize
from tests._engine_helpers import BagOfWordsEncoder


class CountingEncoder(BagOfWordsEncoder):
    """The shared bag-of-words encoder with two more words; ``texts`` records every text it embeds."""

    WORDS = BagOfWordsEncoder.WORDS + ("drawing", "tiger")

    def __init__(self, name: str = "fake-count"):
        super().__init__(name)


PROMPTS = ("a photo of a {}.", "a drawing of a {}.")
NAMES_FILE = "cat\ndog\na red rocket in the sky\ncoffee cup\n"


def _names_file(tmp_path, text=NAMES_FILE):
    path = tmp_path / "names.txt"
    path.write_text(text)
    return path


def _store_files(directory):
    return sorted(p.name for p in directory.glob("names-*"))


def test_stored_name_vectors_equal_the_encoders_own(tiny_clip, tmp_path):
    """(a) every stored vector is the unit mean of encode_texts over the prompted name."""
    from retrieval.encoders import create_encoder

    enc = create_encoder(tiny_clip, device="cpu")
    clf = make_classifier(enc, _names_file(tmp_path), cache_dir=tmp_path / "cache",
                          config=ClassifyConfig(prompts=PROMPTS))
    names_store = clf.names.store
    assert names_store is not None and isinstance(names_store.vectors, np.memmap)
    assert names_store.names == database_names(clf.database) == ["cat", "dog", "rocket", "sky", "coffee cup"]
    expected = np.stack([l2_normalize(np.asarray(enc.encode_texts([p.format(n) for p in PROMPTS]),
                                                 np.float32).mean(axis=0, keepdims=True))[0]
                         for n in names_store.names])
    np.testing.assert_allclose(np.asarray(names_store.vectors), expected, rtol=1e-5, atol=1e-6)
    meta = json.loads(names_store.path.read_text())
    assert meta["encoder"] == tiny_clip and meta["prompts"] == list(PROMPTS) and meta["names"] == names_store.names
    # the classifier's name vectors are the stored ones
    np.testing.assert_array_equal(clf.names(["sky", "cat"]), np.asarray(names_store.vectors)[[3, 0]])


def test_second_classifier_does_not_embed_stored_names(tmp_path):
    """(b) a classifier opening the same database reads the stored names; only unknown ones are embedded."""
    enc = CountingEncoder()
    first = make_classifier(enc, _names_file(tmp_path), cache_dir=tmp_path / "cache",
                            config=ClassifyConfig(prompts=PROMPTS, k_retrieve=3))
    assert len(enc.texts) == 4 + 5 * len(PROMPTS)      # database entries, then every name once
    queries = enc.encode_texts(["cat", "rocket", "coffee"])
    directory = first.database.dir

    enc.texts.clear()
    again = VocabularyFreeClassifier(enc, TextDatabase(directory), ClassifyConfig(prompts=PROMPTS, k_retrieve=3))
    labels = again.classify_vectors(queries, top=2)
    assert enc.texts == []                              # no encoder call: all candidates were stored
    assert [row[0].label for row in labels] == ["cat", "rocket", "coffee cup"]
    assert [row[0].label for row in first.classify_vectors(queries, top=2)] == ["cat", "rocket", "coffee cup"]

    made = make_classifier(enc, _names_file(tmp_path), cache_dir=tmp_path / "cache",
                           config=ClassifyConfig(prompts=PROMPTS, k_retrieve=3))
    made.classify_vectors(queries)
    assert enc.texts == [] and made.names.store.path == first.names.store.path

    vec = again.names(["cat", "red boot"])              # a name not in the store: embedded on demand
    assert enc.texts == [p.format("red boot") for p in PROMPTS]
    np.testing.assert_array_equal(vec[0], np.asarray(again.names.store.vectors)[0])
    again.names(["red boot"])
    assert len(enc.texts) == len(PROMPTS)               # and then cached in memory


def test_prompts_encoder_or_names_change_invalidates(tmp_path):
    """(c) other prompts, another encoder or other names do not use a store built for different ones."""
    enc = CountingEncoder()
    path = _names_file(tmp_path)
    first = make_classifier(enc, path, cache_dir=tmp_path / "cache", config=ClassifyConfig(prompts=PROMPTS))
    db, old_files = first.database, _store_files(first.database.dir)
    assert len(old_files) == 2

    other_prompts = ("{}",)
    assert NameStore.open(db, enc, other_prompts) is None
    assert NameStore.open(db, CountingEncoder("another-encoder"), PROMPTS) is None
    enc.texts.clear()
    second = make_classifier(enc, path, cache_dir=tmp_path / "cache", config=ClassifyConfig(prompts=other_prompts))
    assert sorted(enc.texts) == sorted(database_names(db))            # re-embedded with the new prompts
    np.testing.assert_allclose(np.asarray(second.names.store.vectors), enc.encode_texts(database_names(db)),
                               rtol=1e-6)
    assert _store_files(db.dir) != old_files and len(_store_files(db.dir)) == 2   # the old store removed
    assert NameStore.open(db, enc, PROMPTS) is None

    # a damaged store (vectors of the wrong shape) is not used either
    vec_path = second.names.store.path.with_suffix(".npy")
    np.save(tmp_path / "bad.npy", np.zeros((2, enc.dim), np.float32))
    os.replace(tmp_path / "bad.npy", vec_path)          # replaced, not overwritten: `second` maps the old file
    assert NameStore.open(db, enc, other_prompts) is None

    # the names file changed: database and names rebuilt, the new name is stored
    path.write_text(NAMES_FILE + "sandal\n")
    enc.texts.clear()
    third = make_classifier(enc, path, cache_dir=tmp_path / "cache", config=ClassifyConfig(prompts=PROMPTS))
    assert "sandal" in third.names.store and [p.format("sandal") for p in PROMPTS][0] in enc.texts


def test_index_captions_are_embedded_on_demand(tmp_path):
    """Caption databases get no store: their noun phrases are embedded when a request needs them."""
    enc = CountingEncoder()
    index = _caption_index(tmp_path / "idx", enc, {"a": "A cat on a red rug.", "b": "A rocket in the sky."})
    clf = make_classifier(enc, index, cache_dir=tmp_path / "cache", config=ClassifyConfig(prompts=PROMPTS))
    assert clf.database.kind == "captions" and clf.names.store is None and _store_files(clf.database.dir) == []


# -- the caption classifier after an index reload ----------------------------------------------------
_RUNS = itertools.count()
OLD_CAPTIONS = {"a": "A cat on a red rug.", "b": "A coffee cup on a table.", "c": "A rocket in the sky."}
NEW_CAPTIONS = {"d": "A dog with a boot.", "e": "A tiger in a drawing.", "f": "A sandal on a photo."}


def _caption_index(directory, enc, captions: dict[str, str]):
    from tests._engine_helpers import build_index, fake_id

    words = list(captions.values())
    rows = [{"id": fake_id(i), "source": f"/nowhere/{key}.jpg", "path": None, "caption": cap, "width": 10,
             "height": 10, "sha256": "0" * 64, "size": 1, "mtime": 0.0, "aliases": [], "extra": {}}
            for i, (key, cap) in enumerate(captions.items())]
    path = build_index(directory, {enc.name: enc.encode_texts(words)}, rows=rows)
    stamp = time.time() + next(_RUNS)          # a later run must look newer, even within one clock tick
    os.utime(path / store.MANIFEST, (stamp, stamp))
    return path


def _names_of(captions):
    from retrieval.classify.vocab import extract_noun_phrases

    return {n for cap in captions.values() for n in extract_noun_phrases(cap)}


def test_get_classifier_rebuilds_after_new_captions(tmp_path, fresh_classifier_cache, monkeypatch):
    classify = fresh_classifier_cache
    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "cache"))
    enc = CountingEncoder()
    index = _caption_index(tmp_path / "idx", enc, OLD_CAPTIONS)
    clf = classify.get_classifier(enc, str(index))
    assert classify.get_classifier(enc, str(index)) is clf                    # unchanged: shared
    old = {lab.label for row in clf.classify_vectors(enc.encode_texts(["cat", "rocket"]), top=3) for lab in row}
    assert old <= _names_of(OLD_CAPTIONS) and "cat" in old

    _caption_index(index, enc, NEW_CAPTIONS)                                  # re-indexed with new captions
    new_clf = classify.get_classifier(enc, str(index))
    assert new_clf is not clf
    new = {lab.label for row in new_clf.classify_vectors(enc.encode_texts(["dog", "tiger"]), top=3) for lab in row}
    assert new <= _names_of(NEW_CAPTIONS) and {"dog", "tiger"} <= new


def test_server_reload_refreshes_the_caption_classifier(tmp_path, monkeypatch):
    """(d) after the server reloads a re-indexed DIR, /api/classify names from the new captions: the
    reopened engine takes over the previous engine's classifier registry, which rebuilds the stale one."""
    from retrieval.classify.registry import classifiers_of
    from retrieval.engine.engine import Engine
    from server.app import create_app
    from server.common import state

    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "cache"))
    enc = CountingEncoder()
    index = _caption_index(tmp_path / "idx", enc, OLD_CAPTIONS)
    engine = Engine(index, device="cpu")
    engine.embedder.encoders[enc.name] = enc                  # the fake encoder stands in for a loaded model
    classify = classifiers_of(engine)
    app = create_app({"RELOAD_INTERVAL": 0.001}, engine=engine)
    client = app.test_client()

    def labels(image_id):
        resp = client.post("/api/classify", json={"image_id": image_id, "vocabulary": "captions", "k": 3})
        assert resp.status_code == 200, resp.get_json()
        return {lab["label"] for lab in resp.get_json()["labels"]}

    ids = store.read_metadata(index, "shard-00000").column("id").to_pylist()
    assert labels(ids[0]) <= _names_of(OLD_CAPTIONS)
    cached = classify.get_classifier(enc, str(engine.index_dir))

    _caption_index(index, enc, NEW_CAPTIONS)
    time.sleep(0.01)
    assert client.get("/healthz").get_json()["images"] == 3   # this request reloads the index ...
    reopened = state(app)["engine"]
    assert reopened is not engine and classifiers_of(reopened) is classify   # ... which keeps the registry
    assert classify.join(30)                                   # ... that rebuilds the caption classifier
    assert classify.classifier_state(enc.name, str(engine.index_dir)) == "ready"
    assert classify.get_classifier(enc, str(engine.index_dir)) is not cached
    got = labels(ids[0])                                       # row 0 is now the "dog with a boot" image
    assert got <= _names_of(NEW_CAPTIONS) and "dog" in got


def test_large_vocabularies_store_names_in_the_background(tmp_path, fresh_classifier_cache, monkeypatch):
    """Above NAME_STORE_SYNC_MAX names a classifier is not held up by the store: names are embedded on
    demand; the warm-up builds the store after the classifier is in service and switches to it."""
    import functools

    from retrieval.classify import classifier

    classify = fresh_classifier_cache
    monkeypatch.setattr(classifier, "NAME_STORE_SYNC_MAX", 2)
    enc = CountingEncoder()
    path = _names_file(tmp_path)
    cache = tmp_path / "cache"
    cfg = ClassifyConfig(prompts=PROMPTS, k_retrieve=3)
    clf = make_classifier(enc, path, cache_dir=cache, config=cfg)
    assert clf.names.store is None and _store_files(clf.database.dir) == []
    assert [r[0].label for r in clf.classify_vectors(enc.encode_texts(["cat"]), top=1)] == ["cat"]   # on demand
    forced = make_classifier(enc, path, cache_dir=cache, config=cfg, precompute_names=True)
    assert forced.names.store is not None and len(forced.names.store) == 5
    for f in clf.database.dir.glob("names-*"):
        f.unlink()

    classify.make_classifier = functools.partial(make_classifier, config=cfg)   # the warm-up's config
    thread = classify.warm_classifier(enc, str(path), cache_dir=cache)
    thread.join(30)
    warmed = classify.get_classifier(enc, str(path), cache_dir=cache)
    assert warmed.names.store is not None and len(warmed.names.store) == 5    # built after warm-up, in use
    assert classify.classifier_state(enc.name, str(path)) == "ready" and classify.warm_status() == "ready"
    enc.texts.clear()
    assert [r[0].label for r in warmed.classify_vectors(enc.encode_texts(["rocket"]), top=1)] == ["rocket"]
    assert enc.texts == ["rocket"]                                            # only the query: names stored


def test_default_source_reads_the_captions_once_per_indexing_run(tmp_path, fresh_classifier_cache, monkeypatch):
    """default_source (called by every classify / caption-route request) reads an index's captions once,
    and again only after the index is re-indexed."""
    from retrieval.classify import registry, vocab

    classify = fresh_classifier_cache
    monkeypatch.setattr(registry, "MIN_INDEX_CAPTIONS", 2)
    enc = CountingEncoder()
    index = _caption_index(tmp_path / "idx", enc, OLD_CAPTIONS)
    calls = []
    real = vocab.caption_entries
    monkeypatch.setattr(vocab, "caption_entries", lambda d, *a, **k: calls.append(d) or real(d, *a, **k))
    assert classify.default_source(index) == str(index) == classify.default_source(str(index))
    assert len(calls) == 1
    monkeypatch.setattr(registry, "MIN_INDEX_CAPTIONS", 10_000)
    assert classify.default_source(index) == str(index)             # remembered: no new read
    _caption_index(index, enc, NEW_CAPTIONS)                           # re-indexed: read again
    assert classify.default_source(index) == "imagenet21k" and len(calls) == 2
    assert classify.default_source(None) == "imagenet21k"


def test_background_builds_stop_at_exit(tmp_path, fresh_classifier_cache, monkeypatch):
    """At exit (``stop_all_background_builds``, an atexit hook, for every live ``ClassifierRegistry``) a
    warm-up building a text database stops between batches and the hook waits for its thread: the process
    does not end while a thread is inside the model (which aborts: "terminate called without an active
    exception"). Nothing half-built is written."""
    import threading
    import weakref

    import pytest

    from retrieval.classify import registry
    from retrieval.errors import BuildCancelled

    classify = fresh_classifier_cache
    enc = CountingEncoder()
    db = make_classifier(enc, _names_file(tmp_path), cache_dir=tmp_path / "cache",
                         config=ClassifyConfig(prompts=PROMPTS, k_retrieve=3), precompute_names=False).database
    stop = threading.Event()
    stop.set()
    with pytest.raises(BuildCancelled):
        NameStore.build(db, enc, PROMPTS, batch_size=2, stop=stop)
    assert _store_files(db.dir) == []

    # warm-up threads of two registries, each blocked inside a build: the exit hook sets every live
    # registry's stop event and joins their threads
    other = registry.ClassifierRegistry()
    assert classify in registry._LIVE and other in registry._LIVE           # every registry is seen at exit
    monkeypatch.setattr(registry, "_LIVE", weakref.WeakSet([classify, other]))   # (not other tests' ones)
    seen = []

    def slow_build(entered):
        def build(encoder, source, **kw):
            entered.set()
            while True:                       # a long database build, reporting progress per batch
                kw["progress"](1, 10)
                seen.append(1)
                time.sleep(0.01)
        return build

    threads = []
    for reg in (classify, other):
        entered = threading.Event()
        reg.make_classifier = slow_build(entered)
        threads.append(reg.warm_classifier(enc, "imagenet21k"))
        assert entered.wait(10) and threads[-1] in reg._threads
    registry.stop_all_background_builds(timeout=10)
    assert seen and not any(t.is_alive() for t in threads)
    for reg in (classify, other):
        assert reg._threads == set() and reg.classifier_state(enc.name, "imagenet21k") == "failed"
        assert isinstance(reg._warm_errors[(enc.name, "imagenet21k")], BuildCancelled)
