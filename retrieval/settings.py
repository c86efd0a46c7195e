"""Every environment variable Loupe reads, in one place, read at call time (never at import).

========================  ==================================================================  ==============
variable                  what it sets                                                        default
========================  ==================================================================  ==============
``LOUPE_WEIGHTS_DIR``     a folder of model weights, looked at before the model hubs' caches  (none)
``LOUPE_CACHE_DIR``       caches Loupe builds (text databases, ConSE label vectors)           ~/.cache/loupe
``LOUPE_MAX_PIXELS``      the largest image (width × height) Loupe decodes                    100,000,000
``LOUPE_THREADS``         CPU threads for torch                                               all cores
``LOUPE_IN_FLIGHT_MB``    indexer: bytes of decoded batches waiting for the encoder           1024
``LOUPE_MAX_FILE_BYTES``  indexer: larger input files are skipped (and reported)              512 MiB
========================  ==================================================================  ==============
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T", int, float)

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_IN_FLIGHT_MB = 1024.0
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024


def weights_dir() -> Path | None:
    """``LOUPE_WEIGHTS_DIR`` (user-expanded), or None when unset or empty."""
    value = os.environ.get("LOUPE_WEIGHTS_DIR")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """``LOUPE_CACHE_DIR`` (user-expanded), default ``~/.cache/loupe``."""
    value = os.environ.get("LOUPE_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "loupe"


def max_pixels() -> int:
    """``LOUPE_MAX_PIXELS``: the largest image (width × height) to decode; 0 turns the guard off."""
    return _number("LOUPE_MAX_PIXELS", DEFAULT_MAX_PIXELS, int)


def threads() -> int | None:
    """``LOUPE_THREADS``: torch's CPU threads, or None (unset or 0) for all cores."""
    n = _number("LOUPE_THREADS", 0, int)
    return n if n > 0 else None


def in_flight_bytes() -> int:
    """``LOUPE_IN_FLIGHT_MB`` in bytes."""
    return int(_number("LOUPE_IN_FLIGHT_MB", DEFAULT_IN_FLIGHT_MB, float) * (1 << 20))


def max_file_bytes() -> int:
    """``LOUPE_MAX_FILE_BYTES``: larger input files are skipped by the indexer."""
    return _number("LOUPE_MAX_FILE_BYTES", DEFAULT_MAX_FILE_BYTES, int)


def _number(name: str, default: T, kind: Callable[[Any], T]) -> T:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        from retrieval.errors import LoupeError

        raise LoupeError(f"{name}={raw!r} is not a number; unset it or give a number") from None
