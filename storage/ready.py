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
    """The manifest is of ``source_uri`` at the revision asked for.

    A pinned commit matches the manifest's resolved revision (or the same label); a branch or tag name
    matches only the same name (``@v1`` never serves for ``@v2``, nor for the default branch); what a
    branch points to now cannot be checked without asking the origin, so it is taken as published.
    """

    def split(u: str) -> tuple[str, str]:
        base, _, label = u.partition("@")
        return base.rstrip("/").lower(), label

    have_base, have_label = split(manifest.source_uri)
    want_base, want_label = split(source_uri)
    if have_base != want_base:
        return False
    if revision and _COMMIT.match(revision) and manifest.revision == revision:
        return True
    return have_label == want_label


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
