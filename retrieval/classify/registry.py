"""The classifiers of one index and their warm-ups: per-index state owned by the engine.

A :class:`ClassifierRegistry` holds the classifiers built over text databases (keyed by encoder and
source), their background warm-ups and build errors, the :func:`source_stamp` each was built from, and
the answer of :meth:`~ClassifierRegistry.default_source` per index. A served index has one, kept in its
engine (:func:`classifiers_of`: ``engine.cache("classifiers", ClassifierRegistry)``); a reopened engine
takes over the previous one's (:func:`share_classifiers`) so that its classifiers keep answering while
:meth:`~ClassifierRegistry.refresh_classifiers` rebuilds the stale ones in the background. Callers
without an engine make their own registry.

A classifier is rebuilt when its source changed (:func:`source_stamp`: a re-indexed DIR, an edited names
file). At process exit every live registry's background builds stop between batches
(:func:`stop_all_background_builds`, an ``atexit`` hook).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval.classify.classifier import VocabularyFreeClassifier, make_classifier
from retrieval.classify.names import BuildCancelled, name_store, stores_names
from retrieval.errors import WarmingUpError

__all__ = ["ClassifierRegistry", "classifiers_of", "share_classifiers", "source_stamp",
           "stop_all_background_builds", "MIN_INDEX_CAPTIONS"]

log = logging.getLogger("loupe.classify")

MIN_INDEX_CAPTIONS = 50
CLASSIFIERS_KEY = "classifiers"           # the registry's key in ``Engine.cache``

Key = tuple[str, str]                     # (encoder name, source)

_LIVE: "weakref.WeakSet[ClassifierRegistry]" = weakref.WeakSet()   # for the exit hook (a warm-up keeps its own alive)


def source_stamp(source) -> tuple | None:
    """What changes when the text database behind ``source`` must be rebuilt: the manifest of an index
    (or text database) directory — a new indexing run replaces it — or a file's mtime and size;
    ``None`` for the built-in vocabularies. A cheap ``stat``: checked on every ``get_classifier``."""
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


class ClassifierRegistry:
    """Classifiers shared by the requests of one index, built once per (encoder, source) and warmed up in
    background threads. Thread-safe.

    ``make``: how a classifier is built (kept as ``self.make_classifier``), called as
    ``make(encoder, source, cache_dir=..., progress=...)``; default
    :func:`retrieval.classify.classifier.make_classifier` (tests pass a fake)."""

    def __init__(self, make: Callable[..., VocabularyFreeClassifier] | None = None):
        self.make_classifier = make or make_classifier
        self._classifiers: dict[Key, VocabularyFreeClassifier] = {}
        self._stamps: dict[Key, Any] = {}      # source_stamp of each classifier's source when it was built
        self._warming: dict[Key, threading.Thread] = {}
        self._warm_errors: dict[Key, BaseException] = {}
        self._warmed: set[Key] = set()
        self._threads: set[threading.Thread] = set()   # every warm-up thread still running (joined at exit)
        self._default_sources: dict[str, tuple[Any, str]] = {}   # index dir → (source_stamp, answer)
        self._stop = threading.Event()        # set at exit: background builds stop between batches
        self._lock = threading.Lock()         # guards the dicts above
        self._build_lock = threading.Lock()   # one database build at a time, even under concurrent first requests
        _LIVE.add(self)

    # -- which database names an index's images ------------------------------------------------------
    def default_source(self, index_dir=None) -> str:
        """The text database that names query images: the captions of ``index_dir`` when it has at least
        ``MIN_INDEX_CAPTIONS`` of them, else ``imagenet21k``. Reading an index's captions costs a pass over
        its metadata, so the answer is remembered per index until it is re-indexed (:func:`source_stamp`)."""
        if index_dir is None:
            return "imagenet21k"
        key = str(index_dir)
        stamp = source_stamp(key)
        with self._lock:
            known = self._default_sources.get(key)
        if known is not None and stamp is not None and known[0] == stamp:
            return known[1]
        from retrieval.classify.vocab import caption_entries

        answer = "imagenet21k"
        try:
            if len(caption_entries(index_dir).deduplicated()) >= MIN_INDEX_CAPTIONS:
                answer = key
        except Exception:  # noqa: BLE001 - an unreadable index falls back to the vocabulary
            pass
        with self._lock:
            self._default_sources[key] = (stamp, answer)
        return answer

    # -- shared classifiers --------------------------------------------------------------------------
    def _fresh(self, key: Key) -> bool:
        """The cached classifier of ``key`` was built from the current state of its source (lock held)."""
        return key in self._classifiers and self._stamps.get(key) == source_stamp(key[1])

    def _build(self, encoder, source, key: Key, cache_dir=None) -> VocabularyFreeClassifier:
        """Build (build lock held) and register the classifier of ``key`` unless a fresh one is there."""
        with self._lock:
            if self._fresh(key):
                return self._classifiers[key]
        stamp = source_stamp(source)            # before reading the source: a change while building shows later
        clf = self.make_classifier(encoder, source, cache_dir=cache_dir, progress=self._stop_check)
        with self._lock:
            self._classifiers[key] = clf
            self._stamps[key] = stamp
        return clf

    def get_classifier(self, encoder, source, *, cache_dir=None, wait: bool = False) -> VocabularyFreeClassifier:
        """The shared classifier over ``source`` for ``encoder`` (built once; the text database itself is
        cached on disk by :func:`retrieval.classify.vocab.open_vocabulary`, so a new process only opens it).
        While :meth:`warm_classifier` is building it in the background this raises :class:`WarmingUpError`
        (HTTP 503) unless ``wait`` is true.

        When the source changed since the classifier was built (:func:`source_stamp`: an index re-indexed
        with new captions, an edited names file) it is rebuilt here — or, while a background refresh
        (:meth:`refresh_classifiers`) is under way, the previous one keeps answering until the new one is in."""
        key = (encoder.name, str(source))
        with self._lock:
            clf = self._classifiers.get(key)
            fresh = self._fresh(key)
            thread = self._warming.get(key)
        if clf is not None and (fresh or (thread is not None and thread.is_alive() and not wait)):
            return clf
        if thread is not None and thread.is_alive():
            if not wait:
                raise WarmingUpError(f"the {source} text database for {encoder.name} is still being prepared "
                                     "(loupe serve warms it at start-up); retry in a few seconds")
            thread.join()
            with self._lock:
                if self._fresh(key):
                    return self._classifiers[key]
        with self._build_lock:
            return self._build(encoder, source, key, cache_dir)

    def default_classifier(self, encoder, index_dir=None, *, cache_dir=None,
                           wait: bool = False) -> VocabularyFreeClassifier:
        """The classifier the caption route of composed queries uses to name a query image (over
        :meth:`default_source`); shared, see :meth:`get_classifier`."""
        return self.get_classifier(encoder, self.default_source(index_dir), cache_dir=cache_dir, wait=wait)

    # -- warm-ups ------------------------------------------------------------------------------------
    def warm_classifier(self, encoder, source, *, cache_dir=None, background: bool = True,
                        store_names: bool = True) -> threading.Thread | None:
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
                with self._build_lock:
                    with self._lock:
                        fresh = self._fresh(key)
                    clf = None
                    if not fresh:
                        clf = self._build(encoder, source, key, cache_dir)
                        clf.names.touch()
                        clf.classify_vectors(np.asarray(clf.database.vectors[:1], np.float32), top=1)  # warm the path
                if clf is not None and store_names:
                    with self._lock:                     # in service from here on: requests stop getting 503
                        if self._warming.get(key) is threading.current_thread():
                            self._warming.pop(key, None)
                    self._store_names_later(clf)
                with self._lock:
                    self._warm_errors.pop(key, None)
            except BaseException as exc:  # noqa: BLE001 - reported by classifier_state; requests retry the build
                with self._lock:
                    self._warm_errors[key] = exc
            finally:
                with self._lock:
                    if self._warming.get(key) is threading.current_thread():
                        self._warming.pop(key, None)
                    self._threads.discard(threading.current_thread())

        with self._lock:
            self._warmed.add(key)
        if not background:
            work()
            return None
        with self._lock:
            if key in self._warming:
                return self._warming[key]
            if self._fresh(key):
                return None
            thread = threading.Thread(target=work, name=f"loupe-warm-{source}", daemon=True)
            self._warming[key] = thread
            self._threads.add(thread)
        thread.start()
        return thread

    def _store_names_later(self, clf: VocabularyFreeClassifier) -> None:
        """Build the classifier's missing name store (``stores_names`` databases) and switch to it; meanwhile
        requests embed names on demand. Runs in the warm-up thread, after the classifier is in service."""
        if clf.names.store is not None or not stores_names(clf.database):
            return
        log.info("embedding the candidate names of %s once (stored next to it; names are embedded on demand "
                 "until this finishes)", clf.database.name)
        try:
            store = name_store(clf.database, clf.encoder, clf.names.prompts, build=True, stop=self._stop)
        except BuildCancelled:
            log.info("stopped embedding the names of %s (exiting); the next start resumes", clf.database.name)
            return
        if store is not None:
            store.vectors = np.array(store.vectors)        # in memory, as warm-up reads an existing store
            clf.names.store = store
            log.info("name store of %s ready: %d names", clf.database.name, len(store))

    def refresh_classifiers(self, source, *, background: bool = True) -> list[threading.Thread]:
        """Rebuild the classifiers over ``source`` (e.g. an index directory after ``loupe index`` added
        captions) whose source changed: in background threads (returned; the previous classifier answers
        until its replacement is ready) or now. The server calls this when it reloads its index."""
        with self._lock:
            stale = [clf for key, clf in self._classifiers.items() if key[1] == str(source) and not self._fresh(key)]
        threads = []
        for clf in stale:
            thread = self.warm_classifier(clf.encoder, source, background=background)
            if thread is not None:
                threads.append(thread)
        return threads

    def classifier_state(self, encoder_name: str, source) -> str:
        """``ready``, ``warming``, ``failed`` (the background build raised; a request retries it) or ``cold``."""
        key = (encoder_name, str(source))
        with self._lock:
            if key in self._classifiers:
                return "ready"
            if key in self._warming:
                return "warming"
            return "failed" if key in self._warm_errors else "cold"

    def warm_status(self) -> str | None:
        """Of every :meth:`warm_classifier` call on this registry: ``warming`` while one runs, ``failed`` if
        one raised, ``ready`` when all finished, ``None`` when none was started (cheap: for ``/healthz``)."""
        with self._lock:
            if any(t.is_alive() for t in self._warming.values()):
                return "warming"
            if self._warm_errors:
                return "failed"
            return "ready" if self._warmed else None

    # -- stopping ------------------------------------------------------------------------------------
    def _stop_check(self, done: int, total: int) -> None:
        """``make_classifier``'s progress callback: stops a database build when the process exits."""
        if self._stop.is_set():
            raise BuildCancelled("building the text database was stopped")

    def join(self, timeout: float | None = None) -> bool:
        """Wait (up to ``timeout`` s; None: for as long as it takes) for the warm-up threads under way;
        True when none is left running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def stop_background_builds(self, timeout: float = 10.0) -> None:
        """Ask this registry's warm-up threads to stop between batches and wait for them (up to ``timeout``
        s), so the process does not end while one is inside the model (an abort, "terminate called ...").
        For good: later builds of this registry stop at once."""
        self._stop.set()
        self.join(timeout)


@atexit.register
def stop_all_background_builds(timeout: float = 10.0) -> None:
    """At exit: :meth:`ClassifierRegistry.stop_background_builds` for every live registry, all asked to stop
    first, then waited for together (up to ``timeout`` s in all)."""
    registries = list(_LIVE)
    for registry in registries:
        registry._stop.set()
    deadline = time.monotonic() + timeout
    for registry in registries:
        registry.join(max(0.0, deadline - time.monotonic()))


def classifiers_of(engine) -> ClassifierRegistry:
    """The classifier registry of ``engine`` (a ``retrieval.engine.Engine``), made on first use."""
    return engine.cache(CLASSIFIERS_KEY, ClassifierRegistry)


def share_classifiers(old, new) -> ClassifierRegistry:
    """Let ``new`` (``old.reopen()``) take over ``old``'s registry, before ``new`` serves a request: its
    classifiers keep answering while :meth:`ClassifierRegistry.refresh_classifiers` rebuilds the stale ones,
    and its warm-ups go on (``warming_up`` answers stay as they were)."""
    return new.cache(CLASSIFIERS_KEY, lambda: classifiers_of(old))
