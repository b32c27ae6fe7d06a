"""Is a model folder whole? Quick checks read metadata only; deep checks re-hash every file.

Invariants:
- :func:`verify_quick` is O(files), not O(bytes): it stats files and reads only manifest, index and
  safetensors *header* bytes, never tensor data;
- nothing here writes, and nothing is read outside ``model_dir`` (every name taken from a manifest, an
  index or a ``model_index.json`` goes through :func:`~.paths.contained` first; symlinks leaving the
  folder are reported, never followed);
- the walk is bounded: more than ``max_files`` files (or folders) or a pass past ``deadline_s`` stops it at once
  with one :class:`Problem` (``local:///`` is not a model folder), so time and memory never grow with the tree;
- bad or hostile content is reported as a :class:`Problem`, never raised, and never hangs: JSON is parsed
  by :func:`~.untrusted.load_json` (bounded size, depth, integers), only regular files are opened
  (:func:`~.untrusted.open_regular`; a FIFO, socket or device is reported from its ``stat``), sizes are
  computed with exact integers; only :func:`verify_or_raise` raises, with a
  :class:`~.errors.VerificationError`;
- a :class:`Problem` prints as one line whatever the names in it (:func:`~.paths.quote_name`);
- what is not the model's is neither read nor reported: download tools' metadata (:data:`TOOL_METADATA`,
  ``.cache/huggingface/``) always, and the entries the manifest records as ``foreign`` (kept by adoption), unless
  the name is, or leads to, one of the manifest's files (:func:`ignored_names`).
"""

from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelherdError, UnsafePathError, VerificationError
from .hashing import checkable, hash_file
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .paths import contained, printable, quote_name, safe_relpath
from .untrusted import UntrustedInputError, file_kind, load_json, open_regular_fd, read_json_file, show

# safetensors refuses headers above 100 MB; so do we (a corrupt length must not make us read gigabytes).
MAX_HEADER = 100_000_000
# The first read of a safetensors file: the 8-byte length and, for a shard of up to a few hundred tensors, the
# whole header (one system call a shard).
HEAD_READ = 64 * 1024
# A shard index or model_index.json: ~100 bytes a tensor; this is room for over half a million.
MAX_INDEX_BYTES = 64 * 1024 * 1024
# Bits per element of every dtype the safetensors format accepts (its Rust ``Dtype`` enum, as listed by the
# installed safetensors; tests/unit/test_verify_hostile.py checks this table against it, names and sizes).
# Sub-byte dtypes (F4, F6) pack elements: a tensor's bits must fill whole bytes, bytes = numel * bits / 8.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# safetensors reads shapes, offsets and byte counts as usize: 64 bits.
U64_MAX = 2**64 - 1
INDEX_SUFFIX = ".safetensors.index.json"
# A folder with more files than a listing may have (``EngineOptions.max_files``) is not a model folder.
MAX_FILES = 20_000
# Wall-clock bound of one quick pass, for folders modelherd did not publish (local://): a tenant's folder cannot hold
# a worker; metadata of a real model takes seconds even on shared storage.
LOCAL_DEADLINE_S = 60.0
DEADLINE_S: float | None = None  # published models: no clock (a slow filesystem is not damage); local:// passes one
# What download tools leave inside a model folder (``huggingface-cli download --local-dir``: ``.cache/huggingface/``
# with a ``.gitignore`` and per-file ``.metadata``): never the model's, never damage, never read.
TOOL_METADATA = (".cache/huggingface",)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a model folder. ``path`` is relative to the folder (``.`` for the folder)."""

    path: str
    message: str

    def __str__(self) -> str:
        """One printable line: the path quoted when it is not plain, control characters escaped."""
        return f"{quote_name(self.path)}: {printable(self.message)}"


def _rel(base: Path, p: Path) -> str:
    try:
        return p.relative_to(base).as_posix() or "."
    except ValueError:
        return str(p)


def _inside(real_base: Path, p: Path) -> bool:
    target = Path(os.path.realpath(p))
    return target == real_base or real_base in target.parents


@dataclass(frozen=True)
class _Found:
    """A regular file the walk found: its path, its ``stat`` (links followed), and whether the name itself is a
    symlink (then it was checked to point inside the folder)."""

    path: Path
    st: os.stat_result
    link: bool


class _OutOfBounds(Exception):
    """Internal: the pass went past its bounds; :func:`_quick` turns it into its one :class:`Problem`."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Budget:
    """How far one quick pass may go: ``max_files`` files and as many folders, until ``deadline`` (monotonic)."""

    def __init__(self, max_files: int, deadline_s: float | None) -> None:
        self.max_files = max_files
        self.deadline_s = deadline_s
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _OutOfBounds(Problem(".", f"not verified within {self.deadline_s:g} s: stopped (too many or too "
                                            "slow files for a model folder)"))

    def check_count(self, n: int, what: str) -> None:
        if n > self.max_files:
            raise _OutOfBounds(Problem(".", f"more than {self.max_files} {what}: not a model folder"))


def ignored_names(manifest: Manifest | None) -> frozenset[str]:
    """Relative names (files or whole folders) verification neither reads nor reports: :data:`TOOL_METADATA` and
    the manifest's ``foreign`` entries, less any that is, or leads to, a file of the manifest."""
    names = set(TOOL_METADATA) | set(manifest.foreign if manifest is not None else ())
    if manifest is not None and names:
        for f in manifest.files:
            parts = f.path.split("/")
            names -= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return frozenset(names)


def _walk(model_dir: Path, budget: _Budget, skip: frozenset[str] = frozenset()) -> tuple[dict[str, _Found],
                                                                                        list[Problem]]:
    """Regular files under ``model_dir`` by relative POSIX name (symlinks to regular files inside it included;
    symlinked folders are not descended into) and problems for links leaving it, dangling links, and anything
    that is neither a regular file nor a folder (FIFO, socket, device: reported from ``stat``, never opened).

    One ``scandir`` a folder and one ``stat`` a file (symlinks alone cost a ``realpath``), so a folder reached
    here without a link is inside ``model_dir`` by construction. Entries are taken from ``scandir`` one at a
    time and counted (the top-level manifest aside): past ``budget`` it raises :class:`_OutOfBounds` at once. Names
    in ``skip`` (:func:`ignored_names`) are passed over: not counted, not descended into, not reported."""
    files: dict[str, _Found] = {}
    problems: list[Problem] = []
    real_base = Path(os.path.realpath(model_dir))
    todo: list[tuple[str, str]] = [(os.fspath(model_dir), "")]
    n_files = n_dirs = 0
    while todo:
        budget.check_time()
        folder, prefix = todo.pop()
        try:
            with os.scandir(folder) as it:
                for e in it:
                    budget.check_time()
                    rel = prefix + e.name
                    if rel in skip:
                        continue
                    try:
                        link = e.is_symlink()
                        if not link and e.is_dir(follow_symlinks=False):
                            n_dirs += 1
                            budget.check_count(n_dirs, "folders")
                            todo.append((e.path, rel + "/"))
                            continue
                        if rel != MANIFEST_NAME:
                            n_files += 1
                            budget.check_count(n_files, "files")
                        if link and not _inside(real_base, Path(e.path)):
                            problems.append(Problem(rel, f"symlink points outside the model folder "
                                                         f"({os.path.realpath(e.path)})"))
                            continue
                        st = os.stat(e.path)
                    except OSError as err:
                        if link:
                            problems.append(Problem(rel, f"dangling symlink ({err.strerror})"))
                        continue  # vanished while we walked
                    if stat.S_ISREG(st.st_mode):
                        files[rel] = _Found(Path(e.path), st, link)
                    elif not stat.S_ISDIR(st.st_mode):
                        problems.append(Problem(rel, f"is a {file_kind(st.st_mode)}, not a regular file "
                                                     "(not opened)"))
        except OSError:
            continue  # vanished or unreadable while we walked, as os.walk skips it (what it had listed stays)
    return files, problems


def _lookup(model_dir: Path, found: dict[str, _Found], name: str, what: str) -> tuple[Path, _Found | None]:
    """``name`` (untrusted, already through :func:`~.paths.safe_relpath`: a manifest's names are, an index's are
    made so) as a contained path under ``model_dir``, and what the walk found there.

    A name the walk reached through real folders needs no ``realpath``; any other (missing, or under a
    symlinked folder) goes through :func:`~.paths.contained`, which raises :class:`UnsafePathError` if it leaves
    the folder."""
    hit = found.get(name)
    if hit is not None and not hit.link:
        return hit.path, hit
    return contained(model_dir, name, what=what), hit


def _is(p: Path, kind: Callable[[int], bool]) -> bool:
    """``Path.is_file``/``is_dir`` that is False for every stat error (a name too long, EACCES, ...) where
    pathlib raises for all but a few."""
    try:
        return kind(os.stat(p).st_mode)
    except (OSError, ValueError):
        return False


def _check_manifest(model_dir: Path, manifest: Manifest, found: dict[str, _Found], *,
                    allow_extra: bool, budget: _Budget) -> list[Problem]:
    problems: list[Problem] = []
    listed: set[str] = set()
    for entry in manifest.files:
        budget.check_time()
        listed.add(entry.path)
        try:
            p, hit = _lookup(model_dir, found, entry.path, "manifest entry")
        except ModelherdError as e:
            problems.append(Problem(entry.path, e.message))
            continue
        if hit is not None:
            st = hit.st
        else:
            try:
                st = p.stat()
            except FileNotFoundError:
                problems.append(Problem(entry.path, "listed in the manifest but missing"))
                continue
            except OSError as e:
                problems.append(Problem(entry.path, f"cannot stat: {e.strerror}"))
                continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(Problem(entry.path, f"listed in the manifest but is a {file_kind(st.st_mode)}, "
                                                "not a regular file"))
        elif st.st_size != entry.size:
            problems.append(Problem(entry.path, f"size {st.st_size} != {entry.size} in the manifest"))
    if not allow_extra:
        problems += [Problem(r, "not listed in the manifest") for r in sorted(found.keys() - listed - {MANIFEST_NAME})]
    return problems


def _header(path: Path, mode: int | None = None) -> tuple[dict[str, Any], int, int, bool]:
    """Parse a safetensors header: ``(header dict, data start offset, file size, names are UTF-8)``. Reads only
    the header bytes: one ``pread`` of :data:`HEAD_READ` bytes holds the length and, for most shards, the whole
    header; a longer header takes one more read of what is left.

    The last item is False only when the header's raw bytes hold a ``\\u`` escape, the one way a lone surrogate
    gets past the strict UTF-8 decoding: then each name needs the :func:`_utf8` check, else none does.

    Raises ``ValueError`` with a readable reason on any malformation (``OSError`` if unreadable); never
    opens anything but a regular file.
    """
    fd, st = open_regular_fd(path, mode=mode)
    try:
        raw = os.pread(fd, HEAD_READ, 0)
        if len(raw) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack_from("<Q", raw)
        if n > MAX_HEADER:
            raise ValueError(f"header length {n} is implausible (> {MAX_HEADER})")
        chunks = [raw[8:8 + n]]
        got = len(chunks[0])
        while got < n and (more := os.pread(fd, n - got, 8 + got)):  # a read may come back short
            chunks.append(more)
            got += len(more)
    finally:
        os.close(fd)
    if got < n:
        raise ValueError(f"truncated inside the header ({got} of {n} bytes)")
    text = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    try:
        header = load_json(text, max_bytes=MAX_HEADER)
    except UntrustedInputError as e:
        raise ValueError(f"header {e}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n, st.st_size, b"\\u" not in text


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header: ``(header dict, data start offset)``. Reads only the header bytes.

    Raises ``ValueError`` with a readable reason on any malformation (``OSError`` if unreadable); never
    opens anything but a regular file.
    """
    header, start, _, _ = _header(path)
    return header, start


def check_safetensors(path: Path) -> list[str]:
    """Reasons ``path`` is not a whole safetensors file (empty list: the header checks out)."""
    return _inspect_safetensors(path)[0]


def _utf8(text: str) -> bool:
    """JSON lets ``\\ud800`` through Python's parser; safetensors (serde) refuses lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def tensor_nbytes(dtype: str, shape: list[int]) -> int | str:
    """Exact bytes of a ``dtype`` x ``shape`` tensor, or why there is no such size (as safetensors says:
    a product beyond 64 bits, or sub-byte elements that do not end on a byte boundary)."""
    numel = 1
    for d in shape:  # in order, like safetensors' checked_mul fold: [2**63, 2**63, 0] overflows
        numel *= d
        if numel > U64_MAX:
            return f"{dtype} x {show(shape)} overflows 64 bits"
    bits = numel * DTYPE_BITS[dtype]
    if bits > U64_MAX:
        return f"{dtype} x {show(shape)} overflows 64 bits"
    if bits % 8:
        return f"{dtype} x {show(shape)} is {bits} bits, which does not end on a byte boundary"
    return bits // 8


def _tensor_reason(name: str, info: object, name_ok: bool = False) -> tuple[str | None, tuple[int, int] | None]:
    """``(reason, (begin, end))`` for one header entry: a reason when it is malformed, the span it claims
    when its offsets are well-formed (even if its size is wrong, so the tiling is still checked).
    ``name_ok``: the name is known to be valid Unicode (:func:`_header` says when)."""
    if not name_ok and not _utf8(name):
        return f"tensor {show(name)}: name is not valid Unicode", None
    if not isinstance(info, dict):
        return f"tensor {show(name)}: entry is not an object", None
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return f"tensor {show(name)}: unknown dtype {show(dtype)}", None
    if type(shape) is not list or not _dims(shape):
        return f"tensor {show(name)}: bad shape {show(shape)}", None
    if not (type(offs) is list and len(offs) == 2 and type(b := offs[0]) is int and type(e := offs[1]) is int
            and 0 <= b <= e <= U64_MAX):
        return f"tensor {show(name)}: bad data_offsets {show(offs)}", None
    want = tensor_nbytes(dtype, shape)
    if isinstance(want, str):
        return f"tensor {show(name)}: {want}", (b, e)
    if e - b != want:
        return f"tensor {show(name)}: {e - b} bytes but {dtype} x {show(shape)} needs {want}", (b, e)
    return None, (b, e)


_INT_ONLY = frozenset({int})


def _dims(shape: list[Any]) -> bool:
    """Every dimension an integer (not a bool) in ``[0, 2**64)`` (C-speed passes: no Python loop a dimension)."""
    return _INT_ONLY.issuperset(map(type, shape)) and (not shape or (min(shape) >= 0 and max(shape) <= U64_MAX))


def _inspect_safetensors(path: Path, mode: int | None = None) -> tuple[list[str], set[str]]:
    """``(reasons, tensor names)`` for a safetensors file.

    Checks: header parses; ``__metadata__`` (if any) maps strings to strings; each tensor has a known dtype,
    an integer shape and ``data_offsets`` whose length equals dtype x shape (exact integers, 64-bit like
    safetensors); tensors tile the data region without gaps or overlaps; the data region ends exactly at
    the end of the file (so truncation and trailing bytes are caught without reading any weights).
    """
    try:
        header, start, size, names_ok = _header(path, mode)
    except (OSError, ValueError) as e:
        return [str(e)], set()
    reasons: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(
                    isinstance(v, str) and _utf8(k) and _utf8(v) for k, v in info.items())):
                reasons.append(f"__metadata__ must map strings to strings, got {show(info)}")
            continue
        reason, span = _tensor_reason(name, info, names_ok)
        if reason is not None:
            reasons.append(reason)
        if span is not None:
            spans.append((*span, name))
    spans.sort()
    pos = 0
    for b, end, name in spans:
        if b != pos:
            reasons.append(f"tensor {show(name)}: data starts at {b}, expected {pos} (gap or overlap)")
        pos = max(pos, end)
    data_len = size - start
    if pos > data_len:
        reasons.append(f"truncated: tensors need {pos} data bytes, the file has {data_len}")
    elif pos < data_len:
        reasons.append(f"{data_len - pos} unexpected bytes after the last tensor")
    return reasons, {n for _, _, n in spans}


def _read_index(path: Path, rel: str, what: str) -> tuple[Any, Problem | None]:
    """The parsed JSON document at ``path``, or a Problem (at ``rel``) saying why it cannot be read."""
    try:
        return read_json_file(path, max_bytes=MAX_INDEX_BYTES), None
    except OSError as e:
        return None, Problem(rel, f"malformed {what}: cannot read it: {e.strerror or e}")
    except UntrustedInputError as e:
        return None, Problem(rel, f"malformed {what}: it {e}")


def _check_index(model_dir: Path, rel: str, index: Path, tensors_of: dict[str, set[str] | None],
                 found: dict[str, _Found]) -> list[Problem]:
    doc, bad = _read_index(index, rel, "shard index")
    if bad is not None:
        return [bad]
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        return [Problem(rel, "malformed shard index: 'weight_map' must map tensor names to file names")]
    problems: list[Problem] = []
    prefix = rel.rpartition("/")[0]  # the index's folder, relative to model_dir ("" at the top)
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in wm.items():
        by_shard.setdefault(shard, []).append(tensor)
    for shard, tensors in sorted(by_shard.items()):
        try:
            name = safe_relpath(shard, what="index entry")
            full = f"{prefix}/{name}" if prefix else name
            p, hit = _lookup(model_dir, found, full, "index entry")
        except ModelherdError as e:
            problems.append(Problem(rel, e.message))
            continue
        if hit is None and not _is(p, stat.S_ISREG):
            problems.append(Problem(rel, f"lists shard {show(shard)}, which is missing (or not a regular file)"))
            continue
        names = tensors_of.get(full)
        if names is not None:
            missing = [t for t in tensors if t not in names]
            if missing:
                problems.append(Problem(rel, f"shard {show(shard)} lacks {len(missing)} tensor(s) it should hold, "
                                             f"e.g. {show(missing[0])}"))
    return problems


def _check_diffusers(model_dir: Path, index: Path) -> list[Problem]:
    rel = _rel(model_dir, index)
    doc, bad = _read_index(index, rel, "model_index.json")
    if bad is not None:
        return [bad]
    if not isinstance(doc, dict):
        return [Problem(rel, "malformed model_index.json: not a JSON object")]
    problems: list[Problem] = []
    for comp, spec in doc.items():
        # Components are [library, class]; [null, null] marks a component left out on purpose.
        if comp.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        try:
            p = contained(index.parent, comp, what="diffusers component")
        except ModelherdError as e:
            problems.append(Problem(rel, e.message))
            continue
        if not _is(p, stat.S_ISDIR):
            problems.append(Problem(rel, f"component {show(comp)} ({show(spec[1])}) has no folder"))
    return problems


def _quick(model_dir: Path, *, require_manifest: bool, allow_extra: bool, manifest: Manifest | None = None,
           max_files: int = MAX_FILES, deadline_s: float | None = DEADLINE_S) -> tuple[list[Problem], Manifest | None]:
    """The quick pass and the manifest it used; past its bounds: that one :class:`Problem` and no manifest."""
    budget = _Budget(max_files, deadline_s)
    try:
        return _quick_within(Path(model_dir), budget, require_manifest=require_manifest, allow_extra=allow_extra,
                             manifest=manifest)
    except _OutOfBounds as e:
        return [e.problem], None


def _quick_within(model_dir: Path, budget: _Budget, *, require_manifest: bool, allow_extra: bool,
                  manifest: Manifest | None) -> tuple[list[Problem], Manifest | None]:
    if not _is(model_dir, stat.S_ISDIR):
        return [Problem(".", f"{model_dir} is not a directory")], None
    unreadable: Problem | None = None
    if manifest is None:
        try:
            manifest = read_manifest(model_dir)
        except ModelherdError as e:
            unreadable = Problem(MANIFEST_NAME, e.message)
    found, problems = _walk(model_dir, budget, ignored_names(manifest))
    if unreadable is not None:
        problems.append(unreadable)
    if manifest is not None:
        problems += _check_manifest(model_dir, manifest, found, allow_extra=allow_extra, budget=budget)
    elif require_manifest and not any(p.path == MANIFEST_NAME for p in problems):
        problems.append(Problem(MANIFEST_NAME, "no completion manifest: the folder was never published whole"))

    names = sorted(found)
    tensors_of: dict[str, set[str] | None] = {}
    for rel in names:
        if rel.endswith(".safetensors"):
            budget.check_time()
            reasons, tensors = _inspect_safetensors(found[rel].path, found[rel].st.st_mode)
            problems += [Problem(rel, r) for r in reasons]
            tensors_of[rel] = None if reasons else tensors
    for rel in names:
        if rel.endswith(INDEX_SUFFIX):
            budget.check_time()
            problems += _check_index(model_dir, rel, found[rel].path, tensors_of, found)
        elif rel.rpartition("/")[2] == "model_index.json":
            budget.check_time()
            problems += _check_diffusers(model_dir, found[rel].path)
    return problems, manifest


def verify_quick(model_dir: Path, *, require_manifest: bool = False, allow_extra: bool = False,
                 manifest: Manifest | None = None, max_files: int = MAX_FILES,
                 deadline_s: float | None = DEADLINE_S) -> list[Problem]:
    """Metadata-only checks of ``model_dir``; the empty list means nothing is wrong.

    ``manifest``: the folder's completion manifest when the caller has just read it (it is not read again).

    Bounds: more than ``max_files`` files (the top-level manifest aside) or folders, or ``deadline_s`` seconds
    (``None``: no deadline), stop the pass at once; the result is then that one :class:`Problem` (path ``.``).

    With a manifest: every entry exists with its size, and (unless ``allow_extra``) no other file is there but
    the :func:`ignored_names` (download tools' metadata, the manifest's ``foreign`` entries), never read.
    Always: shard indexes name existing shards holding their tensors, safetensors headers are consistent
    and end exactly at end of file, diffusers components exist, no symlink leaves the folder.
    """
    return _quick(model_dir, require_manifest=require_manifest, allow_extra=allow_extra, manifest=manifest,
                  max_files=max_files, deadline_s=deadline_s)[0]


def _hash_one(model_dir: Path, path: str, algo: str, size: int, want: str,
              throttle: Callable[[int], None] | None = None) -> Problem | None:
    try:
        got = hash_file(str(contained(model_dir, path, what="manifest entry")), [algo], size,
                        throttle=throttle)[algo]
    except (OSError, UnsafePathError) as e:
        return Problem(path, f"cannot hash: {e}")
    if got.lower() != want.lower():
        return Problem(path, f"{algo} mismatch: {got} on disk, {want} in the manifest")
    return None


def verify_deep(model_dir: Path, *, require_manifest: bool = False, allow_extra: bool = False,
                workers: int | None = None, throttle: Callable[[int], None] | None = None,
                max_files: int = MAX_FILES, deadline_s: float | None = DEADLINE_S) -> list[Problem]:
    """:func:`verify_quick` (its bounds, ``deadline_s`` for that quick part alone: hashing is bound by the
    manifest and paced by ``throttle``) plus every manifest checksum recomputed from the bytes on disk.

    Each file is hashed once with its strongest checkable algorithm (``hashing.PREFERENCE``); files are
    hashed in parallel by a thread pool (hashlib releases the GIL). Files whose quick checks already failed
    (missing, wrong size, escaping) are not hashed again. ``throttle(n)`` is called after every read of ``n``
    bytes, from the hashing threads (a shared :class:`~.throttle.RateLimiter` caps the total read rate; an
    exception it raises, e.g. :class:`~.errors.CancelledError`, stops the pass and propagates).
    """
    model_dir = Path(model_dir)
    problems, manifest = _quick(model_dir, require_manifest=require_manifest, allow_extra=allow_extra,
                                max_files=max_files, deadline_s=deadline_s)
    if manifest is None:
        return problems
    return problems + rehash(model_dir, manifest, skip={p.path for p in problems}, workers=workers,
                             throttle=throttle)


def rehash(model_dir: Path, manifest: Manifest, *, skip: Iterable[str] = (),
           workers: int | None = None, throttle: Callable[[int], None] | None = None) -> list[Problem]:
    """Only the checksum half of :func:`verify_deep`: every file of ``manifest`` but ``skip`` re-hashed with its
    strongest checkable algorithm and compared; a mismatch or an unreadable file is a :class:`Problem`."""
    skipped = set(skip)
    jobs = [(f.path, algos[0], f.size, f.checksums[algos[0]])
            for f in manifest.files if f.path not in skipped and (algos := checkable(f.checksums))]
    jobs.sort(key=lambda j: -j[2])  # biggest first: the pool finishes together
    n = workers or min(len(jobs), max(2, os.cpu_count() or 2), 16)
    problems: list[Problem] = []
    if jobs:
        with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="verify") as pool:
            results: Iterable[Problem | None] = pool.map(
                lambda j: _hash_one(model_dir, j[0], j[1], j[2], j[3], throttle), jobs)
            problems += [r for r in results if r is not None]
    return problems


def verify_or_raise(model_dir: Path, deep: bool = False, *, require_manifest: bool = False) -> None:
    """Return quietly if ``model_dir`` checks out; otherwise raise ``VerificationError(problems=[...])``."""
    check = verify_deep if deep else verify_quick
    problems = check(model_dir, require_manifest=require_manifest)
    if problems:
        raise VerificationError(f"{len(problems)} problem(s) in {model_dir}: {problems[0]}",
                                problems=[str(p) for p in problems],
                                hint="delete the model folder and pull again")
