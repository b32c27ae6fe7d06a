"""Staging folders and the resume state kept inside them.

Invariants:
- A staging folder lives in ``<models_root>/.modelherd-staging/`` (same filesystem as every destination, so
  publishing is one rename) and is named by :func:`staging_dir_for` alone.
- Resume state is a small JSON file per in-progress model file under ``<staging>/.modelherd-parts/``; it holds
  only relative names, so a staging folder can be moved (:func:`adopt_staging`) and still resume.
- A checkpoint is recorded only after its bytes were written; on restart every checkpoint is checked against
  the bytes on disk before it is trusted, so the state never needs an fsync to be safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .paths import staging_root

STATE_DIRNAME = ".modelherd-parts"
RESERVED_PREFIX = ".modelherd-"
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _clean_token(text: str, limit: int) -> str:
    token = _UNSAFE_CHARS.sub("_", text).strip("._") or "x"
    return token[:limit]


def staging_dir_for(models_root: Path, dest: Path, writer: str, epoch: int) -> Path:
    """``<models_root>/.modelherd-staging/<tail>-<hash>.<writer>.<epoch>``, the same for the same arguments.

    The hash covers ``dest`` relative to the (resolved) models root, so two destinations never share a folder;
    the tail keeps it readable. ``writer`` is reduced to ``[A-Za-z0-9._-]``.
    """
    root = Path(os.path.realpath(models_root))
    real = Path(os.path.realpath(dest))
    try:
        rel = real.relative_to(root).as_posix()
    except ValueError:
        rel = real.as_posix()
    digest = hashlib.sha256(rel.encode()).hexdigest()[:12]
    key = f"{_clean_token(real.name, 40)}-{digest}"
    return staging_root(root) / f"{key}.{_clean_token(writer, 63)}.{int(epoch)}"


def state_path(staging: Path, relpath: str) -> Path:
    """Where the resume state of model file ``relpath`` lives inside ``staging``."""
    name = hashlib.sha256(relpath.encode()).hexdigest()[:24]
    return Path(staging) / STATE_DIRNAME / f"{name}.json"


@dataclass
class FileState:
    """Resume state of one file: its layout and the checkpoints of the segments already written.

    A file fetched as one stream (one part) is hashed in order as it lands, so its checkpoints cost nothing:
    ``prefix[k]`` is the ``prefix_algo`` hex digest of bytes ``[0, (k + 1) * segment_size)``. A file fetched as
    several ranged parts has, per part, ``parts[i][k]`` = CRC-32 of segment ``k`` of part ``i`` (segments are
    ``segment_size`` long, the last one of a part may be shorter). ``done`` is set once the whole file was
    verified; ``digests`` are then the digests computed while it streamed.
    """

    path: str
    size: int
    expect: dict[str, str]
    part_size: int
    segment_size: int
    parts: list[list[int]] = field(default_factory=list)
    done: bool = False
    digests: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)
    prefix_algo: str = ""

    def layout_matches(self, other: FileState) -> bool:
        """Same file and checkpoint granularity: ``self``'s checkpoints can resume ``other``.

        The part size may differ (whether a file is split depends on the rest of the model); a resumed file keeps
        the part layout its checkpoints were taken with.
        """
        return (self.path, self.size, self.expect, self.segment_size) == (
            other.path, other.size, other.expect, other.segment_size) and self.part_size >= 1 \
            and len(self.parts) == -(-self.size // self.part_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FileState | None:
        try:
            d: dict[str, Any] = json.loads(text)
            return cls(path=str(d["path"]), size=int(d["size"]),
                       expect={str(k): str(v) for k, v in dict(d["expect"]).items()},
                       part_size=int(d["part_size"]), segment_size=int(d["segment_size"]),
                       parts=[[int(c) for c in p] for p in d["parts"]], done=bool(d["done"]),
                       digests={str(k): str(v) for k, v in dict(d.get("digests", {})).items()},
                       prefix=[str(h) for h in d.get("prefix", [])], prefix_algo=str(d.get("prefix_algo", "")))
        except (KeyError, TypeError, ValueError):
            return None


def load_state(staging: Path, relpath: str) -> FileState | None:
    """The saved state of ``relpath``, ``None`` when absent or unreadable (then the file starts over)."""
    try:
        text = state_path(staging, relpath).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    state = FileState.from_json(text)
    return state if state is not None and state.path == relpath else None


def save_state(staging: Path, state: FileState) -> None:
    """Replace the state file atomically (temp + rename; no fsync, see the module invariant)."""
    target = state_path(staging, state.path)
    target.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def drop_state(staging: Path, relpath: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(staging, relpath).unlink()


def remove_tree(path: Path, *, attempts: int = 5) -> None:
    """Delete ``path`` (file or folder) if it exists; tolerates a straggling writer for a few rounds."""
    for i in range(attempts):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            return
        except FileNotFoundError:
            return
        except OSError:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))


def adopt_staging(old_staging: Path, new_staging: Path) -> Path:
    """Move another writer's files and resume state into ``new_staging``; return ``new_staging``.

    Both folders must be in the same staging root (one filesystem, so every move is a rename). Files already in
    ``new_staging`` win over the old ones. ``old_staging`` is gone afterwards.
    """
    old_staging, new_staging = Path(old_staging), Path(new_staging)
    if not old_staging.is_dir():
        new_staging.mkdir(parents=True, exist_ok=True)
        return new_staging
    new_staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(old_staging, new_staging)  # fails when new_staging exists and is not empty
        return new_staging
    except OSError:
        pass
    for dirpath, dirnames, filenames in os.walk(old_staging):
        if Path(dirpath) == old_staging and STATE_DIRNAME in dirnames:
            dirnames.remove(STATE_DIRNAME)
        for name in filenames:
            src = Path(dirpath) / name
            rel = src.relative_to(old_staging).as_posix()
            dst = new_staging / rel
            if dst.exists():
                continue  # ours wins, and so does our state for it
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            old_state = state_path(old_staging, rel)
            if old_state.exists():
                state_path(new_staging, rel).parent.mkdir(exist_ok=True)
                os.replace(old_state, state_path(new_staging, rel))
    remove_tree(old_staging)
    return new_staging
