"""The listing a pull is asked to fetch, checked before anything is planned, allocated or requested.

Invariants:
- :func:`check_listing` passes only a listing a real model can have: at least one file, at most
  ``options.max_files`` entries, sizes in ``[0, MAX_FILE_SIZE]``, safe and unique names outside the reserved
  prefix. Nothing is planned (no memory grows with a hostile listing) before it passes.
- :func:`check_names` passes only names that can be stored as they are in the staging folder: contained in it,
  not both a file and a folder, each segment at most ``NAME_MAX`` bytes and the whole path under ``PATH_MAX``.
- :func:`listing_id` changes whenever anything that makes a staging folder's contents (source, revision, a path,
  a size, a checksum) changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .destination import NAME_MAX, PATH_MAX
from .errors import ConfigError, MalformedListingError, SourceError, UnsafePathError
from .options import EngineOptions
from .paths import contained, safe_relpath
from .staging import RESERVED_PREFIX
from .types import Listing

__all__ = ["MAX_FILE_SIZE", "check_listing", "check_names", "listing_id"]

# No real file comes near a pebibyte; a larger listed size is a malformed (or hostile) listing.
MAX_FILE_SIZE = 2**50


def check_listing(listing: Listing, options: EngineOptions | None = None) -> None:
    """Refuse a listing no real model has, before anything is planned, allocated or requested.

    At least one file (none: :class:`ConfigError` when a selection left everything out, exit 2, since the
    patterns are the user's; else :class:`SourceError`, exit 3), at most ``options.max_files`` entries, sizes
    in ``[0, MAX_FILE_SIZE]`` (else :class:`MalformedListingError`), safe, unique names outside the reserved
    prefix (else :class:`UnsafePathError`).
    """
    options = options or EngineOptions()
    if not listing.files:
        where = f"{listing.uri} (revision {listing.revision})"
        if listing.selection.filtered:
            raise ConfigError(f"{listing.selection.describe()} selects no file of {where}",
                              hint="fix the --allow/--ignore patterns (quote them, e.g. --allow '*.json'); "
                                   "nothing was published")
        raise SourceError(f"{where} lists no file", hint="check the model URI and revision; nothing was published")
    if len(listing.files) > options.max_files:
        raise MalformedListingError(f"{listing.uri} lists {len(listing.files)} files, more than the "
                                    f"{options.max_files} a model may have",
                                    hint="select the files you need with --allow/--ignore, or check the source")
    seen: set[str] = set()
    for rf in listing.files:
        safe_relpath(rf.path, what="file name")
        if rf.path.split("/", 1)[0].startswith(RESERVED_PREFIX):
            raise UnsafePathError(f"file name {rf.path!r} uses the reserved prefix {RESERVED_PREFIX!r}",
                                  hint="the source lists a file modelherd keeps for itself")
        if rf.path in seen:
            raise UnsafePathError(f"file name {rf.path!r} is listed twice", hint="the source is malformed")
        if rf.size < 0:
            raise UnsafePathError(f"file {rf.path!r} has a negative size", hint="the source is malformed")
        if rf.size > MAX_FILE_SIZE:
            raise MalformedListingError(f"file {rf.path!r} claims {rf.size} bytes, more than any real file "
                                        f"({MAX_FILE_SIZE} bytes = 1 PiB)",
                                        hint="the source's listing is malformed; nothing was downloaded")
        seen.add(rf.path)


def check_names(staging: Path, listing: Listing) -> None:
    """Every listed name can be stored as-is in ``staging``: safe, unreserved, unique, not both a file and a
    folder, each segment at most ``NAME_MAX`` bytes and the whole path under ``PATH_MAX``."""
    seen: set[str] = set()
    for rf in listing.files:
        seen.add(rf.path)
        contained(staging, rf.path, what="file name")
        for part in safe_relpath(rf.path, what="file name").split("/"):
            if len(os.fsencode(part)) > NAME_MAX:
                raise UnsafePathError(f"file name {rf.path[:80]!r}... has a part longer than {NAME_MAX} bytes, more "
                                      "than a filesystem can hold", hint="exclude it with --ignore")
        if len(os.fsencode(str(staging / rf.path))) >= PATH_MAX:
            raise UnsafePathError(f"file name {rf.path[:80]!r}... is too long: the path would exceed {PATH_MAX} "
                                  "bytes", hint="exclude it with --ignore, or use a shorter models root")
    names = {safe_relpath(p, what="file name") for p in seen}
    for name in sorted(names):
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in names:
                raise UnsafePathError(f"{folder!r} is listed as both a file and a folder (the folder holds "
                                      f"{name!r})", hint="the source is malformed; exclude one with --ignore")


def listing_id(listing: Listing) -> str:
    """Identifies what a staging folder is being filled for: source, revision, every path, size and checksum."""
    body = [listing.uri, listing.revision,
            sorted([rf.path, rf.size, sorted((a, v.lower()) for a, v in rf.checksums.items())]
                   for rf in listing.files)]
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
