"""Plain data shared by sources, the engine and verification."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Unpack:
    """How an archive entry of a listing becomes files (:mod:`~modelherd.storage.tarlayer`): a tar layer, plain,
    gzip or zstd (told by its magic bytes), applied after every archive of a lower ``order``.

    ``root``: only entries under this folder of the archive are taken, with it stripped (``models`` for a modelcar
    image); ``""`` takes every entry. ``whiteouts``: the archive is an image layer whose ``.wh.`` entries delete
    what lower layers put there (``.wh..wh..opq``: a folder's whole lower content).
    """

    order: int
    root: str = ""
    whiteouts: bool = False


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model as the source describes it.

    ``path`` is a relative POSIX path inside the model folder, already checked by
    :func:`modelherd.storage.paths.safe_relpath`. ``checksums`` maps an algorithm to a hex digest:
    ``sha256``, ``md5``, ``git-sha1`` (git blob sha1), ``md5-multipart`` ("<hex>-<parts>", can only be
    checked when the part size is known, so it is informational), ``crc32c`` (hex).
    ``locator`` is source-private (a URL, an object name).
    ``unpack`` marks an archive (a tar layer): it is fetched and verified like any file, but into staging's hidden
    ``.modelherd-layers/<path>``, never published; the model's files are what it extracts to
    (:mod:`~modelherd.storage.unpack`). Its ``path`` then only names it in that folder.
    """

    path: str
    size: int
    checksums: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    locator: str = ""
    unpack: Unpack | None = None


@dataclass(frozen=True)
class Selection:
    """Which files of a source's listing were asked for: ``--allow``/``--ignore`` glob patterns.

    Part of a model's identity: the same repository with other patterns is another model at the same
    destination. Normal form (built by :meth:`of`): patterns sorted and unique; ``allow=None`` selects every
    file (``()`` selects none); ``ignore=None`` drops nothing (an empty ignore list is the same thing).
    """

    allow: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None

    @classmethod
    def of(cls, allow: Iterable[str] | None = None, ignore: Iterable[str] | None = None) -> Selection:
        """The normal form of these patterns, so that equal selections compare equal."""
        ignored = tuple(sorted(set(ignore))) if ignore is not None else ()
        return cls(allow=tuple(sorted(set(allow))) if allow is not None else None, ignore=ignored or None)

    @property
    def filtered(self) -> bool:
        """Some file of the listing may have been left out."""
        return self.allow is not None or self.ignore is not None

    def describe(self) -> str:
        """The patterns as the CLI takes them, e.g. ``--allow '*.json' --ignore 'x/*'``; ``all files`` if none."""
        words = [f"--allow {p!r}" for p in self.allow or ()] + [f"--ignore {p!r}" for p in self.ignore or ()]
        if self.allow == ():
            words.insert(0, "an empty --allow")
        return " ".join(words) or "all files"

    def to_json(self) -> dict[str, list[str] | None]:
        return {"allow": None if self.allow is None else list(self.allow),
                "ignore": None if self.ignore is None else list(self.ignore)}

    @classmethod
    def from_json(cls, d: Any) -> Selection:
        """Inverse of :meth:`to_json`; ``None`` (a manifest written before selections were recorded) is all files.

        Raises ``TypeError``/``ValueError`` on anything else than that shape.
        """
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise TypeError("selection must be an object")

        def patterns(v: Any) -> list[str] | None:
            if v is None:
                return None
            if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
                raise TypeError("selection patterns must be a list of strings")
            return v

        return cls.of(patterns(d.get("allow")), patterns(d.get("ignore")))


ALL_FILES = Selection()  # no --allow, no --ignore


@dataclass(frozen=True)
class Listing:
    """The exact set of files at a resolved revision, and the selection that produced it from the source."""

    uri: str
    revision: str
    files: tuple[RemoteFile, ...]
    selection: Selection = ALL_FILES

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def plain_files(self) -> tuple[RemoteFile, ...]:
        """The files stored as they are (no archive)."""
        return tuple(f for f in self.files if f.unpack is None)

    @property
    def archives(self) -> tuple[RemoteFile, ...]:
        """The archives (tar layers), in the order they are applied."""
        return tuple(sorted((f for f in self.files if f.unpack is not None),
                            key=lambda f: f.unpack.order if f.unpack is not None else 0))


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
