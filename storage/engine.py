"""The download engine's orchestration: a model from its source to its destination, verified, published atomically.

This module only sequences the steps, each kept by its own module: the listing checks (:mod:`~.listing`), the
seeding of staging from what the destination holds (:mod:`~.repair`), the fetch (:mod:`~.fetch`, planned by
:mod:`~.plan`), the publish (:mod:`~.publish`) and the one "same model" rule (:mod:`~.ready`).

Invariants:
- Nothing is written outside the staging folder until :func:`~.publish.publish`, and the destination only ever
  holds a complete, verified model with its manifest (written last).
- "Ready" is one rule for every caller (:func:`pull`, the coordinator, the CLI's fast path): the manifest is of
  this model (:func:`~.ready.same_model`; with a listing, :func:`~.ready.manifest_matches`) and
  :func:`~.ready.damage` finds nothing. A published copy that shows damage is repaired (only its damaged files are
  fetched); a destination holding files but no manifest is adopted (refused unless it holds this model).
- One owner per staging folder (:func:`~.staging.own_staging`, held by :func:`pull` from before its fast-path
  check until staging is published or cleaned). On a source error staging is kept (a rerun resumes); on cancel,
  verification failure, lack of space, unsafe names or bad settings it is removed; on a destination or models
  root error it is kept for the rerun once the user has fixed them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from . import adopt, capacity
from .destination import check_destination, fs_error
from .errors import (
    CancelledError,
    ConfigError,
    DestinationError,
    InsufficientSpaceError,
    ModelsRootError,
    UnsafePathError,
    VerificationError,
)
from .fetch import fetch_into
from .hashing import checkable
from .listing import check_listing, listing_id
from .manifest import Manifest, ManifestFile, read_manifest
from .options import EngineOptions, PhaseFn, Progress, check_cancel
from .publish import publish, recover_aside
from .ready import damage, manifest_matches
from .repair import adopt_into, seed_from_published
from .staging import LAYERS_DIRNAME, STATE_DIRNAME, own_staging, remove_tree, staging_dir_for, tidy_staging
from .types import Listing, Source
from .unpack import stage_archives
from .verify import verify_quick

__all__ = ["pull", "stage"]

log = logging.getLogger(__name__)


def stage(source: Source, listing: Listing, staging: Path, *, dest: Path, writer: str,
          options: EngineOptions | None = None, cancel: threading.Event | None = None,
          progress: Progress | None = None, on_phase: PhaseFn | None = None) -> Manifest:
    """Make ``staging`` a complete, verified copy of ``listing`` and return the manifest to publish it with.

    A published copy of this very listing at ``dest`` that shows damage seeds staging with its undamaged files
    (repair: only the damaged ones are fetched). A ``dest`` that holds files but no completion manifest is adopted
    (:func:`~.repair.adopt_into`: refused with :class:`DestinationError` unless it holds this model; its files of their
    listed size are hard-linked in and hashed in parallel, ``progress`` counting the bytes hashed, ``on_phase``
    told; only the rest is fetched). The manifest records the listing's selection and the quick-verification
    problems of the staged copy, which are the origin's own (every byte was checked against the listing);
    :func:`~.ready.damage` later counts only what differs from them. Nothing outside ``staging`` is written.
    """
    options = options or EngineOptions()
    check_listing(listing, options)
    check_cancel(cancel)
    staging, dest = Path(staging), Path(dest)
    plain = dataclasses.replace(listing, files=listing.plain_files)
    if adopt.unpublished(dest) and listing.archives:
        raise DestinationError(f"destination {dest} holds files but no completion manifest, and {listing.uri} is "
                               "made of tar layers whose files are known only once extracted: it cannot be adopted",
                               hint="pass an empty or new folder as --dest, or move those files away")
    if adopt.unpublished(dest):
        with own_staging(staging, wait=False):
            adopt_into(listing, staging, dest, options, cancel, progress, on_phase)
    else:
        seed_from_published(listing, staging, dest, cancel)
    if on_phase is not None:
        on_phase("downloading", None)
    with own_staging(staging, wait=False):
        if plain.files:
            digests = fetch_into(source, plain, staging, options=options, cancel=cancel, progress=progress)
        else:
            staging.mkdir(parents=True, exist_ok=True)
            digests = {}
            tidy_staging(staging, [], listing_id(listing))
        extracted = stage_archives(listing, staging, source=source, dest=dest, options=options, cancel=cancel,
                                   progress=progress)
    # the resume state is not part of the model (publish removes it); nor are its files' findings. Our own
    # staging holds the checked listing and at most one state file per listed file: bounded, so no deadline.
    origin = tuple((p.path, p.message) for p in verify_quick(staging, max_files=2 * options.max_files + 1,
                                                             deadline_s=None)
                   if p.path.split("/", 1)[0] not in (STATE_DIRNAME, LAYERS_DIRNAME))
    if origin:
        log.warning("%s as the origin serves it does not pass quick verification (%s); publishing it as it is",
                    listing.uri, f"{origin[0][0]}: {origin[0][1]}")
    return Manifest(
        source_uri=listing.uri, revision=listing.revision, writer=writer, selection=listing.selection,
        origin_problems=origin, archives=tuple(a.locator for a in listing.archives),
        files=tuple(sorted([*(ManifestFile(path=rf.path, size=rf.size,
                                           checksums={**{a: v.lower() for a, v in rf.checksums.items()
                                                         if a in checkable(rf.checksums)}, **digests[rf.path]})
                              for rf in plain.files), *extracted], key=lambda f: f.path)))


_CLEAN_ON = (CancelledError, VerificationError, InsufficientSpaceError, UnsafePathError, ConfigError)


def pull(source: Source, dest: Path, *, models_root: Path, writer: str, listing: Listing | None = None,
         options: EngineOptions | None = None, epoch: int = 0, cancel: threading.Event | None = None,
         progress: Progress | None = None, wait: bool = True, on_phase: PhaseFn | None = None) -> Manifest:
    """Put the model of ``source`` at ``dest`` (inside ``models_root``) and return its manifest.

    ``listing`` is the origin's (``source.list_files()`` when not given, fetched after ``dest`` is checked). A
    ``dest`` whose manifest already matches the listing is returned as
    is, without fetching a byte. Otherwise fetches into ``staging_dir_for(models_root, dest, writer, epoch)``
    and publishes. On a source error staging is kept (a rerun resumes); on cancel, verification failure,
    lack of space or unsafe names it is removed.

    ``dest`` must pass :func:`~.destination.check_destination` (checked before the listing is fetched); a folder
    holding files but no completion manifest is adopted (:func:`stage`; ``on_phase`` and ``progress`` tell the
    hashing) or refused with :class:`~modelherd.storage.errors.DestinationError` when it is not a copy of this
    model, before anything is written. The staging folder is owned (:func:`~.staging.own_staging`) from the
    fast-path check until it is published or cleaned: a second pull of the same model by the same writer waits
    for the first (until ``cancel``) and then finds the model published, or, with ``wait=False``, raises
    :class:`~modelherd.storage.errors.StagingBusyError`.
    """
    options = options or EngineOptions()
    models_root = Path(models_root)
    dest = check_destination(models_root, Path(dest))
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
        recover_aside(staging, dest)
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
