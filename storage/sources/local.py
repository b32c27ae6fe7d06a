"""A model already on disk (``local:///path``), verified in place.

Invariants: nothing here writes, renames or deletes (files are opened read-only); every listed path is a
safe relative path whose real location is inside the folder — a symlink that leads out of it raises
:class:`UnsafePathError`; modelherd's own files (``.modelherd-*``, manifest temp files) are not listed;
only regular files are ever opened — a FIFO, socket or device in the folder raises :class:`SourceError`
when listing (from its ``stat``), and one swapped in later is refused by :meth:`LocalSource.open` without
blocking; the listing walk stops at once past ``max_files`` files or folders
(:class:`MalformedListingError`: ``local:///`` is not a model folder), so it never grows with the tree.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import (
    ConfigError,
    MalformedListingError,
    SourceError,
    SourceNotFoundError,
    UnsafePathError,
    VerificationError,
)
from ..manifest import MANIFEST_NAME, read_manifest
from ..paths import contained, quote_name, safe_relpath
from ..types import Listing, RemoteFile
from ..untrusted import NotRegularFileError, file_kind, open_regular
from ..uri import ModelURI
from ..verify import MAX_FILES

INTERNAL_PREFIX = ".modelherd-"
MANIFEST_TMP_PREFIX = ".manifest."  # write_manifest's temp files, left behind only by a crash


def _internal(rel_parts: tuple[str, ...]) -> bool:
    name = rel_parts[-1]
    return (name == MANIFEST_NAME or name.startswith(INTERNAL_PREFIX)
            or (len(rel_parts) == 1 and name.startswith(MANIFEST_TMP_PREFIX)))


class _FileBody:
    """Bytes ``[start, stop)`` of an open file; a file that shrank raises :class:`SourceError`."""

    def __init__(self, f: BinaryIO, length: int, what: str) -> None:
        self._f = f
        self._left = length
        self._what = what

    def readinto(self, buf: memoryview) -> int:
        if self._left <= 0:
            return 0
        n = self._f.readinto(buf[: min(len(buf), self._left)])  # type: ignore[attr-defined]
        if not n:
            raise SourceError(f"{self._what}: file ended {self._left} bytes early",
                              hint="the file changed while it was read")
        self._left -= n
        return int(n)

    def close(self) -> None:
        self._f.close()


class LocalSource:
    """Files under an absolute local folder. Thread-safe: ``open`` uses a fresh file object each time."""

    def __init__(self, uri: ModelURI, *, max_files: int = MAX_FILES) -> None:
        if uri.scheme != "local":
            raise ConfigError(f"LocalSource needs a local:// URI, got {uri.raw!r}")
        self.uri = uri.canonical
        self.root = Path(uri.path)
        if not self.root.is_dir():
            raise SourceNotFoundError(f"{self.root} is not a folder", hint="give local:///ABSOLUTE/PATH of a model")
        self._real_root = Path(os.path.realpath(self.root))
        self.max_files = max_files

    def _walk(self) -> list[tuple[str, int]]:
        """(relative path, size) of every regular file, following symlinks only while they stay inside;
        anything else that is not a folder (FIFO, socket, device) raises :class:`SourceError`; more than
        ``max_files`` files or folders raise :class:`MalformedListingError` as soon as one too many is seen."""
        out: list[tuple[str, int]] = []
        seen_dirs: set[tuple[int, int]] = set()
        counts = {"files": 0, "folders": 0}

        def count(what: str) -> None:
            counts[what] += 1
            if counts[what] > self.max_files:
                raise MalformedListingError(f"{self.root}: more than {self.max_files} {what}: not a model folder",
                                            hint="give local:///ABSOLUTE/PATH of one model's folder")

        stack: list[tuple[Path, tuple[str, ...]]] = [(self.root, ())]
        while stack:
            folder, parts = stack.pop()
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue  # a symlink loop inside the folder
            seen_dirs.add((st.st_dev, st.st_ino))
            entries = []
            with os.scandir(folder) as it:
                for e in it:
                    if not _internal((*parts, e.name)):  # modelherd's own files are neither listed nor counted
                        count("folders" if e.is_dir(follow_symlinks=False) else "files")
                        entries.append(e)
            entries.sort(key=lambda e: e.name)
            for e in entries:
                rel_parts = (*parts, e.name)
                rel = safe_relpath("/".join(rel_parts), what="file name")
                if e.is_symlink():
                    real = Path(os.path.realpath(e.path))
                    if real != self._real_root and self._real_root not in real.parents:
                        raise UnsafePathError(f"{rel!r} is a symlink to {real}, outside {self._real_root}",
                                              hint="copy the target into the model folder or pull the model")
                try:
                    est = os.stat(e.path)
                except FileNotFoundError:
                    raise UnsafePathError(f"{rel!r} is a dangling symlink",
                                          hint="fix or remove the link") from None
                if stat.S_ISDIR(est.st_mode):
                    stack.append((Path(e.path), rel_parts))
                elif stat.S_ISREG(est.st_mode):
                    out.append((rel, est.st_size))
                else:
                    raise SourceError(f"{quote_name(rel)} is a {file_kind(est.st_mode)}, not a regular file",
                                      hint="a model folder holds only files and folders; remove it or put the "
                                           "real file in its place")
        return sorted(out)

    def list_files(self) -> Listing:
        """Every regular file with its stat size; checksums and revision from the completion manifest.

        Files the manifest names but the folder lacks raise :class:`VerificationError`; checksums are only
        given for files whose size still matches the manifest (``revision`` is ``"local"`` without one).
        """
        manifest = read_manifest(self.root)
        files = self._walk()
        sums: dict[str, tuple[int, dict[str, str]]] = {}
        if manifest is not None:
            sums = {f.path: (f.size, dict(f.checksums)) for f in manifest.files}
            missing = sorted(set(sums) - {rel for rel, _ in files})
            if missing:
                raise VerificationError(f"{self.root}: {len(missing)} file(s) of the manifest are missing",
                                        problems=[f"missing: {m}" for m in missing],
                                        hint="the folder is incomplete; pull the model again")
        out = []
        for rel, size in files:
            msize, checks = sums.get(rel, (-1, {}))
            out.append(RemoteFile(path=rel, size=size, checksums=checks if msize == size else {}, locator=rel))
        return Listing(uri=self.uri, revision=manifest.revision if manifest else "local", files=tuple(out))

    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> _FileBody:
        """Bytes ``[start, end)`` of ``file``, read-only; the path is re-checked against symlink escapes."""
        stop = file.size if end is None else end
        if not 0 <= start <= stop <= file.size:
            raise ValueError(f"bad range [{start}, {stop}) for {file.path} of {file.size} bytes")
        path = contained(self.root, file.locator or file.path, what="file name")
        try:
            f = open_regular(path)
        except FileNotFoundError:
            raise SourceNotFoundError(f"{path} does not exist", hint="the folder changed; list it again") from None
        except NotRegularFileError as e:
            raise SourceError(f"{path} {e}", hint="the folder changed; list it again") from None
        except OSError as e:
            raise SourceError(f"cannot read {path}: {e.strerror}") from None
        f.seek(start)
        return _FileBody(f, stop - start, f"reading {path}")

    def close(self) -> None:
        return None
