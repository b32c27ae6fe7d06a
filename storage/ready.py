"""Is a published copy of a model already in place? The restart fast path, with no origin request.

Invariant: ``published_model`` answers yes only for a folder whose completion manifest names the same
source (and, for a pinned commit, the same revision) and the same file selection, lists at least one file,
and shows no :func:`damage`: quick verification finds nothing wrong that was not already so in the origin's
own bytes when the model was published. The engine's fast path (:func:`modelherd.storage.engine.pull`) uses
the same :func:`damage`, so the two always agree on what is Ready.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import VerificationError
from .manifest import Manifest, read_manifest
from .types import ALL_FILES, Selection
from .verify import Problem, verify_quick

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


def damage(dest: Path, manifest: Manifest) -> list[Problem]:
    """What is wrong with the published copy at ``dest`` now and was not when ``manifest`` was written.

    That is :func:`verify_quick` (manifest entries present with their sizes, nothing else in the folder, headers
    and indexes consistent) less the very problems (same file, same finding) the origin's own bytes had when the
    model was published (``manifest.origin_problems``). A manifest listing no file is damage too: a model of
    zero files is never Ready. The empty list means the copy is as published, as far as metadata can tell.
    """
    if not manifest.files:
        return [Problem(".", "the completion manifest lists no file")]
    accepted = set(manifest.origin_problems)
    return [p for p in verify_quick(dest, require_manifest=True) if (p.path, p.message) not in accepted]


def published_model(dest: Path, source_uri: str, revision: str | None,
                    selection: Selection = ALL_FILES) -> Manifest | None:
    """The manifest of ``dest`` if it is a published copy of this model (source, revision, ``selection``) with
    no :func:`damage`; ``None`` otherwise."""
    try:
        manifest = read_manifest(dest)
    except (VerificationError, OSError):
        return None
    if manifest is None or not same_model(manifest, source_uri, revision) or manifest.selection != selection:
        return None
    problems = damage(dest, manifest)
    if problems:
        log.warning("%s has a manifest but does not verify: %s", dest, problems[0])
        return None
    return manifest
