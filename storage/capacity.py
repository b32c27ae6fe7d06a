"""Free-space checks: fail before downloading, with numbers, instead of half way through.

Invariant: ``ENOSPC``/``EDQUOT`` from any write of the engine surface as :class:`InsufficientSpaceError`.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .errors import InsufficientSpaceError

log = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MiB = 1024 * 1024


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``; ``None`` when the
    filesystem reports no size at all (``f_blocks == 0``: ramfs, some FUSE and network filesystems)."""
    st = os.statvfs(path)
    if st.f_blocks == 0:
        return None
    return st.f_bavail * st.f_frsize


def allocated_bytes(path: Path) -> int:
    """Bytes already allocated on disk for ``path`` (0 when absent); sparse holes do not count."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def ensure_free_space(directory: Path, needed: int) -> None:
    """Raise :class:`InsufficientSpaceError` when ``needed`` bytes do not fit on ``directory``'s filesystem.

    A filesystem that reports no size cannot be checked up front; a full disk then still surfaces as
    :class:`InsufficientSpaceError` from the write that hits it.
    """
    free = free_bytes(directory)
    if free is None:
        log.info("%s reports no capacity (statvfs f_blocks = 0); skipping the free-space check", directory)
        return
    if needed > free:
        raise InsufficientSpaceError(
            f"not enough space in {directory}: need {needed / MiB:.1f} MiB more, {free / MiB:.1f} MiB free",
            hint="free space on the models volume or pull a smaller model")


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def no_space_error(exc: OSError, where: Path) -> InsufficientSpaceError:
    return InsufficientSpaceError(f"filesystem full while writing {where}: {os.strerror(exc.errno or 0)}",
                                  hint="free space on the models volume; the partial download was removed")
