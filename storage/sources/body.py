"""Reading HTTP bodies straight into the engine's buffer.

urllib3's ``HTTPResponse.readinto`` reads a fresh ``bytes`` object and copies it into the caller's buffer, one
allocation and one extra copy per chunk. :func:`readinto_direct` reads through the ``http.client`` response
underneath instead, into the caller's buffer, whenever that yields exactly the same bytes: the body is not
being decoded by urllib3 (sources ask for raw bodies) and urllib3 has buffered nothing of it yet.

A read fills the whole buffer (4 MiB: one write, one hash update) when the bytes come fast, but returns what it has
once :data:`FILL_WAIT_S` has passed, cut at a page boundary (:data:`PAGE`), so on a slow origin (50 KB/s per
connection) the engine writes, hashes and reports progress about once a second instead of once per 4 MiB (80 s),
and a direct-I/O writer keeps its alignment.

:class:`ExactBody` is the byte stream every HTTP source hands the engine: exactly the bytes asked for, a short body
a :class:`~..errors.TransientSourceError` (the engine resumes from what it has), and the connection kept alive
only when its body was read to the end.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from typing import Any

from ..errors import TransientSourceError

_SKIP_CHUNK = 1024 * 1024


def raw_fp(resp: Any) -> Any:
    """The ``http.client`` response under a urllib3 response while it still has bytes to give, else ``None``."""
    fp = getattr(resp, "_fp", None)
    return fp if fp is not None and getattr(fp, "fp", None) is not None else None


FILL_WAIT_S = 1.0  # a read returns what it has after this long (whole pages): progress moves on a slow origin
PAGE = 4096


def readinto_direct(resp: Any, buf: memoryview, *, wait_s: float = FILL_WAIT_S) -> int:
    """Fill ``buf`` from the body of urllib3 response ``resp``, or, after ``wait_s``, as much of it as ends on a
    :data:`PAGE` boundary; 0 at its end. Same bytes as ``resp.readinto``."""
    fp = raw_fp(resp)
    if fp is None or getattr(resp, "_decoded_buffer", None) or getattr(resp, "_decoder", None):
        return int(resp.readinto(buf))
    if not isinstance(fp, http.client.HTTPResponse) or fp.chunked or not hasattr(fp.fp, "readinto1"):
        return int(fp.readinto(buf))
    start = time.monotonic()
    n = 0
    size = len(buf)
    while n < size:
        late = time.monotonic() - start >= wait_s
        if late and n and n % PAGE == 0:
            break
        end = min(size, n + PAGE - n % PAGE) if late else size
        got = _readinto1(fp, buf[n:end])
        if not got:
            break
        n += got
    return n


def _readinto1(fp: http.client.HTTPResponse, b: memoryview) -> int:
    """``fp.readinto(b)`` with at most one system call (what ``read1`` is to ``read``): the same bookkeeping of the
    body's length and of the connection's end as ``http.client`` keeps, into ``b`` without a copy."""
    if fp.length is not None and len(b) > fp.length:
        b = b[: fp.length]
    n = int(fp.fp.readinto1(b))
    if not n and b:
        _close_conn(fp)  # what HTTPResponse.readinto does at the body's end
    elif fp.length is not None:
        fp.length -= n
        if not fp.length:
            _close_conn(fp)
    return n


def fully_read(resp: Any) -> bool:
    """``resp``'s body was read to its end (through either path), so its connection can be kept alive."""
    return getattr(resp, "length_remaining", None) == 0 or (getattr(resp, "_fp", None) is not None
                                                            and raw_fp(resp) is None)


class ExactBody:
    """A body of exactly ``length`` bytes (``None``: until the server's end); a short one raises
    :class:`TransientSourceError` with the source's ``hint``. ``mapper`` turns a transport exception into the
    source's typed error."""

    def __init__(self, resp: Any, length: int | None, what: str, mapper: Callable[[Exception], Exception], *,
                 hint: str) -> None:
        self._resp = resp
        self._left = length
        self._what = what
        self._map = mapper
        self._hint = hint

    def readinto(self, buf: memoryview) -> int:
        if self._left is not None:
            if self._left <= 0:
                return 0
            if len(buf) > self._left:
                buf = buf[: self._left]
        if self._resp is None:
            return 0
        try:
            n = readinto_direct(self._resp, buf)
        except Exception as exc:
            raise self._map(exc) from None
        if n == 0 and self._left not in (None, 0):
            raise TransientSourceError(f"{self._what}: body ended {self._left} bytes early", hint=self._hint)
        if self._left is not None:
            self._left -= n
        return n

    def skip(self, n: int) -> None:
        """Discard ``n`` bytes (a server that ignored ``Range``)."""
        scratch = memoryview(bytearray(min(_SKIP_CHUNK, max(1, n))))
        saved, self._left = self._left, n
        try:
            while self._left:
                self.readinto(scratch)
        finally:
            self._left = saved

    def close(self) -> None:
        """Give the connection back for keep-alive when its body was read to the end, else drop it."""
        resp, self._resp = self._resp, None
        if resp is None:
            return
        if self._left in (None, 0) and fully_read(resp):
            resp.release_conn()
        else:
            resp.close()
            resp.release_conn()


def _close_conn(fp: http.client.HTTPResponse) -> None:
    close: Callable[[], None] = getattr(fp, "_close_conn")  # noqa: B009 - private to http.client, stable since 3.0
    close()
