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

Candidate-name vectors ``g(c)`` of the built-in vocabulary and of users' name files are embedded once
for all names of the database and stored next to it (:class:`NameStore`, memory-mapped, keyed by
encoder + prompts + names; see :mod:`retrieval.classify_names`); names not in a store (an index's
caption noun phrases) are embedded on demand. Process-wide classifiers (:func:`get_classifier`) are
rebuilt when their source changes (:func:`source_stamp`: a re-indexed DIR), in the background after a
server reload (:func:`refresh_classifiers`).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from retrieval.classify.names import (
    BuildCancelled,
    NameEmbedder,
    NameStore,
    database_names,
    name_store,
    stores_names,
)
from retrieval.classify.vocab import EmptyTextDatabaseError, TextDatabase, normalize_name
from retrieval.encoders.base import l2_normalize
from retrieval.errors import InvalidQueryError, WarmingUpError
from retrieval.images import load_image

log = logging.getLogger("loupe.classify")

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
    """A classifier over the text database ``source`` (see :func:`retrieval.vocab.open_vocabulary`).

    Its stored name embeddings (:class:`NameStore`) are used when they exist. When they are missing,
    ``precompute_names`` decides whether to build them here (databases that :func:`stores_names` only):
    ``None`` (default) for up to ``NAME_STORE_SYNC_MAX`` names (a users' label file: about the cost of
    embedding them on demand), ``True`` always, ``False`` never. The 21k vocabulary has ~37k names × every
    prompt, a one-off job of minutes on a CPU, so it is not built on the request path by default:
    ``loupe serve`` builds it in the background after warm-up (:func:`warm_classifier`), ``loupe classify
    --precompute-names`` in the foreground; names are embedded on demand until then."""
    from retrieval.classify.vocab import open_vocabulary

    db = open_vocabulary(source, encoder, cache_dir=cache_dir, column=column, progress=progress)
    config = config or ClassifyConfig()
    build = stores_names(db) and (precompute_names if precompute_names is not None
                                  else len(database_names(db)) <= NAME_STORE_SYNC_MAX)
    store = name_store(db, encoder, config.prompts, build=bool(build))
    return VocabularyFreeClassifier(encoder, db, config, name_store=store or False)


def _store_names_later(clf: VocabularyFreeClassifier) -> None:
    """Build the classifier's missing name store (``stores_names`` databases) and switch to it; meanwhile
    requests embed names on demand. Runs in the warm-up thread, after the classifier is in service."""
    if clf.names.store is not None or not stores_names(clf.database):
        return
    log.info("embedding the candidate names of %s once (stored next to it; names are embedded on demand "
             "until this finishes)", clf.database.name)
    try:
        store = name_store(clf.database, clf.encoder, clf.names.prompts, build=True, stop=_STOP)
    except BuildCancelled:
        log.info("stopped embedding the names of %s (exiting); the next start resumes", clf.database.name)
        return
    if store is not None:
        store.vectors = np.array(store.vectors)        # in memory, as warm-up reads an existing store
        clf.names.store = store
        log.info("name store of %s ready: %d names", clf.database.name, len(store))


MIN_INDEX_CAPTIONS = 50


_CLASSIFIERS: dict[tuple[str, str], VocabularyFreeClassifier] = {}
_WARMING: dict[tuple[str, str], threading.Thread] = {}
_WARM_ERRORS: dict[tuple[str, str], BaseException] = {}
_WARMED: set[tuple[str, str]] = set()
_STAMPS: dict[tuple[str, str], Any] = {}    # source_stamp of each classifier's source when it was built
_THREADS: set[threading.Thread] = set()   # every warm-up thread still running (joined at exit)
_STOP = threading.Event()                  # set at exit: background builds stop between batches
_LOCK = threading.Lock()           # guards the dicts above
_BUILD_LOCK = threading.Lock()     # one database build at a time, even under concurrent first requests


_DEFAULT_SOURCES: dict[str, tuple[Any, str]] = {}   # index dir → (source_stamp, answer) of default_source


def default_source(index_dir=None) -> str:
    """The text database that names query images: the captions of ``index_dir`` when it has at least
    ``MIN_INDEX_CAPTIONS`` of them, else ``imagenet21k``. Reading an index's captions costs a pass over
    its metadata, so the answer is remembered per index until it is re-indexed (:func:`source_stamp`)."""
    if index_dir is None:
        return "imagenet21k"
    key = str(index_dir)
    stamp = source_stamp(key)
    with _LOCK:
        known = _DEFAULT_SOURCES.get(key)
    if known is not None and stamp is not None and known[0] == stamp:
        return known[1]
    from retrieval.classify.vocab import caption_entries

    answer = "imagenet21k"
    try:
        if len(caption_entries(index_dir).deduplicated()) >= MIN_INDEX_CAPTIONS:
            answer = key
    except Exception:  # noqa: BLE001 - an unreadable index falls back to the vocabulary
        pass
    with _LOCK:
        _DEFAULT_SOURCES[key] = (stamp, answer)
    return answer


def source_stamp(source) -> tuple | None:
    """What changes when the text database behind ``source`` must be rebuilt: the manifest of an index
    (or text database) directory — a new indexing run replaces it — or a file's mtime and size;
    ``None`` for the built-in vocabularies. A cheap ``stat``: checked on every :func:`get_classifier`."""
    from retrieval.classify.vocab import BUILTIN_VOCABULARIES
    from retrieval.index import store

    src = str(source)
    if src in BUILTIN_VOCABULARIES:
        return None
    path = Path(src).expanduser()
    try:
        if path.is_dir():
            return ("dir", (path / store.MANIFEST).stat().st_mtime_ns)
        st = path.stat()
        return ("file", st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def _fresh(key) -> bool:
    """The cached classifier of ``key`` was built from the current state of its source (``_LOCK`` held)."""
    return key in _CLASSIFIERS and _STAMPS.get(key) == source_stamp(key[1])


def _build(encoder, source, key, cache_dir=None) -> VocabularyFreeClassifier:
    """Build (``_BUILD_LOCK`` held) and register the classifier of ``key`` unless a fresh one is there."""
    with _LOCK:
        if _fresh(key):
            return _CLASSIFIERS[key]
    stamp = source_stamp(source)            # before reading the source: a change while building shows later
    clf = make_classifier(encoder, source, cache_dir=cache_dir, progress=_stop_check)
    with _LOCK:
        _CLASSIFIERS[key] = clf
        _STAMPS[key] = stamp
    return clf


def get_classifier(encoder, source, *, cache_dir=None, wait: bool = False) -> VocabularyFreeClassifier:
    """The process-wide classifier over ``source`` for ``encoder`` (built once; the text database
    itself is cached on disk by :func:`retrieval.vocab.open_vocabulary`, so a new process only opens
    it). While :func:`warm_classifier` is building it in the background this raises
    :class:`WarmingUpError` (HTTP 503) unless ``wait`` is true.

    When the source changed since the classifier was built (:func:`source_stamp`: an index re-indexed
    with new captions, an edited names file) it is rebuilt here — or, while a background refresh
    (:func:`refresh_classifiers`) is under way, the previous one keeps answering until the new one is in."""
    key = (encoder.name, str(source))
    with _LOCK:
        clf = _CLASSIFIERS.get(key)
        fresh = _fresh(key)
        thread = _WARMING.get(key)
    if clf is not None and (fresh or (thread is not None and thread.is_alive() and not wait)):
        return clf
    if thread is not None and thread.is_alive():
        if not wait:
            raise WarmingUpError(f"the {source} text database for {encoder.name} is still being prepared "
                                 "(loupe serve warms it at start-up); retry in a few seconds")
        thread.join()
        with _LOCK:
            if _fresh(key):
                return _CLASSIFIERS[key]
    with _BUILD_LOCK:
        return _build(encoder, source, key, cache_dir)


def warm_classifier(encoder, source, *, cache_dir=None, background: bool = True, store_names: bool = True):
    """Open (building and caching on disk the first time) the classifier over ``source`` ahead of the
    first request, with its stored name embeddings (:class:`NameStore`) read into memory.
    ``background``: in a daemon thread (returned); requests that need it meanwhile get
    :class:`WarmingUpError` — or, when this refreshes a classifier whose source changed, the previous
    classifier. Nothing is done (None) when a classifier built from the source's current state is there.
    ``store_names``: when the database has no name store yet (built-in vocabulary, names file), build it
    in the same thread *after* the classifier is in service (requests embed names on demand until then;
    the 21k vocabulary takes minutes on a CPU, once: later processes open the stored file)."""
    key = (encoder.name, str(source))

    def work():
        try:
            with _BUILD_LOCK:
                with _LOCK:
                    fresh = _fresh(key)
                clf = None
                if not fresh:
                    clf = _build(encoder, source, key, cache_dir)
                    clf.names.touch()
                    clf.classify_vectors(np.asarray(clf.database.vectors[:1], np.float32), top=1)  # warm the code path
            if clf is not None and store_names:
                with _LOCK:                     # in service from here on: requests stop getting 503
                    if _WARMING.get(key) is threading.current_thread():
                        _WARMING.pop(key, None)
                _store_names_later(clf)
            with _LOCK:
                _WARM_ERRORS.pop(key, None)
        except BaseException as exc:  # noqa: BLE001 - reported by classifier_state; requests retry the build
            with _LOCK:
                _WARM_ERRORS[key] = exc
        finally:
            with _LOCK:
                if _WARMING.get(key) is threading.current_thread():
                    _WARMING.pop(key, None)
                _THREADS.discard(threading.current_thread())

    with _LOCK:
        _WARMED.add(key)
    if not background:
        work()
        return None
    with _LOCK:
        if key in _WARMING:
            return _WARMING[key]
        if _fresh(key):
            return None
        thread = threading.Thread(target=work, name=f"loupe-warm-{source}", daemon=True)
        _WARMING[key] = thread
        _THREADS.add(thread)
    thread.start()
    return thread


def _stop_check(done: int, total: int) -> None:
    """``make_classifier``'s progress callback in warm-ups: stops a database build when the process exits."""
    if _STOP.is_set():
        raise BuildCancelled("building the text database was stopped")


@atexit.register
def stop_background_builds(timeout: float = 10.0) -> None:
    """At exit: ask warm-up threads to stop between batches and wait for them (up to ``timeout`` s), so
    the process does not end while one is inside the model (an abort, "terminate called ...")."""
    _STOP.set()
    deadline = time.monotonic() + timeout
    for thread in list(_THREADS):
        thread.join(max(0.0, deadline - time.monotonic()))


def refresh_classifiers(source, *, background: bool = True) -> list:
    """Rebuild the cached classifiers over ``source`` (e.g. an index directory after ``loupe index``
    added captions) whose source changed: in background threads (returned; the previous classifier
    answers until its replacement is ready) or now. The server calls this when it reloads its index."""
    with _LOCK:
        stale = [(key, clf) for key, clf in _CLASSIFIERS.items() if key[1] == str(source) and not _fresh(key)]
    threads = []
    for _key, clf in stale:
        thread = warm_classifier(clf.encoder, source, background=background)
        if thread is not None:
            threads.append(thread)
    return threads


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
