"""Adoption: a folder that holds a model's files but no completion manifest (downloaded by OME's agent, staged with
``huggingface-cli download --local-dir``, rsync or a copy job) becomes that published model, in place.

Not :func:`~.staging.adopt_staging` (a new Lease holder taking over another writer's staging folder).

Invariants:
- A folder is adopted only if it holds the model (:func:`check_adoptable`, before anything is written): at least
  one listed file at its listed path with its listed size, no listed name held by something of another kind (a
  folder where the model has a file, a file where it has a folder), at most ``MAX_FILES`` entries that are not the
  model's; and, once hashed, at least one listed file with the origin's checksum (the engine checks). Anything else
  is :class:`~.errors.DestinationError` (exit 4) with nothing written, moved or deleted.
- The model's files are never written: the engine hard-links them into staging (same inodes, no bytes copied),
  re-hashes them in parallel against the origin's checksums and fetches only the missing and failing ones, each
  into a new inode; the manifest is written last, so nothing unverified is ever Ready.
- What is not the model's (:func:`foreign_entries`: every entry that is neither a file of the model nor a folder
  leading to one — an operator's notes, ``.cache/huggingface/``) is never hashed, moved out of the folder or
  deleted, by adoption or by any later publish over it (repair, update): :func:`carry_foreign` hard-links it into
  the new tree before the swap, so the old tree's removal leaves it in place (a name the filesystem cannot link is
  renamed across right after the swap), and the manifest records it as ``foreign`` so verification ignores it.
- :func:`looks_adoptable` reads metadata only (sizes, safetensors headers), never file contents beyond headers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import DestinationError, ModelherdError
from .manifest import MANIFEST_NAME
from .paths import contained, quote_name
from .types import Listing
from .verify import MAX_FILES, check_safetensors

log = logging.getLogger(__name__)

_SHOWN = 3


@dataclass(frozen=True)
class Adoptable:
    """:func:`looks_adoptable`'s answer: true when the folder looks like a whole copy of the listing, else why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Survey:
    """What :func:`check_adoptable` found: the listed files present with their listed size (to be hashed), the other
    listed files (to be fetched), and the entries that are not the model's (kept)."""

    present: tuple[str, ...]
    absent: tuple[str, ...]
    foreign: tuple[str, ...]


@dataclass(frozen=True)
class Adoption:
    """The outcome of hashing an adopted folder: files kept in place, files present with their size whose bytes are
    not the origin's (fetched again), files absent or of another size (fetched), entries kept that are not the
    model's. ``intact``: nothing to fetch."""

    kept: tuple[str, ...]
    failed: tuple[str, ...]
    missing: tuple[str, ...]
    foreign: tuple[str, ...]

    @property
    def intact(self) -> bool:
        return not self.failed and not self.missing


def folders_of(paths: Iterable[str]) -> set[str]:
    """Every folder leading to one of ``paths`` (relative names, ``a/b/c`` gives ``a`` and ``a/b``)."""
    out: set[str] = set()
    for p in paths:
        parts = p.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return out


def unpublished(dest: Path) -> bool:
    """``dest`` is a folder that holds something but no completion manifest: a candidate for adoption."""
    try:
        if not stat.S_ISDIR(os.lstat(dest).st_mode) or os.path.lexists(Path(dest) / MANIFEST_NAME):
            return False
        with os.scandir(dest) as it:
            return any(True for _ in it)
    except OSError:
        return False


def holds_any(dest: Path, files: Iterable[tuple[str, int]]) -> bool:
    """At least one of ``files`` (relative name, size) is a regular file in ``dest`` with that size."""
    for rel, size in files:
        try:
            st = os.lstat(contained(dest, rel, what="file name"))
        except (OSError, ModelherdError):
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == size:
            return True
    return False


def foreign_entries(folder: Path, model_paths: Collection[str]) -> list[str]:
    """The entries of ``folder`` that are not the model's, as maximal subtrees (sorted relative names).

    An entry is the model's when it is one of ``model_paths`` or a real folder leading to one (walked into), or the
    completion manifest; whatever else is at a folder's name (a file, a symlink) is in the model's way and not
    foreign either. Folders that are not the model's are returned whole, never walked."""
    wanted = set(model_paths)
    leading = folders_of(wanted)
    found: list[str] = []
    todo: list[tuple[str, str]] = [(os.fspath(folder), "")]
    while todo:
        path, prefix = todo.pop()
        with os.scandir(path) as it:
            for e in it:
                rel = prefix + e.name
                if rel in wanted or (not prefix and e.name == MANIFEST_NAME):
                    continue
                if rel in leading:
                    if e.is_dir(follow_symlinks=False):
                        todo.append((e.path, rel + "/"))
                    continue
                found.append(rel)
    return sorted(found)


def _sample(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(quote_name(n) for n in names[:_SHOWN]) + more


def check_adoptable(dest: Path, listing: Listing) -> Survey:
    """Survey ``dest`` (a folder without a completion manifest) for adoption of ``listing``; raise
    :class:`DestinationError` when it does not hold the model (see the module invariant). Reads metadata only."""
    dest = Path(dest)
    shown = quote_name(str(dest))
    present: list[str] = []
    absent: list[str] = []
    clash: list[str] = []
    leading = folders_of(rf.path for rf in listing.files)
    for rf in listing.files:
        try:
            st = os.lstat(contained(dest, rf.path, what="file name"))
        except (FileNotFoundError, NotADirectoryError):
            absent.append(rf.path)
            continue
        except (OSError, ModelherdError):  # a name leaving the folder through a symlink, unreadable: not this model's
            clash.append(rf.path)
            continue
        if stat.S_ISDIR(st.st_mode):
            clash.append(rf.path)
        elif stat.S_ISREG(st.st_mode) and st.st_size == rf.size:
            present.append(rf.path)
        else:
            absent.append(rf.path)  # another size, a symlink, a special file: fetched, the name replaced
    for folder in sorted(leading):
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.lstat(dest / folder).st_mode):
                clash.append(folder)
    foreign = foreign_entries(dest, [rf.path for rf in listing.files])
    where = f"{listing.uri} (revision {listing.revision})"
    hint = "pass an empty or new folder as --dest, or move those files away"
    if clash:
        raise DestinationError(f"destination {shown} holds files modelherd did not publish, laid out unlike {where}: "
                               f"{_sample(clash)} {'is' if len(clash) == 1 else 'are'} not what the model has there; "
                               "adopting it would delete them", hint=hint)
    if not present:
        entries = sorted(os.listdir(dest))
        raise DestinationError(f"destination {shown} holds files modelherd did not publish ({_sample(entries)}) "
                               f"and none of {where}'s files with its size: it is not a copy of this model",
                               hint=hint)
    if len(foreign) > MAX_FILES:
        raise DestinationError(f"destination {shown} holds {len(foreign)} entries besides {where}'s files, more "
                               f"than the {MAX_FILES} a model folder may keep", hint=hint)
    return Survey(tuple(present), tuple(absent), tuple(foreign))


def looks_adoptable(dest: Path, listing: Listing) -> Adoptable:
    """Does ``dest`` look like a whole copy of ``listing`` that modelherd did not publish? Metadata only, no hashing:
    a folder without a completion manifest, every listed file there (a regular file, inside the folder) with its
    listed size, and every listed ``*.safetensors`` file's header consistent with its size (:func:`check_safetensors`).

    Migration from another agent keeps such a model Ready while the full adoption (the engine's hashing) runs; only
    the hashing proves it (:class:`Adoption`). Never raises for what it finds on disk."""
    dest = Path(dest)
    try:
        st = os.lstat(dest)
    except OSError as e:
        return Adoptable(False, f"{dest}: {e.strerror or e}")
    if not stat.S_ISDIR(st.st_mode):
        return Adoptable(False, f"{dest} is not a folder")
    if os.path.lexists(dest / MANIFEST_NAME):
        return Adoptable(False, f"{dest} has a completion manifest: a model modelherd published (see "
                                "ready.published_model)")
    if not listing.files:
        return Adoptable(False, f"{listing.uri} lists no file")
    for rf in listing.files:
        try:
            path = contained(dest, rf.path, what="file name")
            fst = os.lstat(path)
        except (OSError, ModelherdError) as e:
            return Adoptable(False, f"{quote_name(rf.path)} is missing ({getattr(e, 'strerror', None) or e})")
        if not stat.S_ISREG(fst.st_mode):
            return Adoptable(False, f"{quote_name(rf.path)} is not a regular file")
        if fst.st_size != rf.size:
            return Adoptable(False, f"{quote_name(rf.path)} has {fst.st_size} bytes, the origin lists {rf.size}")
        if rf.path.endswith(".safetensors"):
            reasons = check_safetensors(path)
            if reasons:
                return Adoptable(False, f"{quote_name(rf.path)}: {reasons[0]}")
    return Adoptable(True)


# --------------------------------------------------------------------------------------------- carrying
def _copy_folder_meta(src: str, dst: str) -> None:
    with contextlib.suppress(OSError):
        shutil.copystat(src, dst, follow_symlinks=False)
    with contextlib.suppress(OSError):
        st = os.lstat(src)
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)


def _link_entry(src: Path, dst: Path, rel: str, unlinked: list[str]) -> None:
    """Hard-link ``src`` (a file, symlink or special file: the same inode) or re-create the folder ``src`` with every
    entry below it linked the same way; names that cannot be linked go to ``unlinked``."""
    st = os.lstat(src)
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError as e:
            log.debug("cannot hard-link %s (%s); it is moved after the swap", rel, e.strerror)
            unlinked.append(rel)
        return
    os.mkdir(dst)
    with os.scandir(src) as it:
        names = [e.name for e in it]
    for name in names:
        _link_entry(src / name, dst / name, f"{rel}/{name}", unlinked)
    _copy_folder_meta(os.fspath(src), os.fspath(dst))


def carry_foreign(old: Path, new: Path, entries: Iterable[str]) -> list[str]:
    """Put every foreign entry of the tree ``old`` at the same name in the tree ``new`` before ``new`` replaces
    ``old``: hard links (the same inodes, so the removal of ``old`` leaves them in place; a kill before the swap
    leaves ``old`` whole). Folders leading to an entry that ``new`` lacks are created with ``old``'s mode and owner.
    Returns the names the filesystem would not link, for :func:`move_foreign` right after the swap."""
    unlinked: list[str] = []
    for rel in entries:
        src, dst = old / rel, new / rel
        parent = rel.rpartition("/")[0]
        try:
            if parent:
                _make_folders(old, new, parent)
            if os.path.lexists(dst):
                log.warning("cannot keep %s: the new copy of the model has that name", rel)
                continue
            _link_entry(src, dst, rel, unlinked)
        except FileNotFoundError:
            continue  # gone meanwhile
        except OSError as e:
            log.warning("cannot keep %s in the new copy (%s); moving it after the swap", rel, e.strerror)
            unlinked.append(rel)
    return unlinked


def _make_folders(old: Path, new: Path, rel: str) -> None:
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        target = new / sub
        if not os.path.lexists(target):
            os.mkdir(target)
            _copy_folder_meta(os.fspath(old / sub), os.fspath(target))


def move_foreign(old: Path, new: Path, names: Iterable[str]) -> None:
    """Rename each of ``names`` from the tree ``old`` into the tree ``new`` (same filesystem): the fallback of
    :func:`carry_foreign` for what would not link, run right after the swap and before ``old`` is removed."""
    for rel in names:
        src, dst = old / rel, new / rel
        try:
            if not os.path.lexists(src):
                continue
            parent = rel.rpartition("/")[0]
            if parent:
                _make_folders(old, new, parent)
            if os.path.lexists(dst):
                log.warning("cannot keep %s: the new copy of the model has that name", rel)
                continue
            os.rename(src, dst)
        except OSError as e:
            log.warning("cannot keep %s in the new copy: %s", rel, e.strerror or e)
