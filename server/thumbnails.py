"""A small, thread-safe, byte-bounded LRU cache of JPEG thumbnails keyed by (image id, size)."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

MIN_SIZE, MAX_SIZE = 16, 2048


class ThumbnailCache:
    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._data[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes and self._data:
                _, dropped = self._data.popitem(last=False)
                self.bytes -= len(dropped)


def make_thumbnail(img: Image.Image, size: int) -> bytes:
    """RGB image → JPEG bytes whose longer side is at most ``size``."""
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()
