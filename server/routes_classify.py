"""``POST /api/classify``: vocabulary-free labels for an uploaded (or indexed) image.

Request: ``image`` (multipart upload or base64 JSON) or ``image_id``; optional ``k`` (labels, default
5), ``vocabulary`` (``captions`` = the served index's captions, ``imagenet21k``; default: the
captions when the index has at least 50, else imagenet21k), ``encoder``.
Response: ``{"labels": [{"label", "score"}...], "vocabulary", "encoder", "colours": [{"colour", "score"}...]}``
(the image's main colours, :func:`retrieval.colour.naming.top_colours`). While ``loupe serve`` is
still opening (or, the very first time, building) the text database in the background: 503
``{"error": {"code": "warming_up", ...}}``.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from retrieval.colour.naming import describe_colours, top_colours
from retrieval.compose.fusion import colour_encoder
from retrieval.errors import InvalidQueryError, LoupeError
from server.common import get_engine
from server.requests import ClassifyRequest

bp = Blueprint("classify", __name__)

DEFAULT_LABELS = 5


def classifier_source(engine, vocabulary: str | None) -> tuple[str, str]:
    """(source for ``ClassifierRegistry.get_classifier``, vocabulary name reported to the client)."""
    from retrieval.classify.registry import classifiers_of

    if vocabulary in (None, "", "auto"):
        source = classifiers_of(engine).default_source(engine.index_dir)
        return source, ("imagenet21k" if source == "imagenet21k" else "captions")
    if vocabulary not in ("captions", "imagenet21k"):
        raise InvalidQueryError("vocabulary must be 'captions' or 'imagenet21k'")
    return (str(engine.index_dir) if vocabulary == "captions" else vocabulary), vocabulary


def _classifier(engine, encoder_name: str, vocabulary: str | None):
    """The index's shared classifier (built once, kept in the engine's ``ClassifierRegistry``; its text
    database cached on disk); while ``loupe serve`` is still warming it up this raises ``WarmingUpError``
    → 503 ``warming_up``."""
    from retrieval.classify.registry import classifiers_of

    source, vocabulary = classifier_source(engine, vocabulary)
    return classifiers_of(engine).get_classifier(engine.encoder(encoder_name), source), vocabulary


@bp.post("/api/classify")
def api_classify():
    q = ClassifyRequest.parse(request)
    k, vocabulary = q.k, q.vocabulary
    engine = get_engine()
    encoder_name = q.encoder or engine.text_encoder
    if encoder_name is None:
        raise InvalidQueryError("this index has no text-capable encoder to classify with "
                                "(index with conse-effnet-lite0 or clip-vit-b-32)")
    import numpy as np

    if q.image is not None:   # decode (and reject bad images) before any database is opened
        from retrieval.engine.embed import upload_side
        from retrieval.images import load_image

        image = load_image(q.image, min_side=upload_side(encoder_name))   # reduced to what the encoder needs
        vec = engine.encoder(encoder_name).encode_images([image])
        colours = describe_colours([image])[0]
    else:
        vec = engine.vectors(encoder_name, [engine.hit_for_id(encoder_name, q.image_id)])
        colours = _indexed_colours(engine, q.image_id)
    clf, vocabulary = _classifier(engine, encoder_name, vocabulary)
    labels = clf.classify_vectors(np.asarray(vec, np.float32), top=k)[0]
    return jsonify({"labels": [lab.to_json() for lab in labels], "vocabulary": vocabulary,
                    "encoder": encoder_name, "colours": colours})


def _indexed_colours(engine, image_id: str) -> list:
    """An indexed image's colours: its stored colour-names vector (squared: the distribution), else from its
    file; an empty list when the file is gone (the labels come from stored vectors and still answer)."""
    colour_name = colour_encoder(engine)
    if colour_name is not None:
        return top_colours(engine.vectors(colour_name, [engine.hit_for_id(colour_name, image_id)])[0] ** 2)
    try:
        return describe_colours([engine.load_image(image_id)])[0]
    except (LoupeError, OSError):
        return []
