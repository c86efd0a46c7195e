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

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_IN_FLIGHT_MB = 1024.0
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024


def weights_dir() -> Path | None:
    value = os.environ.get("LOUPE_WEIGHTS_DIR")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    value = os.environ.get("LOUPE_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "loupe"


def max_pixels() -> int:
    return _number("LOUPE_MAX_PIXELS", DEFAULT_MAX_PIXELS, int)


def threads() -> int | None:
    n = _number("LOUPE_THREADS", 0, int)
    return n if n > 0 else None


def in_flight_bytes() -> int:
    return int(_number("LOUPE_IN_FLIGHT_MB", DEFAULT_IN_FLIGHT_MB, float) * (1 << 20))



def max_file_bytes() -> int:
    return _number("LOUPE_MAX_FILE_BYTES", DEFAULT_MAX_FILE_BYTES, int)


def _number(name: str, default, kind):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        from retrieval.errors import LoupeError

        raise LoupeError(f"{name}={raw!r} is not a number; unset it or give a number") from None
