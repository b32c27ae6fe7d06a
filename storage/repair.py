"""Seeding a staging folder from what the destination already holds, so only what differs is fetched.

Two cases: a published copy that shows :func:`~.ready.damage` (repair: :func:`seed_from_published`), and a folder
holding files but no completion manifest (adoption: :func:`adopt_into`, refused unless it holds this model).

Invariants:
- The destination's files are never written: each is brought into staging as a hard link (the same inode, no
  bytes written), else a reflink, else a copy (:func:`link_or_copy`); the fetch that follows writes only new
  inodes.
- A seeded file is never trusted as it is: its resume state is dropped, so it is hashed against its checksum
  (:func:`~.present.verify_present`) before it is kept. Files already in staging win (a resumed run's).
- A repair seeds only from a copy whose manifest is of exactly this listing (:func:`~.ready.manifest_matches`),
  and leaves out the files a deep pass recorded as mismatching (:mod:`~.findings`).
- An adoption is refused (:class:`DestinationError`, staging removed) unless, after hashing, at least one file has
  the origin's checksum. The caller owns the staging folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path

from . import adopt, capacity
from .errors import DestinationError, UnsafePathError
from .findings import read_findings
from .listing import check_names, listing_id
from .options import EngineOptions, MiB, PhaseFn, Progress, check_cancel
from .paths import contained, safe_relpath
from .present import verify_present
from .ready import damage, manifest_matches, published_manifest
from .staging import drop_state, load_state, remove_tree, tidy_staging
from .types import Listing

__all__ = ["adopt_into", "link_or_copy", "seed_from_published"]

log = logging.getLogger(__name__)

_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share the extents (btrfs, XFS, bcachefs)


def link_or_copy(src: Path, dst: Path) -> str:
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
    written), else a reflink, else a copy; its resume state is dropped, so :func:`~.present.verify_present` hashes it
    against its checksum before it is kept. Returns how many files were seeded."""
    staging.mkdir(parents=True, exist_ok=True)
    seeded: dict[str, int] = {}
    for rf in listing.files:
        check_cancel(cancel)
        if rf.path not in paths or rf.unpack is not None:
            continue
        try:
            src, dst = contained(dest, rf.path, what="file name"), contained(staging, rf.path, what="file name")
            st = os.lstat(src)
            if not stat.S_ISREG(st.st_mode) or st.st_size != rf.size or os.path.lexists(dst):
                continue
            drop_state(staging, rf.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            how = link_or_copy(src, dst)
        except (OSError, UnsafePathError) as e:
            if capacity.is_no_space(e):
                raise
            log.debug("not seeding %s from %s: %s", rf.path, dest, e)
            continue
        seeded[how] = seeded.get(how, 0) + 1
    log.info("%s: seeded %s", dest, ", ".join(f"{n} by {how}" for how, n in seeded.items()) or "nothing")
    return sum(seeded.values())


def seed_from_published(listing: Listing, staging: Path, dest: Path, cancel: threading.Event | None) -> int:
    """Repair support: bring the undamaged files of the published copy at ``dest`` into ``staging``.

    Only when ``dest``'s manifest is of exactly this ``listing`` and :func:`~.ready.damage` finds something; every
    file still of its listed size is seeded except those a deep pass recorded as mismatching
    (:mod:`~.findings`), so what :func:`~.fetch.fetch_into` fetches is exactly what differs from the origin. Files
    already in staging win (a resumed repair). Their resume state is dropped: :func:`~.fetch.fetch_into`
    re-verifies a seeded file against its checksum before keeping it (:func:`~.present.verify_present`, in
    parallel), and rewrites only new inodes, so the published files are never written. Returns how many files
    were seeded.
    """
    published = published_manifest(dest)
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


def adopt_into(listing: Listing, staging: Path, dest: Path, options: EngineOptions, cancel: threading.Event | None,
                progress: Progress | None, on_phase: PhaseFn | None) -> adopt.Adoption:
    """Adoption (:mod:`~.adopt`): ``dest`` holds files but no completion manifest. Refuse it unless it holds this
    model (:func:`~.adopt.check_adoptable`, before anything is written; after hashing, at least one file with the
    origin's checksum), else seed staging with hard links of its files of their listed size and hash them in
    parallel; what fails or is missing is left for :func:`~.fetch.fetch_into`. The caller owns ``staging``."""
    survey = adopt.check_adoptable(dest, listing)
    check_names(staging, listing)
    tidy_staging(staging, [safe_relpath(rf.path) for rf in listing.files], listing_id(listing))
    log.info("adopting %s at %s: %d of %d files there with their size, %d entr%s kept as not the model's",
             listing.uri, dest, len(survey.present), len(listing.files), len(survey.foreign),
             "y" if len(survey.foreign) == 1 else "ies")
    _seed(listing, staging, dest, set(survey.present), cancel)
    if on_phase is not None:
        on_phase("adopting", None)
    started = time.monotonic()
    present = [rf for rf in listing.files if rf.path in set(survey.present)]
    _, failed = verify_present(staging, present, options, cancel, progress)
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
