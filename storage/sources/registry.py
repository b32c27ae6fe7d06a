"""An OCI registry (any distribution-spec registry: Harbor, Quay, ECR, GAR, ACR, distribution) as a model source.

``oci://HOST[:PORT]/REPO:TAG`` (or ``@sha256:DIGEST``): a CNCF ModelPack artifact, an ORAS artifact or a modelcar
image: one file per raw layer, one archive per tar layer (:mod:`.registry_manifest`; the engine extracts it,
:mod:`~..unpack`). The HTTP client is the engine's own: one ``urllib3.PoolManager``
with keep-alive, ranged GETs and bodies read straight into the engine's buffer; :mod:`.registry_auth` answers the
registry's 401 challenges.

Invariants:
- the tag is resolved once, by :meth:`RegistrySource.list_files`, to the digest of the manifest the registry served
  (sha256 of the exact bytes received, which must equal ``Docker-Content-Digest`` when sent and the digest asked
  for when pinned): that digest is the listing's revision, and every file is then fetched by its own digest, so a
  tag moved meanwhile changes nothing of this pull;
- every file's checksum is its layer's sha256 digest, which the engine checks while the bytes stream;
- ``open`` yields exactly the bytes ``[start, end)`` or raises a typed ``SourceError``: a 206 must carry exactly the
  asked ``Content-Range``, a 200 (a registry that ignores ``Range``) must carry the listed size and is skipped to
  ``start``; a short body is a ``TransientSourceError``;
- every host (the registry's, every redirect hop's, the token realm's) only where the caller's
  :class:`~.origins.HostPolicy` allows: plain HTTP to a listed insecure registry (and loopback for a caller that
  trusts this machine), a node-local host in no scheme for one that does not; HTTPS tried first as docker does;
  a redirect never
  downgrades to plain HTTP elsewhere, never leaves http(s), is followed at most ``MAX_REDIRECTS`` times, and the
  registry's ``Authorization`` goes only to the registry's own origin (a redirect to blob storage gets none);
- after a 401 a request is sent once more with the refreshed authorization (an expired token mid-download), and a
  second 401 is an :class:`AuthError`; no credential or token reaches a message or a log line;
- a mirror (:func:`open_registry` with ``mirrors``, e.g. a Harbor proxy cache) is asked first and the registry
  itself when the mirror fails; each host gets only its own credentials from the docker config, and the listing
  is the registry's URI either way (the content is named by digest, so a mirror cannot change what is verified).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import urllib3

from ..dockerauth import RegistryCredentials, credentials_for, load_docker_config, registry_key
from ..errors import (
    AuthError,
    CancelledError,
    ConfigError,
    ModelherdError,
    RateLimitedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
    VerificationError,
)
from ..retry import RetryPolicy, call_with_retry, parse_retry_after
from ..types import Listing, RemoteFile
from ..untrusted import UntrustedInputError, load_json, show
from ..uri import ModelURI
from .body import ExactBody
from .origins import LOOPBACK_TRUSTED, HostPolicy, origin
from .registry_auth import AUTH_HINT, Authorizer
from .registry_manifest import ACCEPT, MAX_MANIFEST_BYTES, Document, files_of, parse_document, pick_from_index
from .tls import client_context

__all__ = ["MirroredRegistrySource", "RegistrySource", "mirror_for", "open_registry"]

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
PROBE_TIMEOUT = urllib3.Timeout(connect=5.0, read=10.0)
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_REDIRECTS = (301, 302, 303, 307, 308)
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_RETRY = RetryPolicy()
TRANSIENT_HINT = "the registry or the network failed; it is retried, check connectivity if it persists"
NOT_FOUND_HINT = "check the registry, repository and tag or digest (oci://HOST/REPO:TAG), and that it may be pulled"


def _user_agent() -> str:
    try:
        return f"modelherd/{version('modelherd')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "modelherd/0"


def _credentials(registry: str, auth: RegistryCredentials | Mapping[str, Any] | str | Path | None
                 ) -> RegistryCredentials | None:
    if auth is None or isinstance(auth, RegistryCredentials):
        return auth
    return credentials_for(load_docker_config(auth), registry)


class RegistrySource:
    """The files of one registry artifact; thread-safe (one pool, one authorizer).

    ``auth``: the credentials themselves, or a docker config (a parsed mapping, the path of a ``config.json``, or
    a Secret's ``.dockerconfigjson`` text) whose ``auths`` entry for the registry is used; ``None``: anonymous.
    ``hosts``: who may be spoken to and how (the insecure registries; loopback when the caller trusts this machine).
    ``endpoint``: a mirror ``host[:port][/PREFIX]`` to ask instead of the registry (the repository goes under
    ``PREFIX``, as a Harbor proxy-cache project wants); the credentials are then the mirror host's.
    """

    def __init__(self, uri: ModelURI, *, auth: RegistryCredentials | Mapping[str, Any] | str | Path | None = None,
                 hosts: HostPolicy = LOOPBACK_TRUSTED, retry: RetryPolicy = DEFAULT_RETRY,
                 pool_maxsize: int = 32, cancel: threading.Event | None = None, endpoint: str | None = None,
                 model_folder: str = "models") -> None:
        if uri.scheme != "oci-registry":
            raise ConfigError(f"RegistrySource needs a registry reference (oci://HOST/REPO:TAG), got {uri.raw!r}")
        self.uri = uri.canonical
        self._registry = uri.registry
        self._host = DOCKER_HUB_API if uri.registry == "docker.io" else uri.registry
        repo = uri.repository
        self._repo = f"library/{repo}" if uri.registry == "docker.io" and "/" not in repo else repo
        if endpoint:
            host, _, prefix = endpoint.strip().removeprefix("https://").removeprefix("http://").strip("/") \
                .partition("/")
            self._registry = self._host = host.lower()
            if prefix:
                self._repo = f"{prefix.strip('/')}/{self._repo}"
        self._ref = uri.digest or uri.tag or ""
        self._model_folder = model_folder.strip("/")
        self._hosts = hosts
        self._retry = retry
        self._cancel = cancel
        self._ua = _user_agent()
        self._pool = urllib3.PoolManager(maxsize=pool_maxsize, block=False, retries=False,
                                         timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
                                         ssl_context=client_context())
        self._auth = Authorizer(registry=self._registry, repository=self._repo,
                                credentials=_credentials(self._registry, auth), pool=self._pool,
                                hosts=self._hosts, user_agent=self._ua)
        self._base: str | None = None
        self._base_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RegistrySource({self.uri!r}, {self._auth!r})"

    @property
    def host(self) -> str:
        """The host this source asks (the registry's, or its mirror's)."""
        return self._host


    # -- transport -------------------------------------------------------------------------------
    def _base_url(self, what: str) -> str:
        """``https://HOST`` or, for a registry that may speak plain HTTP and does not speak TLS, ``http://HOST``."""
        with self._base_lock:
            if self._base is None:
                self._base = f"{self._probe(what)}://{self._host}"
            return self._base

    def _probe(self, what: str) -> str:
        refusal = self._hosts.refusal("https", self._host)
        if refusal:
            raise ConfigError(f"{what}: the registry {self._host}: {refusal}", hint=self._hosts.hint())
        if not self._hosts.allows("http", self._host):
            return "https"
        try:
            resp = self._pool.urlopen("GET", f"https://{self._host}/v2/", redirect=False, retries=False,
                                      preload_content=False, timeout=PROBE_TIMEOUT)
        except (urllib3.exceptions.SSLError, urllib3.exceptions.ProtocolError):
            return "http"  # the registry does not speak TLS there (docker's fallback for insecure registries)
        except Exception as exc:
            raise self._mapper(what)(exc) from None
        resp.drain_conn()
        resp.release_conn()
        return "https"

    def _send(self, method: str, url: str, headers: dict[str, str], what: str) -> urllib3.BaseHTTPResponse:
        """The response to ``method url`` after redirects and at most one answered 401; the caller closes it.

        The registry's ``Authorization`` is sent only to the registry's origin."""
        registry = origin(url)
        answered = False
        for _ in range(MAX_REDIRECTS + 1):
            send = dict(headers)
            auth, generation = self._auth.current()
            if auth and origin(url) == registry:
                send["authorization"] = auth
            try:
                resp = self._pool.urlopen(method, url, headers=send, redirect=False, retries=False,
                                          preload_content=False, decode_content=False)
            except Exception as exc:
                raise self._mapper(what)(exc) from None
            if resp.status in _REDIRECTS:
                location = resp.headers.get("location", "")
                _discard(resp)
                url = self._redirect_target(url, location, what)
                continue
            if resp.status == 401 and origin(url) == registry and not answered:
                challenge = resp.headers.get("www-authenticate", "")
                _discard(resp)
                self._auth.refresh(challenge, generation, what)
                answered = True
                continue
            return resp
        raise SourceError(f"{what}: more than {MAX_REDIRECTS} redirects", hint="the registry redirects in a loop")

    def _redirect_target(self, url: str, location: str, what: str) -> str:
        if not location:
            raise SourceError(f"{what}: a redirect without a Location", hint="the registry is malformed")
        target = urljoin(url, location)
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SourceError(f"{what}: redirected to an unusable URL ({show(parts.scheme)}:)",
                              hint="the registry or a proxy redirects to a location that is not http(s)")
        refusal = self._hosts.refusal(parts.scheme, parts.netloc)
        if refusal:
            raise SourceError(f"{what}: redirected to {parts.scheme}://{parts.hostname}: {refusal}",
                              hint=f"the registry's blob storage must be HTTPS; {self._hosts.hint()}")
        return target

    def _call(self, fn: Callable[[], T], what: str) -> T:
        def once() -> T:
            try:
                return fn()
            except ModelherdError:
                raise
            except Exception as exc:
                raise self._mapper(what)(exc) from None

        return call_with_retry(once, self._retry, cancel=self._cancel, what=what)

    def _mapper(self, what: str) -> Callable[[Exception], Exception]:
        def mapper(exc: Exception) -> Exception:
            if isinstance(exc, ModelherdError):
                return exc
            detail = self._auth.redact(str(exc))[:300]
            if isinstance(exc, urllib3.exceptions.LocationValueError):
                return SourceError(f"{what}: unusable URL ({detail})", hint="the registry is malformed")
            if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
                return TransientSourceError(f"{what}: {type(exc).__name__}: {detail}", hint=TRANSIENT_HINT)
            return SourceError(f"{what}: {type(exc).__name__}: {detail}")
        return mapper

    def _status_error(self, resp: urllib3.BaseHTTPResponse, what: str) -> SourceError:
        """The typed error of a non-success answer, with the registry's error code when it sent one."""
        status = resp.status
        retry_after = resp.headers.get("retry-after")
        code = ""
        try:
            doc = load_json(resp.read(MAX_ERROR_BODY + 1), max_bytes=MAX_ERROR_BODY)
            errors = doc.get("errors") if isinstance(doc, dict) else None
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                code = f" {show(errors[0].get('code'))}"
        except (UntrustedInputError, urllib3.exceptions.HTTPError, OSError):
            pass
        finally:
            resp.release_conn()
        msg = f"{what}: HTTP {status}{code}"
        if status in (401, 403):
            return AuthError(f"{msg}: the registry denied access", hint=AUTH_HINT)
        if status == 404:
            return SourceNotFoundError(f"{msg}: not found", hint=NOT_FOUND_HINT)
        if status in (429, 503):
            return RateLimitedError(f"{msg}: rate limited", retry_after=parse_retry_after(retry_after),
                                    hint="the registry asked to slow down; retrying later helps")
        if status >= 500 or status == 408:
            return TransientSourceError(f"{msg}: server error", hint=TRANSIENT_HINT)
        return SourceError(f"{msg}: unexpected answer", hint="the registry does not answer like the distribution API")

    # -- listing ---------------------------------------------------------------------------------
    def list_files(self) -> Listing:
        """The files of the artifact the reference names now; ``revision`` is the manifest digest it resolved to.

        An image index is resolved to the artifact manifest it holds (its digest checked too); the revision stays
        the index's digest, the one the tag named."""
        what = f"listing {self.uri}"
        doc, digest = self._call(lambda: self._manifest(self._ref, what), what)
        if doc.is_index:
            child, _ = pick_from_index(doc, what)
            doc, _ = self._call(lambda: self._manifest(child, what), what)
            if doc.is_index:
                raise SourceError(f"{what}: the index names another index", hint="name the artifact by digest")
        files = files_of(doc, what, self._model_folder)
        return Listing(uri=self.uri, revision=digest, files=tuple(files))

    def _manifest(self, ref: str, what: str) -> tuple[Document, str]:
        url = f"{self._base_url(what)}/v2/{self._repo}/manifests/{ref}"
        resp = self._send("GET", url, {"user-agent": self._ua, "accept": ACCEPT, "accept-encoding": "identity"}, what)
        if resp.status != 200:
            raise self._status_error(resp, what)
        try:
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_MANIFEST_BYTES:
                raise SourceError(f"{what}: the manifest is {length} bytes, more than {MAX_MANIFEST_BYTES}",
                                  hint="the registry serves something that is not a model manifest")
            data = resp.read(MAX_MANIFEST_BYTES + 1)
        finally:
            resp.release_conn()
        if len(data) > MAX_MANIFEST_BYTES:
            raise SourceError(f"{what}: the manifest is more than {MAX_MANIFEST_BYTES} bytes",
                              hint="the registry serves something that is not a model manifest")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if _DIGEST.match(ref) and ref != digest:
            raise VerificationError(f"{what}: the registry served a manifest whose digest is {digest}, not {ref}",
                                    hint="the registry is corrupt or hostile; nothing was downloaded")
        claimed = resp.headers.get("docker-content-digest")
        if claimed and claimed.strip() != digest:
            raise VerificationError(f"{what}: the manifest's bytes hash to {digest}, the registry says "
                                    f"{show(claimed.strip())}",
                                    hint="the registry is corrupt or hostile; nothing was downloaded")
        return parse_document(data, resp.headers.get("content-type", ""), what), digest

    # -- bodies ----------------------------------------------------------------------------------
    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> ExactBody:
        """Exactly the bytes ``[start, end)`` of ``file``'s blob (``end=None``: to its end)."""
        stop = file.size if end is None else end
        if not 0 <= start <= stop <= file.size:
            raise ValueError(f"bad range [{start}, {end}) for {file.path} of {file.size} bytes")
        what = f"GET {file.path} [{start}, {stop}) from {self.uri}"
        mapper = self._mapper(what)
        if start == stop:
            return ExactBody(None, 0, what, mapper, hint=TRANSIENT_HINT)
        if not _DIGEST.match(file.locator):
            raise SourceError(f"{what}: the locator {show(file.locator)} is not a sha256 digest",
                              hint="the listing does not come from this source")
        headers = {"user-agent": self._ua, "accept-encoding": "identity"}
        ranged = not (start == 0 and stop == file.size)
        if ranged:
            headers["range"] = f"bytes={start}-{stop - 1}"
        url = f"{self._base_url(what)}/v2/{self._repo}/blobs/{file.locator}"
        resp = self._send("GET", url, headers, what)
        try:
            return self._checked_body(resp, file, start, stop, ranged, what, mapper)
        except BaseException:
            resp.close()
            resp.release_conn()
            raise

    def _checked_body(self, resp: urllib3.BaseHTTPResponse, file: RemoteFile, start: int, stop: int, ranged: bool,
                      what: str, mapper: Callable[[Exception], Exception]) -> ExactBody:
        body = ExactBody(resp, stop - start, what, mapper, hint=TRANSIENT_HINT)
        if resp.status == 206:
            cr = resp.headers.get("content-range", "").strip()
            m = _CONTENT_RANGE.match(cr)
            if m and m.group(3) != "*" and int(m.group(3)) != file.size:
                raise VerificationError(f"{what}: the blob is {m.group(3)} bytes, the manifest says {file.size}",
                                        hint="the manifest lies about the layer's size; nothing was published")
            if not m or int(m.group(1)) != start or int(m.group(2)) != stop - 1:
                raise TransientSourceError(f"{what}: the registry answered Content-Range {show(cr)}",
                                           hint="a proxy mangled the range; retrying")
            return body
        if resp.status == 200:
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != file.size:
                raise VerificationError(f"{what}: the blob is {length} bytes, the manifest says {file.size}",
                                        hint="the manifest lies about the layer's size; nothing was published")
            if ranged and start:
                log.warning("%s: the registry ignored Range; skipping %d bytes", what, start)
                body.skip(start)
            return body
        raise self._status_error(resp, what)

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.clear()


def mirror_for(mirrors: Mapping[str, str], registry: str) -> str | None:
    """The mirror ``mirrors`` names for ``registry`` (keys matched as docker config keys are: ``host[:port]``,
    case-insensitive, every Docker Hub spelling one), or ``None``."""
    want = registry_key(registry)
    return next((m for k, m in mirrors.items() if registry_key(k) == want and m.strip()), None)


class MirroredRegistrySource:
    """A registry artifact asked of a mirror first, then of the registry itself.

    The listing comes from whichever answered (its ``uri`` is the registry's either way); a blob the mirror then
    fails to serve (not found, denied, or any error after the source's own retries) is fetched from the registry.
    """

    def __init__(self, mirror: RegistrySource, origin: RegistrySource) -> None:
        self.uri = origin.uri
        self._mirror, self._origin = mirror, origin
        self._use_mirror = True

    def __repr__(self) -> str:
        return f"MirroredRegistrySource({self._mirror!r}, {self._origin!r})"

    def list_files(self) -> Listing:
        try:
            listing = self._mirror.list_files()
        except CancelledError:
            raise
        except ModelherdError as e:
            log.warning("mirror %s failed for %s (%s); asking the registry itself", self._mirror.host, self.uri,
                        type(e).__name__)
            self._use_mirror = False
            return self._origin.list_files()
        self._use_mirror = True
        return listing

    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> ExactBody:
        if self._use_mirror:
            try:
                return self._mirror.open(file, start, end)
            except SourceError as e:  # a VerificationError (a lying mirror) is not one: it fails the pull
                log.warning("mirror %s failed for %s of %s (%s); fetching it from the registry", self._mirror.host,
                            file.path, self.uri, type(e).__name__)
        return self._origin.open(file, start, end)

    def close(self) -> None:
        self._mirror.close()
        self._origin.close()


def open_registry(uri: ModelURI, *, auth: RegistryCredentials | Mapping[str, Any] | str | Path | None = None,
                  hosts: HostPolicy = LOOPBACK_TRUSTED, mirrors: Mapping[str, str] | None = None,
                  retry: RetryPolicy = DEFAULT_RETRY, pool_maxsize: int = 32,
                  cancel: threading.Event | None = None) -> RegistrySource | MirroredRegistrySource:
    """The source of a registry artifact: :class:`RegistrySource`, behind its mirror when ``mirrors`` names one for
    its registry (``{"docker.io": "harbor.corp/dockerhub-proxy"}``)."""
    config = auth if auth is None or isinstance(auth, RegistryCredentials) else load_docker_config(auth)
    direct = RegistrySource(uri, auth=config, hosts=hosts, retry=retry, pool_maxsize=pool_maxsize,
                            cancel=cancel)
    mirror = mirror_for(mirrors or {}, uri.registry)
    if not mirror:
        return direct
    via = RegistrySource(uri, auth=config if not isinstance(config, RegistryCredentials) else None,
                         hosts=hosts, retry=retry, pool_maxsize=pool_maxsize, cancel=cancel,
                         endpoint=mirror)
    return MirroredRegistrySource(via, direct)


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Drop a response whose body is not wanted (a redirect, a 401), keeping its connection when it is short."""
    try:
        resp.drain_conn()
    except (urllib3.exceptions.HTTPError, OSError):
        resp.close()
    resp.release_conn()
