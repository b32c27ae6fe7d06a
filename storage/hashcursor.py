"""In-order hashing of a file whose parts land out of order.

Invariant: the hasher sees every byte of ``[0, size)`` exactly once, in order. Bytes offered at the cursor
are hashed from the caller's buffer (no re-read); bytes that landed ahead of it are read back later from the
page cache by whichever thread next advances the cursor. Only one thread hashes at a time.
"""

from __future__ import annotations

import os
import threading

from .hashing import MultiHasher


class HashCursor:
    """``hasher`` has already seen ``[0, position)`` (a resumed file); the cursor continues from there."""

    def __init__(self, hasher: MultiHasher, fd: int, size: int, position: int = 0) -> None:
        self.hasher = hasher
        self.size = size
        self._fd = fd
        self._pos = position
        self._ready: dict[int, int] = {}  # start -> end of written, not yet hashed ranges
        self._busy = False
        self._cond = threading.Condition()
        self.reread_bytes = 0

    @property
    def position(self) -> int:
        with self._cond:
            return self._pos

    def add_written(self, start: int, end: int) -> None:
        """Record bytes already on disk (e.g. verified resume segments); hashed when the cursor gets there."""
        with self._cond:
            start = max(start, self._pos)
            if end > start:
                self._put(start, end)

    def offer(self, start: int, data: memoryview, buf: memoryview) -> None:
        """``data`` (bytes ``[start, start+len)``) was just written; hash it now if the cursor is there.

        ``buf`` is scratch space the caller lends for reading ranges that landed earlier back from disk.
        """
        end = start + len(data)
        with self._cond:
            if self._busy or self._pos != start:
                self._put(start, end)
                return
            self._busy = True
        try:
            self.hasher.update(data)
            with self._cond:
                self._pos = end
        except BaseException:
            self._release()
            raise
        self._catch_up(buf)

    def drain(self, buf: memoryview) -> int:
        """Hash every range recorded so far (waiting for a thread already hashing); return the cursor."""
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._busy = True
        self._catch_up(buf)
        return self.position

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _put(self, start: int, end: int) -> None:
        # merge with a range that ends where this one starts, keeping the map short
        for s, e in self._ready.items():
            if e == start:
                self._ready[s] = end
                return
        self._ready[start] = end

    def _catch_up(self, buf: memoryview) -> None:
        """Runs holding the busy flag; gives it up in the same critical section that finds no more work."""
        try:
            while True:
                with self._cond:
                    end = self._ready.pop(self._pos, None)
                    if end is None:
                        self._busy = False
                        self._cond.notify_all()
                        return
                    start = self._pos
                pos = start
                while pos < end:
                    n = os.preadv(self._fd, [buf[: min(len(buf), end - pos)]], pos)
                    if n <= 0:
                        raise OSError(f"short read at {pos} while hashing")
                    self.hasher.update(buf[:n])
                    pos += n
                self.reread_bytes += end - start
                with self._cond:
                    self._pos = end
        except BaseException:
            self._release()
            raise
