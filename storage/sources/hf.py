"""The Hugging Face Hub as a model source.

Listing makes the two Hub API calls ``snapshot_download`` makes, through ``huggingface_hub``'s own HTTP
session, auth headers (``build_hf_headers``) and typed errors (``hf_raise_for_status``): resolve the
revision to a commit sha (``GET /api/models/{repo}/revision/{rev}``, what ``HfApi.model_info`` sends), then
list the tree of that exact commit (``GET /api/models/{repo}/tree/{sha}?recursive=true``, following the
``Link: rel="next"`` pages, what ``HfApi.list_repo_tree`` sends). Only the two JSON fields we need are read
(``sha``; each file's ``path``/``size``/``oid``/``lfs``), so the 10,000-line ``huggingface_hub.hf_api`` module
is never imported: that is about a tenth of a second of every ``modelherd pull``'s start-up. Bodies are
fetched with ranged GETs through one shared ``urllib3.PoolManager`` from the resolve URL of that commit
(``hf_hub_url``), following the Hub's redirect to its CDN. The engine owns retries (the listing runs inside
our ``RetryPolicy``); neither HTTP client retries on its own.

Invariants:
* every listed name passed :func:`~modelherd.storage.paths.safe_relpath`; the listing names one commit;
* ``open`` yields exactly the bytes ``[start, end)`` or raises a typed ``SourceError``; a short body is
  a ``TransientSourceError``, never a silent EOF;
* the token is sent only to the endpoint host (urllib3 drops ``Authorization`` on a cross-host
  redirect) and never appears in a message, log line or repr.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

import httpx2
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

from ..errors import (
    AuthError,
    RateLimitedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)
from ..paths import safe_relpath
from ..retry import RetryPolicy, call_with_retry, parse_retry_after
from ..types import Listing, RemoteFile, Selection
from ..uri import ModelURI
from .body import fully_read, readinto_direct

log = logging.getLogger(__name__)
T = TypeVar("T")

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
API_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
MAX_TREE_PAGES = 10_000  # 10 million entries at the Hub's 1000 per page; a Link loop ends here
_SKIP_CHUNK = 1024 * 1024
DEFAULT_RETRY = RetryPolicy()

AUTH_HINT = ("set HF_TOKEN to a token that can read this repository; for a gated model, accept its licence "
             "on the model page with that account first")
NOT_FOUND_HINT = "check the repository id and revision (hf://ORG/MODEL[@REVISION])"
TRANSIENT_HINT = "the Hub or the network failed; it is retried, check connectivity to the endpoint if it persists"


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


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


class _HFBody:
    """A body of exactly ``length`` bytes (``None``: until the server's end); short bodies raise."""

    def __init__(self, resp: urllib3.BaseHTTPResponse | None, length: int | None, what: str,
                 mapper: Callable[[Exception], Exception]) -> None:
        self._resp = resp
        self._left = length
        self._what = what
        self._map = mapper

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
            raise TransientSourceError(f"{self._what}: body ended {self._left} bytes early", hint=TRANSIENT_HINT)
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
        if fully_read(resp):
            resp.release_conn()
        else:
            resp.close()
            resp.release_conn()


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
    ) -> None:
        if uri.scheme != "hf":
            raise ValueError(f"HFSource needs an hf:// URI, got {uri.canonical}")
        self.uri = uri.canonical
        self._model_uri = uri
        self._token = token or None
        self._endpoint = endpoint.rstrip("/")
        self._endpoint_netloc = urlsplit(self._endpoint).netloc
        self._allow = list(allow_patterns) if allow_patterns is not None else None
        self._ignore = list(ignore_patterns) if ignore_patterns is not None else None
        self._retry = retry
        ua = _user_agent()
        self._headers = {"user-agent": ua}
        # token=False: never fall back to a token saved on disk or in the environment.
        self._api_headers = build_hf_headers(token=self._token if self._token else False,
                                             library_name="modelherd", library_version=ua.partition("/")[2])
        tls: dict[str, Any] = {}
        if self._endpoint.startswith("https:"):
            # one TLS context (CA bundle parsed once) for every connection, not one per connection
            tls["ssl_context"] = ssl.create_default_context()
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
        """The files of the commit the revision names now, filtered by the patterns, with checksums."""
        return call_with_retry(self._list_once, self._retry, what=f"listing {self.uri}")

    def _list_once(self) -> Listing:
        repo_id = self._model_uri.repo_id
        revision = self._model_uri.revision or "main"
        try:
            if _COMMIT_RE.match(revision):
                commit = revision
            else:
                info = self._api_get(f"{self._endpoint}/api/models/{repo_id}/revision/{quote(revision, safe='')}")
                body = info.json()
                sha = body.get("sha") if isinstance(body, dict) else None
                if not isinstance(sha, str) or not _COMMIT_RE.match(sha):
                    raise SourceError(f"the Hub did not resolve {self.uri} to a commit",
                                      hint="retry later or pin a commit sha: hf://ORG/MODEL@SHA")
                commit = sha
            entries = list(self._tree(f"{self._endpoint}/api/models/{repo_id}/tree/{commit}"))
        except Exception as exc:
            raise self._map_hf(exc, f"listing {self.uri}") from None
        files: list[RemoteFile] = []
        for entry in entries:
            if entry.get("type") != "file":
                continue  # directories: their files are listed too (recursive)
            path = safe_relpath(_field(entry, "path", str), what="Hub tree path")
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
            files.append(RemoteFile(path=path, size=size, checksums=checksums, locator=locator))
        kept = list(filter_repo_objects(files, allow_patterns=self._allow, ignore_patterns=self._ignore,
                                        key=lambda f: f.path))
        kept.sort(key=lambda f: f.path)
        return Listing(uri=self.uri, revision=commit, files=tuple(kept),
                       selection=Selection.of(self._allow, self._ignore))

    def _api_get(self, url: str, params: dict[str, str] | None = None) -> httpx2.Response:
        """One Hub API GET through ``huggingface_hub``'s session; HTTP errors raise its typed errors."""
        r = get_session().get(url, headers=self._api_headers, params=params, timeout=API_TIMEOUT_S)
        hf_raise_for_status(r)
        return r

    def _tree(self, url: str) -> Iterator[dict[str, Any]]:
        """Every entry of a recursive tree listing, following ``Link: rel="next"`` pages."""
        params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
        for _ in range(MAX_TREE_PAGES):
            r = self._api_get(url, params)
            page = r.json()
            if not isinstance(page, list) or not all(isinstance(e, dict) for e in page):
                raise SourceError(f"listing {self.uri}: the tree page is not a list of entries",
                                  hint="the endpoint does not answer like the Hub API")
            yield from page
            link = r.links.get("next", {}).get("url")
            if not link:
                return
            url, params = urljoin(url, link), None  # the next link holds its own query
        raise SourceError(f"listing {self.uri}: more than {MAX_TREE_PAGES} tree pages",
                          hint="the endpoint paginates in a loop")

    def _map_hf(self, exc: Exception, what: str) -> Exception:
        """A ``huggingface_hub``/httpx error as a typed error; the message never holds the token."""
        if isinstance(exc, SourceError):
            return exc
        detail = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, self._token)
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

    # -- bodies ------------------------------------------------------------------------------
    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> _HFBody:
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
            return _HFBody(None, 0, what, self._urllib3_mapper(what))
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
                      ranged: bool, what: str) -> _HFBody:
        body = _HFBody(resp, stop - start, what, self._urllib3_mapper(what))
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

    @staticmethod
    def _urllib3_mapper(what: str) -> Callable[[Exception], Exception]:
        def mapper(exc: Exception) -> Exception:
            if isinstance(exc, SourceError):
                return exc
            if isinstance(exc, urllib3.exceptions.MaxRetryError) and \
                    isinstance(exc.reason, urllib3.exceptions.ResponseError):
                return SourceError(f"{what}: too many redirects", hint="the endpoint redirects in a loop")
            if isinstance(exc, (Urllib3HTTPError, OSError)):
                # urllib3 messages hold URLs and reasons, never request headers.
                return TransientSourceError(f"{what}: {type(exc).__name__}: {exc}", hint=TRANSIENT_HINT)
            return SourceError(f"{what}: {type(exc).__name__}: {exc}")
        return mapper

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.clear()

