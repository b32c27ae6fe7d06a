"""The completion manifest: written last, it is the proof that a model folder is whole.

Invariant: a folder that holds ``.modelherd-manifest.json`` was published by the engine after every
file listed in it was verified; the manifest is written atomically (temp file + rename + fsync).
It records the model's identity (source, revision, the file ``selection``) and the quick-verification
problems the origin's own bytes have (``origin_problems``: what the copy looked like when published, so
that only problems that appeared since count as damage), and the entries of the folder that are not the model's
(``foreign``: an operator's notes, a download tool's metadata — kept in place by adoption, repairs and updates,
ignored by verification; they are never among ``files``). Manifests written before those fields read as "all
files", "no problems" and "nothing foreign".
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

from .errors import UnsafePathError, VerificationError
from .paths import safe_relpath
from .types import ALL_FILES, Selection
from .untrusted import UntrustedInputError, load_json, read_limited, show

MANIFEST_NAME = ".modelherd-manifest.json"
FORMAT_VERSION = 1
# ~100 bytes a file plus checksums: room for a million files; a bigger "manifest" is not one of ours.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    checksums: dict[str, str] = field(default_factory=dict)
    # the locator (``sha256:<hex>``) of the archive (tar layer) this file was extracted from; "" for a plain file
    archive: str = ""


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
    # relative names (files or whole folders) in the model folder that are not the model's: kept, never verified
    foreign: tuple[str, ...] = ()
    # the locators of the listing's archives (tar layers), in the order they were applied
    archives: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        d: dict[str, Any] = asdict(self)
        d["files"] = [{k: v for k, v in asdict(f).items() if k != "archive" or v} for f in self.files]
        if not self.archives:
            del d["archives"]
        else:
            d["archives"] = list(self.archives)
        d["selection"] = self.selection.to_json()
        d["origin_problems"] = [list(p) for p in self.origin_problems]
        d["foreign"] = list(self.foreign)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest; anything malformed or hostile raises :class:`VerificationError`, nothing else."""
        try:
            d = load_json(text, max_bytes=MAX_MANIFEST_BYTES)
            if not isinstance(d, dict) or not isinstance(d.get("files"), list):
                raise ValueError("not an object with a 'files' list")
            files = tuple(
                ManifestFile(path=safe_relpath(f["path"], what="manifest entry"), size=_count(f["size"], "size"),
                             checksums=_checksums(f.get("checksums", {})), archive=_string(f.get("archive", "")))
                for f in d["files"]
            )
            return cls(source_uri=_string(d["source_uri"]), revision=_string(d["revision"]), files=files,
                       writer=_string(d["writer"]), completed_at=_string(d["completed_at"]),
                       version=_count(d.get("version", FORMAT_VERSION), "version"),
                       selection=Selection.from_json(d.get("selection")),
                       origin_problems=tuple((_string(p), _string(m)) for p, m in d.get("origin_problems", [])),
                       foreign=_names(d.get("foreign", [])),
                       archives=tuple(_string(a) for a in _list(d.get("archives", []))))
        except KeyError as e:
            raise VerificationError(f"malformed completion manifest: no field {e}", hint=_HINT) from None
        except UntrustedInputError as e:
            raise VerificationError(f"malformed completion manifest: it {e}", hint=_HINT) from None
        except (TypeError, ValueError, AttributeError) as e:
            raise VerificationError(f"malformed completion manifest: {e}", hint=_HINT) from None
        except UnsafePathError as e:
            raise VerificationError(f"malformed completion manifest: {e.message}", hint=_HINT) from None


_HINT = "delete the model folder and pull again"


def _string(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {show(v)}")
    return v


def _count(v: object, what: str) -> int:
    """A JSON integer in ``[0, 2**63)`` (``true`` is not one, nor ``1.0``)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise ValueError(f"{what} must be an integer in [0, 2**63), got {show(v)}")
    return v


def _list(v: object) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list, got {show(v)}")
    return v


def _names(v: object) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValueError(f"foreign must be a list of names, got {show(v)}")
    return tuple(safe_relpath(_string(x), what="manifest foreign entry") for x in v)


def _checksums(v: object) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(x, str) for kv in v.items() for x in kv):
        raise ValueError(f"checksums must map algorithm names to digests, got {show(v)}")
    return dict(v)


def read_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of ``model_dir``, ``None`` when there is none; anything else that is not a readable,
    well-formed manifest (malformed, hostile, oversized, unreadable, a FIFO or folder) raises
    :class:`VerificationError` — never another exception, never a blocking open."""
    p = Path(model_dir) / MANIFEST_NAME
    try:
        raw = read_limited(p, max_bytes=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    except UntrustedInputError as e:
        raise VerificationError(f"completion manifest {e}", hint=_HINT) from None
    except OSError as e:
        raise VerificationError(f"cannot read the completion manifest: {e.strerror or e}",
                                hint="check the folder's permissions, or delete it and pull again") from None
    return Manifest.from_json(raw)


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
