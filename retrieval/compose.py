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

Instruction patterns understood by :func:`parse_instruction` (case-insensitive, with or without
"the same but", "this", "it"): "as a X", "into a X", "make it (a) X", "turn it into X", "change it to
X", "X instead of Y", "replace Y with X", "change Y to X", "but X", "in X" (colour, material, style),
"with X", "without X", "no X", "not X", "minus X", "remove X", and a bare word or phrase (an adjective
→ attribute, anything else → a new object).

Defaults and why (``benchmarks/bench_instruction.py``, figures in ``benchmarks/results/vocabfree.md``;
GeneCIS-style tasks on tinted Fashion-MNIST with conse-effnet-lite0): ``DEFAULT_METHOD = "fused"``
(what ``method="auto"`` means) was best on "change the object, keep the colour" (R@10 0.60 vs
text-only 0.50, image-only 0.28, sum 0.49) and within noise of ``sum`` on colour changes. Weights:
``sum`` 0.5, arithmetic target 1.0, old attribute 0.5, caption 0.7; a grid search on a tuning half
moved held-out R@10 by at most 0.04 (noise at 80 queries), so they were kept. ``compose_query`` itself
keeps ``method="sum"`` as its default for callers that pass only vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoders.base import l2_normalize
from .errors import InvalidQueryError

DEFAULT_INSTRUCTION_WEIGHT = 0.5   # "sum": weight of the instruction vector
ARITHMETIC_WEIGHT = 1.0            # "arithmetic": weight of text(target) added to the unit image vector
OLD_WEIGHT = 0.5                   # weight of text(old) subtracted (arithmetic and caption routes)
CAPTION_WEIGHT = 0.7               # "caption": weight of text(rewritten name) against the image
DEFAULT_METHOD = "fused"
METHODS = ("sum", "arithmetic", "caption", "fused")
PROMPT = "a photo of a {}."

COLOURS = frozenset("""red orange yellow green blue purple violet pink brown black white grey gray silver gold golden
beige turquoise cyan magenta maroon navy cream tan khaki olive teal lavender crimson""".split())
ATTRIBUTES = COLOURS | frozenset("""striped spotted dotted plaid checked floral patterned plain colorful colourful
dark light bright pale shiny matte transparent
leather wooden wood metal metallic plastic glass paper cotton wool woollen woolen denim silk velvet fur furry
big small large little tiny huge tall short long wide narrow thick thin round square
old new vintage modern antique broken clean dirty wet dry
cartoon drawn painted sketch realistic blurry sunny snowy rainy night""".split())


def _strip_articles(text: str) -> str:
    words = text.strip().split()
    while words and words[0] in ("a", "an", "the", "some", "this", "that", "it", "one"):
        words = words[1:]
    return " ".join(words)


def _clean(text: str) -> str:
    text = str(text or "").lower().replace("’", "'")
    text = re.sub(r"[.!?;:\"“”]+", " ", text)
    return " ".join(text.split())


@dataclass
class Instruction:
    """A parsed instruction: ``kind`` is ``replace`` (new object), ``attribute`` (add/change a property),
    ``remove`` (drop something), or ``free`` (anything else)."""

    text: str
    kind: str
    target: str | None = None     # new object / attribute phrase
    old: str | None = None        # what the instruction says it replaces ("instead of Y")
    remove: str | None = None     # what to take away ("without Y", "not Y")
    preposition: str | None = None  # "in" / "with" for attribute phrases kept after the name

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _is_attribute(phrase: str) -> bool:
    words = phrase.split()
    return bool(words) and all(w in ATTRIBUTES or w.endswith("-colored") or w.endswith("-coloured") for w in words)


def _target(text: str, raw: str, *, old: str | None = None, remove: str | None = None) -> Instruction:
    had_article = bool(re.match(r"^(a|an)\s", text))
    phrase = _strip_articles(text)
    if not phrase:
        raise InvalidQueryError(f"instruction {raw!r} names nothing to change")
    kind = "attribute" if (_is_attribute(phrase) and not had_article) else "replace"
    return Instruction(raw, kind, target=phrase, old=old, remove=remove)


def parse_instruction(text: str) -> Instruction:
    """Parse an instruction into what it adds, replaces and removes (patterns in the module docstring)."""
    raw = str(text or "").strip()
    t = _clean(raw)
    if not t:
        raise InvalidQueryError("empty instruction")
    # "this shoe as a boot": drop the subject the user names the query image with
    t = re.sub(r"^(?:this|that|the|my)\s+[a-z-]+(?:\s+[a-z-]+)?\s+(?=(?:as|into|but|in|with|without|instead|not|"
               r"made|now)\b)", "", t)
    t = re.sub(r"^(the same|same|similar|like this|this|it)\s*(,\s*)?(but\s+)?", lambda m: "but " if m.group(3)
               else "", t).strip() or t
    t = re.sub(r"^(but|and|only|just|please)\s+", "", t).strip()
    t = re.sub(r"^(but|and|only|just|please)\s+", "", t).strip()  # "but please ..."
    m = re.match(r"^(.+?)\s+instead\s+of\s+(.+)$", t)
    if m:
        inner = parse_instruction(m.group(1))
        return Instruction(raw, inner.kind if inner.kind != "free" else "replace", target=inner.target,
                           old=_strip_articles(m.group(2)), preposition=inner.preposition)
    m = re.match(r"^(?:replace|swap|substitute)\s+(.+?)\s+(?:with|for|by)\s+(.+)$", t)
    if m:
        return _target(m.group(2), raw, old=_strip_articles(m.group(1)))
    m = re.match(r"^(?:change|turn)\s+(?!it\b|this\b)(.+?)\s+(?:to|into)\s+(.+)$", t)
    if m:
        return _target(m.group(2), raw, old=_strip_articles(m.group(1)))
    m = re.match(r"^(?:without|no|not|minus|remove|drop|less|except)\s+(.+)$", t)
    if m:
        return Instruction(raw, "remove", remove=_strip_articles(m.group(1)))
    m = re.match(r"^(?:as|into|becoming|to be|make it|make this|turn it into|turn this into|change it to|"
                 r"change it into|change this to|change this into|now|but as|it is|it's|is)\s+(.+)$", t)
    if m:
        return _target(m.group(1), raw)
    m = re.match(r"^(in|with|made of|on)\s+(.+)$", t)
    if m:
        phrase = _strip_articles(m.group(2))
        prep = "made of" if m.group(1) == "made of" else m.group(1)
        if prep == "in" and _is_attribute(phrase):
            return Instruction(raw, "attribute", target=phrase)
        return Instruction(raw, "attribute", target=phrase, preposition=prep)
    m = re.match(r"^(?:more|very|extra)\s+(.+)$", t)
    if m:
        return Instruction(raw, "attribute", target=_strip_articles(m.group(1)))
    phrase = _strip_articles(t)
    if len(phrase.split()) <= 3:
        return _target(t, raw)
    return Instruction(raw, "free", target=phrase)


def rewrite_name(name: str, instruction: Instruction | str) -> str:
    """Apply an instruction to a category name: ``("sandal", "as a boot") -> "boot"``,
    ``("sandal", "in red") -> "red sandal"``, ``("sandal", "with straps") -> "sandal with straps"``,
    ``("sandal", "without straps") -> "sandal"`` (the removed part is subtracted as a vector)."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    name = " ".join(str(name or "").split())
    if ins.kind == "replace":
        return ins.target or name
    if ins.kind == "attribute":
        if not name:
            return ins.target or ""
        if ins.preposition:
            return f"{name} {ins.preposition} {ins.target}"
        base = name
        if ins.old:  # "red instead of blue": drop the old attribute from the name
            base = " ".join(w for w in name.split() if w.lower() not in ins.old.split()) or name
        else:        # a new colour replaces the name's colour words
            if _is_attribute(ins.target or "") and set((ins.target or "").split()) & COLOURS:
                base = " ".join(w for w in name.split() if w.lower() not in COLOURS) or name
        return f"{ins.target} {base}"
    if ins.kind == "remove":
        return name or ""
    return f"{name} {ins.target}".strip() if name else (ins.target or "")


# -- vectors ----------------------------------------------------------------------------------------
def _unit(v) -> np.ndarray:
    return l2_normalize(np.asarray(v, dtype=np.float32).reshape(1, -1))[0]


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
                  label: str | None = None, index_dir=None, **_: object) -> np.ndarray:
    """A unit query vector from an image vector and an instruction.

    ``method="sum"`` (the default of this function, kept for callers that pass only vectors):
    ``normalise((1 - w) * image + w * text)``. With ``encoder`` and ``instruction`` given, every
    method of :data:`METHODS` (and ``"auto"`` = :data:`DEFAULT_METHOD`) is available through
    :func:`compose_instruction`; without them, ``arithmetic`` uses ``text_vec`` as the target vector
    and ``caption``/``fused`` fall back to ``sum`` (they need to embed new text). The query image is
    named by ``classifier``, else ``label``, else :func:`retrieval.classify.default_classifier`
    (the captions of ``index_dir`` when it has enough, else the imagenet21k vocabulary).
    """
    method = (method or "sum").lower()
    if method not in METHODS + ("auto",):
        raise InvalidQueryError(f"unknown composition method {method!r}; use one of {', '.join(METHODS)} or auto")
    if method == "sum":
        return compose_sum(image_vec, text_vec, weight)
    if encoder is not None and instruction:
        if classifier is None and label is None:
            classifier = _LazyClassifier(encoder, index_dir)
        return compose_instruction(encoder, image_vec, instruction, method=method, classifier=classifier,
                                   label=label).vector
    if method == "arithmetic":
        return compose_arithmetic(image_vec, text_vec, weight=ARITHMETIC_WEIGHT)
    return compose_sum(image_vec, text_vec, weight)


class _LazyClassifier:
    """The default classifier, built only if the query image must be named."""

    def __init__(self, encoder, index_dir):
        self.encoder, self.index_dir = encoder, index_dir

    def classify_vectors(self, vecs, top=None):
        from .classify import default_classifier

        return default_classifier(self.encoder, self.index_dir).classify_vectors(vecs, top=top)


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
