"""Staging folders and the resume state kept inside them.

Invariants:
- A staging folder lives in ``<models_root>/.modelherd-staging/`` (same filesystem as every destination, so
  publishing is one rename) and is named by :func:`staging_dir_for` alone.
- Resume state is a small JSON file per in-progress model file under ``<staging>/.modelherd-parts/``; it holds
  only relative names, so a staging folder can be moved (:func:`adopt_staging`) and still resume. A listing's
  archives (tar layers) are fetched into ``<staging>/.modelherd-layers/`` (:mod:`~.unpack`), which
  :func:`tidy_staging` keeps and publish removes.
- A checkpoint is recorded only after its bytes were written; on restart every checkpoint is checked against
  the bytes on disk before it is trusted, so the state never needs an fsync to be safe.
- One owner at a time: whoever writes into, adopts, tidies or publishes a staging folder holds
  :func:`own_staging` on it, an exclusive ``flock(2)`` on ``<staging>.lock`` beside it plus an in-process
  registry (threads of one process exclude each other even where the filesystem turns ``flock`` into POSIX
  locks, which are per process: NFS). The lock file is removed by its owner while still held; an acquirer
  checks that the file it locked is still the one at the path, so removal never lets two owners in.
- A staging folder holds only what may serve its listing (:func:`tidy_staging`): the listing's files (and
  their folders) and, while the listing is the one recorded in ``.modelherd-parts/listing``, their resume
  state. Anything else — files of another revision, an old model left by a kill after the publish swap —
  is removed before a download starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CancelledError, StagingBusyError
from .paths import staging_root

log = logging.getLogger(__name__)

STATE_DIRNAME = ".modelherd-parts"
#: the archives (tar layers) of a listing, fetched and verified before they are extracted; never published
LAYERS_DIRNAME = ".modelherd-layers"
RESERVED_PREFIX = ".modelherd-"
LISTING_MARKER = "listing"
LOCK_SUFFIX = ".lock"
ASIDE_SUFFIX = ".old"
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _clean_token(text: str, limit: int) -> str:
    token = _UNSAFE_CHARS.sub("_", text).strip("._") or "x"
    return token[:limit]


def staging_dir_for(models_root: Path, dest: Path, writer: str, epoch: int) -> Path:
    """``<models_root>/.modelherd-staging/<tail>-<hash>.<writer>.<epoch>``, the same for the same arguments.

    The hash covers ``dest`` relative to the (resolved) models root, so two destinations never share a folder;
    the tail keeps it readable. ``writer`` is reduced to ``[A-Za-z0-9._-]``.
    """
    root = Path(os.path.realpath(models_root))
    real = Path(os.path.realpath(dest))
    try:
        rel = real.relative_to(root).as_posix()
    except ValueError:
        rel = real.as_posix()
    digest = hashlib.sha256(rel.encode()).hexdigest()[:12]
    key = f"{_clean_token(real.name, 40)}-{digest}"
    return staging_root(root) / f"{key}.{_clean_token(writer, 63)}.{int(epoch)}"


def state_path(staging: Path, relpath: str) -> Path:
    """Where the resume state of model file ``relpath`` lives inside ``staging``."""
    name = hashlib.sha256(relpath.encode()).hexdigest()[:24]
    return Path(staging) / STATE_DIRNAME / f"{name}.json"


@dataclass
class FileState:
    """Resume state of one file: its layout and the checkpoints of the segments already written.

    A file fetched as one stream (one part) is hashed in order as it lands, so its checkpoints cost nothing:
    ``prefix[k]`` is the ``prefix_algo`` hex digest of bytes ``[0, (k + 1) * segment_size)``. A file fetched as
    several ranged parts has, per part, ``parts[i][k]`` = CRC-32 of segment ``k`` of part ``i`` (segments are
    ``segment_size`` long, the last one of a part may be shorter). ``done`` is set once the whole file was
    verified; ``digests`` are then the digests computed while it streamed.
    """

    path: str
    size: int
    expect: dict[str, str]
    part_size: int
    segment_size: int
    parts: list[list[int]] = field(default_factory=list)
    done: bool = False
    digests: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)
    prefix_algo: str = ""
    verified_stat: list[int] = field(default_factory=list)  # stat_key() of the file when ``done`` was set

    def layout_matches(self, other: FileState) -> bool:
        """Same file and checkpoint granularity: ``self``'s checkpoints can resume ``other``.

        The part size may differ (whether a file is split depends on the rest of the model); a resumed file keeps
        the part layout its checkpoints were taken with.
        """
        return (self.path, self.size, self.expect, self.segment_size) == (
            other.path, other.size, other.expect, other.segment_size) and self.part_size >= 1 \
            and len(self.parts) == -(-self.size // self.part_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FileState | None:
        try:
            d: dict[str, Any] = json.loads(text)
            return cls(path=str(d["path"]), size=int(d["size"]),
                       expect={str(k): str(v) for k, v in dict(d["expect"]).items()},
                       part_size=int(d["part_size"]), segment_size=int(d["segment_size"]),
                       parts=[[int(c) for c in p] for p in d["parts"]], done=bool(d["done"]),
                       digests={str(k): str(v) for k, v in dict(d.get("digests", {})).items()},
                       prefix=[str(h) for h in d.get("prefix", [])], prefix_algo=str(d.get("prefix_algo", "")),
                       verified_stat=[int(v) for v in d.get("verified_stat", [])])
        except (KeyError, TypeError, ValueError):
            return None


def load_state(staging: Path, relpath: str) -> FileState | None:
    """The saved state of ``relpath``, ``None`` when absent or unreadable (then the file starts over)."""
    try:
        text = state_path(staging, relpath).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    state = FileState.from_json(text)
    return state if state is not None and state.path == relpath else None


def save_state(staging: Path, state: FileState) -> None:
    """Replace the state file atomically (temp + rename; no fsync, see the module invariant)."""
    target = state_path(staging, state.path)
    target.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def drop_state(staging: Path, relpath: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(staging, relpath).unlink()


def remove_tree(path: Path, *, attempts: int = 5) -> None:
    """Delete ``path`` (file or folder) if it exists; tolerates a straggling writer for a few rounds."""
    for i in range(attempts):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            return
        except FileNotFoundError:
            return
        except OSError:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))


def stat_key(st: os.stat_result) -> list[int]:
    """What must not change between verifying a staged file and publishing it: inode, size, mtime, ctime."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


# ------------------------------------------------------------------------------------------- ownership
def lock_path(staging: Path) -> Path:
    """``<staging>.lock``: beside the folder, so it outlives the folder's rename into the destination."""
    staging = Path(staging)
    return staging.with_name(staging.name + LOCK_SUFFIX)


def aside_path(staging: Path) -> Path:
    """Where :func:`~modelherd.storage.publish.publish` moves an old model while it swaps (no ``RENAME_EXCHANGE``)."""
    staging = Path(staging)
    return staging.with_name(staging.name + ASIDE_SUFFIX)


@dataclass
class _Held:
    thread: int
    depth: int
    fd: int  # -1: the filesystem has no flock; only this process's threads are excluded


_registry_lock = threading.Lock()
_held: dict[str, _Held] = {}
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)
_warned_no_flock: set[str] = set()


def _flock(path: Path) -> int | None:
    """An fd holding ``flock(LOCK_EX)`` on the file now at ``path``; ``None`` when another owner holds it,
    ``-1`` when the filesystem refuses ``flock``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            if str(path.parent) not in _warned_no_flock:
                _warned_no_flock.add(str(path.parent))
                log.warning("%s does not support flock (%s): pulls in other processes of this node are not kept "
                            "out of the same staging folder", path.parent, os.strerror(e.errno or 0))
            return -1
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue  # the owner we waited for removed it: lock the new one
        mine = os.fstat(fd)
        if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        return fd


def _try_own(path: Path) -> bool:
    me = threading.get_ident()
    with _registry_lock:
        held = _held.get(str(path))
        if held is not None:
            if held.thread != me:
                return False
            held.depth += 1
            return True
        fd = _flock(path)
        if fd is None:
            return False
        _held[str(path)] = _Held(me, 1, fd)
        return True


def _release(path: Path) -> None:
    with _registry_lock:
        held = _held[str(path)]
        held.depth -= 1
        if held.depth:
            return
        del _held[str(path)]
        try:
            if held.fd >= 0:
                mine, current = os.fstat(held.fd), os.stat(path)
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(path)  # while still locked: an acquirer re-checks the inode after locking
            else:
                os.unlink(path)  # no flock here: the file only ever served as a probe
        except FileNotFoundError:
            pass
        finally:
            if held.fd >= 0:
                os.close(held.fd)


def _holder(path: Path) -> str:
    # under the registry lock: on NFS, closing any fd of a locked file drops this process's (POSIX) lock on it,
    # so the file is read only while no thread of ours can be taking it
    with _registry_lock:
        if str(path) in _held:
            return f"another thread of this process (pid {os.getpid()})"
        try:
            pid, _, host = path.read_text().strip().partition(" ")
        except OSError:
            pid, host = "", ""
    return f"pid {pid} on {host}" if pid else "another process"


@contextlib.contextmanager
def own_staging(staging: Path, *, wait: bool = True, cancel: threading.Event | None = None) -> Iterator[Path]:
    """Hold exclusive ownership of ``staging`` (which need not exist yet) for the ``with`` block.

    Re-entrant for the thread that holds it (``pull`` holds it across ``fetch_into`` and ``publish``, which take
    it again). Another owner — a thread of this process or a process on this node — makes it wait (until
    ``cancel``: :class:`CancelledError`) or, with ``wait=False``, raise :class:`StagingBusyError`. On NFS the
    lock also spans nodes, but staging names carry the writer, so nodes never contend for one (see
    :func:`adopt_staging`).
    """
    path = lock_path(staging)
    delay, announced = 0.02, False
    while not _try_own(path):
        who = _holder(path)
        if not wait:
            raise StagingBusyError(f"another pull owns the staging folder {Path(staging).name} ({who})",
                                   hint="another pull of this model runs on this node; let it finish (a pull that "
                                        "may wait does so) or stop it")
        if not announced:
            log.info("waiting for the pull of %s (%s) to finish", Path(staging).name, who)
            announced = True
        if cancel is not None:
            if cancel.wait(delay):
                raise CancelledError("pull cancelled while waiting for another pull of the same model",
                                     hint="the other pull goes on; run this one again to wait for it")
        else:
            time.sleep(delay)
        delay = min(delay * 2, 0.5)
    try:
        yield Path(staging)
    finally:
        _release(path)


# ------------------------------------------------------------------------------------------- contents
def _read_marker(staging: Path) -> str | None:
    try:
        return (Path(staging) / STATE_DIRNAME / LISTING_MARKER).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_marker(staging: Path, listing_id: str) -> None:
    state_dir = Path(staging) / STATE_DIRNAME
    state_dir.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(listing_id)
        os.replace(tmp, state_dir / LISTING_MARKER)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def tidy_staging(staging: Path, paths: Collection[str], listing_id: str) -> list[str]:
    """Remove from ``staging`` everything that cannot serve the listing ``listing_id`` of files ``paths``.

    Kept: regular files at listed paths and the folders leading to them; their resume state only if the
    listing recorded in the folder is ``listing_id`` (a file of another revision is then kept only if it
    passes the full checksum of this listing, else it is fetched again). Removed: unlisted files and folders,
    symlinks and other special files, resume state of other files or of another listing. Records
    ``listing_id``. Returns the removed entries (relative names). The caller owns ``staging``.
    """
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    wanted = set(paths)
    folders = {"/".join(p.split("/")[:i]) for p in wanted for i in range(1, p.count("/") + 1)}
    removed: list[str] = []
    pending = [("", staging)]
    while pending:
        rel_dir, folder = pending.pop()
        with os.scandir(folder) as it:
            entries = list(it)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if rel in (STATE_DIRNAME, LAYERS_DIRNAME):
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and rel in folders:
                pending.append((rel, Path(entry.path)))
            elif not (stat.S_ISREG(st.st_mode) and rel in wanted):
                remove_tree(Path(entry.path))
                removed.append(rel)
    state_dir = staging / STATE_DIRNAME
    if _read_marker(staging) != listing_id:
        if state_dir.exists() or state_dir.is_symlink():
            remove_tree(state_dir)
    elif state_dir.is_dir():
        keep = {state_path(staging, p).name for p in wanted} | {LISTING_MARKER}
        for entry in os.scandir(state_dir):
            if entry.name not in keep:
                remove_tree(Path(entry.path))
    if removed:
        log.info("removed %d leftover(s) from staging %s: %s", len(removed), staging.name, ", ".join(removed[:5]))
    _write_marker(staging, listing_id)
    return removed


def adopt_staging(old_staging: Path, new_staging: Path) -> Path:
    """Move another writer's files and resume state into ``new_staging``; return ``new_staging``.

    Both folders must be in the same staging root (one filesystem, so every move is a rename). Files already in
    ``new_staging`` win over the old ones; old files recorded for another listing are dropped, not merged.
    ``old_staging`` is gone afterwards — unless its writer still owns it (a paused process): then nothing is
    moved out from under it, ``new_staging`` starts empty, and the old writer removes its own folder once it
    notices it lost the lease.
    """
    old_staging, new_staging = Path(old_staging), Path(new_staging)
    with own_staging(new_staging, wait=False):
        try:
            with own_staging(old_staging, wait=False):
                _adopt(old_staging, new_staging)
        except StagingBusyError as e:
            log.warning("not adopting %s (%s): its writer still runs; downloading into %s from scratch",
                        old_staging.name, e.message, new_staging.name)
            new_staging.mkdir(parents=True, exist_ok=True)
    return new_staging


def _adopt(old_staging: Path, new_staging: Path) -> None:
    if not old_staging.is_dir():
        new_staging.mkdir(parents=True, exist_ok=True)
        return
    new_staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(old_staging, new_staging)  # fails when new_staging exists and is not empty
        return
    except OSError:
        pass
    theirs, ours = _read_marker(old_staging), _read_marker(new_staging)
    if theirs is not None and ours is not None and theirs != ours:
        log.info("dropping %s: it was staged for another listing than %s", old_staging.name, new_staging.name)
        remove_tree(old_staging)
        return
    for dirpath, dirnames, filenames in os.walk(old_staging):
        if Path(dirpath) == old_staging and STATE_DIRNAME in dirnames:
            dirnames.remove(STATE_DIRNAME)
        for name in filenames:
            src = Path(dirpath) / name
            rel = src.relative_to(old_staging).as_posix()
            dst = new_staging / rel
            if dst.exists():
                continue  # ours wins, and so does our state for it
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            old_state = state_path(old_staging, rel)
            if old_state.exists():
                state_path(new_staging, rel).parent.mkdir(exist_ok=True)
                os.replace(old_state, state_path(new_staging, rel))
    remove_tree(old_staging)
