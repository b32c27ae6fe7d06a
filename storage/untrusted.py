"""Reading bytes nobody vouches for: JSON documents and files named like model files.

Invariants:

- :func:`load_json` returns a parsed document or raises :class:`UntrustedInputError` (a ``ValueError``) —
  never ``RecursionError``, ``OverflowError`` or Python's integer-digit-limit ``ValueError`` with a
  traceback's worth of context. Documents are bounded in size (the caller's limit), nesting depth
  (:data:`MAX_DEPTH`, checked by a linear scan *before* the recursive parser runs, so the parser's C stack
  stays shallow whatever the interpreter's recursion limit), and integer length (:data:`MAX_INT_DIGITS`:
  no JSON number we read is meant to exceed 64 bits, and Python's int parsing is quadratic in digits).
  ``NaN``/``Infinity`` (not JSON) are refused; bytes must be UTF-8.
- :func:`open_regular` never opens anything but a regular file: a FIFO, socket or device is refused from a
  ``stat`` (nothing is opened, so a FIFO cannot block and a device's open has no side effects), and the
  descriptor is opened non-blocking and checked again with ``fstat``, so a file swapped for a FIFO between
  the two steps cannot block either.
"""

from __future__ import annotations

import fcntl
import json
import os
import reprlib
import stat
from typing import Any, BinaryIO

# Deeper than any document we read (safetensors headers: 3, manifests: 4) and than serde_json's own limit
# (128), which is what safetensors parses headers with; shallow enough for any C stack.
MAX_DEPTH = 128
# 2**64 has 20 digits; a sign and some slack. Longer integers are refused before Python converts them.
MAX_INT_DIGITS = 32

# Bytes that are not brackets or quotes: deleted before the nesting scan (UTF-8 continuation bytes are all
# >= 0x80, so these ASCII bytes mean the same in any valid document).
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')
_SQUARE = bytes.maketrans(b"{}", b"[]")

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = 8
_REPR.maxdict = 4
_REPR.maxlevel = 3
_REPR.maxlong = 40


class UntrustedInputError(ValueError):
    """Untrusted bytes we refuse to interpret; the message is one printable line saying why."""


class NotRegularFileError(UntrustedInputError):
    """A FIFO, socket, device or directory stands where a regular file was expected; it was not read."""


def show(value: object) -> str:
    """A bounded, quoted ``repr`` of an untrusted value, for messages: at most a few dozen characters per
    string, a handful of items per container, three levels deep; control characters escaped."""
    return _REPR.repr(value)


def file_kind(mode: int) -> str:
    """What ``st_mode`` names, in words (``regular file``, ``named pipe (FIFO)``, ``socket``...)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special file"


def _not_regular(mode: int) -> NotRegularFileError:
    return NotRegularFileError(f"is a {file_kind(mode)}, not a regular file (not opened)")


def open_regular_fd(path: str | os.PathLike[str], *, mode: int | None = None) -> tuple[int, os.stat_result]:
    """:func:`open_regular` without the file object: a blocking read-only descriptor of the regular file ``path``
    and its ``fstat``, for callers that read a few bytes with ``os.pread`` (the caller closes it). Same refusals."""
    if mode is None:
        mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped after the stat: refuse before any read
            raise _not_regular(st.st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, 0)  # blocking reads again (O_RDONLY was opened with no other status flag)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | os.PathLike[str], *, mode: int | None = None, buffering: int = -1) -> BinaryIO:
    """Open ``path`` (symlinks followed) for binary reading, only if it is a regular file.

    Raises ``OSError`` (e.g. ``FileNotFoundError``) from the stat or open, or :class:`NotRegularFileError`.
    Never blocks on a FIFO and never opens a FIFO, socket or device that was in place at the stat. ``mode``: the
    ``st_mode`` of a ``stat`` the caller has just taken (spares taking it again).
    """
    fd, _ = open_regular_fd(path, mode=mode)
    try:
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """The whole content of the regular file ``path``, refused (:class:`UntrustedInputError`) beyond
    ``max_bytes`` without reading it. ``OSError`` as :func:`open_regular`."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UntrustedInputError(f"is {size} bytes, more than the {max_bytes} allowed")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise UntrustedInputError(f"is more than the {max_bytes} bytes allowed")
    return data


def _nesting_error(raw: bytes) -> str | None:
    """Why ``raw`` is nested too deeply to parse safely, or ``None``. Linear C-speed passes, no recursion:
    escaped backslashes and quotes go, then everything but brackets and quotes, then what was inside
    strings; every bracket becomes ``[``/``]``, and each pass peels exactly one level off every innermost
    pair. Exact for any valid document and for the valid prefix of an invalid one (the parser stops at its
    first error), which is all the parser's recursion ever sees."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return None
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(raw.translate(None, _NOT_STRUCTURE).split(b'"')[0::2]).translate(_SQUARE)
    for _ in range(MAX_DEPTH):
        peeled = brackets.replace(b"[]", b"")
        if not peeled:
            return None
        if len(peeled) == len(brackets):
            return "brackets do not balance"
        brackets = peeled
    return f"nested more than {MAX_DEPTH} levels deep"


# every digit as b"0", everything else as b" ": a run of more than MAX_INT_DIGITS digits is then a plain substring
_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_DIGIT_RUN = b"0" * (MAX_INT_DIGITS + 1)


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_INT_DIGITS:
        raise UntrustedInputError(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS} are read)")
    return int(digits)


def _no_constant(name: str) -> Any:
    raise UntrustedInputError(f"{name} is not JSON")


# Built once: ``json.loads`` with any keyword builds a decoder (and its scanner) a call, which costs more than
# parsing a safetensors header.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_BOUNDED_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_no_constant)


def load_json(raw: bytes | str, *, max_bytes: int) -> Any:
    """Parse untrusted JSON, or raise :class:`UntrustedInputError`.

    Error messages are predicates to put after the document's name: ``"is not JSON: ..."``.
    """
    if len(raw) > max_bytes:
        raise UntrustedInputError(f"is {len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        if isinstance(raw, bytes):
            text = raw.decode("utf-8")
        else:
            text, raw = raw, raw.encode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise UntrustedInputError(f"is not JSON: invalid UTF-8 at byte {e.start}") from None
    why = _nesting_error(raw)
    if why is not None:
        raise UntrustedInputError(f"is not JSON we read: {why}")
    try:
        if text.startswith("\ufeff"):
            return json.loads(text)  # json's own error for a byte order mark
        if _DIGIT_RUN not in raw.translate(_DIGITS_TO_ZERO):  # no integer can be too long: no hook for ints
            return _DECODER.decode(text)
        return _BOUNDED_DECODER.decode(text)
    except UntrustedInputError as e:
        raise UntrustedInputError(f"is not JSON we read: {e}") from None
    except json.JSONDecodeError as e:
        raise UntrustedInputError(f"is not JSON: {e.msg} at byte {e.pos}") from None
    except (ValueError, RecursionError, OverflowError, MemoryError) as e:
        raise UntrustedInputError(f"is not JSON we read: {type(e).__name__}") from None


def read_json_file(path: str | os.PathLike[str], *, max_bytes: int) -> Any:
    """:func:`read_limited` + :func:`load_json`. ``OSError`` for a missing or unreadable file."""
    return load_json(read_limited(path, max_bytes=max_bytes), max_bytes=max_bytes)
