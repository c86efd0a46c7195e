"""Every environment variable Loupe reads, in one place, read at call time (never at import).

========================  ==================================================================  ==============
variable                  what it sets                                                        default
========================  ==================================================================  ==============
``LOUPE_WEIGHTS_DIR``     a folder of model weights, looked at before the model hubs' caches  (none)
``LOUPE_CACHE_DIR``       caches Loupe builds (text databases, ConSE label vectors)           ~/.cache/loupe
``LOUPE_MAX_PIXELS``      the largest image (width × height) Loupe decodes                    100,000,000
``LOUPE_MAX_DECODE_MB``   the most memory one image decode may take (pixels × bytes/pixel)    256
``LOUPE_MAX_DECODES``     server: image uploads decoded and embedded at once                  2
``LOUPE_DECODE_WAIT``     server: seconds an upload waits for a decode slot (then 503 busy)   5
``LOUPE_UPLOADS``         server: query images kept for ``POST /api/uploads`` tokens          64
``LOUPE_UPLOADS_MB``      server: bytes those kept query images may take in all               128
``LOUPE_UPLOAD_TTL``      server: seconds an upload token lives after its last use            1800
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
DEFAULT_MAX_DECODE_MB = 256.0
DEFAULT_MAX_DECODES = 2
DEFAULT_DECODE_WAIT = 5.0
DEFAULT_UPLOADS = 64
DEFAULT_UPLOADS_MB = 128.0
DEFAULT_UPLOAD_TTL = 1800.0


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


def max_decode_bytes() -> int:
    """``LOUPE_MAX_DECODE_MB`` in bytes: the most memory one image decode may take (width × height × bytes
    per pixel of the decoded mode, after any reduced decode), checked from the header; 0 turns it off.

    256 MiB: every photo up to 64 MP decodes at full size (Pillow keeps RGB at 4 bytes per pixel: a 61 MP
    camera JPEG is 240 MiB), and so does a 100 MP 8-bit or 16-bit greyscale image; a 100 MP RGBA PNG
    (400 MB) does not. Callers that give a target size (the server, the encoders) decode JPEGs reduced,
    so an upload costs far less than this."""
    return int(_number("LOUPE_MAX_DECODE_MB", DEFAULT_MAX_DECODE_MB, float) * (1 << 20))


def max_decodes() -> int:
    """``LOUPE_MAX_DECODES``: server: image uploads decoded and embedded at once (at least 1)."""
    return max(1, _number("LOUPE_MAX_DECODES", DEFAULT_MAX_DECODES, int))


def decode_wait() -> float:
    """``LOUPE_DECODE_WAIT``: server: seconds an upload waits for a decode slot before a 503 ``busy``."""
    return max(0.0, _number("LOUPE_DECODE_WAIT", DEFAULT_DECODE_WAIT, float))


def uploads() -> int:
    """``LOUPE_UPLOADS``: server: how many uploaded query images (``POST /api/uploads``) are kept (at least 1)."""
    return max(1, _number("LOUPE_UPLOADS", DEFAULT_UPLOADS, int))


def uploads_bytes() -> int:
    """``LOUPE_UPLOADS_MB`` in bytes: server: the most the kept uploaded query images take together."""
    return max(1, int(_number("LOUPE_UPLOADS_MB", DEFAULT_UPLOADS_MB, float) * (1 << 20)))


def upload_ttl() -> float:
    """``LOUPE_UPLOAD_TTL``: server: seconds an upload token lives after it was last used (at least 1)."""
    return max(1.0, _number("LOUPE_UPLOAD_TTL", DEFAULT_UPLOAD_TTL, float))


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
