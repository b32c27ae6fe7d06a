"""The progress gate: a pull's byte counts reach its ``progress`` callback at a bounded rate.

Not the byte throttle (:class:`~.throttle.RateLimiter` paces the bytes themselves); this one only paces the
reports about them, so a caller's callback (a tqdm bar, a ConfigMap writer) never slows the workers down.

Invariants:
- ``progress(done, total)`` is called at most once per ``interval`` from :meth:`ProgressGate.add`, plus once by
  :meth:`ProgressGate.final`, always outside the gate's lock.
- ``done`` counts the bytes present (kept, hashed or fetched) less those being fetched again; ``fetched`` only
  grows.
"""

from __future__ import annotations

import threading
import time

from .options import Progress

__all__ = ["ProgressGate"]


class ProgressGate:
    """Calls ``progress(done, total)`` at most once per interval (plus :meth:`final`)."""

    def __init__(self, total: int, done: int, cb: Progress | None, interval: float) -> None:
        self.total, self.done, self._cb, self._interval = total, done, cb, interval
        self.fetched = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def forget(self, n: int) -> None:
        """``n`` bytes already counted as done are being fetched again."""
        with self._lock:
            self.done -= n

    def add(self, n: int) -> None:
        """``n`` more bytes are present; tells ``progress`` if an interval has passed since it last did."""
        with self._lock:
            self.done += n
            self.fetched += n
            now = time.monotonic()
            if self._cb is None or now - self._last < self._interval:
                return
            self._last = now
            done = self.done
        self._cb(done, self.total)

    def final(self) -> None:
        """Tells ``progress`` where the count stands, whatever the interval."""
        if self._cb is not None:
            self._cb(self.done, self.total)
