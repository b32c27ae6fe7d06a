"""A listing's archives (tar layers) made into the model's files in staging: fetched, verified, extracted, recorded.

Invariants:
- An archive is fetched by :func:`~.fetch.fetch_into` like any file (ranged, resumable, its sha256 digest checked
  while it streams) into staging's hidden ``.modelherd-layers/`` (:data:`~.staging.LAYERS_DIRNAME`, kept by
  :func:`~.staging.tidy_staging` for a rerun, removed before publish, never published), and only then extracted
  (:mod:`~.tarlayer`: safe, bounded, every file hashed as it is written) into staging. The manifest lists the
  extracted files, each with its own sha256 and the archive it came from, and the archives' digests in order
  (:attr:`~.manifest.Manifest.archives`); the revision (the manifest digest) pins them all.
- Every extracted file is recorded as verified (its ``stat_key``), so :func:`~.publish.publish` publishes it only
  if it is the very file that was extracted.
- Repair: a published copy of this very listing that shows damage seeds staging with its extracted files that
  still hash to the manifest's sha256 (hard links, never written; a deep pass's mismatches left out); only the
  archives that own a missing or damaged file are fetched, and only those files are extracted from them, each
  checked against the manifest. Anything that does not check out falls back to a full extraction of every archive.
- A destination holding files but no manifest is not adopted for a listing with archives (its files cannot be
  known before extracting): :class:`~.errors.DestinationError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from .errors import SourceError, UnsafeArchiveError
from .fetch import fetch_into
from .findings import read_findings
from .hashing import hash_file
from .manifest import Manifest, ManifestFile
from .options import EngineOptions, Progress, check_cancel
from .paths import contained
from .ready import manifest_matches, published_manifest
from .repair import link_or_copy
from .staging import LAYERS_DIRNAME, FileState, remove_tree, save_state, stat_key
from .tarlayer import Layer, extract_layers, prune
from .types import ALL_FILES, Listing, Source

__all__ = ["stage_archives"]

log = logging.getLogger(__name__)


def stage_archives(listing: Listing, staging: Path, *, source: Source, dest: Path, options: EngineOptions,
                   cancel: threading.Event | None, progress: Progress | None) -> list[ManifestFile]:
    """Make ``staging`` hold the files ``listing``'s archives extract to (its plain files are already there) and
    return their manifest entries. The caller owns ``staging``."""
    archives = listing.archives
    if not archives:
        return []
    published = published_manifest(dest)
    if published is not None and manifest_matches(published, listing):
        repaired = _repair(listing, published, staging, dest, source, options, cancel, progress)
        if repaired is not None:
            return repaired
    taken = {f.path for f in listing.plain_files}
    layers = _fetch(listing, [a.locator for a in archives], staging, source, options, cancel, progress)
    files = extract_layers(layers, staging, taken=taken, max_files=options.max_files, fsync=options.fsync,
                           cancel=cancel)
    if not files and not taken:
        raise SourceError(f"{listing.uri} (revision {listing.revision}): its layers hold no file of the model"
                          + (f" under /{archives[0].unpack.root}" if archives[0].unpack and archives[0].unpack.root
                             else ""),
                          hint="a modelcar image keeps the model under /models; check the image")
    entries = [ManifestFile(path=f.path, size=f.size, checksums={"sha256": f.sha256}, archive=f.archive)
               for f in sorted(files.values(), key=lambda f: f.path)]
    _record(staging, entries)
    remove_tree(staging / LAYERS_DIRNAME)
    log.info("%s: extracted %d files from %d layer(s)", listing.uri, len(entries), len(archives))
    return entries


def _fetch(listing: Listing, locators: list[str], staging: Path, source: Source, options: EngineOptions,
           cancel: threading.Event | None, progress: Progress | None) -> list[Layer]:
    """Fetch the archives ``locators`` (verified against their digests) into ``staging/.modelherd-layers``."""
    chosen = [a for a in listing.archives if a.locator in set(locators)]
    sub = Listing(uri=listing.uri, revision=listing.revision, files=tuple(chosen), selection=ALL_FILES)
    folder = staging / LAYERS_DIRNAME
    fetch_into(source, sub, folder, options=options, cancel=cancel, progress=progress)
    layers = []
    for a in chosen:
        assert a.unpack is not None
        layers.append(Layer(blob=contained(folder, a.path, what="layer"), digest=a.locator, unpack=a.unpack))
    return layers


def _record(staging: Path, entries: list[ManifestFile]) -> None:
    """Record every extracted file as verified with its ``stat_key`` (after all links were made: ctime settles)."""
    for mf in entries:
        sha = mf.checksums["sha256"]
        save_state(staging, FileState(path=mf.path, size=mf.size, expect={"sha256": sha}, part_size=max(mf.size, 1),
                                      segment_size=max(mf.size, 1), done=True, digests={"sha256": sha},
                                      verified_stat=stat_key(os.lstat(contained(staging, mf.path, what="file")))))


def _repair(listing: Listing, published: Manifest, staging: Path, dest: Path, source: Source,
            options: EngineOptions, cancel: threading.Event | None, progress: Progress | None
            ) -> list[ManifestFile] | None:
    """Seed the published copy's extracted files that still check out, extract only the others from the layers
    that own them; ``None`` when that does not give the whole model (the caller extracts everything)."""
    extracted = [mf for mf in published.files if mf.archive]
    recorded = read_findings(dest, published)
    bad = {path for path, _ in recorded.problems} if recorded else set()
    missing: list[ManifestFile] = []
    for mf in extracted:
        check_cancel(cancel)
        if mf.path in bad or not _seed_one(mf, staging, dest):
            missing.append(mf)
    if missing:
        owners = {mf.archive for mf in missing}
        log.warning("%s at %s: %d extracted file(s) damaged (%s); fetching the %d layer(s) that hold them",
                    listing.uri, dest, len(missing), missing[0].path, len(owners))
        layers = _fetch(listing, sorted(owners), staging, source, options, cancel, progress)
        wanted = {mf.path for mf in missing}
        try:
            extract_layers(layers, staging, taken={f.path for f in listing.plain_files}, wanted=wanted,
                           max_files=options.max_files, fsync=options.fsync, cancel=cancel)
        except UnsafeArchiveError as e:
            log.warning("repairing %s by layer failed (%s); extracting every layer", dest, e.message)
            _undo(staging, extracted)
            return None
        for mf in missing:
            if not _matches(mf, staging):
                log.warning("repairing %s: %s is not as published after extracting its layer; extracting every "
                            "layer", dest, mf.path)
                _undo(staging, extracted)
                return None
    _record(staging, extracted)
    remove_tree(staging / LAYERS_DIRNAME)
    return extracted


def _seed_one(mf: ManifestFile, staging: Path, dest: Path) -> bool:
    """``dest``'s copy of ``mf`` linked into staging if it still hashes to the manifest's sha256."""
    try:
        src, dst = contained(dest, mf.path, what="file"), contained(staging, mf.path, what="file")
        st = os.lstat(src)
        if not os.path.isfile(src) or os.path.islink(src) or st.st_size != mf.size:
            return False
        if os.path.lexists(dst):
            os.unlink(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(src, dst)
    except OSError as e:
        log.debug("not seeding %s: %s", mf.path, e)
        return False
    if _matches(mf, staging):
        return True
    with contextlib.suppress(OSError):
        os.unlink(dst)
    return False


def _matches(mf: ManifestFile, staging: Path) -> bool:
    path = contained(staging, mf.path, what="file")
    try:
        if not os.path.isfile(path) or os.path.islink(path) or os.lstat(path).st_size != mf.size:
            return False
        return hash_file(str(path), ["sha256"], mf.size)["sha256"] == mf.checksums.get("sha256")
    except OSError:
        return False


def _undo(staging: Path, extracted: list[ManifestFile]) -> None:
    """Forget a failed repair: the extracted files in staging go (a full extraction makes them again)."""
    for mf in extracted:
        with contextlib.suppress(OSError):
            os.unlink(contained(staging, mf.path, what="file"))
        prune(staging, mf.path)

