"""Planning a file's fetch: its parts, and what of it already in staging can be kept or resumed.

Invariants:
- A file has at most ``MAX_PARTS_PER_FILE`` parts whatever its size (larger files get larger parts), so a plan's
  size in memory does not grow with the file's; a file is split only when :func:`splittable` and the caller
  allows it (fewer large files than ``concurrency``).
- Nothing on disk is trusted unchecked: a file is kept only when verified in this staging folder and untouched
  since (same ``stat_key``) or hashed again to its checksum; a partial file resumes only from checkpoints that
  still match the disk (CRC-32 per segment, or digests of the in-order hash for one-stream files); a partial
  file that shares its inode with another name is never resumed into.
- Planning writes nothing: it only reads staging and its resume state.
"""

from __future__ import annotations

import copy
import os
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .directio import FileWriter
from .hashing import MultiHasher, checkable, hash_file
from .options import EngineOptions
from .paths import contained
from .staging import FileState, load_state, stat_key
from .types import RemoteFile

__all__ = ["MAX_PARTS_PER_FILE", "Job", "Part", "files_in_flight", "layout", "part_list", "plan_file", "splittable"]

# Parts only spread one file over several streams; more than this many would only cost memory.
MAX_PARTS_PER_FILE = 1024


@dataclass
class Part:
    """The byte range ``[start, end)`` of a file, fetched up to ``resume`` so far."""

    index: int
    start: int
    end: int
    resume: int
    crc: int = 0  # CRC-32 of [segment start, resume): carried across retries so a retry continues mid-segment


@dataclass
class Job:
    """One file of the listing: where it goes, how it is hashed, its parts and what is known of it so far."""

    rf: RemoteFile
    target: Path
    algos: list[str]
    state: FileState
    parts: list[Part]
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


def splittable(rf: RemoteFile, options: EngineOptions) -> bool:
    """Large enough to be fetched as ranged parts (when the listing has few such files)."""
    return rf.size > options.multipart_threshold and rf.size > options.part_size


def layout(rf: RemoteFile, options: EngineOptions, split: bool = True) -> FileState:
    """The fresh layout of ``rf``: one part, or ``part_size`` parts, never more than ``MAX_PARTS_PER_FILE``
    (larger files get larger parts), so its size in memory does not grow with the file's."""
    expect = {a: rf.checksums[a].lower() for a in checkable(rf.checksums)[:1]}
    multipart = split and splittable(rf, options)
    part_size = max(options.part_size, -(-rf.size // MAX_PARTS_PER_FILE)) if multipart else max(rf.size, 1)
    n_parts = -(-rf.size // part_size) if rf.size else 0
    return FileState(path=rf.path, size=rf.size, expect=expect, part_size=part_size,
                     segment_size=options.checkpoint_size, parts=[[] for _ in range(n_parts)])


def part_list(state: FileState) -> list[Part]:
    """The parts of ``state``'s layout, none fetched yet."""
    return [Part(i, i * state.part_size, min((i + 1) * state.part_size, state.size), i * state.part_size)
            for i in range(len(state.parts))]


def _verified_prefix(fd: int, part: Part, crcs: list[int], seg: int, buf: memoryview) -> int:
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


def _replay_prefix(fd: int, job: Job, saved: FileState, buf: memoryview) -> int:
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


def plan_file(staging: Path, rf: RemoteFile, options: EngineOptions, buf: memoryview, split: bool = True) -> Job:
    """Decide, from what is on disk, whether ``rf`` is kept, resumed (and from where) or fetched fresh."""
    target = contained(staging, rf.path, what="file name")
    fresh = layout(rf, options, split)
    algos = options.hash_algos(fresh.expect)
    job = Job(rf, target, algos, fresh, part_list(fresh))
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
        job.parts = part_list(saved)
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


def files_in_flight(todo: int, options: EngineOptions) -> int:
    """All files at once when they fit in the ``concurrency * multipart_concurrency`` stream slots (e.g. 8 shards:
    8 streams, like 8 curls, instead of 4), else ``concurrency`` at a time: a crash then loses at most
    ``concurrency`` partial files' unchecked tails, as the setting promises."""
    slots = options.concurrency * options.multipart_concurrency
    return max(1, todo if todo <= slots else options.concurrency)

