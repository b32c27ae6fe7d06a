"""Writing downloaded bytes with ``O_DIRECT``: straight from the engine's buffer to the disk.

A buffered ``pwrite`` copies every byte into the page cache, and the kernel later spends CPU again writing the
dirty pages back; the fsync before publish then waits for that writeback. For a model that is hundreds of GB
this also evicts everything else the node had cached. With ``O_DIRECT`` the disk reads the engine's own buffer
(DMA, no copy), so the bytes are on the device when ``pwrite`` returns and the fsync only flushes metadata.

Invariants:
- :meth:`FileWriter.write` writes exactly the bytes asked for at the offset asked for, whichever path it takes:
  the aligned head of a piece (address, offset and length multiples of :data:`ALIGN`) goes through the
  ``O_DIRECT`` descriptor, anything else (a file's last partial page, a piece after a short read) through the
  ordinary one. The kernel keeps the two coherent for the same file.
- A filesystem that refuses ``O_DIRECT`` (at open or at the first write, ``EINVAL``) gets buffered writes for
  the rest of that file, never an error.
- Buffers from :func:`aligned_buffer` are page-aligned anonymous memory, released by the garbage collector.
- ``direct_io=auto`` is resolved by one rule, :func:`resolve_direct_io` (on for local storage, off for shared),
  whether the caller knows the storage mode in force (the agent, the CLI) or only a path (:func:`direct_io_at`).
- :func:`start_writeback` is only a hint: it never fails and never waits.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from .errors import ConfigError
from .fsdetect import detect_filesystem

__all__ = ["ALIGN", "DirectMode", "FileWriter", "aligned_buffer", "direct_io_at", "resolve_direct_io",
           "start_writeback"]

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
_HUGE = 2 * 1024 * 1024
DirectMode = Literal["auto", "on", "off"]
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_buffer(size: int) -> memoryview:
    """A writable, page-aligned buffer of ``size`` bytes (rounded up to :data:`ALIGN`).

    Buffers of 2 MiB and more start on a 2 MiB boundary and ask for transparent huge pages
    (``MADV_HUGEPAGE``; a hint the kernel may ignore): receiving, hashing and ``O_DIRECT`` pinning then touch
    a few huge pages instead of a thousand small ones per chunk.
    """
    size = max(ALIGN, -(-size // ALIGN) * ALIGN)
    if size < _HUGE:
        return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    area = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(area)
    skip = -_address(view) % _HUGE
    if hasattr(area, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # no THP in this kernel: small pages work the same, only slower
            area.madvise(mmap.MADV_HUGEPAGE, skip, size)
    return view[skip: skip + size]


def _address(view: memoryview) -> int:
    """Where ``view``'s first byte lives (O_DIRECT needs it aligned); -1 for a read-only view."""
    if view.readonly:
        return -1  # ctypes cannot take a read-only buffer; such a view never comes from aligned_buffer
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class FileWriter:
    """Positional writes into an open file ``fd``, through ``O_DIRECT`` where the piece allows it.

    ``fd`` stays the caller's (it reads it back, truncates it, fsyncs it); the ``O_DIRECT`` descriptor opened
    here on the same path is closed by :meth:`close`.
    """

    def __init__(self, fd: int, path: str | os.PathLike[str], *, direct: bool) -> None:
        self.fd = fd
        self._direct_fd = -1
        self.direct_bytes = 0
        if direct and _O_DIRECT:
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | _O_DIRECT)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise

    @property
    def direct(self) -> bool:
        """Aligned pieces still go through ``O_DIRECT``."""
        return self._direct_fd >= 0

    def write(self, data: memoryview, pos: int) -> None:
        """Write all of ``data`` at ``pos``; ``OSError`` (ENOSPC, EIO, ...) propagates.

        From an aligned start, the largest aligned head goes direct and only the remainder (under
        :data:`ALIGN` bytes: a file's last page) is buffered.
        """
        head = len(data) - len(data) % ALIGN
        if self._direct_fd >= 0 and head and pos % ALIGN == 0 and _address(data) % ALIGN == 0:
            try:
                self._pwrite_all(self._direct_fd, data[:head], pos)
                self.direct_bytes += head
                data, pos = data[head:], pos + head
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._drop_direct()  # the filesystem's own alignment rules are stricter: buffered from now on
        if data:
            self._pwrite_all(self.fd, data, pos)

    @staticmethod
    def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
        while data:
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n

    def _drop_direct(self) -> None:
        fd, self._direct_fd = self._direct_fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        self._drop_direct()

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_direct_io(mode: str, storage_kind: str) -> bool:
    """The one rule for ``direct_io``: ``on`` and ``off`` as given; ``auto`` is on for node-local storage
    (``storage_kind == "local"``) and off for shared storage (NFS, Lustre, FUSE, ...), where the semantics and
    speed of ``O_DIRECT`` depend on the client, so buffered writes stay the default there."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"direct_io must be auto, on or off, got {mode!r}", hint="fix the download settings")
    if mode != "auto":
        return mode == "on"
    return storage_kind == "local"


def direct_io_at(mode: str, path: Path) -> bool:
    """:func:`resolve_direct_io` for writes under ``path``; with ``auto``, the kind is that of the filesystem
    detected there (:func:`~.fsdetect.detect_filesystem`; one that cannot be classified counts as shared)."""
    if mode != "auto":
        return resolve_direct_io(mode, "local")
    try:
        kind: str = detect_filesystem(path).kind
    except (OSError, ConfigError):
        kind = "shared"
    return resolve_direct_io(mode, kind)


_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+length)`` to disk now, without waiting (Linux).

    For buffered writes: the fsync before publish then finds little left to do, and writeback overlaps the
    download instead of following it. A no-op where ``sync_file_range`` is missing or refuses (it is only a hint).
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
