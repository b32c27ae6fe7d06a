"""Is a published copy of a model already in place? The restart fast path, with no origin request, and the one
"same model" rule.

Invariants:
- "Same model" is one rule, :func:`same_model`: the same source (base URI case-folded, trailing ``/`` ignored) at
  the revision asked for (a pinned commit matches the manifest's resolved revision; a branch or tag label matches
  only the same label). Every caller uses it: :func:`published_model` (the agent's and the CLI's fast path, which
  knows only the URI and revision asked for) and :func:`manifest_matches` (the engine's, which also has the
  origin's listing and so asks more of the copy: the very revision the origin resolved and exactly the listing's
  files).
- ``published_model`` answers yes only for a folder whose completion manifest is of the same model and the same
  file selection, lists at least one file, and shows no :func:`damage`: quick verification finds nothing wrong
  that was not already so in the origin's own bytes when the model was published. The engine's fast path
  (:func:`~modelherd.storage.engine.pull`) asks the same :func:`damage`, so the two agree on the health of a copy;
  they differ only in that the engine, holding a fresh listing, refuses a copy of an older commit of a branch that
  the fast path, which cannot ask the origin, takes as published.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import VerificationError
from .findings import read_findings
from .hashing import checkable
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .types import ALL_FILES, Listing, Selection
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


def manifest_matches(manifest: Manifest, listing: Listing, model_dir: Path | None = None) -> bool:
    """``manifest`` is of exactly ``listing``: :func:`same_model` for the listing's source and revision, the very
    revision the origin resolved, the same selection, at least one file, and the same files (paths, sizes,
    checksums); with ``model_dir``, every file is also still there with its size."""
    if not same_model(manifest, listing.uri, listing.revision) or manifest.revision != listing.revision:
        return False
    if manifest.selection != listing.selection or not manifest.files:
        return False
    # a listing's archives are known by their digests (the revision pins them); their files only by extracting
    if manifest.archives != tuple(a.locator for a in listing.archives):
        return False
    have = {f.path: f for f in manifest.files if not f.archive}
    plain = listing.plain_files
    if set(have) != {f.path for f in plain}:
        return False
    for rf in plain:
        mf = have[rf.path]
        if mf.size != rf.size:
            return False
        for algo in checkable(rf.checksums):
            if algo in mf.checksums and mf.checksums[algo].lower() != rf.checksums[algo].lower():
                return False
    if model_dir is not None:
        for mf in manifest.files:
            try:
                if os.stat(Path(model_dir) / mf.path).st_size != mf.size:
                    return False
            except OSError:
                return False
    return True


def published_manifest(model_dir: Path) -> Manifest | None:
    """The completion manifest of ``model_dir``; ``None`` when it has none or it cannot be read."""
    try:
        return read_manifest(model_dir)
    except (VerificationError, OSError):
        return None


def damage(dest: Path, manifest: Manifest) -> list[Problem]:
    """What is wrong with the published copy at ``dest`` now and was not when ``manifest`` was written.

    That is :func:`verify_quick` (manifest entries present with their sizes, nothing else in the folder, headers
    and indexes consistent) less the very problems (same file, same finding) the origin's own bytes had when the
    model was published (``manifest.origin_problems``), plus what a deep pass (any node's) recorded for this very
    publish (:func:`~.findings.read_findings`: checksum mismatches metadata cannot show). A manifest listing no
    file is damage too: a model of zero files is never Ready. The empty list means the copy is as published, as
    far as metadata and the last deep pass can tell.
    """
    if not manifest.files:
        return [Problem(".", "the completion manifest lists no file")]
    accepted = set(manifest.origin_problems)
    found = [p for p in verify_quick(dest, require_manifest=True, manifest=manifest)
             if (p.path, p.message) not in accepted]
    recorded = read_findings(dest, manifest)
    if recorded is not None:
        seen = {p.path for p in found}
        found += [Problem(path, f"deep verification: {message}") for path, message in recorded.problems
                  if path not in seen]
    return found


def inspect_published(dest: Path, source_uri: str, revision: str | None,
                      selection: Selection = ALL_FILES) -> Manifest | list[Problem]:
    """:func:`published_model`, saying why not: the manifest when ``dest`` is Ready, else the problems (never
    empty: a missing folder, a missing or foreign manifest, or the :func:`damage`)."""
    try:
        manifest = read_manifest(dest)
    except (VerificationError, OSError) as e:
        return [Problem(MANIFEST_NAME, getattr(e, "message", None) or str(e))]
    if manifest is None:
        gone = not Path(dest).exists()
        return [Problem(".", f"{dest} is gone" if gone else "no completion manifest")]
    if not same_model(manifest, source_uri, revision) or manifest.selection != selection:
        return [Problem(MANIFEST_NAME, f"the manifest is of {manifest.source_uri}@{manifest.revision}, "
                                       "or of another file selection")]
    problems = damage(dest, manifest)
    return problems or manifest


def published_model(dest: Path, source_uri: str, revision: str | None,
                    selection: Selection = ALL_FILES) -> Manifest | None:
    """The manifest of ``dest`` if it is a published copy of this model (source, revision, ``selection``) with
    no :func:`damage`; ``None`` otherwise."""
    got = inspect_published(dest, source_uri, revision, selection)
    if isinstance(got, Manifest):
        return got
    if got[0].path != "." and got[0].path != MANIFEST_NAME:
        log.warning("%s has a manifest but does not verify: %s", dest, got[0])
    return None
