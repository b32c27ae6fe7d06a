"""The completion manifest: written last, it is the proof that a model folder is whole.

Invariant: a folder that holds ``.modelherd-manifest.json`` was published by the engine after every
file listed in it was verified; the manifest is written atomically (temp file + rename + fsync).
It records the model's identity (source, revision, the file ``selection``) and the quick-verification
problems the origin's own bytes have (``origin_problems``: what the copy looked like when published, so
that only problems that appeared since count as damage). Manifests written before those two fields read
as "all files" and "no problems".
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import VerificationError
from .paths import safe_relpath
from .types import ALL_FILES, Selection

MANIFEST_NAME = ".modelherd-manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    checksums: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    source_uri: str
    revision: str
    files: tuple[ManifestFile, ...]
    writer: str
    completed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    version: int = FORMAT_VERSION
    selection: Selection = ALL_FILES
    # (path, message) of each quick-verification problem of the model exactly as the origin serves it
    origin_problems: tuple[tuple[str, str], ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        d: dict[str, Any] = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        d["selection"] = self.selection.to_json()
        d["origin_problems"] = [list(p) for p in self.origin_problems]
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            d = json.loads(text)
            files = tuple(
                ManifestFile(path=safe_relpath(f["path"], what="manifest entry"), size=int(f["size"]),
                             checksums={str(k): str(v) for k, v in dict(f.get("checksums", {})).items()})
                for f in d["files"]
            )
            return cls(source_uri=str(d["source_uri"]), revision=str(d["revision"]), files=files,
                       writer=str(d["writer"]), completed_at=str(d["completed_at"]),
                       version=int(d.get("version", FORMAT_VERSION)),
                       selection=Selection.from_json(d.get("selection")),
                       origin_problems=tuple((str(p), str(m)) for p, m in d.get("origin_problems", [])))
        except (KeyError, TypeError, ValueError) as e:
            raise VerificationError(f"malformed completion manifest: {e}",
                                    hint="delete the model folder and pull again") from e


def read_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of ``model_dir``, ``None`` when there is none; malformed → ``VerificationError``."""
    p = Path(model_dir) / MANIFEST_NAME
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    return Manifest.from_json(text)


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write atomically: a reader sees the old manifest, or the whole new one, never half of it."""
    model_dir = Path(model_dir)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=model_dir)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; every node's agent must be able to read it
        with os.fdopen(fd, "w") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        final = model_dir / MANIFEST_NAME
        os.replace(tmp, final)
        return final
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
