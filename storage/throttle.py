"""A byte-rate limiter for background reads (deep verification) that must never compete with serving.

Invariant: over any run of calls, :meth:`RateLimiter.take` returns no earlier than ``(bytes taken - credit) /
rate`` seconds after the first call, where the credit is what idle time banked (at most ``burst``; a new
limiter starts with none), so the long-run rate never exceeds ``rate`` bytes/s; it sleeps on a cancel
Event (a set cancel returns at once and makes :meth:`take` raise :class:`~.errors.CancelledError`). Thread-safe:
several hashing threads share one budget.
"""

from __future__ import annotations

import threading
import time

from .errors import CancelledError

MB = 1_000_000


class RateLimiter:
    """Token bucket of ``rate`` bytes/s holding at most ``burst`` bytes (default: a quarter second's worth)."""

    def __init__(self, rate: float, *, burst: float | None = None,
                 cancel: threading.Event | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate / 4)
        self.cancel = cancel or threading.Event()
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the bucket is empty again if nothing else is taken
        self.taken = 0

    @classmethod
    def mb_per_s(cls, mbps: float, *, cancel: threading.Event | None = None) -> RateLimiter | None:
        """``mbps`` megabytes (10**6 bytes) per second; ``None`` (no limit) for 0."""
        return None if mbps <= 0 else cls(mbps * MB, cancel=cancel)

    def take(self, n: int) -> None:
        """Account for ``n`` bytes just read; sleep as long as the budget is overdrawn."""
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.burst / self.rate)
            self._next = start + n / self.rate
            self.taken += n
            wait = self._next - now
        if wait > 0 and self.cancel.wait(wait):
            raise CancelledError("verification cancelled")
        if self.cancel.is_set():
            raise CancelledError("verification cancelled")

    __call__ = take
