"""The ``fusion`` composition: "must match the text AND keep what the image shows", as two (or three) ranked
lists pooled and re-scored (see :mod:`retrieval.compose` for the methods and why these defaults).

* text list: the instruction's words (:func:`fusion_text`) in the text encoder's space;
* image list: the query image in an image-only encoder's space for changes that keep the look, or in the
  text encoder's own space for attribute changes (:func:`fusion_plan`);
* colour (an index with the ``colour-names`` encoder, :mod:`retrieval.colour.naming`): for an instruction that
  names a colour, how much of it each candidate shows, plus a colour list of its own; for object changes,
  how alike each candidate's colours are to the query image's (:func:`colour_plan`).

Pool scores: ``zscore(text) + w_image * zscore(centred image cosine) + w_colour * zscore(colour)``
(:func:`fuse_candidates`).

Plain text queries that name a colour ("a red dress") get the same colour channel on such an index
(:func:`colour_text_search`, called by the engine): text list and colour list pooled,
``zscore(text) + TEXT_COLOUR_WEIGHT * zscore(colour)``; the weight (1.0) was the best of 0.25–3 on one
tinted Fashion-MNIST gallery and is reported on another and on Tux Paint captions
(``benchmarks/bench_colour_search.py``).
"""

from __future__ import annotations

import re

import numpy as np

from retrieval.compose.instructions import COLOURS, Instruction, parse_instruction
from retrieval.numeric import l2_normalize, unit_vector, zscore

FUSION_IMAGE_WEIGHT = 0.35        # "fusion": weight of the image list's z-scores against the text list's
FUSION_ATTRIBUTE_WEIGHT = 2.0     # the same for attribute changes ("in red"), image side from the text encoder
FUSION_CANDIDATES = 100           # "fusion": top-N of each list pooled and re-scored
FUSION_COLOUR_WEIGHT = 3.0        # colour changes ("in red"): weight of zscore(colour match), colour-names index
FUSION_KEEP_COLOUR_WEIGHT = 1.0   # other changes: weight of zscore(colour likeness to the query image)
TEXT_COLOUR_WEIGHT = 1.0          # text queries naming a colour ("a red dress"): weight of zscore(colour match)
COLOUR_CANDIDATES = 400           # colour changes: depth of the image list (the new colour is rarer in its top)


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


_COLOUR_MODIFIERS = frozenset("light dark pale bright deep pastel dusty vivid neon".split())


def instruction_colour(instruction: Instruction | str) -> str | None:
    """The colour an instruction asks the results to have, as a phrase, or None: the colour words of an
    attribute change ("in navy blue" → "navy blue", "red" → "red") or of a new object ("as a red boot"
    → "red"). Materials that happen to be colour names in the survey ("in leather") are not colours."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    if ins.kind not in ("attribute", "replace") or not ins.target or ins.preposition == "with":
        return None
    return colour_words(ins.target)


def colour_words(text: str) -> str | None:
    """The colour words of a phrase, as a colour phrase ("a dark red car" → "dark red"), or None. Only the
    colour vocabulary counts (basic terms and common names such as navy, teal, gold, with light/dark/pale
    modifiers), not every survey name ("leather", "banana" are things first)."""
    from retrieval.colour import naming as colour

    words = re.findall(r"[a-z]+", str(text or "").lower().replace("-coloured", "").replace("-colored", ""))
    picked = [w for w in words if w in COLOURS or (w in _COLOUR_MODIFIERS and any(x in COLOURS for x in words))]
    phrase = " ".join(dict.fromkeys(picked))
    return phrase if phrase and colour.is_colour_phrase(phrase) else None


def text_colour(ctx) -> str | None:
    """The colour a plain text query names ("a red dress" → "red"), or None: only single-string or
    all-positive weighted queries (a subtracted term's colour is not wanted)."""
    if ctx.text is None or ctx.instruction is not None or ctx.image_vector is not None:
        return None
    if ctx.terms and any(w <= 0 for w, _ in ctx.terms):
        return None
    return colour_words(ctx.text)


def colour_text_scores(text_scores, colour_scores, *, weight: float = TEXT_COLOUR_WEIGHT) -> np.ndarray:
    """``zscore(text cosine) + weight * zscore(colour match)`` over one candidate pool."""
    return zscore(text_scores) + float(weight) * zscore(colour_scores)


def colour_text_search(engine, ctx, phrase: str, k: int, *, params=None, filter=None,
                       weight: float = TEXT_COLOUR_WEIGHT, candidates: int = FUSION_CANDIDATES) -> list:
    """A text query that names a colour, on an index with ``colour-names``: the text list (``COLOUR_CANDIDATES``
    deep) and the colour list of the phrase pooled and re-scored ``zscore(text cosine) + weight *
    zscore(colour match)``. "a red dress" must be a dress and be red; a text encoder that cannot see
    colour (the offline ConSE) finds the dresses, the colour names pick the red ones."""
    from retrieval.types import Hit

    col_name = colour_encoder(engine)
    col_q = engine.embed_texts(col_name, [phrase])[0]
    n = max(int(candidates), int(k))
    pool: dict[tuple[int, int], Hit] = {}
    for name, vec, depth in ((ctx.encoder, ctx.vector, max(n, COLOUR_CANDIDATES)), (col_name, col_q, n)):
        for h in engine.search_vector(name, vec, min(depth, max(engine.count, 1)), params=params, filter=filter):
            pool.setdefault((h.shard, h.row), h)
    hits = list(pool.values())
    if not hits:
        return []
    tv = l2_normalize(engine.vectors(ctx.encoder, hits))
    scores = colour_text_scores(tv @ unit_vector(ctx.vector), engine.vectors(col_name, hits) @ col_q, weight=weight)
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(hits[i].id, float(scores[i]), hits[i].shard, hits[i].row) for i in order]


def colour_plan(instruction: Instruction | str, weights: dict[str, float] | None = None
                ) -> tuple[str | None, float]:
    """How the colour-names scores enter a fusion: ``(phrase, weight)`` — for an instruction that names
    a colour, candidates are scored by how much of that colour they show (``FUSION_COLOUR_WEIGHT``); for
    other changes of object or of what is there (``phrase`` None), by how alike their colours are to the
    query image's (``FUSION_KEEP_COLOUR_WEIGHT``: "as a boot" keeps the colour); attribute changes that
    are not colours ("in leather") and free text get weight 0. ``weights`` may override ``colour`` /
    ``keep_colour``."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    w = {"colour": FUSION_COLOUR_WEIGHT, "keep_colour": FUSION_KEEP_COLOUR_WEIGHT} | dict(weights or {})
    phrase = instruction_colour(ins)
    if phrase:
        return phrase, float(w["colour"])
    if ins.kind in ("replace", "remove"):
        return None, float(w["keep_colour"])
    return None, 0.0


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
                    weight: float = FUSION_IMAGE_WEIGHT, centre: bool = True, colour_query=None,
                    colour_vectors=None, colour_weight: float = 0.0) -> np.ndarray:
    """Fusion scores of a candidate pool: text side = cosine of ``text_query`` with the candidates'
    ``text_vectors`` (the text encoder's space), image side = centred cosine of ``image_query`` with
    the candidates' ``image_vectors`` (an image encoder's space; centred on the pool; ``centre=False``:
    plain cosine, for the benchmark's ablation). With ``colour_query`` (a colour-names vector: a
    phrase's, or the query image's) and the candidates' ``colour_vectors``, ``colour_weight *
    zscore(colour_vectors @ colour_query)`` is added (Bhattacharyya coefficients of colour distributions)."""
    tq = unit_vector(text_query)
    tv = l2_normalize(np.asarray(text_vectors, dtype=np.float32).reshape(len(text_vectors), -1))
    mean = None if centre else np.zeros(np.asarray(image_query).size, np.float32)
    scores = fusion_scores(tv @ tq, centred_cosine(image_query, image_vectors, mean), weight=weight)
    if colour_query is not None and colour_vectors is not None and float(colour_weight):
        cv = np.asarray(colour_vectors, dtype=np.float32).reshape(len(scores), -1)
        scores = scores + float(colour_weight) * zscore(cv @ np.asarray(colour_query, np.float32).reshape(-1))
    return scores


COPY_DETECTION_ENCODERS = ("sscd",)   # image-only, but tuned to exact copies: a last resort for "appearance"


def pick_image_encoder(engine, text_encoder: str) -> str:
    """The encoder whose similarities say "keeps what the image shows": the index's first float
    image-only encoder (e.g. ``effnet-lite0``, ``dinov2-*``; not the binary ``pdq``; a copy-detection
    encoder such as ``sscd`` only when there is no other), else the text encoder."""
    found = [name for name in engine.encoder_names if name != text_encoder
             and not engine.manifest.encoders[name].supports_text
             and "colour" not in engine.manifest.encoders[name].modalities
             and engine.manifest.encoders[name].index_type != "binary"]
    general = [n for n in found if not n.startswith(COPY_DETECTION_ENCODERS)]
    return (general or found or [text_encoder])[0]


def fusion_search(engine, ctx, k: int, *, params=None, filter=None, weights: dict[str, float] | None = None,
                  candidates: int = FUSION_CANDIDATES, image_encoder: str | None = None) -> list:
    """The ``fusion`` method over an index: pool the top-``candidates`` of the text list (``ctx.vector``,
    the instruction's words) and of the image list (the query image in the space :func:`fusion_plan`
    picks: ``image_encoder`` or :func:`pick_image_encoder`, or the text encoder for attribute changes),
    re-score the pool with :func:`fuse_candidates`, return the top-``k`` hits (score = fused score)."""
    from retrieval.types import Hit

    appearance, weight = fusion_plan(ctx.instruction, weights)
    img_name = (image_encoder or pick_image_encoder(engine, ctx.encoder)) if appearance else ctx.encoder
    img_q = _query_image_vector(engine, ctx, img_name)
    col_name = colour_encoder(engine)
    phrase, col_weight = colour_plan(ctx.instruction, weights) if col_name else (None, 0.0)
    col_q = None
    if col_weight:
        col_q = (engine.embed_texts(col_name, [phrase])[0] if phrase
                 else _query_image_vector(engine, ctx, col_name))
    n = max(int(candidates), int(k))
    lists = [(ctx.encoder, ctx.vector, n), (img_name, img_q, max(n, COLOUR_CANDIDATES) if phrase else n)]
    if phrase and col_q is not None:
        lists.append((col_name, col_q, n))
    pool: dict[tuple[int, int], Hit] = {}
    for name, vec, depth in lists:
        for h in engine.search_vector(name, vec, min(depth, max(engine.count, 1)), params=params, filter=filter):
            pool.setdefault((h.shard, h.row), h)
    # an instruction asks for a change: the query image itself (an indexed id, or uploaded bytes identical to
    # an indexed file) is not an answer (as in GeneCIS, where the reference image is never a target)
    itself = {ctx.image_id, getattr(ctx, "upload_id", None)} - {None}
    hits = [h for h in pool.values() if h.id not in itself]
    if not hits:
        return []
    scores = fuse_candidates(ctx.vector, engine.vectors(ctx.encoder, hits), img_q,
                             engine.vectors(img_name, hits), weight=weight, colour_query=col_q,
                             colour_vectors=engine.vectors(col_name, hits) if col_q is not None else None,
                             colour_weight=col_weight)
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(hits[i].id, float(scores[i]), hits[i].shard, hits[i].row) for i in order]


def colour_encoder(engine) -> str | None:
    """The index's colour-names encoder (modality ``colour``), or None."""
    return next((name for name in engine.encoder_names if "colour" in engine.manifest.encoders[name].modalities),
                None)


def _query_image_vector(engine, ctx, name: str):
    """The query image in encoder ``name``'s space: the context's own vector, a fresh encoding of an
    uploaded image, or the stored vector of an indexed one."""
    if name == ctx.encoder:
        return ctx.image_vector
    if ctx.image is not None:
        return engine.encoder(name).encode_images([ctx.image])[0]
    return engine.stored_vector(name, ctx.image_id)
