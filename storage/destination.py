"""What a pull may replace, and typed errors for roots and paths the filesystem cannot hold.

Invariants:
- :func:`check_destination` accepts a destination only when publishing there can destroy nothing but an older
  copy of a model: it is inside the models root, no segment below the root is reserved (``.modelherd-*``) or
  longer than ``NAME_MAX``, no folder above it is a file or a published model, and it is absent, an empty
  folder, or a folder with no other published model below it: one with a completion manifest at its top (an
  earlier copy), or one without (a copy made by another tool, with no reserved ``.modelherd-*`` entry at its top:
  only a candidate for adoption, which :mod:`~.adopt` accepts only if it holds the model's files, and whose other
  entries every publish keeps).
- :func:`fs_error` turns the ``OSError`` of a filesystem that cannot hold what modelherd writes (read-only,
  no permission, a name too long, a file where a folder must be) into a typed error with a hint; anything
  else is returned unchanged.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from . import capacity
from .errors import DestinationError, ModelherdError, ModelsRootError, UnsafePathError
from .manifest import MANIFEST_NAME
from .paths import ensure_inside_root, staging_root
from .staging import RESERVED_PREFIX

NAME_MAX = 255  # bytes per path segment on every filesystem modelherd supports
PATH_MAX = 4096  # bytes per path (Linux)
_SHOWN = 3

_ROOT_HINT = "pass --models-root a folder this agent can write (or a path that does not exist yet)"


def prepare_models_root(models_root: Path) -> Path:
    """Create the models root if needed and return it; :class:`ModelsRootError` if it cannot be a folder."""
    root = Path(models_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ModelsRootError(f"models root {root} is not a directory", hint=_ROOT_HINT) from None
    except OSError as e:
        raise fs_error(e, root, what="models root") from None
    if not root.is_dir():
        raise ModelsRootError(f"models root {root} is not a directory", hint=_ROOT_HINT)
    return root


def root_writable(models_root: Path) -> bool:
    """Can this node write into the models root (a read-only mount, EROFS, answers no even to root)?"""
    return os.access(models_root, os.W_OK | os.X_OK)


def ensure_writable(models_root: Path) -> None:
    """The models root can take a download: its staging folder exists (created here) and is writable."""
    root = prepare_models_root(models_root)
    staging = staging_root(root)
    try:
        staging.mkdir(exist_ok=True)
    except OSError as e:
        raise fs_error(e, staging, what="models root") from None
    for folder in (root, staging):
        if not os.access(folder, os.W_OK | os.X_OK):  # EROFS is reported even to root
            raise ModelsRootError(f"models root {root} is not writable ({folder.name}: read-only or no permission)",
                                  hint=_ROOT_HINT)


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _published_below(root: Path, folder: Path) -> list[str]:
    """Published models strictly below ``folder`` (folders holding a completion manifest), relative to root."""
    found: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here != folder and MANIFEST_NAME in filenames:
            found.append(_rel(root, here))
    return sorted(found)


def check_destination(models_root: Path, dest: Path) -> Path:
    """Return ``dest`` resolved if a published model may be put there; else raise :class:`DestinationError`.

    See the module invariant for what is accepted. A folder holding a published model *and* files of the
    user's is still that model's folder; a folder without a manifest is accepted as a candidate for adoption
    (the engine refuses it with :func:`~.adopt.check_adoptable` unless it holds the model's files, before anything
    is written); publishing keeps every entry that is not the model's. A folder holding other models is refused,
    as are the reserved ``.modelherd-*`` names where modelherd keeps its staging, leases and state, and a folder
    without a manifest that holds such a name at its top (another models root).
    """
    root_given = Path(models_root)
    if not root_given.is_dir():
        what = "is not a directory" if os.path.lexists(root_given) else "does not exist"
        raise ModelsRootError(f"models root {root_given} {what}", hint=_ROOT_HINT)
    root = Path(os.path.realpath(root_given))
    real = ensure_inside_root(root_given, Path(dest))
    parts = real.relative_to(root).parts
    shown = _rel(root, real)
    for part in parts:
        if part.startswith(RESERVED_PREFIX):
            raise DestinationError(f"destination {shown} is in {part!r}: names starting with {RESERVED_PREFIX!r} "
                                   "are reserved for modelherd's staging, leases and state",
                                   hint="pass --dest ORG/MODEL, a folder of the model's own")
        if len(os.fsencode(part)) > NAME_MAX:
            raise DestinationError(f"destination {shown}: the name {part[:40]!r}... is longer than {NAME_MAX} bytes",
                                   hint="pass a shorter --dest")
    if len(os.fsencode(str(real))) >= PATH_MAX:
        raise DestinationError(f"destination {shown} is longer than {PATH_MAX} bytes", hint="pass a shorter --dest")
    for i in range(1, len(parts)):
        above = root.joinpath(*parts[:i])
        try:
            st = os.lstat(above)
        except FileNotFoundError:
            break
        if not stat.S_ISDIR(st.st_mode):
            raise DestinationError(f"destination {shown} is under {_rel(root, above)}, which is a file",
                                   hint="pass a --dest whose folders are folders, or move that file away")
        if os.path.lexists(above / MANIFEST_NAME):
            raise DestinationError(f"destination {shown} is inside the published model {_rel(root, above)}",
                                   hint="pass a --dest beside that model, not inside it")
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        return real
    if not stat.S_ISDIR(st.st_mode):
        raise DestinationError(f"destination {shown} is a file, not a model folder",
                               hint="pass a --dest that is a model folder, empty or absent")
    entries = sorted(os.listdir(real))
    if not entries:
        return real
    others = _published_below(root, real)
    if others:
        more = f" and {len(others) - _SHOWN} more" if len(others) > _SHOWN else ""
        raise DestinationError(f"destination {shown} holds other published models ({', '.join(others[:_SHOWN])}"
                               f"{more}); replacing it would delete them",
                               hint="pass the model's own folder as --dest, e.g. --dest ORG/MODEL")
    if MANIFEST_NAME not in entries:
        reserved = [e for e in entries if e.startswith(RESERVED_PREFIX)]
        if reserved:
            raise DestinationError(f"destination {shown} holds modelherd's reserved {', '.join(reserved[:_SHOWN])} "
                                   "but no completion manifest: it is a models root, not a model folder",
                                   hint="pass the model's own folder as --dest, e.g. --dest ORG/MODEL")
    return real


def fs_error(e: OSError, path: Path, *, what: str = "path") -> ModelherdError | OSError:
    """The typed error for an ``OSError`` met while writing ``path``; ``e`` itself when it is none of these."""
    if capacity.is_no_space(e):
        return capacity.no_space_error(e, path)
    reason = os.strerror(e.errno) if e.errno else type(e).__name__
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ModelsRootError(f"{what} {path} is not writable ({reason})", hint=_ROOT_HINT)
    if e.errno == errno.ENAMETOOLONG:
        return UnsafePathError(f"{what} {path}: a name is too long for this filesystem ({reason})",
                               hint="exclude the file with --ignore, or use a shorter --dest")
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return DestinationError(f"{what} {path}: a file and a folder of the same name ({reason})",
                                hint="the source or the models root holds a file where a folder must be")
    return e
