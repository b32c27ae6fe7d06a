"""OCI Object Storage source, through the official ``oci`` SDK.

Invariants:
- every name :meth:`OCISource.list_files` returns went through :func:`safe_relpath` and is relative to the
  folder prefix; two objects that normalise to the same path, or a file that is also a folder, are refused;
- :meth:`OCISource.open` yields exactly the bytes ``[start, end)`` of the object version that was listed
  (``If-Match`` on the listed ETag) or raises a typed :class:`SourceError`;
- the SDK's own retries and circuit breaker are off; :func:`call_with_retry` is the one retry loop, its
  back-offs ended at once by the source's ``cancel`` Event; a redirect to a non-HTTP URL is a ``SourceError``,
  never retried;
- credentials (key file contents, fingerprints, tokens) never reach a message: errors carry the HTTP
  status, the service code, the service message and the ``opc-request-id`` only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import oci
import urllib3
from oci._vendor import requests as oci_requests
from oci.base_client import OCIHTTPAdapter
from oci.circuit_breaker import NoCircuitBreakerStrategy
from oci.retry import NoneRetryStrategy

from ..errors import (
    AuthError,
    ConfigError,
    RateLimitedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
    UnsafePathError,
)
from ..paths import safe_relpath
from ..retry import RetryPolicy, call_with_retry, parse_retry_after
from ..types import Listing, RemoteFile
from ..uri import ModelURI
from .body import fully_read, readinto_direct

log = logging.getLogger(__name__)
T = TypeVar("T")

AuthMode = Literal["auto", "instance_principal", "resource_principal", "workload_identity", "user"]
AUTH_MODES: tuple[str, ...] = ("auto", "instance_principal", "resource_principal", "workload_identity", "user")
LIST_FIELDS = "name,size,md5,etag,timeCreated"
LIST_PAGE = 1000
MAX_LIST_PAGES = 100_000  # a bound on the pagination loop: 10^8 objects
DEFAULT_RETRY = RetryPolicy()
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
NOT_FOUND_HINT = ("OCI answers 404 both when the namespace/bucket/object does not exist and when the principal "
                  "may not read it: check the URI, the region, and the IAM policy (read objects in the bucket)")


def resolve_auth(auth: str, config_file: str, environ: Mapping[str, str], sa_token_path: str = SA_TOKEN_PATH) -> str:
    """The concrete auth mode for ``auth``; ``auto`` picks the first that applies.

    ``auto``: ``user`` when ``config_file`` exists; else, when ``OCI_RESOURCE_PRINCIPAL_VERSION`` is set,
    ``workload_identity`` inside a Kubernetes pod (``KUBERNETES_SERVICE_HOST`` + a service-account token) or
    ``resource_principal`` outside; else ``instance_principal``.
    """
    if auth not in AUTH_MODES:
        raise ConfigError(f"unknown OCI auth mode {auth!r}", hint=f"use one of {', '.join(AUTH_MODES)}")
    if auth != "auto":
        return auth
    if Path(os.path.expanduser(config_file)).is_file():
        return "user"
    if environ.get("OCI_RESOURCE_PRINCIPAL_VERSION"):
        if environ.get("KUBERNETES_SERVICE_HOST") and Path(sa_token_path).is_file():
            return "workload_identity"
        return "resource_principal"
    return "instance_principal"


def _b64_digest_hex(value: str, nbytes: int) -> str | None:
    """Base64 digest → hex, ``None`` when it is not ``nbytes`` long or not base64."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == nbytes else None


def _multipart_hex(value: str) -> str | None:
    """``<b64 md5>-<parts>`` → ``<hex>-<parts>``."""
    digest, sep, parts = value.rpartition("-")
    if not sep or not parts.isdigit():
        return None
    hexed = _b64_digest_hex(digest, 16)
    return f"{hexed}-{int(parts)}" if hexed else None


def checksums_from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Checksums a HEAD/GET response promises, in ``RemoteFile.checksums`` form (hex)."""
    out: dict[str, str] = {}
    md5 = headers.get("content-md5")
    if md5 and (h := _b64_digest_hex(md5, 16)):
        out["md5"] = h
    mp = headers.get("opc-multipart-md5")
    if mp and (h := _multipart_hex(mp)):
        out["md5-multipart"] = h
    crc = headers.get("opc-content-crc32c")
    if crc and (h := _b64_digest_hex(crc, 4)):
        out["crc32c"] = h
    sha = headers.get("opc-content-sha256")
    if sha and "-" not in sha and (h := _b64_digest_hex(sha, 32)):
        out["sha256"] = h
    return out


_URL_ERRORS = (oci_requests.exceptions.InvalidSchema, oci_requests.exceptions.MissingSchema,
               oci_requests.exceptions.InvalidURL)


def _unusable_url(exc: BaseException) -> bool:
    """``exc`` is, or wraps (the SDK re-raises as ``oci.exceptions.RequestException(e)``), a URL no client can
    fetch: a redirect to ``file://``, ``ftp://``, or a URL without a host."""
    inner = exc.args[0] if isinstance(exc, oci.exceptions.RequestException) and exc.args else exc
    return isinstance(inner, _URL_ERRORS) or isinstance(exc.__context__, _URL_ERRORS)


def map_error(exc: BaseException, what: str) -> SourceError:
    """Translate an SDK/transport failure into our typed errors, without secrets."""
    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, oci.exceptions.ServiceError):
        status, code = int(exc.status or 0), str(exc.code or "")
        rid = getattr(exc, "request_id", None) or "-"
        smsg = str(exc.message or "")[:300]
        msg = f"{what}: HTTP {status} {code}: {smsg} (opc-request-id {rid})"
        if status == 404 or code == "NotAuthorizedOrNotFound":
            return SourceNotFoundError(msg, hint=NOT_FOUND_HINT)
        if status in (401, 403):
            return AuthError(msg, hint="check the OCI auth mode, the config profile/key, and the IAM policy")
        if status == 429:
            headers = exc.headers or {}
            return RateLimitedError(msg, retry_after=parse_retry_after(headers.get("retry-after")),
                                    hint="Object Storage is throttling; lower the concurrency or retry later")
        if status == 412:
            return SourceError(msg, hint="the object changed while it was being downloaded; pull again")
        if status >= 500 or status in (408, 409):
            return TransientSourceError(msg, hint="Object Storage failed; retrying usually helps")
        return SourceError(msg)
    if isinstance(exc, oci.exceptions.ClientError | oci.exceptions.ConfigFileNotFound):
        return AuthError(f"{what}: OCI client configuration: {type(exc).__name__}",
                         hint="check the OCI config file, profile and key")
    if _unusable_url(exc):
        # a redirect to file://, ftp://, a URL without a host: no retry can make that work
        return SourceError(f"{what}: redirected to an unusable URL ({type(exc).__name__})",
                           hint="the endpoint or a proxy redirects to a location that is not http(s)")
    if isinstance(exc, oci_requests.RequestException | oci.exceptions.RequestException | oci.exceptions.ConnectTimeout
                  | urllib3.exceptions.HTTPError | http.client.HTTPException | OSError):
        return TransientSourceError(f"{what}: connection failed: {type(exc).__name__}",
                                    hint="check the network path to Object Storage")
    return SourceError(f"{what}: unexpected {type(exc).__name__}")


def _make_signer(mode: str) -> Any:
    if mode == "instance_principal":
        return oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
    if mode == "resource_principal":
        return oci.auth.signers.get_resource_principals_signer()
    if mode == "workload_identity":
        return oci.auth.signers.get_oke_workload_identity_resource_principal_signer()
    raise ConfigError(f"unknown OCI auth mode {mode!r}")


def make_client(*, auth: str, config_file: str, profile: str, region: str, endpoint: str, pool_maxsize: int,
                environ: Mapping[str, str]) -> oci.object_storage.ObjectStorageClient:
    """One ``ObjectStorageClient`` whose keep-alive pools hold ``pool_maxsize`` connections, SDK retries off."""
    mode = resolve_auth(auth, config_file, environ)
    kwargs: dict[str, Any] = {"retry_strategy": NoneRetryStrategy(),
                              "circuit_breaker_strategy": NoCircuitBreakerStrategy(),
                              "timeout": (10.0, 120.0)}
    if endpoint:
        kwargs["service_endpoint"] = endpoint
    try:
        if mode == "user":
            config = oci.config.from_file(os.path.expanduser(config_file), profile)
            if region:
                config["region"] = region
            oci.config.validate_config(config)
            client = oci.object_storage.ObjectStorageClient(config, **kwargs)
        else:
            signer = _make_signer(mode)
            client = oci.object_storage.ObjectStorageClient({"region": region} if region else {}, signer=signer,
                                                            **kwargs)
    except ConfigError:
        raise
    except (oci.exceptions.ConfigFileNotFound, oci.exceptions.ProfileNotFound, oci.exceptions.InvalidConfig,
            oci.exceptions.InvalidKeyFilePath) as e:
        # these messages name files/profiles/keys-of-the-config, never their contents
        raise AuthError(f"OCI {mode} credentials: {type(e).__name__}: {str(e)[:300]}",
                        hint=f"check {config_file} (profile {profile}) or pick another --oci-auth") from None
    except Exception as e:
        raise AuthError(f"could not obtain OCI {mode} credentials: {type(e).__name__}",
                        hint="pick the --oci-auth that matches where this runs (instance_principal on OCI "
                             "nodes, workload_identity on OKE with policies, user with ~/.oci/config)") from None
    session = client.base_client.session
    pools = max(4, pool_maxsize // 8)
    session.mount("https://", OCIHTTPAdapter(pool_connections=pools, pool_maxsize=pool_maxsize))
    session.mount("http://", oci_requests.adapters.HTTPAdapter(pool_connections=pools, pool_maxsize=pool_maxsize))
    return client


class _OCIBody:
    """The body of one ranged GET; raises :class:`TransientSourceError` if it ends early or breaks."""

    def __init__(self, response: Any, expected: int, what: str) -> None:
        self._response = response
        self._raw = response.raw
        self._left = expected
        self._what = what

    def readinto(self, buf: memoryview) -> int:
        if self._left <= 0:
            return 0
        view = buf[: min(len(buf), self._left)]
        try:
            n = readinto_direct(self._raw, view)
        except Exception as e:
            self.close()
            raise map_error(e, f"{self._what}: reading the body") from None
        if n <= 0:
            self.close()
            raise TransientSourceError(f"{self._what}: body ended {self._left} bytes early",
                                       hint="the connection was cut; retrying resumes the range")
        self._left -= n
        return n

    def close(self) -> None:
        """Keep the connection alive when the body was read to its end, else drop it."""
        if self._left == 0 and fully_read(self._raw):
            self._raw.release_conn()
        else:
            self._response.close()


class _Empty:
    def readinto(self, buf: memoryview) -> int:
        return 0

    def close(self) -> None:
        return None


class OCISource:
    """Files under ``oci://n/NS/b/BUCKET/o/PREFIX``; thread-safe (one SDK client, a keep-alive pool)."""

    def __init__(self, uri: ModelURI, *, auth: str = "auto", config_file: str = "~/.oci/config",
                 profile: str = "DEFAULT", region: str = "", endpoint: str = "", retry: RetryPolicy = DEFAULT_RETRY,
                 pool_maxsize: int = 32, environ: Mapping[str, str] | None = None,
                 cancel: threading.Event | None = None) -> None:
        if uri.scheme != "oci":
            raise ConfigError(f"OCISource needs an oci:// URI, got {uri.raw!r}")
        self.uri = uri.canonical
        self._ns, self._bucket = uri.namespace, uri.bucket
        prefix = uri.prefix.strip("/")
        #: the folder listed: the prefix is always a folder, so ``o/llama`` never matches ``llama2/...``
        self.folder = f"{prefix}/" if prefix else ""
        self._retry = retry
        self._cancel = cancel
        self._pool_maxsize = pool_maxsize
        self._etags: dict[str, str] = {}
        self._client = make_client(auth=auth, config_file=config_file, profile=profile,
                                   region=uri.region or region, endpoint=endpoint, pool_maxsize=pool_maxsize,
                                   environ=os.environ if environ is None else environ)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        def once() -> T:
            try:
                return fn()
            except Exception as e:
                raise map_error(e, what) from None

        return call_with_retry(once, self._retry, cancel=self._cancel, what=what)

    def _where(self, name: str = "") -> str:
        return f"oci://n/{self._ns}/b/{self._bucket}/o/{name}"

    def _list_objects(self) -> list[Any]:
        objects: list[Any] = []
        start: str | None = None
        for _ in range(MAX_LIST_PAGES):
            kw: dict[str, Any] = {"fields": LIST_FIELDS, "limit": LIST_PAGE}
            if self.folder:
                kw["prefix"] = self.folder
            if start is not None:
                kw["start"] = start
            def page(kw: dict[str, Any] = kw) -> Any:
                return self._client.list_objects(self._ns, self._bucket, **kw)

            resp = self._call(page, f"listing {self._where(self.folder)}")
            objects.extend(resp.data.objects or [])
            nxt = resp.data.next_start_with
            if not nxt:
                return objects
            if start is not None and nxt <= start:
                raise SourceError(f"listing {self._where(self.folder)}: pagination does not advance ({nxt!r})")
            start = nxt
        raise SourceError(f"listing {self._where(self.folder)}: more than {MAX_LIST_PAGES} pages")

    def _head_checksums(self, name: str) -> dict[str, str]:
        resp = self._call(lambda: self._client.head_object(self._ns, self._bucket, name),
                          f"HEAD {self._where(name)}")
        return checksums_from_headers(resp.headers)

    def list_files(self) -> Listing:
        """Every object under the folder, with checksums; ``revision`` digests the listing.

        ``revision`` = first 40 hex of sha256 over the sorted lines ``name\\tsize\\tetag``: it changes whenever
        an object is added, removed or overwritten (every write gets a new ETag), and is stable otherwise.
        Objects whose listing has no plain md5 (multipart uploads) get a HEAD for ``opc-multipart-md5``
        (informational) and ``opc-content-crc32c`` / ``opc-content-sha256`` (checkable).
        """
        objects = self._list_objects()
        entries: list[tuple[str, str, int, str, dict[str, str]]] = []  # rel, name, size, etag, checksums
        need_head: list[int] = []
        seen: set[str] = set()
        for obj in objects:
            name, size = str(obj.name), int(obj.size or 0)
            if not name.startswith(self.folder):
                raise SourceError(f"listing {self._where(self.folder)} returned {name!r} outside the prefix")
            if name.endswith("/") and size == 0:
                continue  # a console "folder" marker
            rel = safe_relpath(name[len(self.folder):], what="object name")
            if rel in seen:
                raise UnsafePathError(f"object name {name!r} collides with another object as {rel!r}",
                                      hint="rename the objects so that each maps to one file")
            seen.add(rel)
            sums: dict[str, str] = {}
            md5 = obj.md5 or ""
            if md5 and "-" not in md5 and (h := _b64_digest_hex(md5, 16)):
                sums["md5"] = h
            else:
                if md5 and (mp := _multipart_hex(md5)):
                    sums["md5-multipart"] = mp
                need_head.append(len(entries))
            entries.append((rel, name, size, str(obj.etag or ""), sums))
        dirs = {str(p) for rel in seen for p in Path(rel).parents if str(p) != "."}
        if clash := sorted(seen & dirs):
            raise UnsafePathError(f"object {clash[0]!r} is both a file and a folder under {self._where(self.folder)}",
                                  hint="the bucket holds 'x' and 'x/...'; fix the objects")
        if need_head:
            with ThreadPoolExecutor(max_workers=max(1, min(8, self._pool_maxsize, len(need_head)))) as ex:
                heads = list(ex.map(lambda i: self._head_checksums(entries[i][1]), need_head))
            for i, extra in zip(need_head, heads, strict=True):
                entries[i][4].update(extra)
        entries.sort(key=lambda e: e[0])
        digest = hashlib.sha256("".join(f"{n}\t{s}\t{t}\n" for _, n, s, t, _ in entries).encode()).hexdigest()
        self._etags.update({n: t for _, n, _, t, _ in entries if t})
        files = tuple(RemoteFile(path=rel, size=size, checksums=sums, locator=name)
                      for rel, name, size, _, sums in entries)
        return Listing(uri=self.uri, revision=digest[:40], files=files)

    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> _OCIBody | _Empty:
        """Stream bytes ``[start, end)`` of ``file`` with one ranged GET (retried until headers arrive)."""
        stop = file.size if end is None else end
        if not 0 <= start <= stop <= file.size:
            raise ValueError(f"bad range [{start}, {stop}) for {file.path} of {file.size} bytes")
        if start == stop:
            return _Empty()
        name = file.locator or (self.folder + file.path)
        what = f"GET {self._where(name)} bytes {start}-{stop - 1}"
        kw: dict[str, Any] = {"range": f"bytes={start}-{stop - 1}"}
        if etag := self._etags.get(name):
            kw["if_match"] = etag

        def get() -> _OCIBody:
            resp = self._client.get_object(self._ns, self._bucket, name, **kw).data
            try:
                self._check_range(resp, start, stop, file.size, what)
            except BaseException:
                resp.close()
                raise
            return _OCIBody(resp, stop - start, what)

        return self._call(get, what)

    @staticmethod
    def _check_range(resp: Any, start: int, stop: int, size: int, what: str) -> None:
        headers = resp.headers
        length = headers.get("content-length")
        if resp.status_code == 206:
            cr = str(headers.get("content-range", ""))
            if cr != f"bytes {start}-{stop - 1}/{size}":
                raise SourceError(f"{what}: Content-Range {cr!r} is not the range asked for",
                                  hint="the object changed since it was listed; pull again")
        elif resp.status_code != 200 or start != 0 or stop != size:
            raise SourceError(f"{what}: HTTP {resp.status_code} without the asked range")
        if length is not None and int(length) != stop - start:
            raise SourceError(f"{what}: Content-Length {length} for a range of {stop - start} bytes")

    def close(self) -> None:
        self._client.base_client.session.close()
