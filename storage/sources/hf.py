"""The Hugging Face Hub as a model source.

Listing makes the two Hub API calls ``snapshot_download`` makes, through ``huggingface_hub``'s own HTTP
session, auth headers (``build_hf_headers``) and typed errors (``hf_raise_for_status``): resolve the
revision to a commit sha (``GET /api/models/{repo}/revision/{rev}``, what ``HfApi.model_info`` sends), then
list the tree of that exact commit (``GET /api/models/{repo}/tree/{sha}?recursive=true``, following the
``Link: rel="next"`` pages, what ``HfApi.list_repo_tree`` sends). Only the two JSON fields we need are read
(``sha``; each file's ``path``/``size``/``oid``/``lfs``), so the 10,000-line ``huggingface_hub.hf_api`` module
is never imported: that is about a tenth of a second of every ``modelherd pull``'s start-up. Bodies are
fetched with ranged GETs through one shared ``urllib3.PoolManager`` from the resolve URL of that commit
(``hf_hub_url``), following the Hub's redirect to its CDN. The engine owns retries (each listing request runs
inside our ``RetryPolicy``, its back-offs end at once on the source's ``cancel`` Event); neither HTTP client
retries on its own.

Invariants:
* every listed name passed :func:`~modelherd.storage.paths.safe_relpath`; the listing names one commit;
* ``open`` yields exactly the bytes ``[start, end)`` or raises a typed ``SourceError``; a short body is
  a ``TransientSourceError``, never a silent EOF;
* the token is sent only to the endpoint's origin (scheme, host, port): a tree ``Link`` to another origin is
  followed without it, and both HTTP clients drop ``Authorization`` on a cross-origin redirect; it never
  appears in a message, log line or repr: it is checked at construction (:func:`~..credentials.check_token`: one
  header-safe line, else a ``ConfigError`` that does not quote it), every message built from an exception goes
  through :func:`~..credentials.redact`, and the text of an error raised while headers are checked or encoded
  (which may quote a header value) is never used;
* tree pages are parsed while they stream in (``ijson``) and filtered by the patterns entry by entry, so a
  listing holds only the files it keeps, however many entries the Hub sends; no page URL is fetched twice
  (a ``Link`` loop is refused at once);
* a redirect or ``Link`` to a non-HTTP URL (``file://``, ``ftp://``) is a ``SourceError`` at once, never retried.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar
from urllib.parse import quote, urldefrag, urljoin, urlsplit

import httpx2
import ijson
import urllib3
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import hf_hub_url
from huggingface_hub.utils import (  # type: ignore[attr-defined]  # filter_repo_objects is not in __all__
    build_hf_headers,
    filter_repo_objects,
    get_session,
    hf_raise_for_status,
)
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from ..credentials import check_token, redact
from ..errors import (
    AuthError,
    ConfigError,
    ModelherdError,
    RateLimitedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)
from ..paths import safe_relpath
from ..retry import RetryPolicy, call_with_retry, parse_retry_after
from ..types import Listing, RemoteFile, Selection
from ..uri import ModelURI
from .body import ExactBody
from .origins import origin
from .tls import client_context

log = logging.getLogger(__name__)
T = TypeVar("T")

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
API_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
MAX_TREE_PAGES = 10_000  # 10 million entries at the Hub's 1000 per page; a Link that never repeats ends here
DEFAULT_RETRY = RetryPolicy()

AUTH_HINT = ("set HF_TOKEN to a token that can read this repository; for a gated model, accept its licence "
             "on the model page with that account first")
NOT_FOUND_HINT = "check the repository id and revision (hf://ORG/MODEL[@REVISION])"
TRANSIENT_HINT = "the Hub or the network failed; it is retried, check connectivity to the endpoint if it persists"
TOKEN_WHAT = "the Hugging Face token (HF_TOKEN, the model's Secret or parameters.token)"
HEADER_MESSAGE = "the request could not be sent: a header value is invalid (check the token)"
HEADER_HINT = "the Hugging Face token must be one line like hf_..., without spaces or line breaks"
_HEADER_ERROR_NAMES = frozenset({"LocalProtocolError", "InvalidHeader"})


def _user_agent() -> str:
    try:
        return f"modelherd/{version('modelherd')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "modelherd/0"


def _field(entry: dict[str, Any], key: str, kind: type[T]) -> T:
    """``entry[key]`` when it is a ``kind`` (never a bool for int), else a clear error."""
    value = entry.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SourceError(f"the Hub's tree entry {entry.get('path')!r} has no valid {key!r}",
                          hint="the endpoint does not answer like the Hub API")
    return value


def _header_error(exc: BaseException) -> bool:
    """``exc`` (or an error it wraps) was raised while request headers were checked or encoded: h11/httpcore/httpx
    ``LocalProtocolError``, urllib3/requests ``InvalidHeader``, ``http.client``'s ``ValueError("Invalid header
    value b'...'")``, a ``UnicodeEncodeError``. Their text may quote a header value (the token), so it is never
    used in a message."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, UnicodeEncodeError) or any(t.__name__ in _HEADER_ERROR_NAMES for t in type(cur).__mro__):
            return True
        if type(cur) is ValueError and "header" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _header_failure(what: str) -> ConfigError:
    return ConfigError(f"{what}: {HEADER_MESSAGE}", hint=HEADER_HINT)


class HFSource:
    """A Hugging Face Hub repository at one revision. Thread-safe."""

    def __init__(
        self,
        uri: ModelURI,
        *,
        token: str | None = None,
        endpoint: str = "https://huggingface.co",
        allow_patterns: Sequence[str] | None = None,
        ignore_patterns: Sequence[str] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        pool_maxsize: int = 32,
        cancel: threading.Event | None = None,
    ) -> None:
        if uri.scheme != "hf":
            raise ValueError(f"HFSource needs an hf:// URI, got {uri.canonical}")
        self.uri = uri.canonical
        self._model_uri = uri
        self._token = check_token(token, what=TOKEN_WHAT) if token else None
        self._endpoint = endpoint.rstrip("/")
        self._endpoint_origin = origin(self._endpoint)
        self._cancel = cancel
        self._allow = list(allow_patterns) if allow_patterns is not None else None
        self._ignore = list(ignore_patterns) if ignore_patterns is not None else None
        self._retry = retry
        ua = _user_agent()
        self._headers = {"user-agent": ua}
        # token=False: never fall back to a token saved on disk or in the environment.
        self._api_headers = build_hf_headers(token=self._token if self._token else False,
                                             library_name="modelherd", library_version=ua.partition("/")[2])
        self._anon_api_headers = {k: v for k, v in self._api_headers.items() if k.lower() != "authorization"}
        tls: dict[str, Any] = {}
        if self._endpoint.startswith("https:"):
            # one TLS context (CA bundle parsed once) for every connection, not one per connection
            tls["ssl_context"] = client_context()
        self._pool = urllib3.PoolManager(
            maxsize=pool_maxsize,
            block=False,
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS,
                                  raise_on_redirect=True, raise_on_status=False),
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            **tls,
        )

    def __repr__(self) -> str:
        return f"HFSource({self.uri!r}, endpoint={self._endpoint!r}, token={'set' if self._token else 'none'})"

    # -- listing -----------------------------------------------------------------------------
    def list_files(self) -> Listing:
        """The files of the commit the revision names now, filtered by the patterns, with checksums.

        Each API request is retried on its own (a 429 on page 900 does not list pages 1-899 again); every
        back-off ends at once when the source's ``cancel`` Event is set.
        """
        repo_id = self._model_uri.repo_id
        revision = self._model_uri.revision or "main"
        what = f"listing {self.uri}"
        commit = revision if _COMMIT_RE.match(revision) else self._call(lambda: self._resolve(repo_id, revision), what)
        first = f"{self._endpoint}/api/models/{repo_id}/tree/{commit}?recursive=true&expand=false"
        kept = self._tree(first, repo_id, commit)
        kept.sort(key=lambda f: f.path)
        return Listing(uri=self.uri, revision=commit, files=tuple(kept),
                       selection=Selection.of(self._allow, self._ignore))

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn`` under our retry policy; its exceptions as typed errors."""
        def once() -> T:
            try:
                return fn()
            except Exception as exc:
                raise self._map_hf(exc, what) from None

        return call_with_retry(once, self._retry, cancel=self._cancel, what=what)

    def _resolve(self, repo_id: str, revision: str) -> str:
        url = f"{self._endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}"
        r = get_session().get(url, headers=self._api_headers, timeout=API_TIMEOUT_S)
        hf_raise_for_status(r)
        body = r.json()
        sha = body.get("sha") if isinstance(body, dict) else None
        if not isinstance(sha, str) or not _COMMIT_RE.match(sha):
            raise SourceError(f"the Hub did not resolve {self.uri} to a commit",
                              hint="retry later or pin a commit sha: hf://ORG/MODEL@SHA")
        return sha

    def _tree(self, url: str, repo_id: str, commit: str) -> list[RemoteFile]:
        """The wanted files of a recursive tree listing, following ``Link: rel="next"`` pages.

        Invariants: no page URL is requested twice (a ``Link`` back to a page already read is a loop, refused at
        once); a ``Link`` to another origin (scheme, host, port) than the endpoint gets no token; a ``Link`` to a
        non-HTTP scheme is refused; only the entries the patterns keep are ever held.
        """
        kept: list[RemoteFile] = []
        seen: set[str] = set()
        for _ in range(MAX_TREE_PAGES):
            seen.add(url)
            page, link = self._call(functools.partial(self._tree_page, url, repo_id, commit),
                                    f"listing {self.uri}")
            kept.extend(page)
            del page
            if not link:
                return kept
            nxt = urldefrag(urljoin(url, link)).url  # the next link holds its own query
            if urlsplit(nxt).scheme.lower() not in ("http", "https"):
                raise SourceError(f"listing {self.uri}: the next tree page is at a non-HTTP URL "
                                  f"({urlsplit(nxt).scheme}:)", hint="the endpoint does not answer like the Hub API")
            if nxt in seen:
                raise SourceError(f"listing {self.uri}: the tree pagination loops back to a page already read "
                                  f"(after {len(seen)} pages)", hint="the endpoint paginates in a loop")
            url = nxt
        raise SourceError(f"listing {self.uri}: more than {MAX_TREE_PAGES} tree pages",
                          hint="the endpoint paginates without end")

    def _tree_page(self, url: str, repo_id: str, commit: str) -> tuple[list[RemoteFile], str | None]:
        """One tree page, parsed while it streams in: the files the patterns keep, and the next page's link.

        Memory: the parser holds one entry at a time; entries the patterns drop are gone as soon as they are read.
        """
        headers = self._api_headers if origin(url) == self._endpoint_origin else self._anon_api_headers
        with get_session().stream("GET", url, headers=headers, timeout=API_TIMEOUT_S) as r:
            if r.status_code >= 300:
                r.read()
                hf_raise_for_status(r)
                raise SourceError(f"listing {self.uri}: unexpected HTTP status {r.status_code}")
            link: str | None = r.links.get("next", {}).get("url")
            files = self._page_files(r.iter_bytes(), repo_id, commit)
            wanted = filter_repo_objects(files, allow_patterns=self._allow, ignore_patterns=self._ignore,
                                         key=lambda fe: fe[0])
            return [self._remote_file(path, entry, repo_id, commit) for path, entry in wanted], link

    def _page_files(self, chunks: Iterator[bytes], repo_id: str,
                    commit: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(safe path, entry)`` of each file entry of one JSON array of tree entries, as the bytes arrive."""
        entries = ijson.sendable_list()
        parser = ijson.items_coro(entries, "item", use_float=True)
        started = False
        try:
            for chunk in chunks:
                if not started:
                    head = chunk.lstrip()
                    if not head:
                        continue
                    if not head.startswith(b"["):
                        raise self._not_entries()
                    started = True
                parser.send(chunk)
                yield from self._files_of(entries)
            parser.close()
        except ijson.IncompleteJSONError:
            raise TransientSourceError(f"listing {self.uri}: a tree page ended early", hint=TRANSIENT_HINT) from None
        except ijson.JSONError:
            raise SourceError(f"listing {self.uri}: a tree page is not valid JSON",
                              hint="the endpoint does not answer like the Hub API") from None
        if not started:
            raise self._not_entries()
        yield from self._files_of(entries)

    def _files_of(self, entries: list[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Drain ``entries`` (parsed so far), yielding the file entries with their checked paths."""
        batch = entries[:]
        del entries[:]
        for entry in batch:
            if not isinstance(entry, dict):
                raise self._not_entries()
            if entry.get("type") != "file":
                continue  # directories: their files are listed too (recursive)
            yield safe_relpath(_field(entry, "path", str), what="Hub tree path"), entry

    def _not_entries(self) -> SourceError:
        return SourceError(f"listing {self.uri}: the tree page is not a list of entries",
                           hint="the endpoint does not answer like the Hub API")

    def _remote_file(self, path: str, entry: dict[str, Any], repo_id: str, commit: str) -> RemoteFile:
        lfs = entry.get("lfs")
        if lfs is not None:
            if not isinstance(lfs, dict):
                raise SourceError(f"listing {self.uri}: malformed lfs entry for {path!r}",
                                  hint="the endpoint does not answer like the Hub API")
            checksums = {"sha256": _field(lfs, "oid", str)}
            size = _field(lfs, "size", int)
        else:
            checksums = {"git-sha1": _field(entry, "oid", str)}
            size = _field(entry, "size", int)
        locator = hf_hub_url(repo_id, path, revision=commit, endpoint=self._endpoint)
        return RemoteFile(path=path, size=size, checksums=checksums, locator=locator)

    def _map_hf(self, exc: Exception, what: str) -> Exception:
        """A ``huggingface_hub``/httpx error as a typed error; the message never holds the token."""
        if isinstance(exc, ModelherdError):
            return exc
        if _header_error(exc):
            return _header_failure(what)
        detail = self._redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            if isinstance(exc, GatedRepoError) or status in (401, 403):
                return AuthError(f"{what}: access denied ({status}); the repository is private, gated or "
                                 "does not exist", hint=AUTH_HINT)
            if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)) \
                    or status == 404:
                return SourceNotFoundError(f"{what}: not found ({detail})", hint=NOT_FOUND_HINT)
            return self._map_status(status, exc.response.headers.get("Retry-After") if exc.response else None,
                                    what)
        if isinstance(exc, httpx2.UnsupportedProtocol):
            return SourceError(f"{what}: redirected to a non-HTTP URL ({detail})",
                               hint="the endpoint or a proxy redirects to a location that is not http(s)")
        if isinstance(exc, OfflineModeIsEnabled):
            return SourceError(f"{what}: huggingface_hub offline mode is on", hint="unset HF_HUB_OFFLINE")
        if isinstance(exc, (httpx2.TransportError, OSError)):
            return TransientSourceError(f"{what}: {type(exc).__name__}: {detail}", hint=TRANSIENT_HINT)
        return SourceError(f"{what}: {type(exc).__name__}: {detail}")

    @staticmethod
    def _map_status(status: int, retry_after: str | None, what: str) -> SourceError:
        if status in (401, 403):
            return AuthError(f"{what}: access denied ({status})", hint=AUTH_HINT)
        if status == 404:
            return SourceNotFoundError(f"{what}: not found (404)", hint=NOT_FOUND_HINT)
        if status in (429, 503):
            after = parse_retry_after(retry_after)
            return RateLimitedError(f"{what}: rate limited ({status})", retry_after=after,
                                    hint="the Hub asked to slow down; a token raises the rate limit")
        if status >= 500 or status in (408,):
            return TransientSourceError(f"{what}: server error ({status})", hint=TRANSIENT_HINT)
        return SourceError(f"{what}: unexpected HTTP status {status}")

    def _redact(self, text: str) -> str:
        return redact(text, (self._token,) if self._token else ())

    # -- bodies ------------------------------------------------------------------------------
    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> ExactBody:
        """Exactly the bytes ``[start, end)`` of ``file`` (``end=None``: to its end)."""
        stop = file.size if end is None else end
        if start < 0 or stop < start or stop > file.size:
            raise ValueError(f"bad range [{start}, {end}) for {file.path} of {file.size} bytes")
        what = f"GET {file.path} [{start}, {stop})"
        headers = dict(self._headers)
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        ranged = not (start == 0 and stop == file.size)
        if ranged:
            headers["range"] = f"bytes={start}-{stop - 1}"
        if stop == start:
            return ExactBody(None, 0, what, self._urllib3_mapper(what), hint=TRANSIENT_HINT)
        try:
            resp = self._pool.urlopen("GET", file.locator, headers=headers, preload_content=False,
                                      decode_content=False, redirect=True)
        except Exception as exc:
            raise self._urllib3_mapper(what)(exc) from None
        try:
            return self._checked_body(resp, file, start, stop, ranged, what)
        except BaseException:
            resp.close()
            resp.release_conn()
            raise

    def _checked_body(self, resp: urllib3.BaseHTTPResponse, file: RemoteFile, start: int, stop: int,
                      ranged: bool, what: str) -> ExactBody:
        body = ExactBody(resp, stop - start, what, self._urllib3_mapper(what), hint=TRANSIENT_HINT)
        if resp.status == 206:
            m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != start or int(m.group(2)) != stop - 1 or \
                    (m.group(3) != "*" and int(m.group(3)) != file.size):
                raise TransientSourceError(
                    f"{what}: the server answered Content-Range {resp.headers.get('Content-Range')!r}",
                    hint="the file changed on the origin or a proxy mangled the range")
            return body
        if resp.status == 200:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != file.size:
                raise SourceError(f"{what}: the server sent {length} bytes, the listing said {file.size}",
                                  hint="the file changed on the origin; list again")
            if ranged and start:
                log.warning("%s: the server ignored Range; skipping %d bytes", what, start)
                body.skip(start)
            return body
        drained = resp.headers.get("Retry-After")
        raise self._map_status(resp.status, drained, what)

    def _urllib3_mapper(self, what: str) -> Callable[[Exception], Exception]:
        def mapper(exc: Exception) -> Exception:
            if isinstance(exc, ModelherdError):
                return exc
            if isinstance(exc, urllib3.exceptions.LocationValueError):
                # a redirect to file://, ftp://, a URL without a host...: no retry can make that work
                return SourceError(f"{what}: redirected to an unusable URL ({self._redact(str(exc))})",
                                   hint="the origin or a proxy redirects to a location that is not http(s)")
            if isinstance(exc, urllib3.exceptions.MaxRetryError) and \
                    isinstance(exc.reason, urllib3.exceptions.ResponseError):
                return SourceError(f"{what}: too many redirects", hint="the endpoint redirects in a loop")
            if _header_error(exc):
                return _header_failure(what)
            if isinstance(exc, (Urllib3HTTPError, OSError)):
                # urllib3 messages hold URLs and reasons, never request headers.
                return TransientSourceError(f"{what}: {type(exc).__name__}: {self._redact(str(exc))}",
                                            hint=TRANSIENT_HINT)
            return SourceError(f"{what}: {type(exc).__name__}: {self._redact(str(exc))}")
        return mapper

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.clear()

