"""A small thread-safe in-process cache with a time-to-live per entry.

One per kind of thing a worker re-reads on hot paths (configs and user mappings for launches,
subscription secrets for the webhook). Entries expire on read; the cache is emptied when it
grows past ``max_items`` (a bound, not an LRU: these caches hold far fewer entries).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

__all__ = ["MISSING", "Missing", "TtlCache"]

K = TypeVar("K")
V = TypeVar("V")


class Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = Missing()


class TtlCache(Generic[K, V]):
    def __init__(
        self, *, max_items: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._items: dict[K, tuple[float, V]] = {}
        self._max_items = max_items
        self._clock = clock
        self._lock = threading.Lock()

    def get(self, key: K) -> V | Missing:
        """The cached value, or ``MISSING`` when absent or expired (a cached ``None`` is a hit)."""
        with self._lock:
            hit = self._items.get(key)
        if hit is None or hit[0] <= self._clock():
            return MISSING
        return hit[1]

    def put(self, key: K, value: V, *, ttl: float) -> None:
        with self._lock:
            if len(self._items) >= self._max_items:
                self._items.clear()
            self._items[key] = (self._clock() + ttl, value)

    def forget(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)
