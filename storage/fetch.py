"""Fetching a listing into a staging folder: parallel, ranged, resumable, every byte verified while it streams.

Invariants:
- Nothing is written outside the staging folder; staging is never cleaned here (the caller decides). A file
  fetched is always a new inode (the name may be a hard link to a published file), so nothing is ever written
  into a published file.
- Every byte is hashed once, in order, while it streams (:class:`~.hashcursor.HashCursor`: ranges that land ahead
  of the hash cursor are read back from the page cache); memory is a fixed buffer per worker thread.
- At most ``concurrency * multipart_concurrency`` GETs are in flight; whole-file streams are preferred to ranged
  parts (:func:`~.plan.splittable` only when fewer large files than ``concurrency``).
- A crash, a lost connection or a source error leaves staging resumable: written segments carry checkpoints
  (digests of the in-order hash for one-stream files, CRC-32 per segment for split files), saved only after the
  bytes they cover are written.
- The listing and the free space are checked before any file is planned; a set cancel Event stops planning
  between files and the workers within about ``cancel_grace_s``.
- A file that fails its checksum is fetched once more from scratch; a second failure is a
  :class:`VerificationError`. A verified file is recorded with its ``stat_key``, so publish can tell it is the
  very file that was verified.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import time
import zlib
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path

import urllib3.exceptions

from . import capacity
from .destination import fs_error
from .directio import FileWriter, aligned_buffer, direct_io_at, start_writeback
from .errors import CancelledError, ModelherdError, RateLimitedError, TransientSourceError, VerificationError
from .hashcursor import HashCursor
from .hashing import MultiHasher
from .listing import check_listing, check_names, listing_id
from .options import EngineOptions, MiB, Progress, cancelled, check_cancel
from .paths import contained, safe_relpath
from .plan import Job, Part, files_in_flight, layout, part_list, plan_file, splittable
from .present import verify_present
from .progress import ProgressGate
from .retry import call_with_retry
from .staging import drop_state, own_staging, remove_tree, save_state, stat_key, tidy_staging
from .types import ByteStream, Listing, RemoteFile, Source

__all__ = ["fetch_into", "record_verified"]

log = logging.getLogger(__name__)


class _FetchRun:
    """Shared state of one :func:`fetch_into` call."""

    def __init__(self, source: Source, staging: Path, options: EngineOptions, gate: ProgressGate) -> None:
        self.source, self.staging, self.options, self.gate = source, staging, options, gate
        self.stop = threading.Event()
        self.parts_pool = ThreadPoolExecutor(options.concurrency * options.multipart_concurrency,
                                             thread_name_prefix="modelherd-part")
        self._local = threading.local()
        self.reread = 0
        self.direct = direct_io_at(options.direct_io, staging)
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
    def run_file(self, job: Job) -> None:
        if job.kept:
            log.debug("kept %s (already in staging and verified)", job.rf.path)
            return
        for attempt in (1, 2):
            problem = self._fetch_file(job)
            if problem is None:
                log.debug("fetched %s (%d bytes)", job.rf.path, job.rf.size)
                record_verified(self.staging, job)
                return
            log.warning("%s failed verification (%s)%s", job.rf.path, problem,
                        "; fetching it again" if attempt == 1 else "")
            self.gate.forget(job.present)
            remove_tree(job.target)
            drop_state(self.staging, job.rf.path)
            job.state = layout(job.rf, self.options, split=len(job.parts) > 1)
            job.parts = part_list(job.state)
            job.hasher, job.hashed = None, 0
        raise VerificationError(f"{job.rf.path} does not match its checksum after two downloads",
                                problems=[f"{job.rf.path}: {problem}"],
                                hint="the origin serves bytes that differ from its listing; try again later")

    def _fetch_file(self, job: Job) -> str | None:
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

    def _fetch_parts(self, job: Job, fd: int, cursor: HashCursor, todo: list[Part]) -> None:
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
    def _fetch_part(self, job: Job, fd: int, cursor: HashCursor, part: Part) -> None:
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

    def _stream(self, job: Job, fd: int, cursor: HashCursor, part: Part) -> None:
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
                self.gate.add(n)
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

    def _write(self, job: Job, data: memoryview, pos: int) -> None:
        assert job.writer is not None, "a file is written only between open and close in _fetch_file"
        try:
            job.writer.write(data, pos)
        except OSError as e:
            raise self._write_error(e, job) from None

    def _write_error(self, e: OSError, job: Job) -> ModelherdError | OSError:
        if capacity.is_no_space(e):
            return capacity.no_space_error(e, job.target)
        return e


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

def record_verified(staging: Path, job: Job) -> None:
    """Remember which file on disk was verified (``stat_key``), so :func:`~.publish.publish` can tell it is the same."""
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
    are checked before any file is planned. Staging is never cleaned here: :func:`~.engine.pull` decides.
    """
    options = options or EngineOptions()
    staging = Path(staging)
    check_listing(listing, options)
    check_cancel(cancel)
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
    check_names(staging, listing)
    tidy_staging(staging, [safe_relpath(rf.path) for rf in listing.files], listing_id(listing))
    started = time.monotonic()
    verify_present(staging, list(listing.files), options, cancel)  # seeded or stateless files: in parallel

    missing = 0
    for rf in listing.files:
        target = contained(staging, rf.path, what="file name")
        missing += max(0, rf.size - min(capacity.allocated_bytes(target), rf.size))
    capacity.ensure_free_space(staging, missing)

    scratch = memoryview(bytearray(options.chunk_size))
    split = sum(1 for rf in listing.files if splittable(rf, options)) < options.concurrency
    jobs: list[Job] = []
    for rf in listing.files:
        check_cancel(cancel)
        jobs.append(plan_file(staging, rf, options, scratch, split))
    del scratch
    for job in jobs:
        if job.kept:
            record_verified(staging, job)
    present = sum(j.present for j in jobs)
    log.info("pulling %s: %d files, %.1f MiB (%.1f MiB already in staging) into %s", listing.uri,
             len(jobs), listing.total_bytes / MiB, present / MiB, staging)

    gate = ProgressGate(listing.total_bytes, present, progress, options.progress_interval_s)
    run = _FetchRun(source, staging, options, gate)
    files_pool = ThreadPoolExecutor(files_in_flight(sum(1 for j in jobs if not j.kept), options),
                                    thread_name_prefix="modelherd-file")
    # largest first: with more files than workers, no big file starts last and runs alone at the end
    futures = [files_pool.submit(run.run_file, j) for j in sorted(jobs, key=lambda j: -j.rf.size)]
    error: BaseException | None = None
    by_cancel = False
    try:
        pending: set[Future[None]] = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
            if cancel is not None and cancel.is_set():
                by_cancel = True
                error = cancelled()
                break
            if any(f.exception() is not None for f in done):
                error = _first_real_error(futures)
                break
    except BaseException as e:  # KeyboardInterrupt in the waiting thread
        by_cancel, error = True, e
    finally:
        if error is not None:
            run.stop.set()
        files_pool.shutdown(wait=False, cancel_futures=True)
        run.parts_pool.shutdown(wait=False, cancel_futures=True)
        if error is not None:
            # workers notice the stop between chunks; a failure waits a little longer so its cause is found
            wait(futures, timeout=options.cancel_grace_s * (1 if by_cancel else 5))
            if not by_cancel:
                error = _first_real_error(futures) or error
    if error is not None:
        raise error
    gate.final()
    elapsed = max(time.monotonic() - started, 1e-9)
    log.info("pulled %s: fetched %.1f MiB in %.2fs (%.1f MiB/s), %.1f MiB re-read for hashing, %.1f MiB written "
             "with O_DIRECT", listing.uri, gate.fetched / MiB, elapsed, gate.fetched / MiB / elapsed,
             run.reread / MiB, run.direct_bytes / MiB)
    return {j.rf.path: dict(j.digests) for j in jobs}


def _first_real_error(futures: list[Future[None]] | set[Future[None]]) -> BaseException | None:
    """The first failure that is not a knock-on ``CancelledError`` of the internal stop."""
    errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
    real = [e for e in errors if not isinstance(e, CancelledError)]
    return (real or errors or [None])[0]

