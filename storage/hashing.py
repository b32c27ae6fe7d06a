"""Streaming checksums: every algorithm a source may promise, fed chunk by chunk.

Invariant: ``MultiHasher`` sees every byte of a file exactly once, in order; the digests it returns
use the same names as ``RemoteFile.checksums``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Protocol

import google_crc32c

# Strongest first: the engine verifies with the first algorithm a file has.
PREFERENCE = ("sha256", "git-sha1", "md5", "crc32c")
CHUNK = 4 * 1024 * 1024


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32c:
    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | memoryview) -> None:
        self._crc = int(google_crc32c.extend(self._crc, bytes(data)))

    def hexdigest(self) -> str:
        return f"{self._crc:08x}"


def new_hasher(algo: str, size: int) -> _Hasher:
    """A hasher for ``algo``. ``git-sha1`` needs the file size for the blob header."""
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algo == "git-sha1":
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\x00" % size)
        return h
    if algo == "crc32c":
        return _Crc32c()
    raise ValueError(f"unknown checksum algorithm {algo!r}")


def checkable(checksums: dict[str, str]) -> list[str]:
    """The algorithms of ``checksums`` we can verify, strongest first."""
    return [a for a in PREFERENCE if a in checksums]


class MultiHasher:
    """Feeds the same bytes to several hashers."""

    def __init__(self, algos: Iterable[str], size: int) -> None:
        self.hashers = {a: new_hasher(a, size) for a in algos}

    def update(self, data: bytes | memoryview) -> None:
        for h in self.hashers.values():
            h.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.hashers.items()}


def hash_file(path: str, algos: Iterable[str], size: int | None = None, chunk: int = CHUNK,
              throttle: Callable[[int], None] | None = None) -> dict[str, str]:
    """Hash a file on disk with every algorithm in ``algos`` in one read pass (bounded memory).

    ``throttle(n)`` is called after each read of ``n`` bytes (a :class:`~.throttle.RateLimiter` paces the reads
    with it; it may raise to stop)."""
    import os

    if size is None:
        size = os.path.getsize(path)
    mh = MultiHasher(algos, size)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            mh.update(view[:n])
            if throttle is not None:
                throttle(n)
    return mh.hexdigests()
