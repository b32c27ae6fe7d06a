"""Is a published copy of a model already in place? The restart fast path, with no origin request.

Invariant: ``published_model`` answers yes only for a folder whose completion manifest names the same
source (and, for a pinned commit, the same revision) and which passes the quick verification.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import VerificationError
from .manifest import Manifest, read_manifest
from .verify import verify_quick

log = logging.getLogger(__name__)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def same_model(manifest: Manifest, source_uri: str, revision: str | None) -> bool:
    """The manifest is of ``source_uri``; a pinned commit must match, a branch or tag cannot be checked
    without asking the origin and is taken as is."""

    def base(u: str) -> str:
        return u.split("@", 1)[0].rstrip("/").lower()

    if base(manifest.source_uri) != base(source_uri):
        return False
    return not (revision and _COMMIT.match(revision) and manifest.revision != revision)


def published_model(dest: Path, source_uri: str, revision: str | None) -> Manifest | None:
    """The manifest of ``dest`` if it is a published copy of this model that passes ``verify_quick``."""
    try:
        manifest = read_manifest(dest)
    except (VerificationError, OSError):
        return None
    if manifest is None or not same_model(manifest, source_uri, revision):
        return None
    problems = verify_quick(dest, require_manifest=True)
    if problems:
        log.warning("%s has a manifest but does not verify: %s", dest, problems[0])
        return None
    return manifest
