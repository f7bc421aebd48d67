"""Small JPEG thumbnails of indexed files, decoded with embed.decode and kept in an LRU cache.

Only paths read from the index reach this module; the request names an item id, never a path.
"""

from __future__ import annotations

import collections
import io
import os
import threading

from embed.decode import decode_image


class ThumbnailCache:
    def __init__(self, *, size: int, max_pixels: int, max_entries: int = 2048) -> None:
        self.size = size
        self.max_pixels = max_pixels
        self.max_entries = max_entries
        self._cache: collections.OrderedDict[tuple[str, float, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> bytes:
        """JPEG bytes, longest side at most `size`. Raises FileNotFoundError, embed.decode.DecodeError."""
        mtime = os.stat(path).st_mtime
        key = (path, mtime, self.size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._render(path)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return data

    def _render(self, path: str) -> bytes:
        img = decode_image(path, max_pixels=self.max_pixels, draft_size=(self.size, self.size))
        img.thumbnail((self.size, self.size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
