"""Vocabulary-free image classification, after CaSED (Conti et al., "Vocabulary-free Image
Classification", NeurIPS 2023).

For each image:

1. **Retrieve** the top-``K`` entries of a text database (:mod:`retrieval.classify.vocab`) by image→text
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

Candidate-name vectors ``g(c)`` of the built-in vocabulary and of users' name files are embedded once
for all names of the database and stored next to it (:class:`NameStore`, memory-mapped, keyed by
encoder + prompts + names; see :mod:`retrieval.classify.names`); names not in a store (an index's
caption noun phrases) are embedded on demand. The classifiers a served index shares between requests,
and their background warm-ups, are in its :class:`retrieval.classify.registry.ClassifierRegistry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from retrieval.classify.names import (
    NameEmbedder,
    NameStore,
    database_names,
    name_store,
    stores_names,
)
from retrieval.classify.vocab import EmptyTextDatabaseError, TextDatabase, normalize_name
from retrieval.errors import InvalidQueryError
from retrieval.images import load_image
from retrieval.numeric import l2_normalize

DEFAULT_K_RETRIEVE = 20
DEFAULT_ALPHA = 0.7
DEFAULT_TOP = 5


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


def default_temperature(encoder) -> float:
    scale = getattr(encoder, "logit_scale", None)
    return 1.0 / float(scale) if scale else 0.05


class VocabularyFreeClassifier:
    """Names what is in images using a text database (CaSED). Thread-safe for reads."""

    def __init__(self, encoder, database: TextDatabase, config: ClassifyConfig | None = None, *,
                 name_store: NameStore | bool | None = None):
        """``name_store``: the stored name embeddings to use (:class:`NameStore`); ``None``: the
        database's store for this encoder and prompts if one was built (nothing is embedded here);
        ``False``: none (every name embedded on demand)."""
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
        if name_store is None:
            name_store = NameStore.open(database, encoder, self.names.prompts)
        self.names.store = name_store or None

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


NAME_STORE_SYNC_MAX = 5000      # make_classifier builds a missing store itself up to this many names


def make_classifier(encoder, source, *, cache_dir=None, column: str | None = None,
                    config: ClassifyConfig | None = None, progress=None,
                    precompute_names: bool | None = None) -> VocabularyFreeClassifier:
    """A classifier over the text database ``source`` (see :func:`retrieval.classify.vocab.open_vocabulary`).

    Its stored name embeddings (:class:`NameStore`) are used when they exist. When they are missing,
    ``precompute_names`` decides whether to build them here (databases that :func:`stores_names` only):
    ``None`` (default) for up to ``NAME_STORE_SYNC_MAX`` names (a users' label file: about the cost of
    embedding them on demand), ``True`` always, ``False`` never. The 21k vocabulary has ~37k names × every
    prompt, a one-off job of minutes on a CPU, so it is not built on the request path by default:
    ``loupe serve`` builds it in the background after warm-up
    (:meth:`retrieval.classify.registry.ClassifierRegistry.warm_classifier`), ``loupe classify
    --precompute-names`` in the foreground; names are embedded on demand until then."""
    from retrieval.classify.vocab import open_vocabulary

    db = open_vocabulary(source, encoder, cache_dir=cache_dir, column=column, progress=progress)
    config = config or ClassifyConfig()
    build = stores_names(db) and (precompute_names if precompute_names is not None
                                  else len(database_names(db)) <= NAME_STORE_SYNC_MAX)
    store = name_store(db, encoder, config.prompts, build=bool(build))
    return VocabularyFreeClassifier(encoder, db, config, name_store=store or False)
