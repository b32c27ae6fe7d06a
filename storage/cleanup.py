"""Removing what modelherd put on disk: a published model, the staging of a destination, stale staging.

Invariants:
- Nothing outside the models root is removed, nor the root itself, nor anything under a reserved
  ``.modelherd-*`` name except staging entries.
- :func:`remove_published` removes only a real folder (not a symlink) that holds a completion manifest at its
  top (of ``source_uri``, any revision, when given) and no other published model below; it leaves ``dest`` in
  one ``rename`` into the staging root, so a reader sees the whole model or nothing, and only then deletes the
  files. Files a process holds open stay readable until it closes them (Linux unlinks the name, not the inode; on NFS
  the client keeps an open file as a ``.nfsXXXX`` "silly rename" until its last close). Of several nodes racing to
  remove one destination, exactly one ``rename`` succeeds: the others find it absent.
- Staging entries are only removed when no owner holds them (``own_staging`` where the storage layer has it),
  and :func:`collect_staging` only removes entries whose newest file is older than a bound; ``*.lock`` files
  are never touched (their owner removes them).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import staging as staging_mod
from .errors import ConfigError, UnsafePathError, VerificationError
from .manifest import MANIFEST_NAME, read_manifest
from .paths import ensure_inside_root, staging_root
from .staging import RESERVED_PREFIX, remove_tree, staging_dir_for

log = logging.getLogger(__name__)

TRASH_MARK = ".removing-"
LOCK_SUFFIX = ".lock"
_STAGING_NAME = re.compile(r"-[0-9a-f]{12}\.")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

Outcome = Literal["removed", "absent", "kept"]


@dataclass(frozen=True)
class Removal:
    """What :func:`remove_published` did: ``removed`` by this call, ``absent`` (nothing there, or another
    remover won the rename), or ``kept`` with the reason (not a model modelherd published there)."""

    outcome: Outcome
    detail: str = ""


def staging_key(models_root: Path, dest: Path) -> str:
    """The ``<tail>-<hash>`` part every staging folder of ``dest`` starts with (followed by ``.``)."""
    name = staging_dir_for(models_root, dest, "w", 0).name
    return name[: -len(".w.0")]


def _newest_mtime(path: Path) -> float:
    """The newest modification time of ``path`` and everything below it (symlinks not followed)."""
    newest = os.lstat(path).st_mtime
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        return newest
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


@contextlib.contextmanager
def _unowned(entry: Path) -> Iterator[bool]:
    """Yields True while nobody else owns the staging folder ``entry`` (and holds it for the block).

    Uses the storage layer's ``own_staging(wait=False)`` where it exists (one owner per staging folder); a
    storage layer without it has no owners to respect beyond the lease and the age bound."""
    own = getattr(staging_mod, "own_staging", None)
    if own is None:
        yield True
        return
    try:
        cm = own(entry, wait=False)
        cm.__enter__()
    except Exception:  # StagingBusyError: someone writes it
        yield False
        return
    try:
        yield True
    finally:
        cm.__exit__(None, None, None)


def remove_published(models_root: Path, dest: Path, *, writer: str, source_uri: str | None = None) -> Removal:
    """Remove the published model at ``dest`` (see the module invariant); never raises for a folder that is not
    ours (``kept``), raises :class:`UnsafePathError` for a destination outside the root or reserved."""
    root = Path(os.path.realpath(models_root))
    given = Path(dest)
    real = ensure_inside_root(root, given)
    if any(part.startswith(RESERVED_PREFIX) for part in real.relative_to(root).parts):
        raise UnsafePathError(f"{given} is inside modelherd's reserved folders; not removing it",
                              hint="point spec.storage.path at a model folder of its own")
    try:
        st = os.lstat(given)
    except FileNotFoundError:
        return Removal("absent")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return Removal("kept", f"{given} is not a folder modelherd published (a link or a file)")
    try:
        manifest = read_manifest(real)
    except FileNotFoundError:
        return Removal("absent")
    except (VerificationError, OSError) as e:
        return Removal("kept", f"{given} has no readable completion manifest ({e})")
    if manifest is None:
        return Removal("kept", f"{given} holds no completion manifest: not a model modelherd published")
    if source_uri is not None and _base(manifest.source_uri) != _base(source_uri):
        return Removal("kept", f"{given} now holds {manifest.source_uri}, not {source_uri}")
    for dirpath, _dirnames, filenames in os.walk(real):
        if Path(dirpath) != real and MANIFEST_NAME in filenames:
            return Removal("kept", f"{given} holds another published model at {Path(dirpath).relative_to(root)}")
    trash_root = staging_root(root)
    trash_root.mkdir(parents=True, exist_ok=True)
    tag = _UNSAFE.sub("_", writer)[:40] or "x"
    trash = trash_root / f"{staging_key(root, real)}{TRASH_MARK}{tag}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(real, trash)
    except FileNotFoundError:
        return Removal("absent")  # another remover's rename won
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise ConfigError(f"{given} is on another filesystem than the staging folder",
                              hint="destinations must be on the models root's own filesystem") from None
        raise
    with contextlib.suppress(OSError):
        fd = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    remove_tree(trash)
    _prune_empty_parents(root, real.parent)
    log.info("removed the published model at %s (%s)", given, manifest.source_uri)
    return Removal("removed")


def _base(uri: str) -> str:
    """A source without its ``@revision``: another revision of the same source is the same model's files."""
    return uri.partition("@")[0].rstrip("/").lower()


def _prune_empty_parents(root: Path, folder: Path) -> None:
    """Remove now-empty folders between ``folder`` and the root (``org/`` of ``org/model``); never the root."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _entries_of(models_root: Path, key: str) -> list[Path]:
    folder = staging_root(models_root)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    return [folder / n for n in names if n.startswith(key + ".") and not n.endswith(LOCK_SUFFIX)]


def remove_staging_of(models_root: Path, dest: Path) -> list[str]:
    """Remove every staging entry of ``dest`` (any writer, any epoch, trash of a removal) that nobody owns.

    The caller makes sure nobody may still write them (on shared storage: it holds the model's lease and no
    other model wants ``dest``). Returns the names removed."""
    removed: list[str] = []
    for entry in _entries_of(models_root, staging_key(models_root, dest)):
        with _unowned(entry) as free:
            if free:
                remove_tree(entry)
                removed.append(entry.name)
    if removed:
        log.info("removed staging of %s: %s", dest, ", ".join(removed))
    return removed


def collect_staging(models_root: Path, *, wanted: Collection[str], protected: Collection[str],
                    orphan_age_s: float, stale_age_s: float, now: float | None = None) -> list[str]:
    """Garbage-collect the staging root; returns the names removed.

    An entry whose key is in ``protected`` (a download in progress here, a held lease) is kept. Of the others,
    an entry is removed when nothing in it changed for ``orphan_age_s`` and its key is not in ``wanted`` (no
    model points at its destination any more; removal trash is always unwanted), or for ``stale_age_s`` when a
    model still wants it (left by a crash, and no one resumed it). Entries someone owns, ``*.lock`` files and
    names that are not staging names (no ``<key>.`` prefix of the ``<tail>-<12 hex>`` form) are kept.
    """
    folder = staging_root(models_root)
    now = time.time() if now is None else now
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    removed: list[str] = []
    for name in names:
        if name.endswith(LOCK_SUFFIX) or any(name.startswith(k + ".") for k in protected):
            continue
        if not _STAGING_NAME.search(name) and not any(name.startswith(k + ".") for k in wanted):
            continue  # not a staging name we understand: keep it
        entry = folder / name
        is_wanted = TRASH_MARK not in name and any(name.startswith(k + ".") for k in wanted)
        bound = stale_age_s if is_wanted else orphan_age_s
        try:
            age = now - _newest_mtime(entry)
        except FileNotFoundError:
            continue
        if age < bound:
            continue
        with _unowned(entry) as free:
            if not free:
                continue
            remove_tree(entry)
        removed.append(name)
        log.info("removed %s staging %s (unchanged for %.0fs)", "stale" if is_wanted else "orphaned", name, age)
    return removed
