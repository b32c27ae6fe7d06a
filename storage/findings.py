"""What deep verification found in a published copy, kept beside it for every node (and the engine) to see.

A flipped byte leaves sizes and headers intact, so :func:`~.verify.verify_quick` cannot see it; once a deep pass
(any node's) has re-hashed the copy, its findings are written to ``<dest parent>/.<dest name>.modelherd-
findings.json`` — beside the model folder, never inside it, inside the models root — and
:func:`~.ready.damage` counts them as damage. So on shared storage every node's next quick pass reports the model
Failed, and the repair (:func:`~.engine.stage`) leaves exactly those files out of the seed and fetches them again.

Invariants:
- a record is bound to one publish of ``dest``: its ``stamp`` is the manifest file's inode, mtime and the
  manifest's ``completed_at``; a re-publish (repair, update) makes every older record stale, read as nothing;
- a record only ever names files of that manifest; anything malformed, hostile or unreadable reads as "no
  record" (never an exception);
- writes are atomic (temp file + rename in the same folder); a record of the same publish is merged (problems
  united), so two nodes that verified at once both count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .manifest import MANIFEST_NAME, Manifest
from .untrusted import UntrustedInputError, read_json_file

log = logging.getLogger(__name__)

SUFFIX = ".modelherd-findings.json"
MAX_BYTES = 16 * 1024 * 1024
FORMAT_VERSION = 1


def findings_path(dest: Path) -> Path:
    """Where the record of ``dest`` lives: a hidden file beside the model folder."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{SUFFIX}"


def publish_stamp(dest: Path, manifest: Manifest) -> str | None:
    """Identity of this publish of ``dest`` (``None`` when its manifest cannot be stat'ed)."""
    try:
        st = os.stat(Path(dest) / MANIFEST_NAME)
    except OSError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{manifest.completed_at}"


@dataclass(frozen=True)
class Findings:
    """The record of one publish: the problems deep verification found (``(path, message)``) and when it last ran."""

    stamp: str
    problems: tuple[tuple[str, str], ...] = ()
    deep_verified_at: float = 0.0
    by: str = ""


def read_findings(dest: Path, manifest: Manifest) -> Findings | None:
    """The record for the publish of ``dest`` that ``manifest`` describes; ``None`` when there is none, it is of
    another publish (stale), or it is not a well-formed record. Problems naming files outside the manifest are
    dropped."""
    path = findings_path(dest)
    try:
        doc = read_json_file(path, max_bytes=MAX_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, UntrustedInputError) as e:
        log.debug("ignoring the findings record %s: %s", path, e)
        return None
    stamp = publish_stamp(dest, manifest)
    if not isinstance(doc, dict) or stamp is None or doc.get("stamp") != stamp:
        return None
    listed = {f.path for f in manifest.files}
    raw = doc.get("problems")
    problems = tuple((p, m) for item in (raw if isinstance(raw, list) else [])
                     if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
                     for p, m in [item] if p in listed)
    at = doc.get("deep_verified_at")
    by = doc.get("by")
    return Findings(stamp=stamp, problems=problems,
                    deep_verified_at=float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0,
                    by=by if isinstance(by, str) else "")


def record_deep_pass(dest: Path, manifest: Manifest, problems: list[tuple[str, str]], *, by: str,
                     at: float | None = None) -> Findings | None:
    """Record that a deep pass over the publish of ``dest`` found ``problems`` (empty: the copy checked out).

    Merged with a record of the same publish (problems united, the latest time kept). Returns what was written;
    ``None`` when ``dest`` has no manifest any more (nothing is written then). Raises ``OSError`` when the folder
    beside ``dest`` is not writable.
    """
    stamp = publish_stamp(dest, manifest)
    if stamp is None:
        return None
    old = read_findings(dest, manifest)
    merged = dict.fromkeys([*(old.problems if old else ()), *problems])
    findings = Findings(stamp=stamp, problems=tuple(merged), deep_verified_at=at if at is not None else time.time(),
                        by=by)
    path = findings_path(dest)
    body = json.dumps({"version": FORMAT_VERSION, "stamp": findings.stamp, "by": findings.by,
                       "deep_verified_at": findings.deep_verified_at,
                       "problems": [list(p) for p in findings.problems]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(dest).name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return findings


def remove_stale(dest: Path, manifest: Manifest | None) -> bool:
    """Remove the record of ``dest`` when it is not of the current publish (``manifest``; ``None``: the model is
    gone). Returns True when a file was removed."""
    path = findings_path(dest)
    if not os.path.lexists(path):
        return False
    if manifest is not None and read_findings(dest, manifest) is not None:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return True
    return False
