"""Containment of untrusted names.

Invariant: every path modelherd writes or reads for a model is inside that model's folder, which is
inside the models root. Names that come from a source (tree paths, object names, index entries) go
through :func:`safe_relpath` before they touch the filesystem, and the resolved result goes through
:func:`contained` so that a symlink planted on disk cannot redirect a write.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .errors import UnsafePathError
from .untrusted import show

STAGING_DIRNAME = ".modelherd-staging"


def _control_chars(name: str) -> list[str]:
    """The control characters (Unicode category Cc: C0, DEL, C1) in ``name``, escaped."""
    return [repr(c)[1:-1] for c in name if unicodedata.category(c) == "Cc"]


def safe_relpath(name: str, *, what: str = "name") -> str:
    """Return ``name`` as a normalised relative POSIX path, or raise :class:`UnsafePathError`.

    Rejects non-strings, empty names, absolute paths, backslashes, control characters (NUL, newlines,
    ANSI escapes, C1: a name must not be able to forge a line of output), ``.``/``..`` segments.
    ``:`` is an ordinary character on POSIX (``a:b.txt``, ``C:x`` are relative names).
    """
    if not isinstance(name, str):
        raise UnsafePathError(f"unsafe {what} {show(name)}: not a string", hint="the source is malformed")
    if not name or "\\" in name:
        raise UnsafePathError(f"unsafe {what} {show(name)}: empty or backslash", hint="the source is malformed")
    if not name.isprintable() and (bad := _control_chars(name)):  # isprintable: the fast, common answer
        raise UnsafePathError(f"unsafe {what} {show(name)}: control character {bad[0]}",
                              hint="the source names a file with a control character; rename it there")
    if name.startswith("/"):
        raise UnsafePathError(f"unsafe {what} {show(name)}: absolute paths are not allowed",
                              hint="the source names a file outside the model folder")
    parts = [p for p in name.split("/") if p != ""]
    if not parts or any(p in (".", "..") for p in parts):
        raise UnsafePathError(f"unsafe {what} {show(name)}: '.' and '..' segments are not allowed",
                              hint="the source names a file outside the model folder")
    return "/".join(parts)  # what PurePosixPath(*parts) prints, without building one


def printable(text: str) -> str:
    """``text`` with every non-printable character (control characters, ANSI escapes, line breaks, bidi
    overrides, lone surrogates from undecodable file names) replaced by its Python escape; text that is
    all printable comes back unchanged. What is printed on one line stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quote_name(name: str) -> str:
    """A file name for output: as-is when plain, else Python-quoted (unambiguous, one printable line).

    Plain: printable, no backslash or quote, no ``": "``, no leading or trailing space — so a name can
    neither break a line nor pass for the separator between a name and its message.
    """
    if (name.isprintable() and not any(c in name for c in "\\'\"") and ": " not in name
            and name == name.strip()):
        return name
    return repr(name)  # repr escapes every non-printable character


def contained(base: Path, rel: str, *, what: str = "name") -> Path:
    """Join ``base`` and a safe relative path, refusing any result that resolves outside ``base``.

    Existing symlinks along the way are resolved, so a link that points out of ``base`` is refused.
    """
    rel = safe_relpath(rel, what=what)
    base_real = Path(os.path.realpath(base))
    target = base / rel
    real = Path(os.path.realpath(target))
    if real != base_real and base_real not in real.parents:
        raise UnsafePathError(f"unsafe {what} {rel!r}: resolves to {real}, outside {base_real}",
                              hint="remove the symlink or fix the source")
    return target


def ensure_inside_root(models_root: Path, dest: Path) -> Path:
    """Return ``dest`` resolved, refusing a destination outside (or equal to) the models root."""
    root = Path(os.path.realpath(models_root))
    real = Path(os.path.realpath(dest))
    if real == root or root not in real.parents:
        raise UnsafePathError(f"destination {dest} is not inside the models root {root}",
                              hint="pass --dest under --models-root, or change --models-root")
    return real


def staging_root(models_root: Path) -> Path:
    """Staging lives inside the models root so the final rename is atomic (same filesystem)."""
    return Path(models_root) / STAGING_DIRNAME
