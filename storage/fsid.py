"""Which filesystem a models root is: a random id kept in a marker file at the root, the same on every node.

Two shared filesystems mounted at one path (one Lustre or NFS per zone or node pool) must count as two places:
one download, one removal, one repair and one staging GC each. ``st_dev`` and statfs ``f_fsid`` cannot tell
them apart (they differ between nodes for the same NFS export, and can coincide for different ones), so the
filesystem names itself: the first node to look creates ``.modelherd-filesystem-id`` holding 32 random hex
digits, and every node that mounts the same filesystem reads the same id.

Invariants:
- the marker is created atomically and never replaced: it is written to a private temporary name, flushed, then
  ``link(2)``ed to the marker name, which fails with ``EEXIST`` when another node was first (``link`` is atomic on
  NFS too, unlike ``O_EXCL`` on old clients); the loser reads the winner's id. A filesystem without hard links
  (some FUSE, SMB) gets an ``O_EXCL`` create instead, and a reader that finds it still empty waits for its id;
- a root that cannot be written (a read-only mount) and has no marker yet has no id (``""``): such a node waits and
  verifies, it never downloads;
- a marker that is not exactly one id (edited, truncated) is an error naming the file, never silently replaced;
- nothing outside the models root is read or written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from .errors import ModelsRootError
from .untrusted import UntrustedInputError, read_limited

log = logging.getLogger(__name__)

MARKER_NAME = ".modelherd-filesystem-id"
_ID = re.compile(r"[0-9a-f]{32}")
_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def _read(marker: Path, *, settle_s: float = 2.0) -> str | None:
    deadline = time.monotonic() + settle_s
    while True:
        try:
            raw = read_limited(marker, max_bytes=256)
        except FileNotFoundError:
            return None
        except (OSError, UntrustedInputError) as e:
            raise ModelsRootError(f"the filesystem id {marker} cannot be read ({e})",
                                  hint="it must be a regular file holding 32 hex digits; restore or remove it") \
                from None
        if raw or time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # created exclusively by another node a moment ago, not yet written
    text = raw.decode("ascii", errors="replace").strip()
    if not _ID.fullmatch(text):
        raise ModelsRootError(f"the filesystem id {marker} does not hold one id (32 hex digits)",
                              hint="restore it from another node's view of this filesystem, or remove it on every "
                                   "node at once (the next agent creates a new one)")
    return text


def _create(root: Path, marker: Path) -> str | None:
    value = secrets.token_hex(16)
    tmp = root / f"{MARKER_NAME}.tmp-{secrets.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        raise
    try:
        try:
            os.write(fd, (value + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, marker)
        except FileExistsError:
            return _read(marker)
        except OSError as e:  # a filesystem without hard links (some FUSE, SMB): exclusive create instead
            log.debug("link(2) refused in %s (%s): creating the filesystem id exclusively", root, e.strerror)
            return _create_exclusive(marker, value)
        with contextlib.suppress(OSError):
            dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return value
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _create_exclusive(marker: Path, value: str) -> str | None:
    """``O_EXCL`` create, write, fsync: a reader that comes in between finds it empty and waits (:func:`_read`)."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return _read(marker)
    try:
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return value


def filesystem_id(models_root: Path, *, create: bool = True) -> str:
    """The id of the filesystem that holds ``models_root`` (created when absent and ``create``); ``""`` when the
    root has none and cannot get one (read-only). Cached per mount (the root's device and inode)."""
    root = Path(os.path.realpath(models_root))
    st = os.stat(root)
    key = (str(root), st.st_dev, st.st_ino)
    with _lock:
        if key in _cache:
            return _cache[key]
    marker = root / MARKER_NAME
    found = _read(marker)
    if found is None and create:
        found = _create(root, marker)
    if found is None:
        return ""  # not cached: a writable node may create it later
    with _lock:
        _cache[key] = found
    return found
