"""A folder on a plain HTTP(S) server (nginx, an object store's website endpoint) as a model source.

The folder ``https://HOST/PATH/`` holds a ``SHA256SUMS`` file in the format ``sha256sum`` writes (``<64 hex
digits><space><space or *><name>`` per line, or the ``--tag`` form ``SHA256 (name) = <hex>``) naming every file of
the model. Listing GETs that file (bounded in size), checks every name, and learns each file's size with a ``HEAD``
(a ranged ``GET`` of one byte when the server refuses ``HEAD`` or answers it without a ``Content-Length``), a few at
a time, so the engine plans with every size known. The engine then fetches each file with ranged ``GET``s and checks
its bytes against the listed sha256. The listing's revision is the sha256 of the ``SHA256SUMS`` file itself: a
folder whose ``SHA256SUMS`` changed is a new revision.

Invariants:
* every listed name passed :func:`~modelherd.storage.paths.safe_relpath` (after leading ``./``, which
  ``sha256sum ./*`` writes, is dropped); no name is listed twice or is both a file and a folder; ``SHA256SUMS``
  itself is never a model file; a missing, empty, oversized or malformed ``SHA256SUMS`` is a typed error naming
  the line and what to fix;
* every URL (the folder's, every redirect hop) goes only where the caller's :class:`~.origins.HostPolicy`
  allows: plain ``http://`` to listed hosts (and loopback for a caller that trusts this machine), a node-local host
  in no scheme for a caller that does not (the agent serving CRs); a redirect elsewhere is refused;
* redirects are followed here (at most :data:`MAX_REDIRECTS`, a loop refused at once), and the token is sent
  only to the folder's origin (scheme, host, port), never to a host a redirect leads to; it never appears in a
  message (:func:`~..credentials.redact`);
* ``open`` yields exactly the bytes ``[start, end)`` or raises a typed ``SourceError``: a server that ignores
  ``Range`` (answers 200) is read from its start and the first ``start`` bytes are skipped; a short body is a
  ``TransientSourceError``, never a silent EOF; urllib3 neither retries nor redirects on its own (the engine's
  ``RetryPolicy`` does, honouring ``Retry-After``, and its back-offs end at once on the ``cancel`` Event).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import quote, urldefrag, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from ..credentials import check_token, redact
from ..errors import (
    AuthError,
    ConfigError,
    MalformedListingError,
    ModelherdError,
    RateLimitedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
    UnsafePathError,
)
from ..paths import safe_relpath
from ..retry import RetryPolicy, call_with_retry, parse_retry_after
from ..types import Listing, RemoteFile
from ..untrusted import show
from ..uri import ModelURI
from .body import ExactBody
from .origins import LOOPBACK_TRUSTED, HostPolicy, origin
from .tls import client_context

log = logging.getLogger(__name__)
T = TypeVar("T")

SUMS_NAME = "SHA256SUMS"
MAX_SUMS_BYTES = 16 * 1024 * 1024  # ~150,000 lines of 100 characters
MAX_FILES = 100_000
MAX_REDIRECTS = 5
SIZE_CONCURRENCY = 16  # HEAD requests in flight while listing
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
_DRAIN_MAX = 64 * 1024  # a body this small is read to reuse its connection rather than dropped
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RE = re.compile(r"^bytes \*/(\d+)$")
_PLAIN_LINE = re.compile(r"^([0-9A-Fa-f]{64}) [ *](.+)$", re.DOTALL)
_TAG_LINE = re.compile(r"^SHA256 \((.+)\) = ([0-9A-Fa-f]{64})$", re.DOTALL)
DEFAULT_RETRY = RetryPolicy()

SUMS_HINT = ("write it with sha256sum in the model folder, e.g. `sha256sum * > SHA256SUMS` "
             "(`find . -type f ! -name SHA256SUMS -exec sha256sum {} + > SHA256SUMS` for subfolders)")
TRANSIENT_HINT = "the server or the network failed; it is retried, check connectivity to the server if it persists"
AUTH_HINT = "the server refused access; give a token that can read this folder, or check the server's permissions"
TOKEN_WHAT = "the HTTP bearer token"


def _unescape(name: str) -> str | None:
    """A name as GNU ``sha256sum`` escapes it (``\\\\`` and ``\\n``); ``None`` if another escape appears."""
    out: list[str] = []
    i = 0
    while i < len(name):
        c = name[i]
        if c == "\\":
            nxt = name[i + 1: i + 2]
            if nxt not in ("\\", "n"):
                return None
            out.append("\\" if nxt == "\\" else "\n")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _entry(line: str) -> tuple[str, str] | None:
    """``(name, hex)`` of one line of ``sha256sum`` output (plain or ``--tag``), ``None`` if it is neither."""
    escaped = line.startswith("\\")
    body = line[1:] if escaped else line
    m = _PLAIN_LINE.match(body)
    if m:
        name, digest = m.group(2), m.group(1)
    else:
        t = _TAG_LINE.match(body)
        if not t:
            return None
        name, digest = t.group(1), t.group(2)
    if escaped:
        unescaped = _unescape(name)
        if unescaped is None:
            return None
        name = unescaped
    return name, digest.lower()


def parse_sha256sums(data: bytes, *, where: str = SUMS_NAME) -> list[tuple[str, str]]:
    """``(safe relative path, lowercase sha256 hex)`` of every file ``data`` (a ``SHA256SUMS`` file) names, in
    its order, ``SHA256SUMS`` itself left out.

    Blank lines are skipped; CRLF line ends are accepted. Raises :class:`MalformedListingError` for a file that is
    empty, too large, not UTF-8, names no file, holds a line that is not ``sha256sum`` output, names a file twice
    (or a file and a folder at once) or more than :data:`MAX_FILES` files; :class:`UnsafePathError` for a name
    that is absolute or leaves the folder. ``where`` (the file's URL) is named in every message.
    """
    if len(data) > MAX_SUMS_BYTES:
        raise MalformedListingError(f"{where} is {len(data)} bytes, more than {MAX_SUMS_BYTES}",
                                    hint="a SHA256SUMS names each file on one line; is this the right file?")
    if not data.strip():
        raise MalformedListingError(f"{where} is empty", hint=SUMS_HINT)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedListingError(f"{where} is not UTF-8 text (byte {exc.start})",
                                    hint="write SHA256SUMS with sha256sum, in UTF-8") from None
    text = text.removeprefix("\ufeff")
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    folders: set[str] = set()
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        got = _entry(line)
        if got is None:
            raise MalformedListingError(
                f"{where} line {number} is not sha256sum output: {show(line)}",
                hint="each line must be <64 hex digits>, two spaces (or a space and '*') and the file name")
        name, digest = got
        while name.startswith("./"):
            name = name[2:]
        try:
            path = safe_relpath(name, what=f"file name on line {number} of {where}")
        except UnsafePathError as exc:
            raise UnsafePathError(exc.message, hint="SHA256SUMS must name files inside its own folder by "
                                                    "relative paths; fix that line on the server") from None
        if path == SUMS_NAME:
            continue  # the listing names itself: never a model file (and it cannot hold its own digest)
        if path in seen:
            raise MalformedListingError(f"{where} names {show(path)} twice (line {number})",
                                        hint="keep one line per file in SHA256SUMS")
        parents = path.split("/")[:-1]
        ancestors = {"/".join(parents[: i + 1]) for i in range(len(parents))}
        if path in folders or ancestors & seen:
            raise MalformedListingError(f"{where} names {show(path)} (line {number}) both as a file and as a "
                                        "folder", hint="a path cannot be a file and a folder; fix SHA256SUMS")
        seen.add(path)
        folders |= ancestors
        entries.append((path, digest))
        if len(entries) > MAX_FILES:
            raise MalformedListingError(f"{where} names more than {MAX_FILES} files",
                                        hint="a model has far fewer files; is this the right folder?")
    if not entries:
        raise MalformedListingError(f"{where} names no file", hint=SUMS_HINT)
    return entries


def _discard(resp: urllib3.BaseHTTPResponse, *, bodiless: bool = False) -> None:
    """Drop a response whose body is not wanted. What is left of a small body (nothing: the answer to a ``HEAD``
    (``bodiless``), a redirect, an error page) is read so that its connection goes back to the pool; a larger
    one is not read (it may be unbounded): its connection is closed."""
    left = getattr(resp, "length_remaining", None)
    if bodiless or (left is not None and left <= _DRAIN_MAX):
        resp.drain_conn()  # closes the connection itself on an error
    else:
        resp.close()
    resp.release_conn()


class HTTPSource:
    """A folder with a ``SHA256SUMS`` on an HTTP(S) server. Thread-safe."""

    def __init__(
        self,
        uri: ModelURI,
        *,
        token: str | None = None,
        hosts: HostPolicy = LOOPBACK_TRUSTED,
        retry: RetryPolicy = DEFAULT_RETRY,
        pool_maxsize: int = 32,
        cancel: threading.Event | None = None,
    ) -> None:
        if uri.scheme not in ("http", "https"):
            raise ValueError(f"HTTPSource needs an http(s):// URI, got {uri.canonical}")
        self.uri = uri.canonical
        self._folder = uri.canonical
        self._origin = origin(self._folder)
        self._hosts = hosts
        self._token = check_token(token, what=TOKEN_WHAT) if token else None
        self._check_scheme(self._folder, "the model URL")
        self._retry = retry
        self._cancel = cancel
        self._headers = {"user-agent": "modelherd", "accept-encoding": "identity"}
        self._pool = urllib3.PoolManager(
            maxsize=pool_maxsize,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            ssl_context=client_context(),  # one CA bundle parse a process
        )

    def __repr__(self) -> str:
        return f"HTTPSource({self.uri!r}, token={'set' if self._token else 'none'})"

    def _check_scheme(self, url: str, what: str) -> None:
        """Refuse a URL that is not http(s), or whose host :class:`HostPolicy` does not allow in its scheme."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise SourceError(f"{what} {show(self._redact(url))} is not an http(s) URL",
                              hint="the server or a proxy redirects to a location that is not http(s)")
        refusal = self._hosts.refusal(scheme, parts.netloc)
        if refusal:
            raise ConfigError(f"{what} {show(self._redact(url))}: {refusal}", hint=self._hosts.hint())

    def _redact(self, text: str) -> str:
        return redact(text, (self._token,) if self._token else ())

    # -- requests ----------------------------------------------------------------------------
    def _request(self, method: str, url: str, headers: dict[str, str], what: str) -> urllib3.BaseHTTPResponse:
        """``method url``, following redirects here: every hop is checked (scheme, plain-http rule), the token
        goes only to the folder's origin, a loop or more than :data:`MAX_REDIRECTS` hops is refused."""
        seen: set[str] = set()
        for _ in range(MAX_REDIRECTS + 1):
            self._check_scheme(url, f"{what}: the URL")
            seen.add(url)
            sent = dict(headers)
            if self._token and origin(url) == self._origin:
                sent["authorization"] = f"Bearer {self._token}"
            try:
                resp = self._pool.urlopen(method, url, headers=sent, preload_content=False, decode_content=False,
                                          redirect=False, retries=False)
            except Exception as exc:
                raise self._mapper(what)(exc) from None
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or not location:
                return resp
            _discard(resp)
            url = urldefrag(urljoin(url, location.strip())).url
            if url in seen:
                raise SourceError(f"{what}: the server redirects in a loop", hint="fix the server's redirects")
        raise SourceError(f"{what}: more than {MAX_REDIRECTS} redirects", hint="fix the server's redirects")

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retry(fn, self._retry, cancel=self._cancel, what=what)

    def _status_error(self, resp: urllib3.BaseHTTPResponse, what: str, not_found_hint: str) -> SourceError:
        status = resp.status
        _discard(resp)
        if status in (401, 403):
            return AuthError(f"{what}: access denied ({status})", hint=AUTH_HINT)
        if status in (404, 410):
            return SourceNotFoundError(f"{what}: not found ({status})", hint=not_found_hint)
        if status in (429, 503):
            return RateLimitedError(f"{what}: rate limited ({status})",
                                    retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                                    hint="the server asked to slow down; it is retried after the wait it asked for")
        if status >= 500 or status == 408:
            return TransientSourceError(f"{what}: server error ({status})", hint=TRANSIENT_HINT)
        return SourceError(f"{what}: unexpected HTTP status {status}", hint="check the URL and the server")

    def _mapper(self, what: str) -> Callable[[Exception], Exception]:
        def mapper(exc: Exception) -> Exception:
            if isinstance(exc, ModelherdError):
                return exc
            if isinstance(exc, urllib3.exceptions.LocationValueError):
                return SourceError(f"{what}: an unusable URL ({self._redact(str(exc))})",
                                   hint="the server or a proxy redirects to a location that is not http(s)")
            if isinstance(exc, (Urllib3HTTPError, OSError)):
                return TransientSourceError(f"{what}: {type(exc).__name__}: {self._redact(str(exc))}",
                                            hint=TRANSIENT_HINT)
            return SourceError(f"{what}: {type(exc).__name__}: {self._redact(str(exc))}")
        return mapper

    # -- listing -----------------------------------------------------------------------------
    def list_files(self) -> Listing:
        """Every file ``SHA256SUMS`` names, with its size and sha256; the revision is the sha256 of
        ``SHA256SUMS``."""
        sums_url = self._folder + SUMS_NAME
        data = self._call(lambda: self._get_sums(sums_url), f"GET {sums_url}")
        entries = parse_sha256sums(data, where=sums_url)
        with ThreadPoolExecutor(max_workers=max(1, min(SIZE_CONCURRENCY, len(entries))),
                                thread_name_prefix="modelherd-head") as pool:
            sizes = list(pool.map(lambda e: self._size(e[0]), entries))
        files = [RemoteFile(path=path, size=size, checksums={"sha256": digest}, locator=self._locator(path))
                 for (path, digest), size in zip(entries, sizes, strict=True)]
        files.sort(key=lambda f: f.path)
        return Listing(uri=self.uri, revision=hashlib.sha256(data).hexdigest(), files=tuple(files))

    def _locator(self, path: str) -> str:
        return self._folder + quote(path, safe="/")

    def _get_sums(self, url: str) -> bytes:
        what = f"GET {url}"
        resp = self._request("GET", url, dict(self._headers), what)
        try:
            if resp.status != 200:
                raise self._status_error(resp, what, f"the folder has no {SUMS_NAME}; {SUMS_HINT}")
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > MAX_SUMS_BYTES:
                raise MalformedListingError(f"{url} is {length} bytes, more than {MAX_SUMS_BYTES}",
                                            hint="a SHA256SUMS names each file on one line; is this the right "
                                                 "file?")
            try:
                data = resp.read(MAX_SUMS_BYTES + 1)
            except Exception as exc:
                raise self._mapper(what)(exc) from None
            if length.isdigit() and len(data) < int(length):
                raise TransientSourceError(f"{what}: body ended {int(length) - len(data)} bytes early",
                                           hint=TRANSIENT_HINT)
            return bytes(data)
        finally:
            _discard(resp)

    def _size(self, path: str) -> int:
        url = self._locator(path)
        return self._call(lambda: self._probe_size(url, path), f"HEAD {url}")

    def _probe_size(self, url: str, path: str) -> int:
        """The size of the file at ``url``: ``HEAD``'s ``Content-Length``, else (no length, or a ``HEAD`` refused
        but not for a missing file or a retryable reason) a one-byte ranged ``GET``'s ``Content-Range`` total (or
        its ``Content-Length`` if the server ignores ``Range``)."""
        missing = f"{SUMS_NAME} names {path!r} but the server has no such file; upload it or fix {SUMS_NAME}"
        what = f"HEAD {url}"
        resp = self._request("HEAD", url, dict(self._headers), what)
        if resp.status == 200:
            length = resp.headers.get("Content-Length", "")
            _discard(resp, bodiless=True)
            if length.isdigit():
                return int(length)
        elif resp.status in (404, 410, 408, 429) or (resp.status >= 500 and resp.status != 501):
            raise self._status_error(resp, what, missing)
        else:  # 405/501, or a URL signed for GET only (a 403 from an object store): the GET below decides
            _discard(resp, bodiless=True)
        what = f"GET {url} [0, 1)"
        resp = self._request("GET", url, {**self._headers, "range": "bytes=0-0"}, what)
        try:
            if resp.status == 206:
                m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
                if m and m.group(3) != "*":
                    return int(m.group(3))
            elif resp.status == 416:
                m = _UNSATISFIED_RE.match(resp.headers.get("Content-Range", "").strip())
                if m:
                    return int(m.group(1))  # an empty file: no byte 0 to send
            elif resp.status == 200:
                length = resp.headers.get("Content-Length", "")
                if length.isdigit():
                    return int(length)
            else:
                raise self._status_error(resp, what, missing)
        finally:
            _discard(resp)
        raise SourceError(f"{url}: the server tells no size (no Content-Length, no Content-Range)",
                          hint="serve the files as static files (nginx, an object store), not as a chunked stream")

    # -- bodies ------------------------------------------------------------------------------
    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> ExactBody:
        """Exactly the bytes ``[start, end)`` of ``file`` (``end=None``: to its end)."""
        stop = file.size if end is None else end
        if start < 0 or stop < start or stop > file.size:
            raise ValueError(f"bad range [{start}, {end}) for {file.path} of {file.size} bytes")
        what = f"GET {file.path} [{start}, {stop})"
        if stop == start:
            return ExactBody(None, 0, what, self._mapper(what), hint=TRANSIENT_HINT)
        headers = dict(self._headers)
        ranged = not (start == 0 and stop == file.size)
        if ranged:
            headers["range"] = f"bytes={start}-{stop - 1}"
        resp = self._request("GET", file.locator, headers, what)
        try:
            return self._checked_body(resp, file, start, stop, ranged, what)
        except BaseException:
            _discard(resp)
            raise

    def _checked_body(self, resp: urllib3.BaseHTTPResponse, file: RemoteFile, start: int, stop: int,
                      ranged: bool, what: str) -> ExactBody:
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if resp.status in (200, 206) and encoding not in ("", "identity"):
            raise SourceError(f"{what}: the server compressed the body (Content-Encoding: {show(encoding)}) "
                              "although asked not to", hint="turn off compression for model files on the server")
        body = ExactBody(resp, stop - start, what, self._mapper(what), hint=TRANSIENT_HINT)
        if resp.status == 206:
            m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != start or int(m.group(2)) != stop - 1 or \
                    (m.group(3) != "*" and int(m.group(3)) != file.size):
                raise TransientSourceError(
                    f"{what}: the server answered Content-Range {show(resp.headers.get('Content-Range'))}",
                    hint="the file changed on the server or a proxy mangled the range")
            return body
        if resp.status == 200:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) != file.size:
                raise SourceError(f"{what}: the server sent {length} bytes, the listing said {file.size}",
                                  hint="the file changed on the server; pull again")
            if ranged and start:
                log.warning("%s: the server ignored Range; skipping %d bytes", what, start)
                body.skip(start)
            return body
        raise self._status_error(resp, what, f"{SUMS_NAME} names {file.path!r} but the server has no such file; "
                                             f"upload it or fix {SUMS_NAME}")

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.clear()
