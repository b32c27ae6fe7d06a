"""Files already in staging with their listed size and no resume state, hashed in parallel before planning.

They were seeded there by a repair or an adoption (:mod:`~.repair`), or left by a run whose resume state was lost;
hashing them here, one thread per file, spares :func:`~.plan.plan_file` hashing them one at a time.

Invariants:
- A file is kept only when its bytes match the listing's checksum and it was not written while it was hashed
  (same ``stat_key`` before and after); it is then recorded as verified with that ``stat_key``, and flushed with
  ``options.fsync``.
- A file that fails loses only its name in staging (never its inode: a seeded hard link's published twin is
  never touched), so it is fetched into a new inode.
- Memory is one ``chunk_size`` buffer per thread; a set cancel Event stops every thread at its next read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .hashing import hash_file
from .options import EngineOptions, Progress, check_cancel
from .paths import contained
from .plan import files_in_flight, layout
from .progress import ProgressGate
from .staging import FileState, load_state, save_state, stat_key
from .types import RemoteFile

__all__ = ["verify_present"]

log = logging.getLogger(__name__)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_present(staging: Path, files: list[RemoteFile], options: EngineOptions, cancel: threading.Event | None,
                    progress: Progress | None = None) -> tuple[list[str], list[str]]:
    """Hash, in parallel, every file of ``files`` that is in ``staging`` with its listed size and no resume state
    (seeded by a repair or an adoption, or left by a run whose state was lost): what :func:`~.plan.plan_file`
    would otherwise hash one file at a time. Returns ``(kept, failed)``: a kept file is recorded as verified (its
    state done, its ``stat_key`` from before the hash, so :func:`~.plan.plan_file` and :func:`~.publish.publish`
    trust it while it is untouched) and, with ``options.fsync``, flushed (a copy another tool just wrote may not
    be on the disk yet); a failed file's name is removed from staging (only that name: a seeded hard link's
    published twin is never touched), so it is fetched into a new inode.

    Threads: one per file up to the engine's stream slots (``concurrency * multipart_concurrency``), else
    ``concurrency`` (hashlib releases the GIL, so files hash on every core); memory: one ``chunk_size`` buffer per
    thread. ``progress(hashed, total)`` counts the bytes hashed of those to hash; a set ``cancel`` stops every
    thread at its next read (:class:`CancelledError`)."""
    todo: list[tuple[RemoteFile, Path, FileState]] = []
    for rf in files:
        target = contained(staging, rf.path, what="file name")
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            continue
        fresh = layout(rf, options, split=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size != rf.size or not fresh.expect:
            continue
        if load_state(staging, rf.path) is not None:
            continue  # resume state: plan_file checks its checkpoints
        todo.append((rf, target, fresh))
    if not todo:
        return [], []
    gate = ProgressGate(sum(rf.size for rf, _, _ in todo), 0, progress, options.progress_interval_s)

    def paced(n: int) -> None:
        check_cancel(cancel)
        gate.add(n)

    def one(item: tuple[RemoteFile, Path, FileState]) -> bool:
        rf, target, state = item
        algos = options.hash_algos(state.expect)
        try:
            before = stat_key(os.stat(target))
            got = hash_file(str(target), algos, rf.size, chunk=options.chunk_size, throttle=paced)
            same = before == stat_key(os.stat(target))  # not written while we read it
            if same and options.fsync:
                _fsync_file(target)  # a copy just made by another tool may still be in the page cache only
        except OSError as e:
            log.warning("cannot read %s (%s): fetching it", rf.path, e.strerror or e)
            before, got, same = [], {}, False
        if not same or any(got.get(a) != v for a, v in state.expect.items()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return False
        state.done, state.digests, state.verified_stat = True, got, before
        save_state(staging, state)
        return True

    todo.sort(key=lambda t: -t[0].size)  # biggest first: the threads finish together
    pool = ThreadPoolExecutor(files_in_flight(len(todo), options), thread_name_prefix="modelherd-hash")
    try:
        results = list(pool.map(one, todo))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    gate.final()
    kept = [t[0].path for t, ok in zip(todo, results, strict=True) if ok]
    failed = [t[0].path for t, ok in zip(todo, results, strict=True) if not ok]
    return kept, failed
