"""Candidate-name embeddings for vocabulary-free classification (:mod:`retrieval.classify`).

A candidate name ``c`` is embedded as ``g(c)``: the unit mean of its prompted text vectors
(:func:`embed_names`). The names of the built-in vocabularies and of users' name files are embedded
once for all names of a text database and stored next to it (:class:`NameStore`: ``names-<key>.npy``
+ ``names-<key>.json``, memory-mapped, keyed by encoder + prompts + names; :func:`name_store` opens or
builds it, for databases that :func:`stores_names`). :class:`NameEmbedder` serves name vectors from a
store when the name is in it, else embeds them on demand and caches them in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.classify.vocab import TextDatabase
from retrieval.errors import BuildCancelled
from retrieval.numeric import l2_normalize

log = logging.getLogger("loupe.classify")

DEFAULT_PROMPTS = ("a photo of a {}.",)

NAME_STORE_FORMAT = 1
NAME_STORE_BATCH = 512          # prompted texts per encode_texts call when a name store is built
NAME_STORE_PROGRESS_MIN = 2000  # names from which building a store shows a tqdm bar (on a terminal)


def embed_names(encoder, prompts: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """[len(names), dim]: the unit mean of each name's prompted text vectors (``encode_texts``)."""
    if not len(names):
        return np.zeros((0, int(encoder.dim)), np.float32)
    texts = [p.format(n) for n in names for p in prompts]
    vecs = np.asarray(encoder.encode_texts(texts), np.float32)
    return l2_normalize(vecs.reshape(len(names), len(prompts), -1).mean(axis=1)).astype(np.float32, copy=False)


def database_names(database: TextDatabase) -> list[str]:
    """Every candidate name a database can yield, spelled as
    :func:`retrieval.classify.candidate_names` spells it, in order."""
    return list(dict.fromkeys(name for names in database.names
                              for name in (" ".join(str(n).split()) for n in names) if name))


class NameStore:
    """Name embeddings of a text database stored next to it (``names-<key>.npy`` + ``names-<key>.json``).

    ``key`` hashes the encoder name and dimension, the prompt templates and the name list, so another
    encoder or other prompts find no store (and build their own); the JSON, written atomically after the
    vectors, lists the names (row order) and is what makes a store valid. The vectors are memory-mapped.
    """

    def __init__(self, path_json: Path, names: list[str], vectors: np.ndarray):
        self.path = Path(path_json)
        self.names = names
        self.vectors = vectors
        self.rows = {n: i for i, n in enumerate(names)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    @staticmethod
    def key(encoder, prompts: Sequence[str], names: Sequence[str]) -> str:
        names_sha1 = hashlib.sha1("\x1e".join(names).encode()).hexdigest()
        ident = [f"loupe-names-{NAME_STORE_FORMAT}", encoder.name, int(encoder.dim), list(prompts), names_sha1]
        return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]

    @staticmethod
    def paths(directory, key: str) -> tuple[Path, Path]:
        directory = Path(directory)
        return directory / f"names-{key}.json", directory / f"names-{key}.npy"

    @classmethod
    def open(cls, database: TextDatabase, encoder, prompts: Sequence[str],
             names: Sequence[str] | None = None) -> "NameStore | None":
        """The database's store for this encoder and these prompts, or None when there is none (or it
        does not match: another encoder, other prompts, other names, a damaged file)."""
        names = database_names(database) if names is None else list(names)
        key = cls.key(encoder, prompts, names)
        meta_path, vec_path = cls.paths(database.dir, key)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            vectors = np.load(vec_path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if (meta.get("format") != NAME_STORE_FORMAT or meta.get("encoder") != encoder.name
                or list(meta.get("prompts", [])) != list(prompts) or meta.get("names") != names
                or vectors.dtype != np.float32 or vectors.shape != (len(names), int(encoder.dim))):
            return None
        return cls(meta_path, names, vectors)

    @classmethod
    def build(cls, database: TextDatabase, encoder, prompts: Sequence[str], *,
              batch_size: int = NAME_STORE_BATCH, stop=None) -> "NameStore":
        """Embed every name of ``database`` (batched, shortest first) and store them atomically next to
        it; stores of other keys in that directory (other encoder/prompts/names) are removed. ``stop``
        (a ``threading.Event``): checked between batches; when set, :class:`BuildCancelled` is raised and
        nothing is written (a server shutting down does not wait minutes for the 21k vocabulary)."""
        from retrieval.index import store

        names = database_names(database)
        key = cls.key(encoder, prompts, names)
        meta_path, vec_path = cls.paths(database.dir, key)
        vecs = np.zeros((len(names), int(encoder.dim)), np.float32)
        order = sorted(range(len(names)), key=lambda i: len(names[i]))
        step = max(1, int(batch_size) // max(1, len(prompts)))
        bar = None
        if len(names) >= NAME_STORE_PROGRESS_MIN:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(names), desc=f"embedding the names of {database.name}", unit="name",
                       mininterval=2.0, disable=None)
        try:
            for start in range(0, len(order), step):
                if stop is not None and stop.is_set():
                    raise BuildCancelled(f"embedding the names of {database.name} was stopped")
                rows = order[start:start + step]
                vecs[rows] = embed_names(encoder, prompts, [names[i] for i in rows])
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        meta = {"format": NAME_STORE_FORMAT, "encoder": encoder.name, "dim": int(encoder.dim),
                "prompts": list(prompts), "database": database.name, "fingerprint": database.fingerprint,
                "count": len(names), "names": names}
        store.atomic_write_with(vec_path, lambda tmp: np.save(tmp, vecs))
        store.atomic_write_json(meta_path, meta)       # last: a store without its JSON is not a store
        for old in Path(database.dir).glob("names-*.*"):
            if old.name not in (meta_path.name, vec_path.name) and old.suffix in (".json", ".npy"):
                old.unlink(missing_ok=True)
        return cls.open(database, encoder, prompts, names) or cls(meta_path, names, vecs)


class NameEmbedder:
    """Text vectors of category names (mean over prompt templates): from a :class:`NameStore` when
    the name is in it, else embedded on demand and cached in memory."""

    def __init__(self, encoder, prompts: Sequence[str] | None = None, store: NameStore | None = None):
        self.encoder = encoder
        self.prompts = tuple(prompts or getattr(encoder, "templates", None) or DEFAULT_PROMPTS)
        self.store = store
        self._cache: dict[str, np.ndarray] = {}

    def missing(self, names: Sequence[str]) -> list[str]:
        stored = self.store.rows if self.store is not None else {}
        return [n for n in dict.fromkeys(names) if n not in self._cache and n not in stored]

    def __call__(self, names: Sequence[str]) -> np.ndarray:
        missing = self.missing(names)
        if missing:
            self._cache.update(zip(missing, embed_names(self.encoder, self.prompts, missing)))
        if not names:
            return np.zeros((0, self.encoder.dim), np.float32)
        store = self.store
        if store is None:
            return np.stack([self._cache[n] for n in names])
        out = np.empty((len(names), int(self.encoder.dim)), np.float32)
        rows = [store.rows.get(n, -1) for n in names]
        at = [i for i, r in enumerate(rows) if r >= 0]
        if at:
            out[at] = store.vectors[[rows[i] for i in at]]
        for i, r in enumerate(rows):
            if r < 0:
                out[i] = self._cache[names[i]]
        return out

    def touch(self) -> None:
        """Read the stored vectors once, so that the first request does not page them in."""
        if self.store is not None and len(self.store):
            np.asarray(self.store.vectors).sum()


def stores_names(database: TextDatabase) -> bool:
    """Whether :func:`retrieval.classify.make_classifier` embeds all of a database's names ahead of time (a
    :class:`NameStore`): for the built-in vocabularies and users' name files, whose names are fixed
    when the database is built; not for an index's captions (rebuilt with every indexing run, many
    noun phrases, of which a request needs a few dozen: those are embedded on demand)."""
    return database.kind != "captions"


def name_store(database: TextDatabase, encoder, prompts: Sequence[str] | None = None, *,
               build: bool = True, stop=None) -> NameStore | None:
    """The database's stored name embeddings for ``encoder`` and ``prompts`` (default: as
    :class:`NameEmbedder` picks them), built and written next to the database if missing and
    ``build``; None when there is none (or the directory is read-only: names are then embedded on
    demand)."""
    prompts = NameEmbedder(encoder, prompts).prompts
    found = NameStore.open(database, encoder, prompts)
    if found is not None or not build:
        return found
    try:
        return NameStore.build(database, encoder, prompts, stop=stop)
    except OSError as exc:
        log.warning("cannot store the name embeddings of %s in %s (%s); names are embedded on demand",
                    database.name, database.dir, exc)
        return None
