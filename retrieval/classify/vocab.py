"""Text databases for vocabulary-free classification: build once per encoder, store as an index.

A *text database* is a list of entries; each entry has a ``text`` (what is embedded and retrieved by
image→text similarity) and ``names`` (the candidate category names it contributes when retrieved).
Sources:

* ``imagenet21k`` (built in): the 21,843 ImageNet-21k synsets shipped in timm's package data
  (``timm/data/_info/imagenet_synset_to_lemma.txt`` + ``imagenet_synset_to_definition.txt``).
  text = ``"lemma, lemma, ...: definition"``; names = the synset's lemmas.
* the captions of a Loupe index (its Parquet ``caption`` column); names = the noun phrases of each
  caption (:func:`extract_noun_phrases`).
* a user's file: ``.txt`` (one entry per line), or ``.parquet`` / ``.csv`` / ``.jsonl`` with a text
  column (``--column``, default the first of ``caption``, ``text``, ``label``, ``name``). A short line
  (up to 4 words) is taken as a category name as it is; a longer one as a caption (noun phrases).

A database is embedded once per encoder and stored in the ordinary index format of
:mod:`retrieval.index.store` (``manifest.json`` + ``meta/shard-*.parquet`` + ``<encoder>/shard-*.faiss``):
metadata row ``caption`` = the entry's text, ``source`` = where it came from (e.g. ``imagenet21k:n02124075``),
``extra`` = ``{"names": [...]}``. ``manifest.extra`` = ``{"kind": "text-database", "name",
"fingerprint"}``; the fingerprint (hash of the entries and the encoder) decides when to rebuild.
Built-in and file databases live under ``$LOUPE_CACHE_DIR/vocab/<name>-<encoder>/`` (default
``~/.cache/loupe``); an index's caption database under ``<cache>/vocab/captions-<hash of DIR>-<encoder>/``.
Every file is written atomically and the manifest last, so an interrupted build is simply redone.

Noun-phrase heuristic (no tagger needed, documented so its limits are clear): lower-case the caption,
cut it into chunks at punctuation, stop words (articles, pronouns, prepositions, conjunctions,
auxiliary verbs), numbers and ``-ing``/``-ed`` verb forms; drop leading adjectives from a small list
(colours, sizes, ages, qualities) from each chunk; keep the chunk (at most 3 words) and its last word
(the head noun) as candidates. "A red fire truck driving on the road." → ``fire truck``, ``truck``,
``road``. (nltk is not used: it is not a dependency and its tagger data cannot be fetched offline.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from retrieval.errors import EmptyTextDatabaseError, InvalidQueryError, LoupeError, UnknownVocabularyError
from retrieval.index import store, vector_files

BUILTIN_VOCABULARIES = ("imagenet21k",)
SHARD_SIZE = 100_000
TEXT_COLUMNS = ("caption", "text", "label", "name")


# -- noun phrases ------------------------------------------------------------------------------
STOPWORDS = frozenset("""
a an the this that these those some any each every no all both either neither another other such
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs one ones
who whom whose which what where when why how there here
of in on at by for with without from to into onto over under above below between among around through
across along behind beside near off out up down about against after before during since until upon within
via like as than per than toward towards inside outside beneath underneath
and or but nor so yet if then because while although though
is are was were be been being am has have had having do does did doing can could will would shall should
may might must let lets get gets got very too also just only not really quite more most less least much
many few several lot lots plenty own same
called named known make makes made use used using yum hello wow oh
two three four five six seven eight nine ten eleven twelve hundred thousand dozen
""".split())

ADJECTIVES = frozenset("""
red orange yellow green blue purple violet pink brown black white grey gray silver golden gold beige
turquoise cyan magenta maroon navy dark light bright pale colorful colourful multicolored striped spotted
big small large little tiny huge giant tall short long wide narrow thick thin fat round square flat
old new young ancient modern traditional classic vintage antique
good bad nice pretty beautiful cute ugly happy sad angry funny scary silly excited important famous
hot cold warm cool wet dry fresh ripe raw cooked roasted fried frozen sweet sour
open closed empty full broken whole half single double first second third last
cartoon simple fancy plain real fake toy wooden metal plastic glass paper electric
left right front back top bottom upper lower largest biggest smallest tallest best
""".split())

_NUMBER = re.compile(r"^\d+([.,]\d+)?(st|nd|rd|th|s)?$")
_SPLIT = re.compile(r"[.,;:!?()\[\]{}\"“”‘’«»—–/|]+|\s-\s")


def _is_verb_form(word: str) -> bool:
    return len(word) > 4 and (word.endswith("ing") or (word.endswith("ed") and not word.endswith("eed")))


def normalize_name(name: str) -> str:
    """Lower-case, single spaces, no leading article."""
    words = re.sub(r"[^\w\s'-]", " ", str(name).lower()).split()
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def extract_noun_phrases(text: str, *, max_words: int = 3) -> list[str]:
    """Candidate category names of a caption (heuristic; see the module docstring). Order: first seen."""
    out: list[str] = []

    def add(phrase: str) -> None:
        if phrase and phrase not in out:
            out.append(phrase)

    text = str(text or "").replace("’", "'").lower()
    for chunk in _SPLIT.split(text):
        words = [w.strip("'-") for w in chunk.split()]
        run: list[str] = []
        for word in words + [""]:
            possessive = word.endswith("'s") or word.endswith("s'")
            if possessive:
                word = word[:-2] if word.endswith("'s") else word[:-1]
            stop = (not word or word in STOPWORDS or _NUMBER.match(word) or _is_verb_form(word)
                    or len(word) < 2 or not re.match(r"^[a-z][a-z'-]*$", word))
            if not stop:
                run.append(word)
                if not possessive:
                    continue
            # adjectives: dropped anywhere but in the head position
            run = [w for w in run[:-1] if w not in ADJECTIVES] + run[-1:]
            if run and run[-1] in ADJECTIVES:
                run = []
            if run:
                phrase = run[-max_words:]
                add(" ".join(phrase))
                if len(phrase) > 1:
                    add(phrase[-1])
            run = []
    return out


def entry_names(text: str) -> list[str]:
    """Names of a user-given entry: a short line is a name as it is, a longer one a caption."""
    name = normalize_name(text)
    if name and len(name.split()) <= 4:
        return [name]
    return extract_noun_phrases(text)


# -- entries -----------------------------------------------------------------------------------
@dataclass
class TextEntries:
    """Entries before embedding: ``texts[i]`` is embedded; ``names[i]`` are its candidate names."""

    texts: list[str]
    names: list[list[str]]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.texts) != len(self.names):
            raise ValueError("texts and names differ in length")
        if not self.sources:
            self.sources = [""] * len(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def deduplicated(self) -> "TextEntries":
        """Identical texts merged (their names united), empty texts dropped; order kept."""
        pos: dict[str, int] = {}
        texts, names, sources = [], [], []
        for text, nm, src in zip(self.texts, self.names, self.sources):
            text = " ".join(str(text or "").split())
            if not text:
                continue
            if text in pos:
                merged = names[pos[text]]
                merged.extend(n for n in nm if n not in merged)
                continue
            pos[text] = len(texts)
            texts.append(text)
            names.append([n for n in dict.fromkeys(nm) if n])
            sources.append(src)
        return TextEntries(texts, names, sources)

    def fingerprint(self, encoder_name: str) -> str:
        h = hashlib.sha1(f"loupe-textdb-1|{encoder_name}|".encode())
        for text, nm in zip(self.texts, self.names):
            h.update(text.encode())
            h.update(b"\x1f")
            h.update("|".join(nm).encode())
            h.update(b"\x1e")
        return h.hexdigest()[:20]


def timm_info_dir() -> Path:
    import timm

    return Path(timm.__file__).parent / "data" / "_info"


def _read_tsv(path: Path) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.rstrip("\n").partition("\t")
            if key and value:
                out[key] = value
    return out


def imagenet21k_entries() -> TextEntries:
    """The ImageNet-21k synsets: text = ``"lemmas: definition"``, names = the lemmas."""
    info = timm_info_dir()
    lemma_file, defn_file = info / "imagenet_synset_to_lemma.txt", info / "imagenet_synset_to_definition.txt"
    if not lemma_file.is_file():
        raise UnknownVocabularyError(f"the imagenet21k vocabulary needs timm's package data ({lemma_file} is "
                                     "missing); pip install timm")
    lemmas = _read_tsv(lemma_file)
    defs = _read_tsv(defn_file) if defn_file.is_file() else {}
    synsets_file = info / "imagenet21k_goog_synsets.txt"
    order = ([s.strip() for s in synsets_file.read_text().split() if s.strip() in lemmas]
             if synsets_file.is_file() else sorted(lemmas))
    texts, names, sources = [], [], []
    for syn in order:
        nm = [n.strip() for n in lemmas[syn].split(",") if n.strip()]
        d = defs.get(syn, "").strip()
        texts.append(f"{', '.join(nm)}: {d}" if d else ", ".join(nm))
        names.append(nm)
        sources.append(f"imagenet21k:{syn}")
    return TextEntries(texts, names, sources)


def file_entries(path: str | os.PathLike, column: str | None = None) -> TextEntries:
    """A user's text file (one entry per line) or table (Parquet/CSV/JSONL) with a text column."""
    path = Path(path)
    if not path.is_file():
        raise InvalidQueryError(f"text database file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".lst", ""):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        texts = [ln for ln in lines if ln and not ln.startswith("#")]
    else:
        texts = _table_column(path, column)
    texts = [str(t) for t in texts if t is not None and str(t).strip()]
    return TextEntries(texts, [entry_names(t) for t in texts], [f"{path.name}:{i}" for i in range(len(texts))])


def _table_column(path: Path, column: str | None) -> list:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(path)
        elif suffix == ".csv":
            table = pcsv.read_csv(path)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            table = pjson.read_json(path)
        else:
            raise InvalidQueryError(f"unsupported text database file {path.name}: use .txt, .parquet, .csv or .jsonl")
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidQueryError(f"cannot read text database {path}: {exc}") from exc
    names = table.column_names
    col = column or next((c for c in TEXT_COLUMNS if c in names), None)
    if col is None or col not in names:
        raise InvalidQueryError(f"{path.name} has no column {column or ' / '.join(TEXT_COLUMNS)!r}; "
                                f"columns: {', '.join(names)} (pick one with --column)")
    return table.column(col).to_pylist()


def caption_entries(index_dir: str | os.PathLike, attempts: int = 8) -> TextEntries:
    """The captions of a Loupe index; names = their noun phrases. A metadata shard that ``loupe index``
    deleted while it was read (a timed commit replaced it and the manifest) means: read the new version."""
    manifest_path = Path(index_dir) / store.MANIFEST
    for attempt in range(1, attempts + 1):
        stamp = _file_stamp(manifest_path)
        try:
            return _caption_entries(index_dir)
        except store.IndexFormatError:
            if attempt == attempts or _file_stamp(manifest_path) == stamp:
                raise
    raise AssertionError("unreachable")


def _file_stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _caption_entries(index_dir: str | os.PathLike) -> TextEntries:
    manifest = store.read_manifest(index_dir)
    texts, sources = [], []
    for shard in manifest.shards:
        table = store.read_metadata(index_dir, shard.name)
        for image_id, caption in zip(table.column("id").to_pylist(), table.column("caption").to_pylist()):
            if caption and str(caption).strip():
                texts.append(str(caption))
                sources.append(f"caption:{image_id}")
    return TextEntries(texts, [extract_noun_phrases(t) for t in texts], sources)


# -- the stored database -----------------------------------------------------------------------
class TextDatabase:
    """An embedded text database opened from disk: texts, names and a FAISS index per shard."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.manifest = store.read_manifest(self.dir)
        info = self.manifest.extra
        if info.get("kind") != "text-database":
            raise store.IndexFormatError(f"{self.dir} is a Loupe index, not a text database")
        self.name: str = info.get("name", self.dir.name)
        self.fingerprint: str = info.get("fingerprint", "")
        # builtin | captions | file (databases built before "source_kind" was recorded: from the name)
        self.kind: str = info.get("source_kind") or (
            "builtin" if self.name in BUILTIN_VOCABULARIES else
            "captions" if self.name.startswith("captions of ") else "file")
        self.encoder_name: str = next(iter(self.manifest.encoders))
        self.texts: list[str] = []
        self.names: list[list[str]] = []
        self.sources: list[str] = []
        vectors = []
        for shard in self.manifest.shards:
            table = store.read_metadata(self.dir, shard.name)
            self.texts.extend(table.column("caption").to_pylist())
            self.sources.extend(table.column("source").to_pylist())
            self.names.extend(json.loads(x or "{}").get("names", []) for x in table.column("extra").to_pylist())
            index = vector_files.read_vectors(self.dir, self.encoder_name, shard.name, mmap=False)
            vectors.append(vector_files.reconstruct_all(index))
        dim = self.manifest.encoders[self.encoder_name].dim
        self.vectors = np.ascontiguousarray(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))
        import faiss

        self.index = faiss.IndexFlatIP(dim)
        if len(self.vectors):
            self.index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` entries per query row by inner product: (scores [n, k], rows [n, k]; -1 = none)."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        k = max(1, min(int(k), max(1, len(self))))
        if not len(self):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return self.index.search(q, k)

    def __repr__(self) -> str:
        return f"<TextDatabase {self.name} encoder={self.encoder_name} entries={len(self)}>"


def build_text_database(out_dir: str | os.PathLike, encoder, entries: TextEntries, *, name: str,
                        batch_size: int = 128, progress: Callable[[int, int], None] | None = None,
                        kind: str | None = None) -> TextDatabase:
    """Embed ``entries`` with ``encoder`` (text side) and write them as an index at ``out_dir``.
    ``kind`` (``builtin`` / ``captions`` / ``file``; recorded as ``source_kind``) decides whether the
    classifier stores the embeddings of all its names (:func:`retrieval.classify.stores_names`)."""
    import faiss

    entries = entries.deduplicated()
    if not len(entries):
        raise EmptyTextDatabaseError(f"text database {name!r} is empty: no non-empty texts to classify with")
    if not getattr(encoder, "supports_text", False):
        encoder.encode_texts([])  # raises UnsupportedModalityError with the standard message
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = store.Manifest(
        encoders={encoder.name: store.EncoderEntry(name=encoder.name, dim=int(encoder.dim),
                                                   modalities=list(encoder.modalities))},
        extra={"kind": "text-database", "name": name, "fingerprint": entries.fingerprint(encoder.name),
               **({"source_kind": kind} if kind else {})})
    done = 0
    for number, start in enumerate(range(0, len(entries), SHARD_SIZE)):
        stop = min(len(entries), start + SHARD_SIZE)
        # embed in order of length: batches pad to their longest text, so this is several times faster
        order = sorted(range(start, stop), key=lambda i: len(entries.texts[i]))
        vecs = np.zeros((stop - start, int(encoder.dim)), np.float32)
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            vecs[np.asarray(rows) - start] = np.asarray(encoder.encode_texts([entries.texts[i] for i in rows]),
                                                        np.float32)
            done += len(rows)
            if progress:
                progress(done, len(entries))
        vecs = np.ascontiguousarray(vecs)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        shard = store.shard_name(number)
        rows = [{"id": store.content_id(store.sha256_bytes(entries.texts[i].encode())), "source": entries.sources[i],
                 "caption": entries.texts[i], "extra": {"names": entries.names[i]}} for i in range(start, stop)]
        store.write_metadata(out_dir, shard, rows)
        vector_files.write_vectors(out_dir, encoder.name, shard, index)
        manifest.shards.append(store.ShardEntry(shard, stop - start))
    store.write_manifest(out_dir, manifest)
    return TextDatabase(out_dir)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` when given, else ``<LOUPE_CACHE_DIR>/vocab`` (read now, :func:`retrieval.settings.cache_dir`)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from retrieval import settings

    return settings.cache_dir() / "vocab"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "db"


def ensure_text_database(entries: TextEntries, encoder, *, name: str, directory: str | os.PathLike,
                         rebuild: bool = False, progress=None, kind: str | None = None) -> TextDatabase:
    """Open the database at ``directory`` if it matches ``entries`` + encoder, else (re)build it."""
    entries = entries.deduplicated()
    if not len(entries):
        raise EmptyTextDatabaseError(f"text database {name!r} is empty: no non-empty texts to classify with")
    directory = Path(directory)
    if not rebuild and (directory / store.MANIFEST).is_file():
        try:
            db = TextDatabase(directory)
            if db.fingerprint == entries.fingerprint(encoder.name) and db.encoder_name == encoder.name:
                return db
        except LoupeError:
            pass
    return build_text_database(directory, encoder, entries, name=name, progress=progress, kind=kind)


_OPEN: dict[tuple[str, str], TextDatabase] = {}


def open_vocabulary(source: str | os.PathLike, encoder, *, cache_dir=None, column: str | None = None,
                    rebuild: bool = False, progress=None) -> TextDatabase:
    """A text database for ``encoder`` from ``source``: a built-in name (``imagenet21k``), a Loupe
    index directory (its captions), an already built text database directory, or a text/table file.
    Built databases are cached on disk (and in this process)."""
    src = str(source)
    root = cache_root(cache_dir)
    path = Path(src).expanduser()
    if src in BUILTIN_VOCABULARIES:
        key_dir = root / f"{src}-{_safe(encoder.name)}"
        loader, name, kind = imagenet21k_entries, src, "builtin"
    elif path.is_dir() and (path / store.MANIFEST).is_file():
        manifest = store.read_manifest(path)
        if manifest.extra.get("kind") == "text-database":
            db = TextDatabase(path)
            if db.encoder_name != encoder.name:
                raise InvalidQueryError(f"text database {path} was embedded with {db.encoder_name!r}, not "
                                        f"{encoder.name!r}")
            return db
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        key_dir = root / f"captions-{digest}-{_safe(encoder.name)}"
        loader, name, kind = (lambda: caption_entries(path)), f"captions of {path}", "captions"
    elif path.is_file():
        digest = hashlib.sha1(f"{path.resolve()}|{column}".encode()).hexdigest()[:10]
        key_dir = root / f"file-{_safe(path.stem)}-{digest}-{_safe(encoder.name)}"
        loader, name, kind = (lambda: file_entries(path, column)), path.name, "file"
    elif path.is_dir():
        raise InvalidQueryError(f"{path} is neither a Loupe index nor a text database (no manifest.json)")
    else:
        raise UnknownVocabularyError(f"unknown vocabulary {src!r}: use one of {', '.join(BUILTIN_VOCABULARIES)}, "
                                     "a text file (.txt/.parquet/.csv/.jsonl) or a Loupe index directory")
    entries = loader()
    fp = entries.deduplicated().fingerprint(encoder.name)
    cached = _OPEN.get((str(key_dir), fp))
    if cached is not None and not rebuild:
        return cached
    db = ensure_text_database(entries, encoder, name=name, directory=key_dir, rebuild=rebuild, progress=progress,
                              kind=kind)
    for stale in [k for k in _OPEN if k[0] == str(key_dir)]:   # e.g. the captions before a re-index
        _OPEN.pop(stale, None)
    _OPEN[(str(key_dir), fp)] = db
    return db


def subset_entries(entries: TextEntries, keep: Iterable[int]) -> TextEntries:
    keep = list(keep)
    return TextEntries([entries.texts[i] for i in keep], [entries.names[i] for i in keep],
                       [entries.sources[i] for i in keep])


def from_texts(texts: Sequence[str], names: Sequence[Sequence[str]] | None = None) -> TextEntries:
    """Entries from in-memory texts; names default to :func:`entry_names` of each text."""
    texts = [str(t) for t in texts]
    return TextEntries(texts, [list(n) for n in names] if names is not None else [entry_names(t) for t in texts])
