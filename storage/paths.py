"""Containment of untrusted names.

Invariant: every path modelherd writes or reads for a model is inside that model's folder, which is
inside the models root. Names that come from a source (tree paths, object names, index entries) go
through :func:`safe_relpath` before they touch the filesystem, and the resolved result goes through
:func:`contained` so that a symlink planted on disk cannot redirect a write.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import UnsafePathError

STAGING_DIRNAME = ".modelherd-staging"


def safe_relpath(name: str, *, what: str = "name") -> str:
    """Return ``name`` as a normalised relative POSIX path, or raise :class:`UnsafePathError`.

    Rejects empty names, absolute paths, drive letters, backslashes, NUL, ``.``/``..`` segments.
    """
    if not name or "\x00" in name or "\\" in name:
        raise UnsafePathError(f"unsafe {what} {name!r}: empty, NUL or backslash", hint="the source is malformed")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"unsafe {what} {name!r}: absolute paths are not allowed",
                              hint="the source names a file outside the model folder")
    parts = [p for p in name.split("/") if p != ""]
    if not parts or any(p in (".", "..") for p in parts):
        raise UnsafePathError(f"unsafe {what} {name!r}: '.' and '..' segments are not allowed",
                              hint="the source names a file outside the model folder")
    return str(PurePosixPath(*parts))


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
