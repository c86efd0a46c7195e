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
* ``"fusion"`` — score fusion of two ranked lists, "must match the text AND keep what the image
  shows": the text list ranks by the instruction's words (:func:`fusion_text`: "as a boot" → "boot",
  "in red" → "red") in the text encoder's space; the image list ranks by the query image in an
  image-only encoder's space (e.g. ``effnet-lite0``, ``dinov2-*``: appearance — colour, texture,
  style) for object changes, or in the text encoder's own space for attribute changes (keep *what*
  it is, not how it looks). The top ``FUSION_CANDIDATES`` of each list are pooled and re-scored with
  ``zscore(text cosine) + w * zscore(centred image cosine)`` (:func:`fuse_candidates`; centring on
  the pool mean is the modality-gap / hubness correction). It needs two searches, so it runs in
  :func:`fusion_search` (the engine calls it); as a single vector, ``compose_query`` returns its
  text side. It needs no vocabulary-free naming, hence no ImageNet-21k text database.

Instruction patterns understood by :func:`parse_instruction` (case-insensitive, with or without
"the same but", "this", "it"): "as a X", "into a X", "make it (a) X", "turn it into X", "change it to
X", "X instead of Y", "replace Y with X", "change Y to X", "but X", "in X" (colour, material, style),
"with X", "without X", "no X", "not X", "minus X", "remove X", and a bare word or phrase (an adjective
→ attribute, anything else → a new object).

Defaults and why (``benchmarks/bench_instruction.py``, figures in ``benchmarks/results/vocabfree.md``;
GeneCIS-style tasks on tinted Fashion-MNIST, 300 gallery images, 400 queries per task: weights chosen
by R@1 + R@10 on the first 200, figures from the other 200; conse-effnet-lite0 for text, effnet-lite0
as the image-only encoder): ``DEFAULT_METHOD = "fusion"`` (what ``method="auto"`` means) — on
"change the object, keep the colour" held-out R@1 0.290 / R@10 0.650 vs text-only 0.155 / 0.545 and
image-only 0.045 / 0.240; on "change the colour" 0.165 / 0.600 vs text-only (given the true class
name) 0.145 / 0.545 and image-only 0.095 / 0.545 (within noise there; on the tuning half text-only
was ahead). Fusion weights 0.35 (object changes, image list from the image-only encoder) and 1.5
(attribute changes, image list from the text encoder); arithmetic target 2.0, old attribute 0.5,
caption 0.85 (tuned; were 1.0 / 0.5 / 0.7). ``sum`` keeps 0.5 (the tuning half picked 0.7) because
it is the documented API default of the first composition. ``compose_query`` itself keeps
``method="sum"`` as its default for callers that pass only vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoders.base import l2_normalize
from .errors import InvalidQueryError

DEFAULT_INSTRUCTION_WEIGHT = 0.5   # "sum": weight of the instruction vector
ARITHMETIC_WEIGHT = 2.0            # "arithmetic": weight of text(target) added to the unit image vector
OLD_WEIGHT = 0.5                   # weight of text(old) subtracted (arithmetic and caption routes)
CAPTION_WEIGHT = 0.85              # "caption": weight of text(rewritten name) against the image
FUSION_IMAGE_WEIGHT = 0.35        # "fusion": weight of the image list's z-scores against the text list's
FUSION_ATTRIBUTE_WEIGHT = 1.5     # the same for attribute changes ("in red"), image side from the text encoder
FUSION_CANDIDATES = 100           # "fusion": top-N of each list pooled and re-scored
DEFAULT_METHOD = "fusion"
METHODS = ("sum", "arithmetic", "caption", "fused", "fusion")
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
    and ``caption``/``fused`` fall back to ``sum`` (they need to embed new text). ``fusion`` (and ``auto``)
    returns only the text side of the fusion — the engine's :func:`fusion_search` adds the image list;
    searching with this vector alone is a text-only search. The query image is
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
    if method == "fusion":   # the text side of the fusion: the instruction's own words
        return _unit(text_vec)
    return compose_sum(image_vec, text_vec, weight)


# -- fusion: "must match the text AND keep what the image shows" -----------------------------------
def fusion_text(instruction: Instruction | str) -> str | None:
    """The text side of the ``fusion`` method: what the result must show that the image does not, in
    words — the new object of an object change ("as a boot" → "boot"), the attribute of an attribute
    change ("in red" → "red", "with straps" → "with straps"). None for "without Y" (the text list then
    searches with the image's own vector minus Y) and for free text (the instruction is embedded as it
    is). The query image is not named: what to keep comes from the image list, and a wrong name (the
    offline encoder names Fashion-MNIST images right 12% of the time) would only pull the wrong way."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    if ins.kind == "replace":
        return ins.target
    if ins.kind == "attribute":
        return f"{ins.preposition} {ins.target}" if ins.preposition else ins.target
    return None


def fusion_plan(instruction: Instruction | str, weights: dict[str, float] | None = None) -> tuple[bool, float]:
    """``(appearance, weight)`` of the image list for an instruction. An attribute change ("in red", "in
    leather") must keep *what* the image shows but not how it looks, so its image list comes from the
    text encoder's own (semantic) image vectors (``appearance`` False) with weight
    ``FUSION_ATTRIBUTE_WEIGHT``; every other change keeps the look (colour, style), so its image list
    comes from an image-only encoder when the index has one, with weight ``FUSION_IMAGE_WEIGHT``.
    ``weights`` may override ``fusion`` / ``fusion_attribute``."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    w = {"fusion": FUSION_IMAGE_WEIGHT, "fusion_attribute": FUSION_ATTRIBUTE_WEIGHT} | dict(weights or {})
    if ins.kind == "attribute":
        return False, float(w["fusion_attribute"])
    return True, float(w["fusion"])


def zscore(x) -> np.ndarray:
    """Standardise one list of scores (mean 0, std 1); a constant list becomes all zeros."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def centred_cosine(query, candidates, mean=None) -> np.ndarray:
    """Cosine of each candidate row with ``query`` after subtracting ``mean`` from both (default: the
    candidates' mean). Centring removes what every candidate shares, the direction that dominates raw
    cosines of one encoder (the modality-gap / hubness fix for dual encoders)."""
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if not len(candidates):
        return np.zeros(0, np.float64)
    cands = np.asarray(candidates, dtype=np.float32).reshape(len(candidates), -1)
    mu = cands.mean(axis=0) if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1)
    c = cands - mu
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    qc = q - mu
    qc /= max(float(np.linalg.norm(qc)), 1e-12)
    return (c @ qc).astype(np.float64)


def fusion_scores(text_scores, image_scores, *, weight: float = FUSION_IMAGE_WEIGHT) -> np.ndarray:
    """``zscore(text) + weight * zscore(image)`` over one candidate pool: a candidate must score well on
    both lists to rank high (standardising puts the two encoders' cosines on one scale)."""
    t, i = np.asarray(text_scores, np.float64), np.asarray(image_scores, np.float64)
    if t.shape != i.shape:
        raise ValueError("text and image scores must cover the same candidates")
    return zscore(t) + float(weight) * zscore(i)


def fuse_candidates(text_query, text_vectors, image_query, image_vectors, *,
                    weight: float = FUSION_IMAGE_WEIGHT, centre: bool = True) -> np.ndarray:
    """Fusion scores of a candidate pool: text side = cosine of ``text_query`` with the candidates'
    ``text_vectors`` (the text encoder's space), image side = centred cosine of ``image_query`` with
    the candidates' ``image_vectors`` (an image encoder's space; centred on the pool; ``centre=False``:
    plain cosine, for the benchmark's ablation)."""
    tq = _unit(text_query)
    tv = l2_normalize(np.asarray(text_vectors, dtype=np.float32).reshape(len(text_vectors), -1))
    mean = None if centre else np.zeros(np.asarray(image_query).size, np.float32)
    return fusion_scores(tv @ tq, centred_cosine(image_query, image_vectors, mean), weight=weight)


COPY_DETECTION_ENCODERS = ("sscd",)   # image-only, but tuned to exact copies: a last resort for "appearance"


def pick_image_encoder(engine, text_encoder: str) -> str:
    """The encoder whose similarities say "keeps what the image shows": the index's first float
    image-only encoder (e.g. ``effnet-lite0``, ``dinov2-*``; not the binary ``pdq``; a copy-detection
    encoder such as ``sscd`` only when there is no other), else the text encoder."""
    found = [name for name in engine.encoder_names if name != text_encoder
             and not engine.manifest.encoders[name].supports_text
             and engine.manifest.encoders[name].index_type != "binary"]
    general = [n for n in found if not n.startswith(COPY_DETECTION_ENCODERS)]
    return (general or found or [text_encoder])[0]


def fusion_search(engine, ctx, k: int, *, params=None, filter=None, weights: dict[str, float] | None = None,
                  candidates: int = FUSION_CANDIDATES, image_encoder: str | None = None) -> list:
    """The ``fusion`` method over an index: pool the top-``candidates`` of the text list (``ctx.vector``,
    the instruction's words) and of the image list (the query image in the space :func:`fusion_plan`
    picks: ``image_encoder`` or :func:`pick_image_encoder`, or the text encoder for attribute changes),
    re-score the pool with :func:`fuse_candidates`, return the top-``k`` hits (score = fused score)."""
    from .query import Hit

    appearance, weight = fusion_plan(ctx.instruction, weights)
    img_name = (image_encoder or pick_image_encoder(engine, ctx.encoder)) if appearance else ctx.encoder
    if img_name == ctx.encoder:
        img_q = ctx.image_vector
    elif ctx.image is not None:
        img_q = engine.encoder(img_name).encode_images([ctx.image])[0]
    else:
        shard, row = engine.locate(ctx.image_id)
        img_q = engine._reconstruct(img_name, shard, row)
    n = max(int(candidates), int(k))
    pool: dict[tuple[int, int], Hit] = {}
    for name, vec in ((ctx.encoder, ctx.vector), (img_name, img_q)):
        for h in engine.search_vector(name, vec, min(n, max(engine.count, 1)), params=params, filter=filter):
            pool.setdefault((h.shard, h.row), h)
    hits = list(pool.values())
    if not hits:
        return []
    scores = fuse_candidates(ctx.vector, engine.vectors(ctx.encoder, hits), img_q,
                             engine.vectors(img_name, hits), weight=weight)
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(hits[i].id, float(scores[i]), hits[i].shard, hits[i].row) for i in order]


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
