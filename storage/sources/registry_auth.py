"""Authorization against one OCI registry: anonymous, basic, and the bearer-token flow of the distribution spec.

A request goes out with the current ``Authorization`` value (none at first). A 401 carries a challenge
(``WWW-Authenticate: Basic realm=...`` or ``Bearer realm=...,service=...,scope=...``): :meth:`Authorizer.refresh`
answers it (basic: the user and password; bearer: a token from the realm, asked with basic credentials, an
identity token as an OAuth2 refresh token, or anonymously) and the request is sent once more.

Invariants:
- one refresh per generation: threads that saw the same 401 share one token request (a refresh asked with an
  outdated generation returns at once), and a caller retries a request at most once after a 401;
- the scope asked for is ``repository:REPO:pull``, whatever the challenge asks: a pull never asks for more;
- the realm is asked only where the caller's :class:`~.origins.HostPolicy` allows (HTTPS, or plain HTTP to a
  listed insecure registry or, for a caller that trusts this machine, loopback; no node-local host for one that
  does not): a realm elsewhere is refused and nothing is sent;
- no message holds a credential or a token: messages name the registry, the realm's host and the HTTP status;
  everything else built from an exception goes through :func:`~..credentials.redact`; tokens are checked with
  :func:`~..credentials.check_token` (one header-safe line) before use.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import urlencode, urlsplit

import urllib3

from ..credentials import check_token, redact
from ..dockerauth import RegistryCredentials
from ..errors import AuthError, RateLimitedError, SourceError, TransientSourceError
from ..retry import parse_retry_after
from ..untrusted import UntrustedInputError, load_json
from .origins import HostPolicy

__all__ = ["Authorizer", "parse_challenge"]

MAX_TOKEN_RESPONSE = 1024 * 1024
TOKEN_TIMEOUT = urllib3.Timeout(connect=10.0, read=30.0)
AUTH_HINT = ("give credentials that may pull this repository: a docker config (~/.docker/config.json, "
             "REGISTRY_AUTH_FILE, DOCKER_CONFIG) for the CLI, a kubernetes.io/dockerconfigjson Secret named by "
             "spec.storage.key for a model")
_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``(scheme, params)`` of a ``WWW-Authenticate`` value: ``("bearer", {"realm": ..., "service": ...})``.

    The scheme is lower case (``""`` when the header is empty); parameter names are lower case; quoted values
    are unescaped.
    """
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    params = {m.group(1).lower(): (m.group(2).replace('\\"', '"') if m.group(2) is not None else m.group(3))
              for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class Authorizer:
    """The ``Authorization`` value for one registry and repository; thread-safe."""

    def __init__(self, *, registry: str, repository: str, credentials: RegistryCredentials | None,
                 pool: urllib3.PoolManager, hosts: HostPolicy, user_agent: str) -> None:
        self._registry = registry
        self._scope = f"repository:{repository}:pull"
        self._creds = credentials
        self._pool = pool
        self._hosts = hosts
        self._ua = user_agent
        self._lock = threading.Lock()
        self._header: str | None = None
        self._generation = 0
        self._tokens: list[str] = []
        if credentials is not None and credentials.registry_token:
            self._header = f"Bearer {self._check(credentials.registry_token, 'the registrytoken')}"

    def __repr__(self) -> str:
        return f"Authorizer({self._registry!r}, {self._creds!r})"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every credential and token this authorizer holds or held, for :func:`redact`."""
        return (*(self._creds.secrets if self._creds else ()), *self._tokens)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def current(self) -> tuple[str | None, int]:
        """``(Authorization value or None, generation)``: pass the generation to :meth:`refresh` after a 401."""
        with self._lock:
            return self._header, self._generation

    def refresh(self, challenge: str, generation: int, what: str) -> None:
        """Answer the 401 challenge a request sent with ``generation`` got; a no-op when another thread has
        answered it since. Raises :class:`AuthError` when there is nothing to answer with."""
        with self._lock:
            if generation != self._generation:
                return
            scheme, params = parse_challenge(challenge)
            if scheme == "basic":
                header = self._creds.basic_header() if self._creds else None
                if header is None:
                    raise AuthError(f"{what}: {self._registry} asks for a user and password (basic auth) and none "
                                    "is configured for it", hint=AUTH_HINT)
                if header == self._header:
                    raise AuthError(f"{what}: {self._registry} refused the user and password", hint=AUTH_HINT)
            elif scheme == "bearer":
                header = f"Bearer {self._token(params, what)}"
            else:
                raise AuthError(f"{what}: {self._registry} answered 401 with an unsupported challenge "
                                f"({scheme or 'none'})", hint=AUTH_HINT)
            self._header = header
            self._generation += 1

    def _check(self, token: str, where: str) -> str:
        token = check_token(token, what=f"{where} for {self._registry}")
        self._tokens.append(token)
        return token

    def _token(self, params: dict[str, str], what: str) -> str:
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        host = parts.hostname or ""
        realm_what = f"{what}: the token service of {self._registry} ({parts.scheme}://{parts.netloc})"
        if parts.scheme not in ("http", "https") or not host:
            raise AuthError(f"{what}: {self._registry} names no usable token realm", hint=AUTH_HINT)
        refusal = self._hosts.refusal(parts.scheme, parts.netloc)
        if refusal:
            raise AuthError(f"{realm_what}: {refusal}; no credentials were sent",
                            hint=f"the token service must be HTTPS on a host the agent may reach; {self._hosts.hint()}")
        query = {"scope": self._scope}
        if service := params.get("service"):
            query["service"] = service
        headers = {"user-agent": self._ua, "accept": "application/json"}
        creds = self._creds
        if creds is not None and creds.identity_token:
            body = urlencode({**query, "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                              "client_id": "modelherd"})
            headers["content-type"] = "application/x-www-form-urlencoded"
            resp = self._send("POST", realm, headers, body, realm_what)
        else:
            if creds is not None and (basic := creds.basic_header()):
                headers["authorization"] = basic
            sep = "&" if parts.query else "?"
            resp = self._send("GET", f"{realm}{sep}{urlencode(query)}", headers, None, realm_what)
        try:
            doc = load_json(resp, max_bytes=MAX_TOKEN_RESPONSE)
        except UntrustedInputError:
            raise AuthError(f"{realm_what} answered something that is not JSON", hint=AUTH_HINT) from None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{realm_what} answered no token", hint=AUTH_HINT)
        return self._check(token, "the token its token service issued")

    def _send(self, method: str, url: str, headers: dict[str, str], body: str | None, what: str) -> bytes:
        try:
            resp = self._pool.urlopen(method, url, headers=headers, body=body, redirect=False, retries=False,
                                      preload_content=False, decode_content=True, timeout=TOKEN_TIMEOUT)
        except urllib3.exceptions.HTTPError as e:
            raise TransientSourceError(f"{what}: {type(e).__name__}: {self.redact(str(e))}",
                                       hint="check the network path to the token service") from None
        try:
            data = resp.read(MAX_TOKEN_RESPONSE + 1)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TransientSourceError(f"{what}: reading the answer failed: {type(e).__name__}",
                                       hint="retrying usually helps") from None
        finally:
            resp.release_conn()
        if resp.status == 200:
            if len(data) > MAX_TOKEN_RESPONSE:
                raise AuthError(f"{what} answered more than {MAX_TOKEN_RESPONSE} bytes", hint=AUTH_HINT)
            return data
        if resp.status in (401, 403):
            raise AuthError(f"{what} refused the credentials ({resp.status})", hint=AUTH_HINT)
        if resp.status in (429, 503):
            raise RateLimitedError(f"{what}: rate limited ({resp.status})",
                                   retry_after=parse_retry_after(resp.headers.get("retry-after")),
                                   hint="the token service asked to slow down")
        if resp.status >= 500:
            raise TransientSourceError(f"{what}: server error ({resp.status})", hint="retrying usually helps")
        raise SourceError(f"{what}: unexpected HTTP status {resp.status}", hint=AUTH_HINT)

