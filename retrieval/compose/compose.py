"""Instruction-conditioned (composed) queries: an image plus a text instruction, zero-shot.

Methods (``method=``; ``DEFAULT_METHOD`` when the caller does not choose):

* ``"sum"`` — the first composition: ``normalise((1 - w) * image + w * instruction)``.
* ``"arithmetic"`` — vector arithmetic on what the instruction *names*: ``normalise(image
  + w * text(target) - w_old * text(old))``. ``target`` is what the instruction asks for ("boot" in
  "as a boot", "red" in "in red"); ``old`` the attribute it replaces, when it names one ("instead
  of Y", "not Y", "without Y") or, for an object change ("as a boot"), the query image's own class
  from vocabulary-free classification (the "minus the old attribute" variant).
* ``"caption"`` — the caption route: name the query image (vocabulary-free classification,
  :mod:`retrieval.classify`), rewrite the name with the instruction ("sandal" + "as a boot" →
  "boot"; "sandal" + "in red" → "red sandal"; "sandal" + "without straps" → "sandal", straps
  subtracted), embed the rewritten text and fuse it with the image vector:
  ``normalise((1 - w_c) * image + w_c * text(rewritten) - w_old * text(removed))``.
* ``"fused"`` — the normalised mean of the arithmetic and caption vectors.
* ``"fusion"`` — score fusion of ranked lists, "must match the text AND keep what the image shows"
  (:mod:`retrieval.compose.fusion`): the text list ranks by the instruction's words (:func:`fusion_text`:
  "as a boot" → "boot", "in red" → "red") in the text encoder's space; the image list ranks by the query
  image in an image-only encoder's space (e.g. ``effnet-lite0``, ``dinov2-*``: appearance — colour,
  texture, style) for object changes, or in the text encoder's own space for attribute changes (keep
  *what* it is, not how it looks). When the index has the ``colour-names`` encoder
  (:mod:`retrieval.colour.naming`), colour enters as a third score: for an instruction that names a colour
  ("in red", "the same but navy blue", "as a red boot") how much of it each candidate shows (and a
  colour list joins the pool; the image list goes ``COLOUR_CANDIDATES`` deep), for other object changes
  how alike each candidate's colours are to the query image's ("as a boot" keeps the colour). The
  pooled candidates are re-scored with ``zscore(text cosine) + w * zscore(centred image cosine) + w_c *
  zscore(colour)`` (:func:`fuse_candidates`; centring on the pool mean is the modality-gap / hubness
  correction). It needs several searches, so it runs in :func:`fusion_search` (the engine calls it); as
  a single vector, ``compose_query`` returns its text side. It needs no vocabulary-free naming, hence no
  ImageNet-21k text database.

Instruction patterns: :mod:`retrieval.compose.instructions` (:func:`parse_instruction`).

Why a colour model of its own: the offline text encoder cannot tell colours apart (ConSE image
vectors are mixtures of ImageNet class names; its zero-shot colour naming of the tinted gallery is at
chance, and of Tux Paint stamps whose caption names a colour 0.098 top-1 vs 0.094 chance), so without
it no composition can follow "in red". With CLIP the text list carries colour too, and the colour score
adds an explicit, calibrated one.

Defaults and why (``benchmarks/bench_instruction.py``, figures in ``benchmarks/results/vocabfree.md``;
GeneCIS-style tasks on tinted Fashion-MNIST, 300 gallery images, 400 queries per task: weights chosen
by R@1 + R@10 on the first 200, figures from the other 200; conse-effnet-lite0 for text, effnet-lite0
as the image-only encoder, colour-names): ``DEFAULT_METHOD = "fusion"`` (what ``method="auto"``
means) — on "change the object, keep the colour" held-out R@1 0.425 / R@10 0.715 vs text-only 0.155 /
0.545 and image-only 0.045 / 0.240 (0.290 / 0.650 without colour-names); on "change the colour" 0.425 /
0.870 vs text-only (given the true class name) 0.145 / 0.545 and image-only 0.095 / 0.545 (0.165 /
0.615 without colour-names). A fresh query set and a fresh 4-colour gallery (never tuned on) agree
(figures in the results file). Weights: image list 0.35 (object changes) and 2.0 (attribute changes,
image list from the text encoder), colour match 3.0, colour likeness 1.0. The grid search on the
tuning half went to still larger attribute-image and colour weights (3.0 / 6.0, object image 0.15:
the ConSE text list is noise for colours); on the held-out half those scored 0.415 / 0.855 (colour)
and 0.460 / 0.705 (object) against the defaults' 0.425 / 0.870 and 0.425 / 0.715, so the defaults
stay moderate, leaving weight to text encoders that do see colour (CLIP; not measurable offline).
Arithmetic target 2.0, old attribute 0.5, caption 0.85. ``sum`` keeps 0.5 (the tuning half picked 0.7)
because it is the documented API default of the first composition. ``compose_query`` itself keeps
``method="sum"`` as its default for callers that pass only vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.compose.fusion import fusion_text
from retrieval.compose.instructions import Instruction, parse_instruction, rewrite_name
from retrieval.errors import InvalidQueryError
from retrieval.numeric import unit_vector as _unit

DEFAULT_INSTRUCTION_WEIGHT = 0.5   # "sum": weight of the instruction vector
ARITHMETIC_WEIGHT = 2.0            # "arithmetic": weight of text(target) added to the unit image vector
OLD_WEIGHT = 0.5                   # weight of text(old) subtracted (arithmetic and caption routes)
CAPTION_WEIGHT = 0.85              # "caption": weight of text(rewritten name) against the image
DEFAULT_METHOD = "fusion"
METHODS = ("sum", "arithmetic", "caption", "fused", "fusion")
PROMPT = "a photo of a {}."


# -- vectors ----------------------------------------------------------------------------------------
def compose_sum(image_vec, text_vec, weight: float = DEFAULT_INSTRUCTION_WEIGHT) -> np.ndarray:
    """``normalise((1 - w) * image + w * text)``."""
    w = float(weight)
    return _unit((1.0 - w) * _unit(image_vec) + w * _unit(text_vec))


def compose_arithmetic(image_vec, target_vec, old_vec=None, *, weight: float = ARITHMETIC_WEIGHT,
                       old_weight: float = OLD_WEIGHT) -> np.ndarray:
    """``normalise(image + w * target - w_old * old)`` (all inputs unit-normalised first)."""
    v = _unit(image_vec) + float(weight) * _unit(target_vec)
    if old_vec is not None and float(old_weight):
        v = v - float(old_weight) * _unit(old_vec)
    return _unit(v)


def compose_caption(image_vec, rewritten_vec, removed_vec=None, *, weight: float = CAPTION_WEIGHT,
                    old_weight: float = OLD_WEIGHT) -> np.ndarray:
    """``normalise((1 - w) * image + w * text(rewritten) - w_old * text(removed))``."""
    w = float(weight)
    v = (1.0 - w) * _unit(image_vec) + w * _unit(rewritten_vec)
    if removed_vec is not None and float(old_weight):
        v = v - float(old_weight) * _unit(removed_vec)
    return _unit(v)


def compose_query(image_vec: np.ndarray, text_vec: np.ndarray, *, weight: float = DEFAULT_INSTRUCTION_WEIGHT,
                  method: str = "sum", encoder=None, instruction: str | None = None, classifier=None,
                  label: str | None = None, index_dir=None, classifiers=None, **_: object) -> np.ndarray:
    """A unit query vector from an image vector and an instruction.

    ``method="sum"`` (the default of this function, kept for callers that pass only vectors):
    ``normalise((1 - w) * image + w * text)``. With ``encoder`` and ``instruction`` given, every
    method of :data:`METHODS` (and ``"auto"`` = :data:`DEFAULT_METHOD`) is available through
    :func:`compose_instruction`; without them, ``arithmetic`` uses ``text_vec`` as the target vector
    and ``caption``/``fused`` fall back to ``sum`` (they need to embed new text). ``fusion`` (and ``auto``)
    returns only the text side of the fusion — the engine's :func:`fusion_search` adds the image list;
    searching with this vector alone is a text-only search. The query image is
    named by ``classifier``, else ``label``, else the default classifier of ``classifiers`` (the index's
    :class:`retrieval.classify.ClassifierRegistry`, whose warm-up may answer ``WarmingUpError``; without
    one, a registry of this call's own): the captions of ``index_dir`` when it has enough, else the
    imagenet21k vocabulary.
    """
    method = (method or "sum").lower()
    if method not in METHODS + ("auto",):
        raise InvalidQueryError(f"unknown composition method {method!r}; use one of {', '.join(METHODS)} or auto")
    if method == "sum":
        return compose_sum(image_vec, text_vec, weight)
    if encoder is not None and instruction:
        if classifier is None and label is None:
            classifier = _LazyClassifier(encoder, index_dir, classifiers)
        return compose_instruction(encoder, image_vec, instruction, method=method, classifier=classifier,
                                   label=label).vector
    if method == "arithmetic":
        return compose_arithmetic(image_vec, text_vec, weight=ARITHMETIC_WEIGHT)
    if method == "fusion":   # the text side of the fusion: the instruction's own words
        return _unit(text_vec)
    return compose_sum(image_vec, text_vec, weight)


class _LazyClassifier:
    """The default classifier of ``classifiers`` (a ``ClassifierRegistry``; None: a new one), taken only
    if the query image must be named."""

    def __init__(self, encoder, index_dir, classifiers=None):
        self.encoder, self.index_dir, self.classifiers = encoder, index_dir, classifiers

    def classify_vectors(self, vecs, top=None):
        from retrieval.classify.registry import ClassifierRegistry

        classifiers = self.classifiers if self.classifiers is not None else ClassifierRegistry()
        return classifiers.default_classifier(self.encoder, self.index_dir).classify_vectors(vecs, top=top)


@dataclass
class ComposedQuery:
    vector: np.ndarray
    method: str
    instruction: Instruction
    label: str | None = None          # the query image's name (caption route / old object)
    rewritten: str | None = None      # the rewritten name searched for (caption route)
    parts: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "instruction": self.instruction.to_json(), "label": self.label,
                "rewritten": self.rewritten}


class _TextVectors:
    def __init__(self, encoder, prompt: str = PROMPT):
        self.encoder, self.prompt, self.cache = encoder, prompt, {}

    def __call__(self, phrase: str | None, *, prompt: bool = True) -> np.ndarray | None:
        if not phrase:
            return None
        text = self.prompt.format(phrase) if prompt else phrase
        if text not in self.cache:
            self.cache[text] = _unit(self.encoder.encode_texts([text])[0])
        return self.cache[text]


def name_image(classifier, image_vec) -> str | None:
    """The top vocabulary-free label of an image vector, or None without a classifier."""
    if classifier is None:
        return None
    labels = classifier.classify_vectors(np.asarray(image_vec, np.float32).reshape(1, -1), top=1)[0]
    return labels[0].label if labels else None


def compose_instruction(encoder, image_vec, instruction: str | Instruction, *, method: str = DEFAULT_METHOD,
                        classifier=None, label: str | None = None, weights: dict[str, float] | None = None,
                        text_vectors=None) -> ComposedQuery:
    """Compose an image vector with an instruction using ``method`` (see the module docstring).

    ``classifier``: a :class:`retrieval.classify.VocabularyFreeClassifier` naming the query image
    (caption route; the old object of arithmetic); ``label`` gives the name directly instead.
    ``weights`` overrides ``sum``/``arithmetic``/``old``/``caption`` weights (benchmarks tune them).
    """
    method = (method or DEFAULT_METHOD).lower()
    if method == "auto":
        method = DEFAULT_METHOD
    if method not in METHODS:
        raise InvalidQueryError(f"unknown composition method {method!r}; use one of {', '.join(METHODS)} or auto")
    w = {"sum": DEFAULT_INSTRUCTION_WEIGHT, "arithmetic": ARITHMETIC_WEIGHT, "old": OLD_WEIGHT,
         "caption": CAPTION_WEIGHT} | dict(weights or {})
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    tv = text_vectors or _TextVectors(encoder)
    img = _unit(image_vec)
    if method == "sum":
        return ComposedQuery(compose_sum(img, tv(ins.text, prompt=False), w["sum"]), method, ins)
    if method == "fusion":   # the text list's query; the image list is searched by fusion_search
        text = fusion_text(ins)
        vec = tv(text) if text else None
        if ins.remove:   # "without Y": the image in the text encoder's space minus Y
            vec = _unit(img - w["old"] * tv(ins.remove))
        if vec is None:
            vec = tv(ins.text, prompt=False)
        return ComposedQuery(vec, method, ins, label=label, rewritten=text, parts={"text": vec, "image": img})
    if label is None and (method in ("caption", "fused") or (ins.kind == "replace" and not ins.old)):
        label = name_image(classifier, img)
    parts: dict[str, np.ndarray] = {}
    rewritten = None
    if method in ("arithmetic", "fused"):
        target = ins.target if ins.kind != "remove" else None
        if ins.kind == "attribute" and ins.preposition:
            target = f"{ins.preposition} {ins.target}"
        old = ins.old or ins.remove or (label if ins.kind == "replace" else None)
        tvec = tv(target) if target else None
        ovec = tv(old) if old else None
        if tvec is None:  # "without Y": only the subtraction
            v = img - w["old"] * ovec if ovec is not None else img
            parts["arithmetic"] = _unit(v)
        else:
            parts["arithmetic"] = compose_arithmetic(img, tvec, ovec, weight=w["arithmetic"], old_weight=w["old"])
    if method in ("caption", "fused"):
        rewritten = rewrite_name(label or "", ins) or None
        if rewritten:
            removed = tv(ins.remove) if ins.remove else None
            parts["caption"] = compose_caption(img, tv(rewritten), removed, weight=w["caption"], old_weight=w["old"])
        else:  # nothing to name the image with and nothing to rewrite: the plain sum
            parts["caption"] = compose_sum(img, tv(ins.text, prompt=False), w["sum"])
    vector = parts[method] if method in parts else _unit(sum(parts.values()))
    return ComposedQuery(vector, method, ins, label=label, rewritten=rewritten, parts=parts)
