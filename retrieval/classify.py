"""Vocabulary-free image classification, after CaSED (Conti et al., "Vocabulary-free Image
Classification", NeurIPS 2023).

For each image:

1. **Retrieve** the top-``K`` entries of a text database (:mod:`retrieval.vocab`) by image→text
   similarity in the encoder's joint space.
2. **Extract candidates**: the names the retrieved entries carry (ImageNet-21k lemmas, or the noun
   phrases of captions), de-duplicated case-insensitively.
3. **Score** every candidate ``c`` with two distributions over the image's candidate set::

       p_img(c) = softmax_c( <f(x), g(c)> / T )          image → candidate name
       p_txt(c) = softmax_c( <t̄, g(c)> / T )             retrieved texts → candidate name
       score(c) = alpha * p_img(c) + (1 - alpha) * p_txt(c)

   where ``f(x)`` is the unit image vector, ``g(c)`` the unit text vector of the candidate name
   (mean over prompt templates), and ``t̄`` the normalised mean of the retrieved entries' vectors
   (CaSED's "caption centroid": the text-to-text support a name gets from what was retrieved).
   The scores sum to 1 over the candidates of one image.

Defaults (see ``benchmarks/results/vocabfree.md``): ``K = 20`` entries (best of 3/5/10/20/40/80), ``alpha = 0.7``,
``T = 1/logit_scale`` for CLIP (0.01) and ``0.05`` for other encoders (ConSE similarities spread over a
wider range); prompts: the encoder's own templates when it has them (ConSE), else
``"a photo of a {}."``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .encoders.base import l2_normalize
from .errors import InvalidQueryError, LoupeError
from .images import load_image
from .vocab import EmptyTextDatabaseError, TextDatabase, normalize_name

DEFAULT_K_RETRIEVE = 20
DEFAULT_ALPHA = 0.7
DEFAULT_TOP = 5
DEFAULT_PROMPTS = ("a photo of a {}.",)


@dataclass
class Label:
    label: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(float(self.score), 6)}


@dataclass
class ClassifyConfig:
    """How candidates are retrieved and scored (CaSED's K, alpha and the softmax temperature)."""

    k_retrieve: int = DEFAULT_K_RETRIEVE
    alpha: float = DEFAULT_ALPHA
    temperature: float | None = None          # None: 1/encoder.logit_scale if it has one, else 0.05
    prompts: Sequence[str] | None = None      # None: encoder.templates if it has them, else DEFAULT_PROMPTS
    top: int = DEFAULT_TOP
    batch_size: int = 32


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / max(float(temperature), 1e-8)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def cased_scores(image_vec: np.ndarray, retrieved_vecs: np.ndarray, name_vecs: np.ndarray, *,
                 alpha: float = DEFAULT_ALPHA, temperature: float = 0.05
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CaSED candidate scores for one image: ``(score, p_img, p_txt)``, each ``[n_candidates]``.

    ``image_vec`` [d]; ``retrieved_vecs`` [k, d] vectors of the retrieved texts; ``name_vecs`` [m, d]
    vectors of the candidate names. All are L2-normalised here.
    """
    if not len(name_vecs):
        empty = np.zeros(0, np.float64)
        return empty, empty, empty
    names = l2_normalize(np.asarray(name_vecs, dtype=np.float32).reshape(len(name_vecs), -1))
    img = l2_normalize(np.asarray(image_vec, dtype=np.float32).reshape(1, -1))[0]
    retrieved = l2_normalize(np.asarray(retrieved_vecs, dtype=np.float32).reshape(-1, names.shape[1]))
    centroid = l2_normalize(retrieved.mean(axis=0, keepdims=True))[0] if len(retrieved) else img
    p_img = softmax(names @ img, temperature)
    p_txt = softmax(names @ centroid, temperature)
    a = float(alpha)
    return a * p_img + (1.0 - a) * p_txt, p_img, p_txt


def candidate_names(names_lists: Iterable[Sequence[str]]) -> list[str]:
    """Candidates of the retrieved entries, in retrieval order, de-duplicated case-insensitively
    (the first spelling is kept, e.g. "Egyptian cat")."""
    seen: dict[str, str] = {}
    for names in names_lists:
        for name in names:
            name = " ".join(str(name).split())
            key = normalize_name(name)
            if key and key not in seen:
                seen[key] = name
    return list(seen.values())


class NameEmbedder:
    """Text vectors of category names (mean over prompt templates), cached per name."""

    def __init__(self, encoder, prompts: Sequence[str] | None = None):
        self.encoder = encoder
        self.prompts = tuple(prompts or getattr(encoder, "templates", None) or DEFAULT_PROMPTS)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, names: Sequence[str]) -> np.ndarray:
        missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if missing:
            texts = [p.format(n) for n in missing for p in self.prompts]
            vecs = np.asarray(self.encoder.encode_texts(texts), np.float32)
            vecs = l2_normalize(vecs.reshape(len(missing), len(self.prompts), -1).mean(axis=1))
            self._cache.update(zip(missing, vecs))
        if not names:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([self._cache[n] for n in names])


def default_temperature(encoder) -> float:
    scale = getattr(encoder, "logit_scale", None)
    return 1.0 / float(scale) if scale else 0.05


class VocabularyFreeClassifier:
    """Names what is in images using a text database (CaSED). Thread-safe for reads."""

    def __init__(self, encoder, database: TextDatabase, config: ClassifyConfig | None = None):
        if not len(database):
            raise EmptyTextDatabaseError(f"text database {database.name!r} is empty")
        if database.encoder_name != encoder.name:
            raise InvalidQueryError(f"text database {database.name!r} was embedded with {database.encoder_name!r}, "
                                    f"not {encoder.name!r}")
        self.encoder = encoder
        self.database = database
        self.config = config or ClassifyConfig()
        self.temperature = self.config.temperature or default_temperature(encoder)
        self.names = NameEmbedder(encoder, self.config.prompts)

    def candidates(self, image_vecs: np.ndarray, k: int | None = None) -> list[tuple[list[str], np.ndarray]]:
        """Per image: (candidate names, vectors of the retrieved entries)."""
        k = k or self.config.k_retrieve
        _, rows = self.database.search(image_vecs, k)
        out = []
        for r in rows:
            r = r[r >= 0]
            out.append((candidate_names(self.database.names[i] for i in r), self.database.vectors[r]))
        return out

    def classify_vectors(self, image_vecs: np.ndarray, top: int | None = None) -> list[list[Label]]:
        """Ranked labels for each image vector (rows of ``image_vecs`` [n, d])."""
        top = top or self.config.top
        image_vecs = l2_normalize(np.asarray(image_vecs, dtype=np.float32).reshape(-1, self.database.dim))
        per_image = self.candidates(image_vecs)
        self.names([n for names, _ in per_image for n in names])  # one batched embedding call
        results = []
        for vec, (names, retrieved) in zip(image_vecs, per_image):
            if not names:
                results.append([])
                continue
            score, _, _ = cased_scores(vec, retrieved, self.names(names), alpha=self.config.alpha,
                                       temperature=self.temperature)
            order = np.argsort(-score, kind="stable")[:top]
            results.append([Label(names[i], float(score[i])) for i in order])
        return results

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Image vectors for PIL images / paths / bytes (each decoded with ``load_image``)."""
        out = []
        bs = max(1, self.config.batch_size)
        for start in range(0, len(images), bs):
            batch = [img if hasattr(img, "mode") else load_image(img) for img in images[start:start + bs]]
            out.append(np.asarray(self.encoder.encode_images(batch), np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.encoder.dim), np.float32)

    def classify(self, images: Sequence[Any], top: int | None = None) -> list[list[Label]]:
        """Ranked labels for each image (PIL / path / bytes); batch mode."""
        images = list(images)
        if not images:
            return []
        return self.classify_vectors(self.embed_images(images), top=top)


def zero_shot_classify(encoder, image_vecs: np.ndarray, classnames: Sequence[str], *, top: int = DEFAULT_TOP,
                       prompts: Sequence[str] | None = None, temperature: float | None = None,
                       name_vectors: np.ndarray | None = None) -> list[list[Label]]:
    """Closed-vocabulary zero-shot baseline: softmax over the similarities to a fixed list of names."""
    if name_vectors is None:
        name_vectors = NameEmbedder(encoder, prompts)(list(classnames))
    t = temperature or default_temperature(encoder)
    probs = softmax(l2_normalize(np.asarray(image_vecs, np.float32)) @ name_vectors.T, t)
    out = []
    for p in probs:
        order = np.argsort(-p, kind="stable")[:top]
        out.append([Label(classnames[i], float(p[i])) for i in order])
    return out


@dataclass
class Prediction:
    image: str
    labels: list[Label] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "labels": [lab.to_json() for lab in self.labels]}


def make_classifier(encoder, source, *, cache_dir=None, column: str | None = None,
                    config: ClassifyConfig | None = None, progress=None) -> VocabularyFreeClassifier:
    """A classifier over the text database ``source`` (see :func:`retrieval.vocab.open_vocabulary`)."""
    from .vocab import open_vocabulary

    db = open_vocabulary(source, encoder, cache_dir=cache_dir, column=column, progress=progress)
    return VocabularyFreeClassifier(encoder, db, config)


MIN_INDEX_CAPTIONS = 50


class WarmingUpError(LoupeError):
    """A text database is still being built or opened in the background (``warm_classifier``)."""

    code = "warming_up"
    http_status = 503


_CLASSIFIERS: dict[tuple[str, str], VocabularyFreeClassifier] = {}
_WARMING: dict[tuple[str, str], threading.Thread] = {}
_WARM_ERRORS: dict[tuple[str, str], BaseException] = {}
_WARMED: set[tuple[str, str]] = set()
_LOCK = threading.Lock()           # guards the dicts above
_BUILD_LOCK = threading.Lock()     # one database build at a time, even under concurrent first requests


def default_source(index_dir=None) -> str:
    """The text database that names query images: the captions of ``index_dir`` when it has at least
    ``MIN_INDEX_CAPTIONS`` of them, else ``imagenet21k``."""
    if index_dir is not None:
        from .vocab import caption_entries

        try:
            if len(caption_entries(index_dir).deduplicated()) >= MIN_INDEX_CAPTIONS:
                return str(index_dir)
        except Exception:  # noqa: BLE001 - an unreadable index falls back to the vocabulary
            pass
    return "imagenet21k"


def get_classifier(encoder, source, *, cache_dir=None, wait: bool = False) -> VocabularyFreeClassifier:
    """The process-wide classifier over ``source`` for ``encoder`` (built once; the text database
    itself is cached on disk by :func:`retrieval.vocab.open_vocabulary`, so a new process only opens
    it). While :func:`warm_classifier` is building it in the background this raises
    :class:`WarmingUpError` (HTTP 503) unless ``wait`` is true."""
    key = (encoder.name, str(source))
    with _LOCK:
        clf = _CLASSIFIERS.get(key)
        thread = _WARMING.get(key)
    if clf is not None:
        return clf
    if thread is not None and thread.is_alive():
        if not wait:
            raise WarmingUpError(f"the {source} text database for {encoder.name} is still being prepared "
                                 "(loupe serve warms it at start-up); retry in a few seconds")
        thread.join()
        with _LOCK:
            clf = _CLASSIFIERS.get(key)
        if clf is not None:
            return clf
    with _BUILD_LOCK:
        with _LOCK:
            clf = _CLASSIFIERS.get(key)
        if clf is None:
            clf = make_classifier(encoder, source, cache_dir=cache_dir)
            with _LOCK:
                _CLASSIFIERS[key] = clf
    return clf


def warm_classifier(encoder, source, *, cache_dir=None, background: bool = True):
    """Open (building and caching on disk the first time) the classifier over ``source`` ahead of the
    first request. ``background``: in a daemon thread (returned); requests that need it meanwhile get
    :class:`WarmingUpError`. Also embeds the names once, so the first request pays no start-up cost."""
    key = (encoder.name, str(source))

    def work():
        try:
            with _BUILD_LOCK:
                with _LOCK:
                    clf = _CLASSIFIERS.get(key)
                if clf is None:
                    clf = make_classifier(encoder, source, cache_dir=cache_dir)
                    clf.classify_vectors(np.asarray(clf.database.vectors[:1], np.float32), top=1)  # warm the code path
                    with _LOCK:
                        _CLASSIFIERS[key] = clf
            with _LOCK:
                _WARM_ERRORS.pop(key, None)
        except BaseException as exc:  # noqa: BLE001 - reported by classifier_state; requests retry the build
            with _LOCK:
                _WARM_ERRORS[key] = exc
        finally:
            with _LOCK:
                _WARMING.pop(key, None)

    with _LOCK:
        _WARMED.add(key)
    if not background:
        work()
        return None
    with _LOCK:
        if key in _CLASSIFIERS or key in _WARMING:
            return _WARMING.get(key)
        thread = threading.Thread(target=work, name=f"loupe-warm-{source}", daemon=True)
        _WARMING[key] = thread
    thread.start()
    return thread


def classifier_state(encoder_name: str, source) -> str:
    """``ready``, ``warming``, ``failed`` (the background build raised; a request retries it) or ``cold``."""
    key = (encoder_name, str(source))
    with _LOCK:
        if key in _CLASSIFIERS:
            return "ready"
        if key in _WARMING:
            return "warming"
        return "failed" if key in _WARM_ERRORS else "cold"


def warm_status() -> str | None:
    """Of every :func:`warm_classifier` call in this process: ``warming`` while one runs, ``failed`` if
    one raised, ``ready`` when all finished, ``None`` when none was started (cheap: for ``/healthz``)."""
    with _LOCK:
        if any(t.is_alive() for t in _WARMING.values()):
            return "warming"
        if _WARM_ERRORS:
            return "failed"
        return "ready" if _WARMED else None


def default_classifier(encoder, index_dir=None, *, cache_dir=None, wait: bool = False) -> VocabularyFreeClassifier:
    """The classifier the caption route of composed queries uses to name a query image (over
    :func:`default_source`); cached per process, see :func:`get_classifier`."""
    return get_classifier(encoder, default_source(index_dir), cache_dir=cache_dir, wait=wait)
