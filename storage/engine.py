"""The download engine: parallel, ranged, resumable, verified while streaming, published atomically.

Invariants:
- Nothing is written outside the staging folder until :func:`publish`, and the destination only ever holds a
  complete, verified model with its manifest (written last).
- Every byte is hashed once, in order, while it streams (ranges that land ahead of the hash cursor are read
  back from the page cache); memory is a fixed buffer per worker thread, never a whole file.
- Whole-file streams are preferred to ranged parts (parts land out of order and must be read back to be
  hashed): large files are split only when there are fewer of them than ``concurrency``; at most
  ``concurrency * multipart_concurrency`` GETs are in flight.
- A crash, a lost connection or a source error leaves staging resumable: written segments carry checkpoints
  (digests of the in-order hash for one-stream files, CRC-32 per segment for split files) that are checked
  against the disk before they are trusted again.
- Planning is bounded before it allocates: a listing is checked (sizes at most ``MAX_FILE_SIZE``, at most
  ``max_files`` entries, at least one file) and the free space is checked before any file is planned; a file
  has at most ``MAX_PARTS_PER_FILE`` parts whatever its size. A set cancel Event stops planning between files.
- "Ready" is one rule for every caller (:func:`pull`, the coordinator, the CLI's fast path): the manifest is of
  this listing (source, revision, selection, files) and :func:`~.ready.damage` finds nothing. A published copy
  that shows damage is repaired: its undamaged files are hard-linked into staging (reflink or copy where links
  fail), re-verified against their checksums, only the rest is fetched, and the whole is published atomically.
  A file fetched into staging is always a new inode, so nothing is ever written into a published file.
- A destination holding files but no manifest is adopted the same way (:mod:`~.adopt`): refused unless it holds
  this model, its files of their listed size hard-linked into staging and hashed in parallel (one thread per file
  up to the stream slots, one buffer each), only the rest fetched. Every publish keeps in place what the destination
  holds that is not the model's (hard links into the new tree before the swap), and records it in the manifest.
- One owner per staging folder (:func:`~modelherd.storage.staging.own_staging`, held by :func:`pull` from
  before its fast-path check until staging is published or cleaned), and staging holds only the listing's
  files (:func:`~modelherd.storage.staging.tidy_staging`). :func:`publish` publishes a file only if it is
  the very file that was verified (same inode, size, mtime and ctime as when its checksum matched; else it is
  hashed again) and refuses a staging folder holding anything the manifest does not list.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import shutil
import stat
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import urllib3.exceptions

from . import adopt, capacity
from .destination import NAME_MAX, PATH_MAX, check_destination, fs_error
from .directio import DirectMode, FileWriter, aligned_buffer
from .errors import (
    CancelledError,
    ConfigError,
    DestinationError,
    InsufficientSpaceError,
    MalformedListingError,
    ModelherdError,
    ModelsRootError,
    RateLimitedError,
    SourceError,
    StagingBusyError,
    TransientSourceError,
    UnsafePathError,
    VerificationError,
)
from .findings import read_findings
from .hashcursor import HashCursor
from .hashing import MultiHasher, checkable, hash_file
from .manifest import Manifest, ManifestFile, read_manifest, write_manifest
from .paths import STAGING_DIRNAME, contained, safe_relpath, staging_root
from .ready import damage
from .retry import RetryPolicy, call_with_retry
from .staging import (
    ASIDE_SUFFIX,
    RESERVED_PREFIX,
    STATE_DIRNAME,
    FileState,
    adopt_staging,
    aside_path,
    drop_state,
    load_state,
    own_staging,
    remove_tree,
    save_state,
    staging_dir_for,
    stat_key,
    tidy_staging,
)
from .types import ByteStream, Listing, RemoteFile, Source
from .verify import MAX_FILES, verify_quick

__all__ = ["EngineOptions", "PhaseFn", "adopt_staging", "check_destination", "check_listing", "fetch_into",
           "manifest_matches", "own_staging", "publish", "pull", "recover_interrupted_publish", "stage",
           "staging_dir_for"]

log = logging.getLogger(__name__)
MiB = 1024 * 1024
# No real file comes near a pebibyte; a larger listed size is a malformed (or hostile) listing.
MAX_FILE_SIZE = 2**50
# Parts only spread one file over several streams; more than this many would only cost memory.
MAX_PARTS_PER_FILE = 1024
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EngineOptions:
    """Knobs of one pull. ``concurrency * multipart_concurrency`` is the number of GETs that may be in flight.

    A model with at most that many files to fetch runs them all at once; a larger one ``concurrency`` files at a
    time. Files larger than ``multipart_threshold`` are fetched as ``part_size``
    ranges, ``multipart_concurrency`` at a time, but only when fewer than ``concurrency`` files of the listing
    are that large: with enough files, whole-file streams fill the slots without any read-back for hashing.
    """

    concurrency: int = 4
    multipart_concurrency: int = 4
    multipart_threshold: int = 200 * MiB
    part_size: int = 64 * MiB
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_size: int = 4 * MiB
    checkpoint_size: int = 16 * MiB
    progress_interval_s: float = 0.1
    fsync: bool = True
    direct_io: DirectMode = "auto"
    record_sha256: bool = True
    cancel_grace_s: float = 1.0
    max_files: int = MAX_FILES  # 20,000: a longer listing is refused as malformed before anything is planned

    def __post_init__(self) -> None:
        for name in ("concurrency", "multipart_concurrency", "multipart_threshold", "part_size", "chunk_size",
                     "checkpoint_size", "max_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine option {name} must be at least 1, got {getattr(self, name)}",
                                  hint="fix the download settings")


# --------------------------------------------------------------------------------------------------- planning
@dataclass
class _Part:
    index: int
    start: int
    end: int
    resume: int
    crc: int = 0  # CRC-32 of [segment start, resume): carried across retries so a retry continues mid-segment


@dataclass
class _Job:
    rf: RemoteFile
    target: Path
    algos: list[str]
    state: FileState
    parts: list[_Part]
    kept: bool = False
    digests: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    hasher: MultiHasher | None = None  # resumed one-stream file: the hash of its verified prefix
    hashed: int = 0  # ... and how many bytes that is
    writer: FileWriter | None = None  # while the file is being fetched

    @property
    def prefix_mode(self) -> bool:
        """One stream hashed in order: checkpoints are digests of the hash itself, not CRCs."""
        return len(self.parts) == 1 and bool(self.algos)

    @property
    def present(self) -> int:
        return self.rf.size if self.kept else sum(p.resume - p.start for p in self.parts)


def _splittable(rf: RemoteFile, options: EngineOptions) -> bool:
    return rf.size > options.multipart_threshold and rf.size > options.part_size


def _layout(rf: RemoteFile, options: EngineOptions, split: bool = True) -> FileState:
    """The fresh layout of ``rf``: one part, or ``part_size`` parts, never more than ``MAX_PARTS_PER_FILE``
    (larger files get larger parts), so its size in memory does not grow with the file's."""
    expect = {a: rf.checksums[a].lower() for a in checkable(rf.checksums)[:1]}
    multipart = split and _splittable(rf, options)
    part_size = max(options.part_size, -(-rf.size // MAX_PARTS_PER_FILE)) if multipart else max(rf.size, 1)
    n_parts = -(-rf.size // part_size) if rf.size else 0
    return FileState(path=rf.path, size=rf.size, expect=expect, part_size=part_size,
                     segment_size=options.checkpoint_size, parts=[[] for _ in range(n_parts)])


def _parts(state: FileState) -> list[_Part]:
    return [_Part(i, i * state.part_size, min((i + 1) * state.part_size, state.size), i * state.part_size)
            for i in range(len(state.parts))]


def _verified_prefix(fd: int, part: _Part, crcs: list[int], seg: int, buf: memoryview) -> int:
    """How many leading checkpointed segments of ``part`` still match the disk."""
    good = 0
    for k, want in enumerate(crcs):
        start = part.start + k * seg
        end = min(start + seg, part.end)
        crc, pos = 0, start
        while pos < end:
            n = os.preadv(fd, [buf[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                break
            crc = zlib.crc32(buf[:n], crc)
            pos += n
        if pos != end or crc != want:
            break
        good = k + 1
    return good


def _copy_hasher(mh: MultiHasher) -> MultiHasher:
    twin = MultiHasher([], 0)
    twin.hashers = {a: h.copy() if hasattr(h, "copy") else copy.copy(h) for a, h in mh.hashers.items()}
    return twin


def _replay_prefix(fd: int, job: _Job, saved: FileState, buf: memoryview) -> int:
    """Hash the file from byte 0 through its prefix checkpoints while they match; return how many did.

    Leaves ``job.hasher`` at the end of the last matching checkpoint, so the in-order hash continues from there
    without reading those bytes again.
    """
    hasher, good, seg = MultiHasher(job.algos, job.rf.size), 0, saved.segment_size
    algo = saved.prefix_algo
    if algo not in hasher.hashers:
        return 0
    for k, want in enumerate(saved.prefix):
        trial, pos, end = _copy_hasher(hasher), k * seg, min((k + 1) * seg, job.rf.size)
        while pos < end:
            n = os.preadv(fd, [buf[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                break
            trial.update(buf[:n])
            pos += n
        if pos != end or trial.hashers[algo].hexdigest() != want:
            break
        hasher, good = trial, k + 1
    job.hasher, job.hashed = hasher, min(good * seg, job.rf.size)
    return good


def _plan(staging: Path, rf: RemoteFile, options: EngineOptions, buf: memoryview, split: bool = True) -> _Job:
    """Decide, from what is on disk, whether ``rf`` is kept, resumed (and from where) or fetched fresh."""
    target = contained(staging, rf.path, what="file name")
    fresh = _layout(rf, options, split)
    algos = list(fresh.expect)
    if options.record_sha256 and "sha256" not in algos:
        algos.append("sha256")
    job = _Job(rf, target, algos, fresh, _parts(fresh))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return job
    saved = load_state(staging, rf.path)
    if st.st_size != rf.size:
        return job
    if saved is not None and saved.layout_matches(fresh):
        if not saved.done and st.st_nlink > 1:
            return job  # shares its inode with another name (a published file?): never resume into it
        if saved.done:
            if saved.digests and len(saved.verified_stat) == 4 and saved.verified_stat == stat_key(st):
                # verified in this staging folder and untouched since (inode, size, mtime, ctime): as publish trusts it
                job.kept, job.digests, job.state = True, dict(saved.digests), saved
                return job
            check = fresh.expect or {a: saved.digests[a] for a in saved.digests}
            if check and hash_file(str(target), list(check), rf.size) == check:
                job.kept, job.digests, job.state = True, dict(saved.digests), saved
            return job
        job.state = saved
        job.parts = _parts(saved)
        fd = os.open(target, os.O_RDONLY)
        try:
            if job.prefix_mode:
                good = _replay_prefix(fd, job, saved, buf)
                del saved.prefix[good:]
                saved.parts[0].clear()
                job.parts[0].resume = job.hashed
            else:
                saved.prefix.clear()
                for part, crcs in zip(job.parts, saved.parts, strict=True):
                    good = _verified_prefix(fd, part, crcs, saved.segment_size, buf)
                    del crcs[good:]
                    part.resume = min(part.start + good * saved.segment_size, part.end)
        finally:
            os.close(fd)
        return job
    if saved is None and fresh.expect:
        got = hash_file(str(target), algos, rf.size)
        if all(got[a] == v for a, v in fresh.expect.items()):
            job.kept, job.digests = True, got
    return job


def _verify_present(staging: Path, files: list[RemoteFile], options: EngineOptions, cancel: threading.Event | None,
                    progress: Progress | None = None) -> tuple[list[str], list[str]]:
    """Hash, in parallel, every file of ``files`` that is in ``staging`` with its listed size and no resume state
    (seeded by a repair or an adoption, or left by a run whose state was lost): what :func:`_plan` would otherwise
    hash one file at a time. Returns ``(kept, failed)``: a kept file is recorded as verified (its state done, its
    ``stat_key`` from before the hash, so :func:`_plan` and :func:`publish` trust it while it is untouched) and, with
    ``options.fsync``, flushed (a copy another tool just wrote may not be on the disk yet); a failed
    file's name is removed from staging (only that name: a seeded hard link's published twin is never touched), so
    it is fetched into a new inode.

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
        fresh = _layout(rf, options, split=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size != rf.size or not fresh.expect:
            continue
        if load_state(staging, rf.path) is not None:
            continue  # resume state: _plan checks its checkpoints
        todo.append((rf, target, fresh))
    if not todo:
        return [], []
    throttle = _Throttle(sum(rf.size for rf, _, _ in todo), 0, progress, options.progress_interval_s)

    def paced(n: int) -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError("pull cancelled", hint="staging is removed; run the pull again to restart")
        throttle.add(n)

    def one(item: tuple[RemoteFile, Path, FileState]) -> bool:
        rf, target, state = item
        algos = list(state.expect)
        if options.record_sha256 and "sha256" not in algos:
            algos.append("sha256")
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
    pool = ThreadPoolExecutor(_files_in_flight(len(todo), options), thread_name_prefix="modelherd-hash")
    try:
        results = list(pool.map(one, todo))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    throttle.final()
    kept = [t[0].path for t, ok in zip(todo, results, strict=True) if ok]
    failed = [t[0].path for t, ok in zip(todo, results, strict=True) if not ok]
    return kept, failed


# --------------------------------------------------------------------------------------------------- running
class _Throttle:
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
        if self._cb is not None:
            self._cb(self.done, self.total)


class _Run:
    """Shared state of one :func:`fetch_into` call."""

    def __init__(self, source: Source, staging: Path, options: EngineOptions, throttle: _Throttle) -> None:
        self.source, self.staging, self.options, self.throttle = source, staging, options, throttle
        self.stop = threading.Event()
        self.parts_pool = ThreadPoolExecutor(options.concurrency * options.multipart_concurrency,
                                             thread_name_prefix="modelherd-part")
        self._local = threading.local()
        self.reread = 0
        self.direct = _use_direct_io(options.direct_io, staging)
        self.direct_bytes = 0

    def buffer(self) -> memoryview:
        """This thread's chunk buffer: page-aligned, so ``O_DIRECT`` can write straight from it."""
        view: memoryview | None = getattr(self._local, "buf", None)
        if view is None:
            view = aligned_buffer(self.options.chunk_size)[: self.options.chunk_size]
            self._local.buf = view
        return view

    def check(self) -> None:
        if self.stop.is_set():
            raise CancelledError("download stopped", hint="another part failed or the pull was cancelled")

    # one file ---------------------------------------------------------------------------------------------
    def run_file(self, job: _Job) -> None:
        if job.kept:
            log.debug("kept %s (already in staging and verified)", job.rf.path)
            return
        for attempt in (1, 2):
            problem = self._fetch_file(job)
            if problem is None:
                log.debug("fetched %s (%d bytes)", job.rf.path, job.rf.size)
                _record_verified(self.staging, job)
                return
            log.warning("%s failed verification (%s)%s", job.rf.path, problem,
                        "; fetching it again" if attempt == 1 else "")
            self.throttle.forget(job.present)
            remove_tree(job.target)
            drop_state(self.staging, job.rf.path)
            job.state = _layout(job.rf, self.options, split=len(job.parts) > 1)
            job.parts = _parts(job.state)
            job.hasher, job.hashed = None, 0
        raise VerificationError(f"{job.rf.path} does not match its checksum after two downloads",
                                problems=[f"{job.rf.path}: {problem}"],
                                hint="the origin serves bytes that differ from its listing; try again later")

    def _fetch_file(self, job: _Job) -> str | None:
        """Fetch the missing parts of ``job`` and verify it; a mismatch is returned, not raised."""
        rf = job.rf
        job.target.parent.mkdir(parents=True, exist_ok=True)
        resuming = any(p.resume > p.start for p in job.parts)
        flags = os.O_RDWR | os.O_CREAT | (0 if resuming else os.O_TRUNC)
        try:
            if not resuming:
                # a new inode: the name may be a hard link to a published file (a repair), never truncate that
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(job.target)
            fd = os.open(job.target, flags, 0o644)
        except OSError as e:
            raise self._write_error(e, job) from None
        try:
            try:
                os.ftruncate(fd, rf.size)
                save_state(self.staging, job.state)
                job.writer = FileWriter(fd, job.target, direct=self.direct)
            except OSError as e:
                raise self._write_error(e, job) from None
            if job.prefix_mode:
                job.state.prefix_algo = job.algos[0]
            hasher = job.hasher if job.hasher is not None else MultiHasher(job.algos, rf.size)
            cursor = HashCursor(hasher, fd, rf.size, position=job.hashed if job.hasher is not None else 0)
            for p in job.parts:
                cursor.add_written(p.start, p.resume)
            todo = [p for p in job.parts if p.resume < p.end]
            if len(todo) == 1:
                self._fetch_part(job, fd, cursor, todo[0])
            elif todo:
                self._fetch_parts(job, fd, cursor, todo)
            hashed = cursor.drain(self.buffer())
            self.reread += cursor.reread_bytes
            if hashed != rf.size or os.fstat(fd).st_size != rf.size:
                return f"size {os.fstat(fd).st_size}, hashed {hashed}, expected {rf.size}"
            digests = cursor.hasher.hexdigests()
            for algo, want in job.state.expect.items():
                if digests[algo] != want:
                    return f"{algo} {digests[algo]} != expected {want}"
            try:
                if self.options.fsync:
                    os.fsync(fd)
                job.state.done, job.state.digests, job.digests = True, digests, digests
                save_state(self.staging, job.state)
            except OSError as e:
                raise self._write_error(e, job) from None
            return None
        finally:
            if job.writer is not None:
                self.direct_bytes += job.writer.direct_bytes
                job.writer.close()
                job.writer = None
            os.close(fd)

    def _fetch_parts(self, job: _Job, fd: int, cursor: HashCursor, todo: list[_Part]) -> None:
        """At most ``multipart_concurrency`` parts of this file in flight; the first failure wins."""
        window = self.options.multipart_concurrency
        queue = list(todo)
        running: set[Future[None]] = set()
        while queue or running:
            while queue and len(running) < window and not self.stop.is_set():
                running.add(self.parts_pool.submit(self._fetch_part, job, fd, cursor, queue.pop(0)))
            if not running:
                self.check()
            done, running = wait(running, return_when=FIRST_EXCEPTION)
            if any(f.cancelled() or f.exception() is not None for f in done):
                self.stop.set()
                wait(running)
                raise _first_real_error([*done, *running]) or CancelledError("part cancelled")

    # one part ---------------------------------------------------------------------------------------------
    def _fetch_part(self, job: _Job, fd: int, cursor: HashCursor, part: _Part) -> None:
        """Stream ``[part.resume, part.end)`` into ``fd``; retries continue from the last written byte."""
        rounds = 0
        while True:
            before = part.resume
            try:
                call_with_retry(lambda: self._stream(job, fd, cursor, part), self.options.retry, cancel=self.stop,
                                what=f"GET {job.rf.path} [{part.resume}, {part.end})")
                return
            except (TransientSourceError, RateLimitedError):
                # a retry budget is for one stuck spot: progress earns a fresh one (bounded)
                if part.resume > before and rounds < 100:
                    rounds += 1
                    continue
                raise

    def _stream(self, job: _Job, fd: int, cursor: HashCursor, part: _Part) -> None:
        self.check()
        buf = self.buffer()
        seg = job.state.segment_size
        prefix_mode = job.prefix_mode
        # one-stream files: the in-order hash is the checkpoint (no CRC pass); split files: CRC per segment
        marks: list[int] | list[str] = job.state.prefix if prefix_mode else job.state.parts[part.index]
        stream = self.source.open(job.rf, part.resume, part.end)
        try:
            while part.resume < part.end:
                self.check()
                pos = part.resume
                seg_end = min(part.start + (len(marks) + 1) * seg, part.end)
                view = buf[: min(len(buf), seg_end - pos)]
                n = _read(stream, view, job.rf)
                if n == 0:
                    raise TransientSourceError(f"body of {job.rf.path} ended early at byte {pos}",
                                               hint="the connection was cut; retrying from there")
                data = view[:n]
                self._write(job, data, pos)
                if not prefix_mode:
                    part.crc = zlib.crc32(data, part.crc)
                cursor.offer(pos, data, buf)
                part.resume = pos + n
                self.throttle.add(n)
                if part.resume == seg_end:
                    if self.options.fsync and not self.direct:
                        start_writeback(fd, max(part.start, seg_end - seg), seg_end - max(part.start, seg_end - seg))
                    with job.lock:
                        if prefix_mode:
                            if cursor.position != seg_end:  # cannot happen with one stream; never trust it
                                raise TransientSourceError(f"{job.rf.path}: hash cursor behind the stream",
                                                           hint="retrying")
                            job.state.prefix.append(cursor.hasher.hashers[job.state.prefix_algo].hexdigest())
                        else:
                            job.state.parts[part.index].append(part.crc)
                        part.crc = 0
                        self.check()
                        try:
                            save_state(self.staging, job.state)
                        except OSError as e:
                            raise self._write_error(e, job) from None
        finally:
            _close_quietly(stream)

    def _write(self, job: _Job, data: memoryview, pos: int) -> None:
        assert job.writer is not None, "a file is written only between open and close in _fetch_file"
        try:
            job.writer.write(data, pos)
        except OSError as e:
            raise self._write_error(e, job) from None

    def _write_error(self, e: OSError, job: _Job) -> ModelherdError | OSError:
        if capacity.is_no_space(e):
            return capacity.no_space_error(e, job.target)
        return e


def _use_direct_io(mode: DirectMode, staging: Path) -> bool:
    """``auto``: ``O_DIRECT`` on node-local filesystems only. On a shared one (NFS, Lustre, FUSE, ...) its
    semantics and speed depend on the client, so buffered writes stay the default there."""
    if mode != "auto":
        return mode == "on"
    from .fsdetect import detect_filesystem

    try:
        return detect_filesystem(staging).kind == "local"
    except (OSError, ConfigError):
        return False


_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes
    import ctypes.util

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

    The fsync before publish then finds little left to do, and writeback overlaps the download instead of
    following it. A no-op where ``sync_file_range`` is missing or refuses (it is only a hint).
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _read(stream: ByteStream, view: memoryview, rf: RemoteFile) -> int:
    try:
        return stream.readinto(view)
    except ModelherdError:
        raise
    except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as e:
        # the message is built from the type only: a raw error may quote a signed URL
        code = f" errno {e.errno}" if isinstance(e, OSError) and e.errno else ""
        raise TransientSourceError(f"reading {rf.path} failed: {type(e).__name__}{code}",
                                   hint="the connection broke; retrying from the last byte written") from None


def _close_quietly(stream: ByteStream) -> None:
    try:
        stream.close()
    except Exception:  # closing a broken stream must not hide the error that broke it
        log.debug("closing a stream failed", exc_info=False)


# --------------------------------------------------------------------------------------------------- fetch_into
def check_listing(listing: Listing, options: EngineOptions | None = None) -> None:
    """Refuse a listing no real model has, before anything is planned, allocated or requested.

    At least one file (none: :class:`ConfigError` when a selection left everything out, exit 2, since the
    patterns are the user's; else :class:`SourceError`, exit 3), at most ``options.max_files`` entries, sizes
    in ``[0, MAX_FILE_SIZE]`` (else :class:`MalformedListingError`), safe, unique names outside the reserved
    prefix (else :class:`UnsafePathError`).
    """
    options = options or EngineOptions()
    if not listing.files:
        where = f"{listing.uri} (revision {listing.revision})"
        if listing.selection.filtered:
            raise ConfigError(f"{listing.selection.describe()} selects no file of {where}",
                              hint="fix the --allow/--ignore patterns (quote them, e.g. --allow '*.json'); "
                                   "nothing was published")
        raise SourceError(f"{where} lists no file", hint="check the model URI and revision; nothing was published")
    if len(listing.files) > options.max_files:
        raise MalformedListingError(f"{listing.uri} lists {len(listing.files)} files, more than the "
                                    f"{options.max_files} a model may have",
                                    hint="select the files you need with --allow/--ignore, or check the source")
    seen: set[str] = set()
    for rf in listing.files:
        safe_relpath(rf.path, what="file name")
        if rf.path.split("/", 1)[0].startswith(RESERVED_PREFIX):
            raise UnsafePathError(f"file name {rf.path!r} uses the reserved prefix {RESERVED_PREFIX!r}",
                                  hint="the source lists a file modelherd keeps for itself")
        if rf.path in seen:
            raise UnsafePathError(f"file name {rf.path!r} is listed twice", hint="the source is malformed")
        if rf.size < 0:
            raise UnsafePathError(f"file {rf.path!r} has a negative size", hint="the source is malformed")
        if rf.size > MAX_FILE_SIZE:
            raise MalformedListingError(f"file {rf.path!r} claims {rf.size} bytes, more than any real file "
                                        f"({MAX_FILE_SIZE} bytes = 1 PiB)",
                                        hint="the source's listing is malformed; nothing was downloaded")
        seen.add(rf.path)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("pull cancelled", hint="staging is removed; run the pull again to restart")


def _check_listing(staging: Path, listing: Listing) -> None:
    """Every listed name can be stored as-is in ``staging``: safe, unreserved, unique, not both a file and a
    folder, each segment at most ``NAME_MAX`` bytes and the whole path under ``PATH_MAX``."""
    seen: set[str] = set()
    for rf in listing.files:
        seen.add(rf.path)
        contained(staging, rf.path, what="file name")
        for part in safe_relpath(rf.path, what="file name").split("/"):
            if len(os.fsencode(part)) > NAME_MAX:
                raise UnsafePathError(f"file name {rf.path[:80]!r}... has a part longer than {NAME_MAX} bytes, more "
                                      "than a filesystem can hold", hint="exclude it with --ignore")
        if len(os.fsencode(str(staging / rf.path))) >= PATH_MAX:
            raise UnsafePathError(f"file name {rf.path[:80]!r}... is too long: the path would exceed {PATH_MAX} "
                                  "bytes", hint="exclude it with --ignore, or use a shorter models root")
    names = {safe_relpath(p, what="file name") for p in seen}
    for name in sorted(names):
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in names:
                raise UnsafePathError(f"{folder!r} is listed as both a file and a folder (the folder holds "
                                      f"{name!r})", hint="the source is malformed; exclude one with --ignore")


def _listing_id(listing: Listing) -> str:
    """Identifies what a staging folder is being filled for: source, revision, every path, size and checksum."""
    body = [listing.uri, listing.revision,
            sorted([rf.path, rf.size, sorted((a, v.lower()) for a, v in rf.checksums.items())]
                   for rf in listing.files)]
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def _record_verified(staging: Path, job: _Job) -> None:
    """Remember which file on disk was verified (``stat_key``), so :func:`publish` can tell it is the same."""
    job.state.done, job.state.digests = True, dict(job.digests)
    try:
        job.state.verified_stat = stat_key(os.lstat(job.target))
        save_state(staging, job.state)
    except OSError as e:
        raise fs_error(e, job.target, what="staged file") from None


def fetch_into(
    source: Source,
    listing: Listing,
    staging: Path,
    *,
    options: EngineOptions | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> dict[str, dict[str, str]]:
    """Download every file of ``listing`` into ``staging/<path>``, verified; return the digests per path.

    Keeps files (and checkpointed segments) already in ``staging`` that check out, so a rerun resumes.
    Raises typed errors; when ``cancel`` is set it stops within about ``cancel_grace_s`` (between two files
    while planning) and raises :class:`CancelledError`. The listing (:func:`check_listing`) and the free space
    are checked before any file is planned. Staging is never cleaned here: :func:`pull` decides.
    """
    options = options or EngineOptions()
    staging = Path(staging)
    check_listing(listing, options)
    _check_cancel(cancel)
    staging.mkdir(parents=True, exist_ok=True)
    with own_staging(staging, wait=False):
        return _fetch_owned(source, listing, staging, options, cancel, progress)


def _fetch_owned(source: Source, listing: Listing, staging: Path, options: EngineOptions,
                 cancel: threading.Event | None, progress: Progress | None) -> dict[str, dict[str, str]]:
    try:
        if staging.is_symlink():  # planted: writes through it would land outside the models root
            staging.unlink()
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fs_error(e, staging, what="staging folder") from None
    _check_listing(staging, listing)
    tidy_staging(staging, [safe_relpath(rf.path) for rf in listing.files], _listing_id(listing))
    started = time.monotonic()
    _verify_present(staging, list(listing.files), options, cancel)  # seeded or stateless files: in parallel

    missing = 0
    for rf in listing.files:
        target = contained(staging, rf.path, what="file name")
        missing += max(0, rf.size - min(capacity.allocated_bytes(target), rf.size))
    capacity.ensure_free_space(staging, missing)

    scratch = memoryview(bytearray(options.chunk_size))
    split = sum(1 for rf in listing.files if _splittable(rf, options)) < options.concurrency
    jobs: list[_Job] = []
    for rf in listing.files:
        _check_cancel(cancel)
        jobs.append(_plan(staging, rf, options, scratch, split))
    del scratch
    for job in jobs:
        if job.kept:
            _record_verified(staging, job)
    present = sum(j.present for j in jobs)
    log.info("pulling %s: %d files, %.1f MiB (%.1f MiB already in staging) into %s", listing.uri,
             len(jobs), listing.total_bytes / MiB, present / MiB, staging)

    throttle = _Throttle(listing.total_bytes, present, progress, options.progress_interval_s)
    run = _Run(source, staging, options, throttle)
    files_pool = ThreadPoolExecutor(_files_in_flight(sum(1 for j in jobs if not j.kept), options),
                                    thread_name_prefix="modelherd-file")
    # largest first: with more files than workers, no big file starts last and runs alone at the end
    futures = [files_pool.submit(run.run_file, j) for j in sorted(jobs, key=lambda j: -j.rf.size)]
    error: BaseException | None = None
    cancelled = False
    try:
        pending: set[Future[None]] = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
            if cancel is not None and cancel.is_set():
                cancelled = True
                error = CancelledError("pull cancelled", hint="staging is removed; run the pull again to restart")
                break
            if any(f.exception() is not None for f in done):
                error = _first_real_error(futures)
                break
    except BaseException as e:  # KeyboardInterrupt in the waiting thread
        cancelled, error = True, e
    finally:
        if error is not None:
            run.stop.set()
        files_pool.shutdown(wait=False, cancel_futures=True)
        run.parts_pool.shutdown(wait=False, cancel_futures=True)
        if error is not None:
            # workers notice the stop between chunks; a failure waits a little longer so its cause is found
            wait(futures, timeout=options.cancel_grace_s * (1 if cancelled else 5))
            if not cancelled:
                error = _first_real_error(futures) or error
    if error is not None:
        raise error
    throttle.final()
    elapsed = max(time.monotonic() - started, 1e-9)
    log.info("pulled %s: fetched %.1f MiB in %.2fs (%.1f MiB/s), %.1f MiB re-read for hashing, %.1f MiB written "
             "with O_DIRECT", listing.uri, throttle.fetched / MiB, elapsed, throttle.fetched / MiB / elapsed,
             run.reread / MiB, run.direct_bytes / MiB)
    return {j.rf.path: dict(j.digests) for j in jobs}


def _files_in_flight(todo: int, options: EngineOptions) -> int:
    """All files at once when they fit in the ``concurrency * multipart_concurrency`` stream slots (e.g. 8 shards:
    8 streams, like 8 curls, instead of 4), else ``concurrency`` at a time: a crash then loses at most
    ``concurrency`` partial files' unchecked tails, as the setting promises."""
    slots = options.concurrency * options.multipart_concurrency
    return max(1, todo if todo <= slots else options.concurrency)


def _first_real_error(futures: list[Future[None]] | set[Future[None]]) -> BaseException | None:
    """The first failure that is not a knock-on ``CancelledError`` of the internal stop."""
    errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
    real = [e for e in errors if not isinstance(e, CancelledError)]
    return (real or errors or [None])[0]


# --------------------------------------------------------------------------------------------------- publish
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _models_root_of(staging: Path) -> Path:
    if staging.parent.name != STAGING_DIRNAME:
        raise ConfigError(f"staging folder {staging} is not in a {STAGING_DIRNAME} folder",
                          hint="stage with staging_dir_for(models_root, dest, writer, epoch)")
    return staging.parent.parent


def _check_staged(staging: Path, manifest: Manifest) -> None:
    """Staging holds exactly the manifest's files, each the very file that was verified.

    A file whose inode or size changed is refused; one whose mtime or ctime changed (another writer, or a
    filesystem with odd timestamps) is hashed again against the manifest and refused unless it matches.
    """
    listed = {safe_relpath(mf.path): mf for mf in manifest.files}
    folders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(staging):
        rel_dir = Path(dirpath).relative_to(staging).as_posix()
        for name in [*dirnames, *filenames]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel != STATE_DIRNAME and rel not in listed and rel not in folders:
                problems.append(f"{rel}: in staging but not in the manifest")
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != STATE_DIRNAME]
    for rel, mf in listed.items():
        state = load_state(staging, mf.path)
        try:
            now = stat_key(os.lstat(staging / rel))
        except FileNotFoundError:
            problems.append(f"{rel}: missing from staging")
            continue
        if state is None or not state.done or len(state.verified_stat) != 4:
            problems.append(f"{rel}: never verified in this staging folder")
        elif now[:2] != state.verified_stat[:2] or now[1] != mf.size:
            problems.append(f"{rel}: replaced or resized after it was verified")
        elif now != state.verified_stat:
            algos = checkable(mf.checksums)[:1]
            if not algos or hash_file(str(staging / rel), algos, mf.size) != {a: mf.checksums[a] for a in algos}:
                problems.append(f"{rel}: rewritten after it was verified")
            else:
                log.info("%s: timestamps changed after verification, but the bytes still match", rel)
    if problems:
        raise VerificationError(f"not publishing {staging.name}: {problems[0]}"
                                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                                problems=problems,
                                hint="another writer touched the staging folder; run the pull again")


def publish(staging: Path, dest: Path, manifest: Manifest, *, models_root: Path | None = None) -> Manifest:
    """Make ``staging`` the model at ``dest`` in one step; the manifest is written last, just before. Returns the
    manifest written (``manifest`` with the ``foreign`` entries kept).

    ``dest`` is only ever absent, the old complete model, or the new complete model (swapped with
    ``renameat2(RENAME_EXCHANGE)`` where the filesystem has it, else moved aside into the staging root first).
    ``dest`` must pass :func:`check_destination` (checked again here: the agent calls this directly); a folder
    without a completion manifest must hold one of the manifest's files with its size (it is adopted). Every
    file of ``manifest`` must be the one ``fetch_into`` verified (:func:`_check_staged`). Whatever ``dest`` holds
    that is not the model's (:func:`~.adopt.foreign_entries`: not a file of the new manifest nor of the old one) is
    kept in place (:func:`~.adopt.carry_foreign`) and recorded in the manifest. ``models_root`` defaults to the
    root whose staging folder holds ``staging``.
    """
    staging, dest = Path(staging), Path(dest)
    root = Path(models_root) if models_root is not None else _models_root_of(staging)
    with own_staging(staging, wait=False):
        dest = check_destination(root, dest)
        if adopt.unpublished(dest) and not adopt.holds_any(dest, ((f.path, f.size) for f in manifest.files)):
            raise DestinationError(f"destination {dest} holds files modelherd did not publish and none of "
                                   f"{manifest.source_uri}'s files: it is not a copy of this model",
                                   hint="pass an empty or new folder as --dest, or move those files away")
        _check_staged(staging, manifest)
        return _publish_owned(staging, dest, manifest)


def _foreign_at(dest: Path, manifest: Manifest) -> list[str]:
    """What ``dest`` holds that is not the model's: neither a file of ``manifest`` (the new copy) nor of the manifest
    already there (the old copy: a file an update drops is the model's, and goes with the old tree)."""
    try:
        if not stat.S_ISDIR(os.lstat(dest).st_mode):
            return []
    except FileNotFoundError:
        return []
    old = _read_manifest_quietly(dest)
    model = {f.path for f in manifest.files} | ({f.path for f in old.files} if old is not None else set())
    return adopt.foreign_entries(dest, model)


def _publish_owned(staging: Path, dest: Path, manifest: Manifest) -> Manifest:
    remove_tree(staging / STATE_DIRNAME)
    foreign = _foreign_at(dest, manifest)
    # linked before the swap: a kill anywhere leaves them in dest (and only extra names in staging, tidied later)
    unlinked = adopt.carry_foreign(dest, staging, foreign) if foreign else []
    if foreign:
        log.info("keeping %d entr%s of %s that %s not the model's: %s", len(foreign), "y" if len(foreign) == 1 else
                 "ies", dest, "is" if len(foreign) == 1 else "are", ", ".join(foreign[:5]))
    manifest = dataclasses.replace(manifest, foreign=tuple(foreign))
    write_manifest(staging, manifest)
    _fsync_dir(staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not os.path.lexists(dest):
            os.rename(staging, dest)
        elif _exchange(staging, dest):
            adopt.move_foreign(staging, dest, unlinked)
            remove_tree(staging)  # now holds the old model
        else:
            aside = aside_path(staging)
            remove_tree(aside)
            os.rename(dest, aside)
            try:
                os.rename(staging, dest)
            except BaseException:
                os.rename(aside, dest)
                raise
            adopt.move_foreign(aside, dest, unlinked)
            remove_tree(aside)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise ConfigError(f"{dest} is on another filesystem than the staging folder {staging}",
                              hint="destinations must be on the models root's own filesystem") from None
        raise
    _fsync_dir(dest.parent)
    return manifest


def _recover_aside(staging: Path, dest: Path) -> None:
    """Undo a publish killed between moving the old tree aside and moving the new one in, or finish one killed after
    (the caller owns ``staging``): an absent ``dest`` gets the old tree back (a published model, or a folder being
    adopted: never lost); else the foreign entries the published manifest records and ``dest`` lacks are moved in
    from the old tree (what would not link) and the old tree is removed. With anything else at ``dest`` (no
    manifest) the old tree is left where it is."""
    aside = aside_path(staging)
    if not os.path.lexists(aside):
        return
    if not os.path.lexists(dest):
        log.warning("restoring %s from %s (a publish was interrupted)", dest, aside.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(aside, dest)
        return
    published = _read_manifest_quietly(dest)
    if published is None:
        log.warning("not removing %s: %s has no completion manifest", aside, dest)
        return
    adopt.move_foreign(aside, dest, [n for n in published.foreign if not os.path.lexists(dest / n)])
    remove_tree(aside)


def recover_interrupted_publish(models_root: Path, dest: Path) -> None:
    """:func:`_recover_aside` for every writer's staging of ``dest`` (staging names carry writer and epoch, so a
    Lease holder finds what an earlier holder's killed publish left); the caller must be the only one publishing
    ``dest`` (it holds the model's Lease). A staging folder whose writer still owns it is left alone."""
    from .cleanup import staging_key

    root = staging_root(models_root)
    prefix = staging_key(models_root, dest) + "."
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix) and n.endswith(ASIDE_SUFFIX)]
    except FileNotFoundError:
        return
    for name in names:
        staging = root / name[: -len(ASIDE_SUFFIX)]
        try:
            with own_staging(staging, wait=False):
                _recover_aside(staging, dest)
        except StagingBusyError:
            continue


# --------------------------------------------------------------------------------------------------- pull
def manifest_matches(manifest: Manifest, listing: Listing, model_dir: Path | None = None) -> bool:
    """``manifest`` describes exactly ``listing`` (uri, revision, selection, paths, sizes, checksums) and lists at
    least one file; with ``model_dir``, every file is also still there with its size."""
    if manifest.source_uri != listing.uri or manifest.revision != listing.revision:
        return False
    if manifest.selection != listing.selection or not manifest.files:
        return False
    have = {f.path: f for f in manifest.files}
    if set(have) != {f.path for f in listing.files}:
        return False
    for rf in listing.files:
        mf = have[rf.path]
        if mf.size != rf.size:
            return False
        for algo in checkable(rf.checksums):
            if algo in mf.checksums and mf.checksums[algo].lower() != rf.checksums[algo].lower():
                return False
        if model_dir is not None:
            try:
                if os.stat(Path(model_dir) / mf.path).st_size != mf.size:
                    return False
            except OSError:
                return False
    return True


def _read_manifest_quietly(model_dir: Path) -> Manifest | None:
    try:
        return read_manifest(model_dir)
    except (VerificationError, OSError):
        return None


_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share the extents (btrfs, XFS, bcachefs)


def _link_or_copy(src: Path, dst: Path) -> str:
    """Make ``dst`` hold ``src``'s bytes as cheaply as the filesystem allows: a hard link (the same inode, no
    bytes written), else a reflink, else a copy. Returns which it was."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return "link"
    except OSError as e:
        log.debug("hard link %s -> %s failed (%s); trying a reflink", src, dst, e.strerror)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return "reflink"
        except OSError:
            shutil.copyfileobj(fin, fout, 4 * MiB)
            return "copy"


def _seed(listing: Listing, staging: Path, dest: Path, paths: set[str], cancel: threading.Event | None) -> int:
    """Bring the files ``paths`` of ``listing`` from ``dest`` into ``staging``: each a regular file of its listed
    size there, and not already in staging (a resumed run's files win). A hard link (the same inode, nothing
    written), else a reflink, else a copy; its resume state is dropped, so :func:`_verify_present` hashes it
    against its checksum before it is kept. Returns how many files were seeded."""
    staging.mkdir(parents=True, exist_ok=True)
    seeded: dict[str, int] = {}
    for rf in listing.files:
        _check_cancel(cancel)
        if rf.path not in paths:
            continue
        try:
            src, dst = contained(dest, rf.path, what="file name"), contained(staging, rf.path, what="file name")
            st = os.lstat(src)
            if not stat.S_ISREG(st.st_mode) or st.st_size != rf.size or os.path.lexists(dst):
                continue
            drop_state(staging, rf.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            how = _link_or_copy(src, dst)
        except (OSError, UnsafePathError) as e:
            if capacity.is_no_space(e):
                raise
            log.debug("not seeding %s from %s: %s", rf.path, dest, e)
            continue
        seeded[how] = seeded.get(how, 0) + 1
    log.info("%s: seeded %s", dest, ", ".join(f"{n} by {how}" for how, n in seeded.items()) or "nothing")
    return sum(seeded.values())


def _seed_from_published(listing: Listing, staging: Path, dest: Path, cancel: threading.Event | None) -> int:
    """Repair support: bring the undamaged files of the published copy at ``dest`` into ``staging``.

    Only when ``dest``'s manifest is of exactly this ``listing`` and :func:`~.ready.damage` finds something; every
    file still of its listed size is seeded except those a deep pass recorded as mismatching
    (:mod:`~.findings`), so what :func:`fetch_into` fetches is exactly what differs from the origin. Files
    already in staging win (a resumed repair). Their resume state is dropped: :func:`fetch_into` re-verifies a
    seeded file against its checksum before keeping it (:func:`_verify_present`, in parallel), and rewrites only
    new inodes, so the published files are never written. Returns how many files were seeded.
    """
    published = _read_manifest_quietly(dest)
    if published is None or not manifest_matches(published, listing):
        return 0
    problems = damage(dest, published)
    if not problems:
        return 0
    # Every file of the right size is seeded and re-hashed by fetch_into, so only what really differs is fetched
    # (an index is not refetched because a shard it names is missing); a deep pass's known mismatches are left
    # out at once, sparing a re-hash that must fail.
    recorded = read_findings(dest, published)
    bad = {path for path, _ in recorded.problems} if recorded else set()
    log.warning("%s at %s does not verify (%s): repairing it, fetching only the damaged files", listing.uri,
                dest, problems[0])
    return _seed(listing, staging, dest, {rf.path for rf in listing.files} - bad, cancel)


PhaseFn = Callable[[str, adopt.Adoption | None], None]
"""``on_phase(name, adoption)``: ``("adopting", None)`` when the hashing of a folder being adopted starts,
``("adopted", Adoption)`` when it ends (what is kept, what is fetched), ``("downloading", None)`` when fetching
starts (every stage)."""


def _adopt_into(listing: Listing, staging: Path, dest: Path, options: EngineOptions, cancel: threading.Event | None,
                progress: Progress | None, on_phase: PhaseFn | None) -> adopt.Adoption:
    """Adoption (:mod:`~.adopt`): ``dest`` holds files but no completion manifest. Refuse it unless it holds this
    model (:func:`~.adopt.check_adoptable`, before anything is written; after hashing, at least one file with the
    origin's checksum), else seed staging with hard links of its files of their listed size and hash them in
    parallel; what fails or is missing is left for :func:`fetch_into`. The caller owns ``staging``."""
    survey = adopt.check_adoptable(dest, listing)
    _check_listing(staging, listing)
    tidy_staging(staging, [safe_relpath(rf.path) for rf in listing.files], _listing_id(listing))
    log.info("adopting %s at %s: %d of %d files there with their size, %d entr%s kept as not the model's",
             listing.uri, dest, len(survey.present), len(listing.files), len(survey.foreign),
             "y" if len(survey.foreign) == 1 else "ies")
    _seed(listing, staging, dest, set(survey.present), cancel)
    if on_phase is not None:
        on_phase("adopting", None)
    started = time.monotonic()
    present = [rf for rf in listing.files if rf.path in set(survey.present)]
    _, failed = _verify_present(staging, present, options, cancel, progress)
    kept = []
    for rf in listing.files:
        state = load_state(staging, rf.path)
        if state is not None and state.done:
            kept.append(rf.path)
    if not kept:
        remove_tree(staging)
        raise DestinationError(f"destination {dest} holds files modelherd did not publish, and none of the "
                               f"{len(present)} named like {listing.uri}'s (revision {listing.revision}) files has "
                               "the origin's bytes: it is not a copy of this model",
                               hint="pass an empty or new folder as --dest, or move those files away")
    done = set(kept) | set(failed)
    result = adopt.Adoption(kept=tuple(kept), failed=tuple(failed),
                            missing=tuple(rf.path for rf in listing.files if rf.path not in done),
                            foreign=survey.foreign)
    hashed = sum(rf.size for rf in present)
    log.info("adopting %s at %s: %d files kept in place (%.1f MiB hashed in %.2fs), %d failed their checksum, %d "
             "missing: fetching %d", listing.uri, dest, len(result.kept), hashed / MiB, time.monotonic() - started,
             len(result.failed), len(result.missing), len(result.failed) + len(result.missing))
    if on_phase is not None:
        on_phase("adopted", result)
    return result


def stage(source: Source, listing: Listing, staging: Path, *, dest: Path, writer: str,
          options: EngineOptions | None = None, cancel: threading.Event | None = None,
          progress: Progress | None = None, on_phase: PhaseFn | None = None) -> Manifest:
    """Make ``staging`` a complete, verified copy of ``listing`` and return the manifest to publish it with.

    A published copy of this very listing at ``dest`` that shows damage seeds staging with its undamaged files
    (repair: only the damaged ones are fetched). A ``dest`` that holds files but no completion manifest is adopted
    (:func:`_adopt_into`: refused with :class:`DestinationError` unless it holds this model; its files of their
    listed size are hard-linked in and hashed in parallel, ``progress`` counting the bytes hashed, ``on_phase``
    told; only the rest is fetched). The manifest records the listing's selection and the quick-verification
    problems of the staged copy, which are the origin's own (every byte was checked against the listing);
    :func:`~.ready.damage` later counts only what differs from them. Nothing outside ``staging`` is written.
    """
    options = options or EngineOptions()
    check_listing(listing, options)
    _check_cancel(cancel)
    staging, dest = Path(staging), Path(dest)
    if adopt.unpublished(dest):
        with own_staging(staging, wait=False):
            _adopt_into(listing, staging, dest, options, cancel, progress, on_phase)
    else:
        _seed_from_published(listing, staging, dest, cancel)
    if on_phase is not None:
        on_phase("downloading", None)
    digests = fetch_into(source, listing, staging, options=options, cancel=cancel, progress=progress)
    # the resume state is not part of the model (publish removes it); nor are its files' findings. Our own
    # staging holds the checked listing and at most one state file per listed file: bounded, so no deadline.
    origin = tuple((p.path, p.message) for p in verify_quick(staging, max_files=2 * options.max_files + 1,
                                                             deadline_s=None)
                   if p.path.split("/", 1)[0] != STATE_DIRNAME)
    if origin:
        log.warning("%s as the origin serves it does not pass quick verification (%s); publishing it as it is",
                    listing.uri, f"{origin[0][0]}: {origin[0][1]}")
    return Manifest(
        source_uri=listing.uri, revision=listing.revision, writer=writer, selection=listing.selection,
        origin_problems=origin,
        files=tuple(ManifestFile(path=rf.path, size=rf.size,
                                 checksums={**{a: v.lower() for a, v in rf.checksums.items()
                                               if a in checkable(rf.checksums)}, **digests[rf.path]})
                    for rf in listing.files))


_CLEAN_ON = (CancelledError, VerificationError, InsufficientSpaceError, UnsafePathError, ConfigError)


@overload
def pull(source: Source, dest: Path, /, *, models_root: Path, writer: str, listing: Listing | None = None,
         options: EngineOptions | None = None, epoch: int = 0, cancel: threading.Event | None = None,
         progress: Progress | None = None, wait: bool = True, on_phase: PhaseFn | None = None) -> Manifest: ...


@overload
def pull(source: Source, listing: Listing, dest: Path, /, *, models_root: Path, writer: str,
         options: EngineOptions | None = None, epoch: int = 0, cancel: threading.Event | None = None,
         progress: Progress | None = None, wait: bool = True, on_phase: PhaseFn | None = None) -> Manifest: ...


def pull(source: Source, *args: Path | Listing, models_root: Path, writer: str, listing: Listing | None = None,
         options: EngineOptions | None = None, epoch: int = 0, cancel: threading.Event | None = None,
         progress: Progress | None = None, wait: bool = True, on_phase: PhaseFn | None = None) -> Manifest:
    """Put the model of ``source`` at ``dest`` (inside ``models_root``) and return its manifest.

    Called as ``pull(source, dest, ...)`` (the listing is fetched, or passed as ``listing=``) or
    ``pull(source, listing, dest, ...)``. A ``dest`` whose manifest already matches the listing is returned as
    is, without fetching a byte. Otherwise fetches into ``staging_dir_for(models_root, dest, writer, epoch)``
    and publishes. On a source error staging is kept (a rerun resumes); on cancel, verification failure,
    lack of space or unsafe names it is removed.

    ``dest`` must pass :func:`check_destination` (checked before the listing is fetched); a folder holding files
    but no completion manifest is adopted (:func:`stage`; ``on_phase`` and ``progress`` tell the hashing) or
    refused with :class:`~modelherd.storage.errors.DestinationError` when it is not a copy of this model, before
    anything is written. The staging folder is
    owned (:func:`own_staging`) from the fast-path check until it is published or cleaned: a second pull of the
    same model by the same writer waits for the first (until ``cancel``) and then finds the model published,
    or, with ``wait=False``, raises :class:`~modelherd.storage.errors.StagingBusyError`.
    """
    if len(args) == 2 and isinstance(args[0], Listing):
        listing, dest_arg = args[0], args[1]
    elif len(args) == 1:
        dest_arg = args[0]
    else:
        raise TypeError("pull(source, dest, ...) or pull(source, listing, dest, ...)")
    if isinstance(dest_arg, Listing):
        raise TypeError("dest must be a path")
    options = options or EngineOptions()
    models_root = Path(models_root)
    dest = check_destination(models_root, Path(dest_arg))
    if listing is None:
        listing = source.list_files()
    check_listing(listing, options)
    existing = _already_published(dest, listing, progress)
    if existing is not None:
        return existing
    staging = staging_dir_for(models_root, dest, writer, epoch)
    try:
        with own_staging(staging, wait=wait, cancel=cancel):
            existing = _already_published(dest, listing, progress)  # the pull we waited for published it
            if existing is not None:
                return existing
            return _pull_owned(source, listing, dest, staging, models_root, writer, options, cancel, progress,
                               on_phase)
    except OSError as e:
        raise fs_error(e, staging, what="staging folder") from None


def _already_published(dest: Path, listing: Listing, progress: Progress | None) -> Manifest | None:
    try:
        existing = read_manifest(dest)
    except VerificationError:
        existing = None
    if existing is not None and manifest_matches(existing, listing) and not damage(dest, existing):
        log.info("%s is already complete at %s (revision %s)", listing.uri, dest, listing.revision)
        if progress is not None:
            progress(listing.total_bytes, listing.total_bytes)
        return existing
    return None


def _pull_owned(source: Source, listing: Listing, dest: Path, staging: Path, models_root: Path, writer: str,
                options: EngineOptions, cancel: threading.Event | None, progress: Progress | None,
                on_phase: PhaseFn | None) -> Manifest:
    try:
        _recover_aside(staging, dest)
        staged = stage(source, listing, staging, dest=dest, writer=writer, options=options, cancel=cancel,
                       progress=progress, on_phase=on_phase)
        manifest = publish(staging, dest, staged, models_root=models_root)
    except (DestinationError, ModelsRootError):
        raise  # the user fixes the destination or the mount; what was downloaded stays for the rerun
    except _CLEAN_ON:
        remove_tree(staging)
        raise
    except OSError as e:
        if capacity.is_no_space(e):
            remove_tree(staging)
            raise capacity.no_space_error(e, staging) from None
        raise
    return manifest
