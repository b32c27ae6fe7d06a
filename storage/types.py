"""Plain data shared by sources, the engine and verification."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model as the source describes it.

    ``path`` is a relative POSIX path inside the model folder, already checked by
    :func:`modelherd.storage.paths.safe_relpath`. ``checksums`` maps an algorithm to a hex digest:
    ``sha256``, ``md5``, ``git-sha1`` (git blob sha1), ``md5-multipart`` ("<hex>-<parts>", can only be
    checked when the part size is known, so it is informational), ``crc32c`` (hex).
    ``locator`` is source-private (a URL, an object name).
    """

    path: str
    size: int
    checksums: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    locator: str = ""


@dataclass(frozen=True)
class Listing:
    """The exact set of files at a resolved revision."""

    uri: str
    revision: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class ByteStream(Protocol):
    """A readable body. ``readinto`` returns 0 at end of body."""

    def readinto(self, buf: memoryview) -> int: ...

    def close(self) -> None: ...


class Source(Protocol):
    """A place models come from.

    Invariant: ``list_files`` returns names that are safe relative paths; ``open`` returns exactly the
    bytes ``[start, end)`` of the file (``end=None``: to the end) or raises a typed ``SourceError``.
    Implementations are thread-safe: the engine calls ``open`` from several threads.
    """

    uri: str

    def list_files(self) -> Listing: ...

    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> ByteStream: ...

    def close(self) -> None: ...
