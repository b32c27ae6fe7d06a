"""Publishing a staging folder as the model at its destination, in one step, and recovering from a killed one.

Invariants:
- ``dest`` is only ever absent, the old complete model, or the new complete model: the new tree is swapped in
  with ``renameat2(RENAME_EXCHANGE)`` where the filesystem has it, else the old one is moved aside into the
  staging root first (:func:`~.staging.aside_path`) and restored if the move in fails; the manifest is written
  last, just before, and the directories are fsynced around the swap.
- :func:`publish` publishes a file only if it is the very file that was verified (same inode, size, mtime and
  ctime as when its checksum matched; else it is hashed again) and refuses a staging folder holding anything the
  manifest does not list.
- Whatever ``dest`` holds that is not the model's is kept in place (hard links into the new tree before the swap)
  and recorded in the manifest; a folder without a completion manifest is replaced only if it holds one of the
  model's files with its size.
- A publish killed between moving the old tree aside and moving the new one in is undone (:func:`recover_aside`):
  a published model, or a folder being adopted, is never lost.
- The caller owns the staging folder (:func:`~.staging.own_staging`) throughout.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import stat
from pathlib import Path

from . import adopt
from .cleanup import staging_key
from .destination import check_destination
from .errors import ConfigError, DestinationError, StagingBusyError, VerificationError
from .hashing import checkable, hash_file
from .manifest import Manifest, write_manifest
from .paths import STAGING_DIRNAME, safe_relpath, staging_root
from .ready import published_manifest
from .staging import (
    ASIDE_SUFFIX,
    LAYERS_DIRNAME,
    STATE_DIRNAME,
    aside_path,
    load_state,
    own_staging,
    remove_tree,
    stat_key,
)

__all__ = ["publish", "recover_aside", "recover_interrupted_publish"]

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
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
            if rel not in (STATE_DIRNAME, LAYERS_DIRNAME) and rel not in listed and rel not in folders:
                problems.append(f"{rel}: in staging but not in the manifest")
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in (STATE_DIRNAME, LAYERS_DIRNAME)]
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
    ``dest`` must pass :func:`~.destination.check_destination` (checked again here: the agent calls this
    directly); a folder without a completion manifest must hold one of the manifest's files with its size (it is
    adopted). Every file of ``manifest`` must be the one :func:`~.fetch.fetch_into` verified
    (:func:`_check_staged`). Whatever ``dest`` holds that is not the model's (:func:`~.adopt.foreign_entries`: not
    a file of the new manifest nor of the old one) is kept in place (:func:`~.adopt.carry_foreign`) and recorded in the
    manifest. ``models_root`` defaults to the root whose staging folder holds ``staging``.
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
    old = published_manifest(dest)
    model = {f.path for f in manifest.files} | ({f.path for f in old.files} if old is not None else set())
    return adopt.foreign_entries(dest, model)


def _publish_owned(staging: Path, dest: Path, manifest: Manifest) -> Manifest:
    remove_tree(staging / STATE_DIRNAME)
    remove_tree(staging / LAYERS_DIRNAME)
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


def recover_aside(staging: Path, dest: Path) -> None:
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
    published = published_manifest(dest)
    if published is None:
        log.warning("not removing %s: %s has no completion manifest", aside, dest)
        return
    adopt.move_foreign(aside, dest, [n for n in published.foreign if not os.path.lexists(dest / n)])
    remove_tree(aside)


def recover_interrupted_publish(models_root: Path, dest: Path) -> None:
    """:func:`recover_aside` for every writer's staging of ``dest`` (staging names carry writer and epoch, so a
    Lease holder finds what an earlier holder's killed publish left); the caller must be the only one publishing
    ``dest`` (it holds the model's Lease). A staging folder whose writer still owns it is left alone."""
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
                recover_aside(staging, dest)
        except StagingBusyError:
            continue
