"""Vocabulary-free classification (CaSED): candidates, scoring, text databases, CLI and API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retrieval.classify.classifier import (
    ClassifyConfig,
    VocabularyFreeClassifier,
    candidate_names,
    cased_scores,
    make_classifier,
    zero_shot_classify,
)
from retrieval.classify.vocab import (
    EmptyTextDatabaseError,
    TextDatabase,
    UnknownVocabularyError,
    build_text_database,
    caption_entries,
    ensure_text_database,
    entry_names,
    extract_noun_phrases,
    from_texts,
    imagenet21k_entries,
    open_vocabulary,
    subset_entries,
)
from retrieval.errors import InvalidImageError, LoupeError, WarmingUpError
from retrieval.index import store
from tests._engine_helpers import BagOfWordsEncoder

CAT_WORDS = ("cat", "tabby", "kitten", "feline", "kitty", "tom", "mouser")


def is_cat_like(label: str) -> bool:
    return any(w in label.lower().split() or label.lower().endswith(w) for w in CAT_WORDS)


# -- candidate extraction ------------------------------------------------------------------------
@pytest.mark.parametrize("caption, expected", [
    ("A red fire truck driving on the road.", ["fire truck", "truck", "road"]),
    ("A giraffe.", ["giraffe"]),
    ("Grandma's old rag doll.", ["grandma", "rag doll", "doll"]),
    ("Two flowers.", ["flowers"]),
    ("A girl in a wheelchair.", ["girl", "wheelchair"]),
    ("Excited!", []),
    ("", []),
])
def test_extract_noun_phrases(caption, expected):
    assert extract_noun_phrases(caption) == expected


def test_entry_names_short_lines_are_names():
    assert entry_names("The Coffee Cup") == ["coffee cup"]
    assert entry_names("a small dog sleeping on a big red sofa") == ["dog", "sofa"]


def test_candidate_names_dedupe_case_insensitive_keep_first_spelling():
    assert candidate_names([["Egyptian cat", "cat"], ["egyptian cat", "Cat", "dog"], []]) == \
        ["Egyptian cat", "cat", "dog"]


def test_imagenet21k_entries():
    entries = imagenet21k_entries()
    assert len(entries) == 21843
    i = entries.sources.index("imagenet21k:n02124075")   # Egyptian cat
    assert entries.names[i] == ["Egyptian cat"]
    assert entries.texts[i].startswith("Egyptian cat: ")


# -- CaSED scoring -------------------------------------------------------------------------------
def test_cased_scores_hand_computed():
    image = np.array([1.0, 0.0])
    retrieved = np.array([[1.0, 0.0], [0.0, 1.0]])        # centroid (1, 1)/sqrt(2)
    names = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    score, p_img, p_txt = cased_scores(image, retrieved, names, alpha=0.25, temperature=0.5)
    # p_img = softmax([1, 0, 0.6] / 0.5); p_txt = softmax([s, s, 1.4 s] / 0.5), s = 1/sqrt(2)
    e_img = np.exp(np.array([1.0, 0.0, 0.6]) / 0.5)
    s = 1 / math.sqrt(2)
    e_txt = np.exp(np.array([s, s, 1.4 * s]) / 0.5)
    np.testing.assert_allclose(p_img, e_img / e_img.sum(), rtol=1e-5)
    np.testing.assert_allclose(p_txt, e_txt / e_txt.sum(), rtol=1e-5)
    np.testing.assert_allclose(score, 0.25 * p_img + 0.75 * p_txt, rtol=1e-6)
    assert score.sum() == pytest.approx(1.0)
    # alpha = 1: pure image→name ranking; alpha = 0: the text centroid prefers the "between" name
    assert np.argmax(cased_scores(image, retrieved, names, alpha=1.0, temperature=0.5)[0]) == 0
    assert np.argmax(cased_scores(image, retrieved, names, alpha=0.0, temperature=0.5)[0]) == 2


def test_cased_scores_no_candidates():
    score, _, _ = cased_scores(np.ones(4), np.ones((2, 4)), np.zeros((0, 4)))
    assert score.shape == (0,)


# -- text databases ------------------------------------------------------------------------------
FakeTextEncoder = BagOfWordsEncoder


def test_build_and_reopen_text_database(tmp_path):
    enc = FakeTextEncoder()
    entries = from_texts(["a cat", "a dog", "a coffee cup", "a cat"])  # duplicate merged
    db = build_text_database(tmp_path / "db", enc, entries, name="tiny")
    assert len(db) == 3 and db.names == [["cat"], ["dog"], ["coffee cup"]]
    manifest = store.read_manifest(tmp_path / "db")        # the ordinary index format
    assert manifest.extra["kind"] == "text-database" and manifest.count == 3
    assert store.read_metadata(tmp_path / "db", "shard-00000").column("caption").to_pylist()[0] == "a cat"
    again = TextDatabase(tmp_path / "db")
    np.testing.assert_allclose(again.vectors, db.vectors)
    scores, rows = again.search(enc.encode_texts(["coffee"]), 2)
    assert rows[0][0] == 2


def test_ensure_reuses_and_rebuilds_on_change(tmp_path):
    enc = FakeTextEncoder()
    entries = from_texts(["a cat", "a dog"])
    ensure_text_database(entries, enc, name="t", directory=tmp_path / "db")
    calls = enc.calls
    ensure_text_database(entries, enc, name="t", directory=tmp_path / "db")
    assert enc.calls == calls                     # fingerprint matched: nothing re-embedded
    db = ensure_text_database(from_texts(["a cat", "a rocket"]), enc, name="t", directory=tmp_path / "db")
    assert enc.calls > calls and db.texts == ["a cat", "a rocket"]


def test_empty_text_database_is_an_error(tmp_path):
    enc = FakeTextEncoder()
    with pytest.raises(EmptyTextDatabaseError):
        build_text_database(tmp_path / "db", enc, from_texts(["", "   "]), name="empty")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(EmptyTextDatabaseError):
        open_vocabulary(empty, enc, cache_dir=tmp_path / "cache")
    with pytest.raises(UnknownVocabularyError):
        open_vocabulary("no-such-vocabulary", enc, cache_dir=tmp_path / "cache")


def test_classifier_ranks_with_fake_encoder(tmp_path):
    enc = FakeTextEncoder()
    db = build_text_database(tmp_path / "db", enc, from_texts(["a cat", "a dog", "a coffee cup", "a rocket"]),
                             name="t")
    clf = VocabularyFreeClassifier(enc, db, ClassifyConfig(k_retrieve=2, prompts=("{}",), temperature=0.1))
    labels = clf.classify_vectors(enc.encode_texts(["cat", "rocket sky"]), top=2)
    assert labels[0][0].label == "cat" and labels[1][0].label == "rocket"
    assert all(a.score >= b.score for row in labels for a, b in zip(row, row[1:]))
    assert sum(lab.score for lab in labels[0]) <= 1.0 + 1e-6


def test_table_vocabulary_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    enc = FakeTextEncoder()
    path = tmp_path / "names.parquet"
    pq.write_table(pa.table({"id": [1, 2], "label": ["cat", "boot"]}), path)
    db = open_vocabulary(path, enc, cache_dir=tmp_path / "cache")
    assert db.names == [["cat"], ["boot"]]
    with pytest.raises(LoupeError):
        open_vocabulary(path, enc, cache_dir=tmp_path / "cache", column="nope")


# -- the real offline encoder ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def vocab_subset_db(conse, tmp_path_factory):
    """~700 ImageNet-21k synsets (every 40th, plus a few everyday ones) embedded with conse."""
    entries = imagenet21k_entries()
    extra = {"n02124075", "n02123045", "n02123159", "n07920052", "n04099969", "n02084071", "n03063599"}
    keep = [i for i, s in enumerate(entries.sources) if i % 40 == 0 or s.split(":")[1] in extra]
    return build_text_database(tmp_path_factory.mktemp("vocab") / "db", conse, subset_entries(entries, keep),
                               name="imagenet21k-subset")


def test_chelsea_is_a_cat_with_the_offline_encoder(conse, photos, vocab_subset_db):
    clf = VocabularyFreeClassifier(conse, vocab_subset_db)
    labels = clf.classify([photos["chelsea"], photos["coffee"]], top=3)
    assert is_cat_like(labels[0][0].label), labels[0]
    assert any(w in labels[1][0].label.lower() for w in ("coffee", "espresso", "cup", "mug")), labels[1]
    assert labels[0][0].score > labels[0][1].score


def test_image_that_is_not_an_image(conse, vocab_subset_db):
    clf = VocabularyFreeClassifier(conse, vocab_subset_db)
    with pytest.raises(InvalidImageError):
        clf.classify([b"definitely not an image"])


def test_zero_shot_baseline(conse, photos):
    vec = conse.encode_images([photos["chelsea"]])
    labels = zero_shot_classify(conse, vec, ["cat", "rocket", "coffee mug", "astronaut"], top=2)[0]
    assert labels[0].label == "cat"


@pytest.mark.slow
def test_full_imagenet21k_vocabulary(conse, photos):
    """The whole 21,843-entry vocabulary (embedded once, then cached in ~/.cache/loupe/vocab)."""
    clf = make_classifier(conse, "imagenet21k")
    assert len(clf.database) == 21843
    labels = clf.classify([photos["chelsea"]], top=3)[0]
    assert is_cat_like(labels[0].label), labels


# -- captions of an index, CLI, API -----------------------------------------------------------------
CAPTIONS = {"chelsea": "A tabby cat lying on a rug.", "coffee": "A cup of coffee on a saucer.",
            "rocket": "A rocket launching into the sky.", "astronaut": "An astronaut in a space suit.",
            "camera": "A man holding a camera on a tripod."}


@pytest.fixture
def caption_index(tmp_path, photos, conse):
    from tests._engine_helpers import build_index, image_rows

    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for name in CAPTIONS:
        photos[name].save(folder / f"{name}.jpg")
        paths.append(folder / f"{name}.jpg")
    vecs = conse.encode_images([photos[n] for n in CAPTIONS])
    return build_index(tmp_path / "idx", {"conse-effnet-lite0": vecs}, rows=image_rows(paths, CAPTIONS))


def test_caption_database_of_an_index(caption_index, conse, photos, tmp_path):
    entries = caption_entries(caption_index)
    assert len(entries) == len(CAPTIONS) and ["tabby cat", "cat", "rug"] == entries.names[0]
    clf = make_classifier(conse, caption_index, cache_dir=tmp_path / "cache")
    labels = clf.classify([photos["chelsea"], photos["rocket"]], top=3)
    assert is_cat_like(labels[0][0].label), labels[0]
    assert labels[1][0].label in ("rocket", "sky"), labels[1]


def run_cli(argv, capsys):
    from loupe.cli.main import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_classify_json_shape(tmp_path, photos, conse, capsys, monkeypatch):
    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "cache"))
    vocab = tmp_path / "names.txt"
    vocab.write_text("cat\nrocket\ncoffee mug\nastronaut\nhorse\n")
    for name in ("chelsea", "rocket"):
        photos[name].save(tmp_path / f"{name}.png")
    rc, out, err = run_cli(["classify", "--vocabulary", str(vocab), str(tmp_path / "chelsea.png"),
                            str(tmp_path / "rocket.png"), "-k", "2", "--json", "--encoder", "conse-effnet-lite0",
                            "--device", "cpu"], capsys)
    assert rc == 0, err
    body = json.loads(out)
    assert [p["image"] for p in body["predictions"]] == [str(tmp_path / "chelsea.png"), str(tmp_path / "rocket.png")]
    for p in body["predictions"]:
        assert len(p["labels"]) == 2 and set(p["labels"][0]) == {"label", "score"}
    assert body["predictions"][0]["labels"][0]["label"] == "cat"
    assert body["predictions"][1]["labels"][0]["label"] == "rocket"
    # and each image's main colours, from the colour-names encoder
    from retrieval.colour.naming import top_colours
    from retrieval.encoders import create_encoder

    dists = create_encoder("colour-names", device="cpu").distributions([photos["chelsea"], photos["rocket"]])
    assert [p["colours"] for p in body["predictions"]] == [top_colours(d) for d in dists]


def test_cli_classify_index_captions_and_bad_inputs(tmp_path, caption_index, photos, conse, capsys, monkeypatch):
    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "cache"))
    photos["chelsea"].save(tmp_path / "q.jpg")
    rc, out, err = run_cli(["classify", str(caption_index), str(tmp_path / "q.jpg"), "--device", "cpu"], capsys)
    assert rc == 0, err
    assert str(tmp_path / "q.jpg") in out
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    rc, out, err = run_cli(["classify", str(caption_index), str(bad), "--device", "cpu"], capsys)
    assert rc == 2 and "bad.jpg" in err and err.count("\n") == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    rc, out, err = run_cli(["classify", "--vocabulary", str(empty), str(tmp_path / "q.jpg"),
                            "--encoder", "conse-effnet-lite0", "--device", "cpu"], capsys)
    assert rc == 2 and "empty" in err
    rc, out, err = run_cli(["classify", str(tmp_path / "q.jpg")], capsys)   # neither DIR nor --vocabulary
    assert rc == 2


def engine_ids(index_dir):
    return store.read_metadata(index_dir, "shard-00000").column("id").to_pylist()


def test_api_classify(tmp_path, caption_index, photos, conse, monkeypatch):
    import base64
    import io

    from retrieval.engine.engine import Engine
    from server.app import create_app

    monkeypatch.setenv("LOUPE_CACHE_DIR", str(tmp_path / "cache"))
    app = create_app(engine=Engine(caption_index, device="cpu"))
    client = app.test_client()
    assert "classify" in client.get("/healthz").get_json().get("features", [])
    buf = io.BytesIO()
    photos["chelsea"].save(buf, format="JPEG")
    resp = client.post("/api/classify", json={"image": base64.b64encode(buf.getvalue()).decode(), "k": 2,
                                              "vocabulary": "captions"})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert len(body["labels"]) == 2 and set(body["labels"][0]) == {"label", "score"}
    assert is_cat_like(body["labels"][0]["label"])
    from retrieval.colour.naming import describe_colours
    from retrieval.images import load_image

    assert body["colours"] == describe_colours([load_image(buf.getvalue())])[0]
    # multipart upload, default k
    resp = client.post("/api/classify", data={"image": (io.BytesIO(buf.getvalue()), "q.jpg"),
                                              "vocabulary": "captions"}, content_type="multipart/form-data")
    assert resp.status_code == 200 and 1 <= len(resp.get_json()["labels"]) <= 5
    # bad inputs: not an image, no image, unknown vocabulary
    resp = client.post("/api/classify", json={"image": base64.b64encode(b"nope").decode(), "vocabulary": "captions"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_image"
    assert client.post("/api/classify", json={"k": 3, "vocabulary": "captions"}).status_code == 400
    first = engine_ids(caption_index)[0]
    resp = client.post("/api/classify", json={"image_id": first, "vocabulary": "captions"})
    assert resp.status_code == 200 and is_cat_like(resp.get_json()["labels"][0]["label"])
    assert resp.get_json()["colours"] == describe_colours([Engine(caption_index).load_image(first)])[0]
    # the source file gone: labels still come from the stored vectors, colours are left empty
    Engine(caption_index).source_file(first).unlink()
    resp = client.post("/api/classify", json={"image_id": first, "vocabulary": "captions"})
    assert resp.status_code == 200 and resp.get_json()["labels"] and resp.get_json()["colours"] == []
    resp = client.post("/api/classify", json={"image": base64.b64encode(buf.getvalue()).decode(),
                                              "vocabulary": "klingon"})
    assert resp.status_code == 400


def test_clip_family_encoder_runs_end_to_end(tiny_clip, photos, tmp_path):
    """The CLIP path (open_clip tokenizer, logit-scale temperature) with the tiny random CLIP."""
    from retrieval.classify.classifier import default_temperature
    from retrieval.encoders import create_encoder

    enc = create_encoder(tiny_clip, device="cpu")
    assert default_temperature(enc) == pytest.approx(1.0 / enc.logit_scale)
    db = open_vocabulary(_write(tmp_path / "v.txt", "cat\ndog\na red rocket in the sky\ncoffee cup\n"), enc,
                         cache_dir=tmp_path / "cache")
    assert db.encoder_name == tiny_clip and db.dim == enc.dim
    labels = VocabularyFreeClassifier(enc, db, ClassifyConfig(k_retrieve=3)).classify(
        [photos["chelsea"], photos["rocket"]], top=2)
    assert [len(row) for row in labels] == [2, 2]
    names = {"cat", "dog", "rocket", "sky", "coffee cup"}
    assert all(lab.label in names and 0.0 <= lab.score <= 1.0 for row in labels for lab in row)


def _write(path, text):
    path.write_text(text)
    return path


# -- shared classifiers and the serve-time warm-up --------------------------------------------------
def _blocking_builder(monkeypatch, classify, result):
    """make_classifier that waits for ``release`` (a database build in progress) and counts calls."""
    import threading

    release, calls = threading.Event(), []

    def build(encoder, source, **_):
        calls.append(source)
        assert release.wait(30)
        return result

    monkeypatch.setattr(classify, "make_classifier", build)
    return release, calls


def test_warm_classifier_then_get(fresh_classifier_cache, monkeypatch, conse, vocab_subset_db):
    classify = fresh_classifier_cache
    clf = VocabularyFreeClassifier(conse, vocab_subset_db)
    release, calls = _blocking_builder(monkeypatch, classify, clf)
    assert classify.warm_status() is None and classify.classifier_state(conse.name, "imagenet21k") == "cold"
    thread = classify.warm_classifier(conse, "imagenet21k")
    assert classify.warm_classifier(conse, "imagenet21k") is thread      # one warm-up per database
    assert classify.warm_status() == "warming"
    with pytest.raises(WarmingUpError) as err:
        classify.get_classifier(conse, "imagenet21k")
    assert err.value.http_status == 503 and err.value.code == "warming_up"
    release.set()
    assert classify.get_classifier(conse, "imagenet21k", wait=True) is clf
    thread.join(30)
    assert calls == ["imagenet21k"]                                        # built once, then shared
    assert classify.warm_status() == "ready" and classify.classifier_state(conse.name, "imagenet21k") == "ready"
    assert classify.default_classifier(conse) is clf                       # the caption route shares it


def test_get_classifier_builds_once_without_warm_up(fresh_classifier_cache, monkeypatch, conse, vocab_subset_db):
    classify = fresh_classifier_cache
    clf = VocabularyFreeClassifier(conse, vocab_subset_db)
    release, calls = _blocking_builder(monkeypatch, classify, clf)
    release.set()
    assert classify.get_classifier(conse, "x") is clf and classify.get_classifier(conse, "x") is clf
    assert calls == ["x"]


def test_api_classify_answers_503_while_warming(tmp_path, fresh_classifier_cache, monkeypatch, caption_index,
                                                photos, conse, vocab_subset_db):
    import base64
    import io

    from retrieval.classify.registry import classifiers_of
    from retrieval.engine.engine import Engine
    from server.app import create_app

    classify = fresh_classifier_cache
    release, calls = _blocking_builder(monkeypatch, classify, VocabularyFreeClassifier(conse, vocab_subset_db))
    engine = Engine(caption_index, device="cpu")
    assert engine.cache("classifiers", lambda: classify) is classifiers_of(engine) is classify   # the server's
    app = create_app({"WARM_CLASSIFIER": True}, engine=engine)
    client = app.test_client()
    assert client.get("/healthz").get_json()["classifier"] == "warming"
    buf = io.BytesIO()
    photos["chelsea"].save(buf, format="JPEG")
    payload = {"image": base64.b64encode(buf.getvalue()).decode(), "vocabulary": "imagenet21k"}
    resp = client.post("/api/classify", json=payload)
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "warming_up"
    release.set()
    for _ in range(300):
        if client.get("/healthz").get_json()["classifier"] == "ready":
            break
        import time

        time.sleep(0.1)
    resp = client.post("/api/classify", json=payload)
    assert resp.status_code == 200, resp.get_json()
    assert is_cat_like(resp.get_json()["labels"][0]["label"]) and calls == ["imagenet21k"]
