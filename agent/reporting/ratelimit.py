"""A token bucket per key (one model's label, one model's Events): what keeps one misbehaving model from flooding
the API server, every kubelet and every controller watching Nodes.

Invariant: each key may spend at most ``burst`` tokens at once and gets ``rate_per_s`` back per second; keys never
share a bucket, so one model's storm never delays another's writes. Memory is bounded: at most ``max_keys``
buckets are kept (the least recently used goes first; a forgotten key starts with a full bucket).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class KeyedRateLimiter:
    def __init__(self, *, burst: int, rate_per_s: float, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.max_keys, self._clock = float(burst), rate_per_s, max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def reserve(self, key: str) -> float:
        """Take one token for ``key``; the seconds to wait before using it (0: at once)."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate) - 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return 0.0 if tokens >= 0 else -tokens / self.rate

    def allow(self, key: str) -> bool:
        """Take a token only when one is there now (for what may be dropped, such as an Event)."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok
