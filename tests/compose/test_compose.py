"""Instruction-conditioned queries: parsing, rewriting, composition arithmetic, real-encoder sanity."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.compose.compose import (
    METHODS,
    ComposedQuery,
    compose_arithmetic,
    compose_caption,
    compose_instruction,
    compose_query,
    compose_sum,
)
from retrieval.compose.fusion import (
    FUSION_ATTRIBUTE_WEIGHT,
    FUSION_IMAGE_WEIGHT,
    centred_cosine,
    fuse_candidates,
    fusion_plan,
    fusion_scores,
    fusion_text,
)
from retrieval.compose.instructions import parse_instruction, rewrite_name
from retrieval.errors import InvalidQueryError, WarmingUpError
from retrieval.numeric import zscore


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("text, kind, target, old, remove", [
    ("as a boot", "replace", "boot", None, None),
    ("this shoe as a boot", "replace", "boot", None, None),
    ("make it red", "attribute", "red", None, None),
    ("make it a boot", "replace", "boot", None, None),
    ("the same but in red", "attribute", "red", None, None),
    ("boot instead of sandal", "replace", "boot", "sandal", None),
    ("red instead of blue", "attribute", "red", "blue", None),
    ("replace the sandal with a boot", "replace", "boot", "sandal", None),
    ("without straps", "remove", None, None, "straps"),
    ("not striped", "remove", None, None, "striped"),
    ("but red", "attribute", "red", None, None),
    ("in leather", "attribute", "leather", None, None),
    ("Sneaker.", "replace", "sneaker", None, None),
])
def test_parse_instruction(text, kind, target, old, remove):
    ins = parse_instruction(text)
    assert (ins.kind, ins.target, ins.old, ins.remove) == (kind, target, old, remove)


def test_parse_instruction_rejects_empty():
    with pytest.raises(InvalidQueryError):
        parse_instruction("   ")


@pytest.mark.parametrize("name, instruction, expected", [
    ("sandal", "as a boot", "boot"),
    ("sandal", "in red", "red sandal"),
    ("blue sandal", "make it red", "red sandal"),
    ("sandal", "with a strap", "sandal with strap"),
    ("sandal", "without straps", "sandal"),
    ("sandal", "boot instead of sandal", "boot"),
    ("", "in red", "red"),
])
def test_rewrite_name(name, instruction, expected):
    assert rewrite_name(name, instruction) == expected


# -- arithmetic --------------------------------------------------------------------------------------
def test_compose_query_keeps_the_original_signature_and_sum():
    img, txt = np.array([3.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0])
    out = compose_query(img, txt)                       # defaults: weight=0.5, method="sum"
    np.testing.assert_allclose(out, unit([0.5, 0, 0.5]), rtol=1e-6)
    out = compose_query(img, txt, weight=0.25, method="sum")
    np.testing.assert_allclose(out, unit([0.75, 0, 0.25]), rtol=1e-6)
    assert out.dtype == np.float32 and np.linalg.norm(out) == pytest.approx(1.0)
    # arithmetic without an encoder: image + w * text (text_vec is the target; ARITHMETIC_WEIGHT = 2)
    np.testing.assert_allclose(compose_query(img, txt, method="arithmetic"), unit([1, 0, 2]), rtol=1e-6)
    with pytest.raises(InvalidQueryError):
        compose_query(img, txt, method="nonsense")


def test_arithmetic_and_caption_formulas():
    img, tgt, old = np.array([1.0, 0, 0]), np.array([0, 2.0, 0]), np.array([0, 0, 1.0])
    np.testing.assert_allclose(compose_arithmetic(img, tgt, old, weight=1.0, old_weight=0.5),
                               unit([1, 1, -0.5]), rtol=1e-6)
    np.testing.assert_allclose(compose_arithmetic(img, tgt), unit([1, 2, 0.0]), rtol=1e-6)   # default w = 2
    np.testing.assert_allclose(compose_caption(img, tgt, old, weight=0.7, old_weight=0.5),
                               unit([0.3, 0.7, -0.5]), rtol=1e-6)
    np.testing.assert_allclose(compose_sum(img, tgt, 0.5), unit([1, 1, 0]), rtol=1e-6)


class WordEncoder:
    """Each known word is an axis; a text is the normalised sum of its words (prompt words ignored)."""

    name = "words"
    WORDS = ("sandal", "boot", "red", "blue", "strap", "straps", "shoe")
    dim = len(WORDS)

    def encode_texts(self, texts):
        out = np.full((len(texts), self.dim), 1e-6, np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").split():
                if w in self.WORDS:
                    out[i, self.WORDS.index(w)] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def axis(word):
    return WordEncoder().encode_texts([word])[0]


def test_compose_instruction_methods_with_a_label():
    enc = WordEncoder()
    img = unit(axis("sandal") + 0.2 * axis("blue"))
    w = {"arithmetic": 1.0, "old": 0.5, "caption": 0.7}
    arith = compose_instruction(enc, img, "as a boot", method="arithmetic", label="sandal", weights=w)
    np.testing.assert_allclose(arith.vector, unit(img + axis("boot") - 0.5 * axis("sandal")), atol=1e-5)
    cap = compose_instruction(enc, img, "as a boot", method="caption", label="sandal", weights=w)
    assert cap.rewritten == "boot" and cap.label == "sandal"
    np.testing.assert_allclose(cap.vector, unit(0.3 * img + 0.7 * axis("boot")), atol=1e-5)
    fused = compose_instruction(enc, img, "as a boot", method="fused", label="sandal", weights=w)
    np.testing.assert_allclose(fused.vector, unit(arith.vector + cap.vector), atol=1e-5)
    # every method moves the query toward "boot" and away from "sandal"
    for m in METHODS:
        v = compose_instruction(enc, img, "as a boot", method=m, label="sandal").vector
        assert v @ axis("boot") > img @ axis("boot")
        assert v @ axis("sandal") < img @ axis("sandal")
    # "without straps": the removed part is subtracted
    rem = compose_instruction(enc, unit(axis("sandal") + axis("straps")), "without straps", method="caption",
                              label="sandal")
    assert rem.vector @ axis("straps") < 0.1
    # attribute: "in red" -> "red sandal"
    red = compose_instruction(enc, img, "in red", method="caption", label="blue sandal")
    assert red.rewritten == "red sandal" and red.vector @ axis("red") > 0.3


def test_compose_instruction_names_the_image_with_a_classifier():
    from retrieval.classify.classifier import Label
    from retrieval.classify.registry import ClassifierRegistry

    class FakeClassifier:
        def __init__(self):
            self.calls = 0

        def classify_vectors(self, vecs, top=None):
            self.calls += 1
            return [[Label("sandal", 0.9)] for _ in vecs]

    clf = FakeClassifier()
    enc = WordEncoder()
    out = compose_query(axis("sandal"), axis("boot"), method="caption", encoder=enc, instruction="as a boot",
                        classifier=clf)
    assert clf.calls == 1
    np.testing.assert_allclose(out, compose_instruction(enc, axis("sandal"), "as a boot", method="caption",
                                                        label="sandal").vector, atol=1e-6)
    q = compose_instruction(enc, axis("sandal"), "boot instead of sandal", method="arithmetic", classifier=clf)
    assert isinstance(q, ComposedQuery) and clf.calls == 1   # the instruction named the old object itself
    assert set(q.to_json()) == {"method", "instruction", "label", "rewritten"}
    # without a classifier: the default one of the index's registry (what the engine passes), built once
    built = []
    registry = ClassifierRegistry(make=lambda encoder, source, **_: built.append(source) or clf)
    for _ in range(2):
        shared = compose_query(axis("sandal"), axis("boot"), method="caption", encoder=enc,
                               instruction="as a boot", classifiers=registry)
        np.testing.assert_allclose(shared, out, atol=1e-6)
    assert built == ["imagenet21k"] and clf.calls == 3


def test_real_encoder_moves_toward_the_instruction(conse, photos):
    img = conse.encode_images([photos["chelsea"]])[0]
    dog = conse.encode_texts(["a photo of a dog."])[0]
    for method in METHODS:
        v = compose_instruction(conse, img, "as a dog", method=method, label="cat").vector
        assert float(v @ dog) > float(img @ dog) + 0.05, method


@pytest.mark.slow
def test_caption_route_names_the_image_with_the_default_vocabulary(conse, photos):
    """compose_query with an encoder and no classifier names the image from imagenet21k (cached on disk)."""
    img = conse.encode_images([photos["chelsea"]])[0]
    txt = conse.encode_texts(["as a dog"])[0]
    from retrieval.classify.registry import ClassifierRegistry

    q = compose_instruction(conse, img, "as a dog", method="caption",
                            classifier=ClassifierRegistry().default_classifier(conse))
    assert "cat" in (q.label or "").lower() and q.rewritten == "dog"
    out = compose_query(img, txt, method="caption", encoder=conse, instruction="as a dog")
    np.testing.assert_allclose(out, q.vector, atol=1e-5)


# -- fusion ("must match the text AND keep what the image shows") -------------------------------------
def test_zscore_hand_computed():
    np.testing.assert_allclose(zscore([1.0, 2.0, 3.0]), [-1.224744871, 0.0, 1.224744871], rtol=1e-6)
    np.testing.assert_array_equal(zscore([5.0, 5.0]), [0.0, 0.0])   # a constant list carries no evidence
    assert zscore([]).shape == (0,)


def test_centred_cosine_matches_brute_force():
    rng = np.random.default_rng(0)
    cands, q = rng.normal(size=(7, 5)), rng.normal(size=5)
    mu = cands.mean(axis=0)
    expected = [float(unit(c - mu) @ unit(q - mu)) for c in cands]
    np.testing.assert_allclose(centred_cosine(q, cands), expected, rtol=1e-5)
    m2 = rng.normal(size=5)
    np.testing.assert_allclose(centred_cosine(q, cands, m2), [float(unit(c - m2) @ unit(q - m2)) for c in cands],
                               rtol=1e-5)
    # hand case: the shared component (the mean) no longer counts
    cands = np.array([[10.0, 1.0], [10.0, -1.0]])
    np.testing.assert_allclose(centred_cosine([10.0, 1.0], cands), [1.0, -1.0], atol=1e-6)
    assert centred_cosine([1.0, 0.0], np.zeros((0, 2))).shape == (0,)


def test_fusion_scores_need_both_lists():
    # candidate 0: best text, worst image; 1: good on both; 2: best image, worst text
    text, image = np.array([0.9, 0.8, 0.1]), np.array([0.1, 0.8, 0.9])
    z_t, z_i = zscore(text), zscore(image)
    np.testing.assert_allclose(fusion_scores(text, image, weight=0.5), z_t + 0.5 * z_i)
    assert int(np.argmax(fusion_scores(text, image, weight=1.0))) == 1
    assert int(np.argmax(fusion_scores(text, image, weight=0.0))) == 0
    with pytest.raises(ValueError):
        fusion_scores([1.0, 2.0], [1.0])


def test_fuse_candidates_brute_force():
    rng = np.random.default_rng(1)
    tq, tvecs = rng.normal(size=4), rng.normal(size=(6, 4))
    iq, ivecs = rng.normal(size=3), rng.normal(size=(6, 3))
    text = np.array([float(unit(v) @ unit(tq)) for v in tvecs])
    mu = ivecs.mean(axis=0)
    image = np.array([float(unit(v - mu) @ unit(iq - mu)) for v in ivecs])
    expected = (text - text.mean()) / text.std() + 0.35 * (image - image.mean()) / image.std()
    np.testing.assert_allclose(fuse_candidates(tq, tvecs, iq, ivecs, weight=0.35), expected, rtol=1e-5)
    plain = np.array([float(unit(v) @ unit(iq)) for v in ivecs])
    expected = (text - text.mean()) / text.std() + 0.35 * (plain - plain.mean()) / plain.std()
    np.testing.assert_allclose(fuse_candidates(tq, tvecs, iq, ivecs, weight=0.35, centre=False), expected, rtol=1e-5)


@pytest.mark.parametrize("instruction, expected, appearance", [
    ("as a boot", "boot", True),
    ("boot instead of sandal", "boot", True),
    ("in red", "red", False),
    ("with straps", "with straps", False),
    ("without straps", None, True),
    ("a cat sleeping on the sofa at noon today", None, True),
])
def test_fusion_text_and_plan(instruction, expected, appearance):
    assert fusion_text(instruction) == expected
    plan = fusion_plan(instruction)
    assert plan == (appearance, FUSION_IMAGE_WEIGHT if appearance else FUSION_ATTRIBUTE_WEIGHT)
    assert fusion_plan(instruction, {"fusion": 0.1, "fusion_attribute": 0.2})[1] == (0.1 if appearance else 0.2)


def test_compose_instruction_fusion_is_the_text_side():
    enc = WordEncoder()
    img = unit(axis("sandal") + 0.2 * axis("blue"))
    q = compose_instruction(enc, img, "as a boot", method="fusion")
    np.testing.assert_allclose(q.vector, axis("boot"), atol=1e-5)
    np.testing.assert_allclose(q.parts["image"], img, atol=1e-6)
    red = compose_instruction(enc, img, "in red", method="fusion", label="sandal")
    np.testing.assert_allclose(red.vector, axis("red"), atol=1e-5)
    strapped = unit(axis("sandal") + axis("straps"))
    rem = compose_instruction(enc, strapped, "without straps", method="fusion", weights={"old": 1.0})
    np.testing.assert_allclose(rem.vector, unit(strapped - axis("straps")), atol=1e-5)
    # without an encoder, compose_query's fusion is the (unit) instruction vector
    np.testing.assert_allclose(compose_query(img, 3 * axis("boot"), method="fusion"), axis("boot"), atol=1e-6)


def test_caption_route_waits_for_no_one_while_the_database_warms():
    """While loupe serve warms the default classifier of the index's registry (``classifiers``: what the
    engine passes), the caption route answers WarmingUpError (503) at once; fusion needs no classifier and
    still works."""
    import threading

    from retrieval.classify.registry import ClassifierRegistry

    release = threading.Event()
    classifiers = ClassifierRegistry(make=lambda *a, **k: release.wait(30) and None)
    enc = WordEncoder()
    thread = classifiers.warm_classifier(enc, "imagenet21k")
    try:
        with pytest.raises(WarmingUpError):
            compose_query(axis("sandal"), axis("boot"), method="caption", encoder=enc, instruction="as a boot",
                          classifiers=classifiers)
        out = compose_query(axis("sandal"), axis("boot"), method="fusion", encoder=enc, instruction="as a boot",
                            classifiers=classifiers)
        np.testing.assert_allclose(out, axis("boot"), atol=1e-5)
    finally:
        release.set()
        thread.join(30)


def test_pick_image_encoder_prefers_a_general_image_encoder():
    from types import SimpleNamespace

    from retrieval.compose.fusion import pick_image_encoder

    def engine(*entries):
        encoders = {name: SimpleNamespace(supports_text=text, index_type=kind,
                                          modalities=["image", "colour"] if name == "colour-names" else ["image"])
                    for name, text, kind in entries}
        return SimpleNamespace(encoder_names=list(encoders), manifest=SimpleNamespace(encoders=encoders))

    clip = ("clip-vit-b-32", True, "flat")
    assert pick_image_encoder(engine(clip), "clip-vit-b-32") == "clip-vit-b-32"
    assert pick_image_encoder(engine(clip, ("pdq", False, "binary")), "clip-vit-b-32") == "clip-vit-b-32"
    assert pick_image_encoder(engine(clip, ("sscd", False, "flat")), "clip-vit-b-32") == "sscd"
    assert pick_image_encoder(engine(clip, ("sscd", False, "flat"), ("dinov2-small", False, "hnsw")),
                              "clip-vit-b-32") == "dinov2-small"
    # colour-names is not an appearance encoder: it only says which colours an image has
    assert pick_image_encoder(engine(clip, ("colour-names", False, "flat")), "clip-vit-b-32") == "clip-vit-b-32"
    assert pick_image_encoder(engine(clip, ("colour-names", False, "flat"), ("effnet-lite0", False, "flat")),
                              "clip-vit-b-32") == "effnet-lite0"
