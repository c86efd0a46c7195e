"""The indexer's reader, listing part: turn SOURCE arguments into a list of ``Item``s, and read one item's bytes.

A SOURCE is one of

* a directory, walked recursively (symlinks followed, each real directory visited once so link loops
  end); files with an image extension (``retrieval.images.IMAGE_EXTENSIONS``, any case) are items; a
  sidecar ``NAME.txt`` beside ``NAME.png`` gives the caption (its first line, as in Tux Paint stamps);
* a manifest ``.parquet`` / ``.csv`` / ``.jsonl`` with a ``path`` or ``url`` column, an optional
  ``caption`` column; every other column is kept as ``extra`` metadata. Relative paths are resolved
  against the manifest's folder;
* a webdataset ``.tar`` shard (img2dataset layout: ``KEY.jpg`` + ``KEY.txt`` caption + ``KEY.json``
  metadata); the item's source is ``/abs/shard.tar#KEY.jpg``;
* a single image file.

Enumeration only stats files; bytes are read later, in DataLoader workers (``read_bytes``). An item's
``source`` string is its identity for incremental runs: an unchanged source (same size and mtime) is
not read again.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from retrieval import settings
from retrieval.errors import InputError, LoupeError
from retrieval.images import IMAGE_EXTENSIONS

MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl", ".ndjson")
CAPTION_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Item:
    """One image to index (picklable; sent to DataLoader workers)."""

    source: str                     # identity: absolute path, URL, or "/abs/shard.tar#member"
    kind: str                       # "file" | "url" | "tar"
    path: str | None = None         # the file (for "tar": the tar file)
    caption: str | None = None
    extra: dict[str, Any] | None = None
    size: int = -1                  # bytes (-1: unknown, e.g. a broken symlink or a URL)
    mtime: float | None = None
    offset: int = 0                 # tar member data offset


@dataclass
class Failure:
    source: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason}


@dataclass
class Enumeration:
    items: list[Item] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


# -- enumeration ---------------------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def enumerate_sources(sources: Iterable[str | os.PathLike]) -> Enumeration:
    """All items of all SOURCEs, in a deterministic order; a source given twice is listed once."""
    out = Enumeration()
    for src in sources:
        text = str(src)
        if text.startswith(("http://", "https://")):
            out.items.append(Item(source=text, kind="url"))
            continue
        path = Path(text).expanduser()
        if not path.exists():
            raise LoupeError(f"source {text!r} does not exist (give a folder, a .parquet/.csv/.jsonl manifest, "
                             "a webdataset .tar or an image file)")
        if path.is_dir():
            _walk_directory(path, out)
        elif path.name.lower().endswith(MANIFEST_EXTENSIONS):
            _read_manifest(path, out)
        elif path.name.lower().endswith(".tar"):
            _read_tar(path, out)
        elif is_image_name(path.name):
            st = path.stat()
            out.items.append(Item(source=os.path.abspath(path), kind="file", path=os.path.abspath(path),
                                  size=st.st_size, mtime=st.st_mtime))
        else:
            raise LoupeError(f"source {text!r} is not a folder, a manifest (.parquet/.csv/.jsonl), "
                             "a webdataset .tar or an image file")
    seen: set[str] = set()
    unique = []
    for item in out.items:
        if item.source not in seen:
            seen.add(item.source)
            unique.append(item)
    out.items = unique
    return out


def _read_caption(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            text = fh.read(CAPTION_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first or None


def _walk_directory(root: Path, out: Enumeration) -> None:
    root = Path(os.path.abspath(root))
    visited: set[str] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue  # a symlink loop or a second link to the same folder
        visited.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            out.failures.append(Failure(folder, f"cannot list folder: {exc.strerror or exc}"))
            continue
        names = {e.name for e in entries}
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir():  # follows symlinks
                    subdirs.append(entry.path)
                    continue
            except OSError:
                pass
            if not is_image_name(entry.name):
                continue
            try:
                st = entry.stat()  # follows symlinks; a broken one raises
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                size, mtime = -1, None  # read_bytes gives the reason (broken symlink, ...)
            stem = entry.name.rsplit(".", 1)[0]
            caption = _read_caption(os.path.join(folder, stem + ".txt")) if stem + ".txt" in names else None
            out.items.append(Item(source=entry.path, kind="file", path=entry.path, caption=caption,
                                  size=size, mtime=mtime))
        stack.extend(reversed(subdirs))


def _plain(value: Any) -> Any:
    """A manifest cell as a JSON-able value (metadata is stored as JSON): numbers, strings, booleans and
    nulls as they are, dates and times as ISO text, decimals as floats, lists and objects recursively."""
    import datetime
    import decimal

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


MANIFEST_BATCH_ROWS = 65536


def _arrow_batches(path: Path):
    """Record batches of a Parquet or CSV manifest, streamed (types kept: a CSV column of whole numbers
    is int64, as in Parquet). Yields the column names first."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            yield pf.schema_arrow.names
            yield from pf.iter_batches(batch_size=MANIFEST_BATCH_ROWS)
        else:
            import pyarrow.csv as pacsv

            reader = pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
            yield reader.schema.names
            yield from reader
    except LoupeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader error is the same to the user
        hint = (" (a column whose values change type part-way, e.g. numbers then text, must be quoted "
                "or made consistent)" if "CSV" in type(exc).__name__ or "conversion" in str(exc).lower()
                or "invalid" in type(exc).__name__.lower() else "")
        raise LoupeError(f"manifest {path} is unreadable: {exc}{hint}") from exc


def _manifest_rows(path: Path):
    """The rows of a manifest as dicts, streamed: Parquet and CSV through pyarrow (column types kept),
    JSON lines one line at a time (a bad line becomes a failure row, the rest are read)."""
    name = path.name.lower()
    if name.endswith((".parquet", ".csv")):
        batches = _arrow_batches(path)
        columns = next(batches)
        if "path" not in columns and "url" not in columns:
            raise LoupeError(f"manifest {path} needs a 'path' or 'url' column (it has: {', '.join(columns)})")
        for batch in batches:
            for row in batch.to_pylist():
                yield {k: _plain(v) for k, v in row.items()}
        return
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield {"__error__": f"{path}:{line_no}", "__reason__": f"bad JSON line: {exc.msg}"}
                continue
            yield (row if isinstance(row, dict) else
                   {"__error__": f"{path}:{line_no}", "__reason__": "JSON line is not an object"})


def _read_manifest(path: Path, out: Enumeration) -> None:
    base = path.parent.resolve()
    has_column = False
    n_rows = 0
    for i, row in enumerate(_manifest_rows(path)):
        if "__error__" in row:
            out.failures.append(Failure(row["__error__"], row["__reason__"]))
            continue
        n_rows += 1
        has_column = has_column or "path" in row or "url" in row
        caption = row.get("caption")
        caption = None if caption is None or caption == "" else str(caption)
        extra = {k: v for k, v in row.items() if k not in ("path", "url", "caption")} or None
        if row.get("path"):
            p = Path(str(row["path"])).expanduser()
            p = p if p.is_absolute() else base / p
            p_s = os.path.abspath(p)
            try:
                st = os.stat(p_s)
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                size, mtime = -1, None
            out.items.append(Item(source=p_s, kind="file", path=p_s, caption=caption, extra=extra,
                                  size=size, mtime=mtime))
        elif row.get("url"):
            out.items.append(Item(source=str(row["url"]), kind="url", caption=caption, extra=extra))
        else:
            out.failures.append(Failure(f"{path}:row {i}", "manifest row has neither 'path' nor 'url'"))
    if n_rows and not has_column:
        raise LoupeError(f"manifest {path} needs a 'path' or 'url' column")


def _read_tar(path: Path, out: Enumeration) -> None:
    tar_path = os.path.abspath(path)
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                group = groups[key]
                ext = ext.lower()
                if ("." + ext) in IMAGE_EXTENSIONS:
                    group["image"] = member
                elif ext in ("txt", "caption", "json") and member.size <= CAPTION_MAX_BYTES:
                    fh = tar.extractfile(member)
                    group[ext] = fh.read().decode("utf-8", errors="replace") if fh else ""
    except (tarfile.TarError, OSError) as exc:
        out.failures.append(Failure(tar_path, f"unreadable tar: {exc}"))
        return
    for key in order:
        group = groups[key]
        member = group.get("image")
        if member is None:
            continue
        extra = None
        if "json" in group:
            try:
                parsed = json.loads(group["json"])
                extra = parsed if isinstance(parsed, dict) else {"json": parsed}
            except json.JSONDecodeError:
                extra = None
        caption = (group.get("txt") or group.get("caption") or "").strip() or None
        if caption is None and extra and isinstance(extra.get("caption"), str):
            caption = extra["caption"]
        if extra:
            extra = {k: v for k, v in extra.items() if k != "caption"} or None
        out.items.append(Item(source=f"{tar_path}#{member.name}", kind="tar", path=tar_path, caption=caption,
                              extra=extra, size=member.size, mtime=float(member.mtime), offset=member.offset_data))


# -- reading bytes (runs in DataLoader workers) -------------------------------------------------
@dataclass(frozen=True)
class ReadConfig:
    allow_download: bool = False
    max_bytes: int = field(default_factory=settings.max_file_bytes)   # bigger files are skipped
    timeout: float = 10.0
    retries: int = 2


def read_bytes(item: Item, cfg: ReadConfig = ReadConfig()) -> bytes:
    """The raw bytes of one item; raises ``InputError`` with a reason a user can act on."""
    if item.kind == "file":
        return _read_file(item.path or item.source, cfg.max_bytes)
    if item.kind == "tar":
        if item.size > cfg.max_bytes:
            raise InputError(f"file too large ({item.size:,} bytes > {cfg.max_bytes:,})")
        try:
            with open(item.path, "rb") as fh:
                fh.seek(item.offset)
                data = fh.read(item.size)
        except OSError as exc:
            raise InputError(f"cannot read tar member: {exc.strerror or exc}") from exc
        if len(data) != item.size:
            raise InputError("tar member is truncated")
        if not data:
            raise InputError("empty file (0 bytes)")
        return data
    if item.kind == "url":
        if not cfg.allow_download:
            raise InputError("URL download is off; pass --allow-download to fetch URLs")
        return download(item.source, cfg)
    raise InputError(f"unknown item kind {item.kind!r}")


def _read_file(path: str, max_bytes: int) -> bytes:
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"broken symlink (target {os.readlink(path)!r} does not exist)")
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise InputError(f"file too large ({size:,} bytes > {max_bytes:,}; set LOUPE_MAX_FILE_BYTES)")
            data = fh.read()
    except PermissionError as exc:
        raise InputError("permission denied (file is not readable)") from exc
    except FileNotFoundError as exc:
        raise InputError("file not found (deleted during the run?)") from exc
    except IsADirectoryError as exc:
        raise InputError("is a directory") from exc
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise InputError("empty file (0 bytes)")
    return data


def download(url: str, cfg: ReadConfig) -> bytes:
    """img2dataset-style fetch: timeout, size cap, a few retries with back-off."""
    last: Exception | None = None
    for attempt in range(cfg.retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "loupe-indexer/0.1"})
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:  # noqa: S310 - opt-in download
                length = resp.headers.get("Content-Length")
                if length and int(length) > cfg.max_bytes:
                    raise InputError(f"download too large ({int(length):,} bytes > {cfg.max_bytes:,})")
                data = resp.read(cfg.max_bytes + 1)
            if len(data) > cfg.max_bytes:
                raise InputError(f"download too large (> {cfg.max_bytes:,} bytes)")
            if not data:
                raise InputError("empty download (0 bytes)")
            return data
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - network errors of every kind are retried
            last = exc
            if attempt < cfg.retries:
                time.sleep(0.5 * 2 ** attempt)
    raise InputError(f"download failed after {cfg.retries + 1} tries: {last}")
