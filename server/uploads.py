"""Query images uploaded once (``POST /api/uploads``) and named by a token in later requests.

The web page uploads a query image once and then sends ``"upload": "<token>"`` instead of the image with
every request that needs it (the search, "Load more", each "Why?" overlay, the pair view). The server keeps
the image's bytes — checked to decode within the usual limits when they were uploaded — in an
:class:`UploadCache`: bounded in count (``LOUPE_UPLOADS``) and in bytes (``LOUPE_UPLOADS_MB``), least
recently used first out, and a token expires ``LOUPE_UPLOAD_TTL`` seconds after its last use. Tokens are
``secrets.token_urlsafe`` (unguessable); an unknown or expired one is a 404 ``upload_not_found``.
The bytes (not the decoded picture) are kept, so a request with a token decodes exactly what a request
with the file would: the answers are the same.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from retrieval import settings
from retrieval.errors import LoupeError

TOKEN_BYTES = 24           # 32 URL-safe characters
MAX_TOKEN_CHARS = 64


class UploadNotFoundError(LoupeError, code="upload_not_found", status=404):
    pass


@dataclass
class Upload:
    data: bytes
    width: int
    height: int
    expires: float          # monotonic seconds


class UploadCache:
    """Token → uploaded image bytes; at most ``max_count`` entries and ``max_bytes`` bytes, LRU, with a
    sliding time to live (``ttl`` seconds after the last use). Thread-safe."""

    def __init__(self, max_count: int, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.max_count, self.max_bytes, self.ttl, self.clock = int(max_count), int(max_bytes), float(ttl), clock
        self._items: OrderedDict[str, Upload] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0

    @classmethod
    def from_settings(cls) -> "UploadCache":
        return cls(settings.uploads(), settings.uploads_bytes(), settings.upload_ttl())

    def put(self, data: bytes, width: int, height: int) -> str:
        """Keep ``data``; returns its new token. An image larger than the whole cache is refused (413)."""
        if len(data) > self.max_bytes:
            from retrieval.errors import ImageTooLargeError

            raise ImageTooLargeError(f"the image ({len(data)} bytes) is larger than the upload cache "
                                     f"({self.max_bytes} bytes, LOUPE_UPLOADS_MB); send it with each request instead")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self._lock:
            self._expire()
            while self._items and (len(self._items) >= self.max_count or self._bytes + len(data) > self.max_bytes):
                self._drop(next(iter(self._items)))
                self.evicted += 1
            self._items[token] = Upload(bytes(data), int(width), int(height), self.clock() + self.ttl)
            self._bytes += len(data)
        return token

    def get(self, token: object) -> Upload:
        """The upload named by ``token`` (its life starts again); ``UploadNotFoundError`` when unknown or expired."""
        if not isinstance(token, str) or not token.strip():
            raise UploadNotFoundError("upload must be a token from POST /api/uploads")
        token = token.strip()
        with self._lock:
            item = self._items.get(token) if len(token) <= MAX_TOKEN_CHARS else None
            if item is not None and item.expires <= self.clock():
                self._drop(token)
                item = None
            if item is None:
                raise UploadNotFoundError(
                    "unknown or expired upload token: upload the image again (POST /api/uploads with an image "
                    "file) or send the image itself with this request")
            item.expires = self.clock() + self.ttl
            self._items.move_to_end(token)
            return item

    def stats(self) -> tuple[int, int]:
        """(uploads kept, their bytes), expired ones dropped first."""
        with self._lock:
            self._expire()
            return len(self._items), self._bytes

    def _expire(self) -> None:
        now = self.clock()
        for token in [t for t, item in self._items.items() if item.expires <= now]:
            self._drop(token)

    def _drop(self, token: str) -> None:
        item = self._items.pop(token)
        self._bytes -= len(item.data)


_CREATE_LOCK = threading.Lock()


def upload_cache(app=None) -> UploadCache:
    """The app's upload cache (made on first use, from the settings then)."""
    from server.common import state

    st = state(app)
    cache = st.get("uploads")
    if cache is None:
        with _CREATE_LOCK:
            cache = st.get("uploads")
            if cache is None:
                cache = st["uploads"] = UploadCache.from_settings()
    return cache
