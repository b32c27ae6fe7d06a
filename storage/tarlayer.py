"""Safe extraction of tar layers (modelcar image layers, ModelPack ``.tar`` layers, folders pushed with oras) into a
staging folder, every extracted file hashed (sha256) while it is written.

Invariants (each layer's blob was verified against its digest before it is opened here):
- Nothing is written outside ``dest``, and nothing but regular files and folders is created in it: a name is taken
  only when it is relative, has no ``..`` segment, no control character, no segment of the reserved
  ``.modelherd-`` prefix and no segment over ``NAME_MAX`` bytes; ``tarfile.data_filter`` checks every entry again
  against ``dest`` (on a Python without it, before 3.11.4, ``_data_filter_problem`` applies the same rules). Files
  are opened ``O_CREAT|O_EXCL|O_NOFOLLOW`` after their name was unlinked: always a new inode, never written through
  a link.
- A hardlink is taken only to a file already extracted inside the model folder (a hard link in ``dest``: tar's own
  semantics, the link keeps the bytes it had); a symlink only when it resolves, inside the model folder, to a file
  of the final model (it is stored as a hard link to that file); no entry is ever written through a symlink or
  under a file. A device, FIFO, socket, sparse file, a link leaving the model folder or an absolute name is an
  :class:`~.errors.UnsafeArchiveError`, as is any unreadable or truncated archive. For a modelcar image
  (``Unpack.root``) entries outside the model folder are skipped, never written, whatever their type.
- Bounds: at most ``max_entries`` entries over all layers, ``max_files`` files in the model, ``MAX_ENTRY_BYTES``
  per file, ``MAX_TOTAL_BYTES`` in all, ``MAX_HEADER_BYTES`` per extended header (pax, GNU long names: read in
  memory), the free space checked before each file; a zstd window is bounded by the library's default limit.
- Duplicates follow tar: the last entry of a name wins (a new inode; a hard link made earlier keeps the old bytes).
  Layers are applied in order; with ``Unpack.whiteouts`` a ``.wh.NAME`` entry deletes NAME (file, symlink or
  folder) of the layers below, and ``.wh..wh..opq`` a folder's whole lower content (the OCI image layer rules).
- Repair (``wanted``): only the named files are written, from the layers given (their owners), whiteouts are not
  applied (the other files in ``dest`` are the final model's); the caller checks each against the manifest.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import os
import tarfile
import threading
import zlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import capacity
from .destination import NAME_MAX
from .errors import UnsafeArchiveError
from .options import check_cancel
from .paths import contained, safe_relpath
from .staging import RESERVED_PREFIX
from .types import Unpack
from .untrusted import show

__all__ = ["MAX_ENTRIES", "Extracted", "Layer", "extract_layers", "prune"]

MAX_ENTRIES = 1_000_000
MAX_ENTRY_BYTES = 2**40  # one file of a model: 1 TiB
MAX_TOTAL_BYTES = 2**43  # all files extracted by one pull: 8 TiB
MAX_HEADER_BYTES = 1024 * 1024  # a pax header or GNU long name held in memory
MAX_LINK_HOPS = 16
CHUNK = 1024 * 1024
_WHITEOUT, _OPAQUE = ".wh.", ".wh..wh..opq"
_GZIP, _ZSTD = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


@dataclass(frozen=True)
class Layer:
    """A verified archive blob on disk, its digest (``sha256:<hex>``) and how it is unpacked."""

    blob: Path
    digest: str
    unpack: Unpack


@dataclass(frozen=True)
class Extracted:
    """A file of the model as extracted: its size, sha256 and the digest of the layer it came from."""

    path: str
    size: int
    sha256: str
    archive: str


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an extended header (read whole into memory by ``tarfile``) larger than ``MAX_HEADER_BYTES``."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER_BYTES:
            raise UnsafeArchiveError(f"an extended tar header of {self.size} bytes (at most {MAX_HEADER_BYTES})",
                                     hint="the layer is malformed or hostile; nothing was published")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


@contextlib.contextmanager
def _decompressed(path: Path) -> Iterator[IO[bytes] | gzip.GzipFile]:
    """The tar stream of ``path``: plain, gzip or zstd, told by its magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == _GZIP:
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                yield gz
        elif magic == _ZSTD:
            import zstandard  # only when a zstd layer is met

            with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False) as zst:
                yield zst
        else:
            yield f


def _segments(name: str, what: str) -> list[str]:
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{what}: absolute name {show(name)}", hint=_HINT)
    segs = [s for s in name.split("/") if s not in ("", ".")]
    if ".." in segs:
        raise UnsafeArchiveError(f"{what}: name {show(name)} leaves the model folder", hint=_HINT)
    return segs


_HINT = "the layer is malformed or hostile; nothing outside staging was written and nothing was published"


def _data_filter_problem(m: tarfile.TarInfo, dest: str) -> str | None:
    """What ``tarfile.data_filter`` (PEP 706, Python >= 3.11.4) would refuse in ``m`` extracted into ``dest``, for
    the Pythons that lack it; None when it would pass. The same rules: the entry stays inside ``dest`` once
    resolved, no device, FIFO or other special file, a link's target neither absolute nor outside ``dest``; an
    absolute name, which ``data_filter`` would strip, is refused (callers pass relative names only)."""
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    name = m.name
    if name.startswith("/") or os.path.isabs(name):
        return f"member {name!r} has an absolute path"
    target = os.path.join(root, name)
    if not inside(target):
        return f"{name!r} would be extracted to {os.path.realpath(target)!r}, which is outside the destination"
    if not (m.isreg() or m.isdir() or m.islnk() or m.issym()):
        return f"{name!r} is a special file"
    if m.islnk() or m.issym():
        link = m.linkname
        if link.startswith("/") or os.path.isabs(link):
            return f"{name!r} is a link to an absolute path"
        where = os.path.join(root, os.path.dirname(name), link) if m.issym() else os.path.join(root, link)
        if not inside(where):
            return f"{name!r} would link to {os.path.realpath(where)!r}, which is outside the destination"
    return None


class _Extraction:
    def __init__(self, dest: Path, taken: Collection[str], wanted: Collection[str] | None, max_files: int,
                 max_entries: int, fsync: bool, cancel: threading.Event | None) -> None:
        self.dest, self.taken, self.fsync, self.cancel = dest, set(taken), fsync, cancel
        self.wanted = set(wanted) if wanted is not None else None
        self.max_files, self.max_entries = max_files, max_entries
        self.files: dict[str, Extracted] = {}
        self.links: dict[str, tuple[str, str]] = {}  # symlink -> (target in the model folder, layer digest)
        self.folders: set[str] = set()
        self.entries = 0
        self.total = 0

    # -- names -------------------------------------------------------------------------------------------------
    def _model_path(self, segs: list[str], unpack: Unpack) -> list[str] | None:
        """The segments inside the model folder, ``None`` for an entry outside it (a modelcar's other folders)."""
        if not unpack.root:
            return segs
        root = unpack.root.split("/")
        if segs[: len(root)] != root:
            return None
        return segs[len(root):]

    def _rel(self, segs: list[str], what: str) -> str:
        for s in segs:
            if s.startswith(RESERVED_PREFIX):
                raise UnsafeArchiveError(f"{what}: {show(s)} uses the reserved prefix {RESERVED_PREFIX}", hint=_HINT)
            if len(os.fsencode(s)) > NAME_MAX:
                raise UnsafeArchiveError(f"{what}: a name segment longer than {NAME_MAX} bytes", hint=_HINT)
        return safe_relpath("/".join(segs), what=what)

    def _check_place(self, rel: str, what: str) -> None:
        """``rel`` may become a file: under no file or symlink, not a folder holding files, not a raw file's."""
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self.files or parent in self.taken:
                raise UnsafeArchiveError(f"{what}: {show(rel)} is under the file {show(parent)}", hint=_HINT)
            if parent in self.links:
                raise UnsafeArchiveError(f"{what}: {show(rel)} is written through the symlink {show(parent)}",
                                         hint=_HINT)
        if rel in self.taken:
            raise UnsafeArchiveError(f"{what}: {show(rel)} is also a raw layer's file", hint=_HINT)
        if rel in self.folders and any(p.startswith(rel + "/") for p in (*self.files, *self.links, *self.taken)):
            raise UnsafeArchiveError(f"{what}: {show(rel)} is both a file and a folder", hint=_HINT)

    def _count_file(self, rel: str, what: str) -> None:
        if rel not in self.files and rel not in self.links and \
                len(self.files) + len(self.links) + len(self.taken) >= self.max_files:
            raise UnsafeArchiveError(f"{what}: more than {self.max_files} files in the model",
                                     hint="the image holds more files than a model may have; nothing was published")

    # -- layers ------------------------------------------------------------------------------------------------
    def layer(self, layer: Layer) -> None:
        what = f"layer {layer.digest[:19]}"
        try:
            with _decompressed(layer.blob) as stream, \
                    tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tf:
                while True:
                    member = tf.next()
                    if member is None:
                        break
                    tf.members.clear()  # type: ignore[attr-defined]  # stream mode: no lookups; flat memory
                    self.entries += 1
                    if self.entries > self.max_entries:
                        raise UnsafeArchiveError(f"{what}: more than {self.max_entries} tar entries", hint=_HINT)
                    if self.entries % 256 == 0:
                        check_cancel(self.cancel)
                    self._member(tf, member, layer, what)
        except _READ_ERRORS as e:
            raise UnsafeArchiveError(f"{what} is not a readable tar: {type(e).__name__}: {show(str(e))}",
                                     hint=_HINT) from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise UnsafeArchiveError(f"{what} is not readable zstd: {show(str(e))}", hint=_HINT) from None
            raise

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo, layer: Layer, what: str) -> None:
        unpack = layer.unpack
        segs = _segments(m.name, what)
        if unpack.whiteouts and segs and segs[-1].startswith(_WHITEOUT):
            self._whiteout(segs, layer, what)
            return
        inside = self._model_path(segs, unpack)
        if inside is None:
            return
        if not inside:  # the model folder itself
            if not m.isdir():
                raise UnsafeArchiveError(f"{what}: the model folder {show(m.name)} is not a folder", hint=_HINT)
            return
        rel = self._rel(inside, what)
        if m.isdir():
            if rel in self.files or rel in self.links or rel in self.taken:
                raise UnsafeArchiveError(f"{what}: {show(rel)} is both a file and a folder", hint=_HINT)
            self.folders.add(rel)
            return
        if m.isreg():
            self._regular(tf, m, rel, layer, what)
        elif m.islnk():
            self._hardlink(m, rel, layer, what)
        elif m.issym():
            self._symlink(m, rel, inside, layer, what)
        else:
            raise UnsafeArchiveError(f"{what}: {show(rel)} is a device, FIFO or other special file", hint=_HINT)

    def _filter(self, m: tarfile.TarInfo, rel: str, linkname: str, what: str) -> None:
        member = copy.copy(m)  # TarInfo.replace() is PEP 706 too: absent before 3.11.4
        member.name, member.linkname = rel, linkname
        data_filter = getattr(tarfile, "data_filter", None)
        if data_filter is None:  # Python < 3.11.4 (Debian bookworm's 3.11.2): the same checks, ours
            problem = _data_filter_problem(member, str(self.dest))
            if problem:
                raise UnsafeArchiveError(f"{what}: {show(rel)}: {problem}", hint=_HINT)
            return
        try:
            data_filter(member, str(self.dest))
        except tarfile.FilterError as e:  # exists wherever data_filter does
            raise UnsafeArchiveError(f"{what}: {show(rel)}: {e}", hint=_HINT) from None

    def _regular(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, layer: Layer, what: str) -> None:
        if m.issparse():
            raise UnsafeArchiveError(f"{what}: {show(rel)} is a sparse file", hint=_HINT)
        if m.size > MAX_ENTRY_BYTES or self.total + m.size > MAX_TOTAL_BYTES:
            raise UnsafeArchiveError(f"{what}: {show(rel)} claims {m.size} bytes, more than a model file may have "
                                     f"({MAX_ENTRY_BYTES} bytes each, {MAX_TOTAL_BYTES} in all)", hint=_HINT)
        self._check_place(rel, what)
        self._filter(m, rel, "", what)
        if self.wanted is not None and rel not in self.wanted:
            return
        self._count_file(rel, what)
        self.links.pop(rel, None)
        target = self._fresh(rel)
        capacity.ensure_free_space(self.dest, m.size)
        src = tf.extractfile(m)
        if src is None:
            raise UnsafeArchiveError(f"{what}: {show(rel)} has no data", hint=_HINT)
        digest, written = hashlib.sha256(), 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            while chunk := src.read(CHUNK):
                check_cancel(self.cancel)
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                written += len(chunk)
            if written != m.size:
                raise UnsafeArchiveError(f"{what}: {show(rel)} holds {written} of its {m.size} bytes", hint=_HINT)
            if self.fsync:
                os.fsync(fd)
        except OSError as e:
            if capacity.is_no_space(e):
                raise capacity.no_space_error(e, target) from None
            raise
        finally:
            os.close(fd)
        self.total += m.size
        self.files[rel] = Extracted(rel, m.size, digest.hexdigest(), layer.digest)

    def _fresh(self, rel: str) -> Path:
        """``dest/rel`` unlinked (last wins: a new inode), its folders made."""
        target = contained(self.dest, rel, what="tar entry")
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(target) and not os.path.islink(target):
            raise UnsafeArchiveError(f"{show(rel)} is both a file and a folder", hint=_HINT)
        if os.path.lexists(target):
            os.unlink(target)
        parts = rel.split("/")
        self.folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return target

    def _hardlink(self, m: tarfile.TarInfo, rel: str, layer: Layer, what: str) -> None:
        inside = self._model_path(_segments(m.linkname, what), layer.unpack)
        if not inside:
            raise UnsafeArchiveError(f"{what}: {show(rel)} is a hardlink to {show(m.linkname)}, outside the model "
                                     "folder", hint=_HINT)
        src = self._rel(inside, what)
        self._check_place(rel, what)
        self._filter(m, rel, src, what)
        if self.wanted is not None and rel not in self.wanted:
            return
        have = self.files.get(src)
        if have is None and self.wanted is not None and os.path.isfile(self.dest / src):
            size = os.lstat(self.dest / src).st_size
            have = Extracted(src, size, "", layer.digest)  # repair: the caller checks the bytes
        if have is None:
            raise UnsafeArchiveError(f"{what}: {show(rel)} is a hardlink to {show(src)}, which is no file extracted "
                                     "before it", hint=_HINT)
        self._count_file(rel, what)
        self.links.pop(rel, None)
        os.link(contained(self.dest, src, what="tar entry"), self._fresh(rel), follow_symlinks=False)
        self.files[rel] = Extracted(rel, have.size, have.sha256, layer.digest)

    def _symlink(self, m: tarfile.TarInfo, rel: str, inside: list[str], layer: Layer, what: str) -> None:
        link = m.linkname
        if link.startswith("/"):
            target = self._model_path(_segments(link.lstrip("/"), what), layer.unpack) if layer.unpack.root else None
            if not target:
                raise UnsafeArchiveError(f"{what}: {show(rel)} is a symlink to {show(link)}, outside the model "
                                         "folder", hint=_HINT)
        else:
            target = inside[:-1]
            for s in (s for s in link.split("/") if s not in ("", ".")):
                if s == "..":
                    if not target:
                        raise UnsafeArchiveError(f"{what}: {show(rel)} is a symlink to {show(link)}, outside the "
                                                 "model folder", hint=_HINT)
                    target.pop()
                else:
                    target.append(s)
            if not target:
                raise UnsafeArchiveError(f"{what}: {show(rel)} is a symlink to the model folder itself", hint=_HINT)
        dest_rel = self._rel(target, what)
        self._check_place(rel, what)
        parent = os.path.dirname(rel)
        self._filter(m, rel, os.path.relpath(dest_rel, parent or "."), what)
        if self.wanted is not None and rel not in self.wanted:
            return
        self._count_file(rel, what)
        if rel in self.files:
            self.files.pop(rel)
            os.unlink(contained(self.dest, rel, what="tar entry"))
        self.links[rel] = (dest_rel, layer.digest)

    def _whiteout(self, segs: list[str], layer: Layer, what: str) -> None:
        """``.wh.NAME``: NAME and all below it go; ``.wh..wh..opq``: what lower layers put in the folder goes."""
        opaque = segs[-1] == _OPAQUE
        name = segs[-1][len(_WHITEOUT):]
        if not opaque and not name:
            raise UnsafeArchiveError(f"{what}: a whiteout that names nothing", hint=_HINT)
        folder = segs[:-1] if opaque else [*segs[:-1], name]
        inside = self._model_path(folder, layer.unpack)
        if inside is None:
            if layer.unpack.root.split("/")[: len(folder)] != folder:
                return  # outside the model folder
            inside = []  # the model folder or a folder above it: the whole lower model goes
        prefix = "/".join(inside)
        if self.wanted is not None:
            return
        for table in (self.files, self.links):
            for path in [p for p in table if (not prefix or p == prefix or p.startswith(prefix + "/"))]:
                if opaque and table[path] and _layer_of(table[path]) == layer.digest:
                    continue  # an opaque whiteout hides the lower layers only
                table.pop(path)
                if table is self.files:
                    os.unlink(contained(self.dest, path, what="tar entry"))
                    prune(self.dest, path)

    def finish(self) -> dict[str, Extracted]:
        """Symlinks become hard links to the file they resolve to (inside the model folder), or are refused."""
        for rel, (target, digest) in sorted(self.links.items()):
            seen = 0
            while target in self.links and seen < MAX_LINK_HOPS:
                target, seen = self.links[target][0], seen + 1
            have = self.files.get(target)
            if have is None and self.wanted is not None and os.path.isfile(self.dest / target):
                have = Extracted(target, os.lstat(self.dest / target).st_size, "", digest)
            if have is None:
                raise UnsafeArchiveError(f"the symlink {show(rel)} resolves to no file of the model (it points to "
                                         f"{show(target)})", hint="only symlinks to files inside the model folder "
                                         "are supported; nothing was published")
            os.link(contained(self.dest, target, what="tar entry"), self._fresh(rel), follow_symlinks=False)
            self.files[rel] = Extracted(rel, have.size, have.sha256, digest)
        self.links.clear()
        return self.files


def prune(dest: Path, rel: str) -> None:
    """Remove the folders of ``rel`` that are left empty (a whited-out folder is no entry of the model)."""
    parts = rel.split("/")[:-1]
    while parts:
        try:
            os.rmdir(contained(dest, "/".join(parts), what="tar entry"))
        except OSError:
            return
        parts.pop()


def _layer_of(entry: Extracted | tuple[str, str]) -> str:
    return entry.archive if isinstance(entry, Extracted) else entry[1]


def extract_layers(layers: Sequence[Layer], dest: Path, *, max_files: int, taken: Collection[str] = (),
                   wanted: Collection[str] | None = None, max_entries: int | None = None, fsync: bool = True,
                   cancel: threading.Event | None = None) -> dict[str, Extracted]:
    """Extract ``layers`` in order into ``dest`` (see the module's invariants); return the model's files.

    ``taken``: names the model already has (raw layers' files) that no entry may use. ``wanted``: repair mode,
    only those files are written (with ``sha256`` of "" for a link whose target was already in ``dest``)."""
    run = _Extraction(Path(dest), taken, wanted, max_files, MAX_ENTRIES if max_entries is None else max_entries,
                      fsync, cancel)
    for layer in layers:
        check_cancel(cancel)
        run.layer(layer)
    return run.finish()
