"""Our own writes, newer than the watch cache until the watch catches up.

A watch cache lags the writes this process just made. Deciding "already in place, nothing to write" from the cache
alone can skip a needed write (we wrote Updating, the cache still shows the Ready before it). :class:`OwnWrites`
keeps, per key, what we wrote and the object's resourceVersion after that write; :meth:`current` answers from the
cache once the cache holds that resourceVersion or a later one, else from our write.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

V = TypeVar("V")
_MISSING = object()


def rv_number(rv: object) -> int | None:
    """etcd's resourceVersions are increasing integers; treat anything else as unknown (never newer)."""
    try:
        return int(str(rv))
    except ValueError:
        return None


class OwnWrites(Generic[V]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writes: dict[str, tuple[V | None, int | None]] = {}

    def wrote(self, key: str, value: V | None, rv: object) -> None:
        with self._lock:
            self._writes[key] = (value, rv_number(rv))

    def current(self, key: str, cached: V | None, cache_rv: object) -> V | None:
        with self._lock:
            mine = self._writes.get(key)
            if mine is None:
                return cached
            value, rv = mine
            seen = rv_number(cache_rv)
            if rv is not None and seen is not None and seen >= rv:
                del self._writes[key]  # the cache has caught up (and may hold a later change by someone else)
                return cached
            return value
