"""A rate-limited work queue with client-go's semantics (``k8s.io/client-go/util/workqueue``), thread-safe.

Invariants, all kept under one lock:

- A key is *waiting* (in the FIFO, counted by ``len``), *processing* (handed out by ``get`` and not yet
  ``done``), *delayed* (due at a future instant), or absent. A key waits at most once: ``add`` of a waiting
  key is a no-op. Internally, a key is waiting exactly when it is dirty and not processing.
- A key is never handed to two workers at once: ``add`` of a processing key only marks it *dirty*, and
  ``done`` re-queues a dirty key once, however many times it was added meanwhile.
- Producers never block on workers: ``add``, ``add_after`` and ``add_rate_limited`` take the lock only
  for a few dictionary operations and return at once.
- Delayed keys live in one heap; there is no thread per key and no timer thread at all: a getter sleeps
  until its own deadline or the earliest due instant, whichever is sooner, and moves due keys into the
  FIFO itself (so does ``len``). A producer that schedules an earlier due instant wakes the getters so
  they shorten their sleep. A key delayed twice keeps the earlier instant (client-go's rule); a delayed
  key that is added plainly meanwhile is processed now *and* again when it falls due.
- After ``shutdown`` every getter returns ``None`` at once (waiting keys are abandoned: the agent
  re-lists on its next start) and adds are ignored; ``done`` still works for keys being processed.

Backoff (client-go's ``ItemExponentialFailureRateLimiter``): the n-th consecutive ``add_rate_limited``
of a key (n from 0) is delayed ``min(backoff_max_s, backoff_base_s * 2**n)``, less up to
``jitter`` of itself (so keys that failed together spread out, and the cap is never exceeded);
``forget`` resets the count.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["WorkQueue"]

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Deduplicating FIFO of keys with delayed and rate-limited adds; see the module docstring."""

    def __init__(
        self,
        *,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        if backoff_base_s <= 0 or backoff_max_s < backoff_base_s:
            raise ValueError(f"need 0 < backoff_base_s <= backoff_max_s, got {backoff_base_s}, {backoff_max_s}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self._base = backoff_base_s
        self._max = backoff_max_s
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()  # waiting keys, plus processing keys added again
        self._processing: set[K] = set()
        self._due: dict[K, float] = {}  # delayed key -> its (earliest) due instant, monotonic seconds
        self._heap: list[tuple[float, int, K]] = []  # may hold stale entries; _due is the truth
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._shut = False

    # -- producers ---------------------------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue ``key`` unless it is already waiting; a key being processed is re-queued at its ``done``."""
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: K, delay_s: float) -> None:
        """Queue ``key`` after ``delay_s`` seconds (at once when ``delay_s <= 0``).

        A key already delayed keeps the earlier of its two due instants.
        """
        with self._cond:
            if self._shut:
                return
            if delay_s <= 0:
                self._add_locked(key)
                return
            due = time.monotonic() + delay_s
            current = self._due.get(key)
            if current is not None and current <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key))
            if self._heap[0][0] == due:
                self._cond.notify_all()  # getters may be sleeping past the new earliest instant

    def add_rate_limited(self, key: K) -> float:
        """Queue ``key`` after its next backoff delay and count one more retry; returns that delay (seconds)."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            delay = self._max if failures >= 64 else min(self._max, self._base * 2.0**failures)
            delay *= 1.0 - self._jitter * self._rng.random()
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset ``key``'s backoff: its next ``add_rate_limited`` waits ``backoff_base_s`` again."""
        with self._cond:
            self._failures.pop(key, None)

    def retries(self, key: K) -> int:
        """How many ``add_rate_limited`` calls ``key`` had since it was last forgotten."""
        with self._cond:
            return self._failures.get(key, 0)

    def remove(self, key: K) -> None:
        """Drop every pending run of ``key``: waiting, delayed, or the re-queue of a processing key.

        A run in progress is left to the caller to cancel; its ``done`` will not re-queue the key. The
        backoff count is kept (call ``forget`` as well to reset it).
        """
        with self._cond:
            if key in self._dirty and key not in self._processing:
                self._queue.remove(key)
            self._dirty.discard(key)
            self._due.pop(key, None)  # its heap entry is now stale and skipped

    # -- workers -----------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> K | None:
        """The next key, now marked processing; blocks up to ``timeout`` seconds (forever when ``None``).

        Returns ``None`` on timeout or once the queue is shut down. Every key returned must be given
        back with ``done``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shut:
                    return None
                now = time.monotonic()
                self._promote_due(now)
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                sleep = self._heap[0][0] - now if self._heap else None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    sleep = left if sleep is None else min(sleep, left)
                self._cond.wait(sleep)

    def done(self, key: K) -> None:
        """Mark ``key``'s run finished; if it was added meanwhile, queue it (once) for another run.

        Raises ``ValueError`` for a key that is not being processed (a worker bug: done twice, or never got).
        """
        with self._cond:
            if key not in self._processing:
                raise ValueError(f"done({key!r}): the key is not being processed")
            self._processing.remove(key)
            if key in self._dirty:  # dirty and not processing means waiting, shut down or not
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        """Wake every getter (they return ``None``); later adds are ignored."""
        with self._cond:
            self._shut = True
            self._cond.notify_all()

    # -- observation -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Keys waiting to be handed out (due delayed keys included; processing ones not)."""
        with self._cond:
            self._promote_due(time.monotonic())
            return len(self._queue)

    def processing(self) -> int:
        """Keys handed out by ``get`` and not yet ``done``."""
        with self._cond:
            return len(self._processing)

    @property
    def is_shutdown(self) -> bool:
        """Whether ``shutdown`` was called."""
        with self._cond:
            return self._shut

    # -- internals (lock held) ---------------------------------------------------------------------

    def _add_locked(self, key: K) -> None:
        if self._shut or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # re-queued by done()
        self._queue.append(key)
        self._cond.notify()

    def _promote_due(self, now: float) -> None:
        """Move every delayed key due by ``now`` into the FIFO, earliest first; drop stale heap entries."""
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                self._add_locked(key)
