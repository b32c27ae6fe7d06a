"""A real OCI registry on loopback for the registry source's tests: Debian's ``docker-registry`` (CNCF distribution),
artifacts pushed with the real ``oras`` CLI.

* :class:`Registry` starts ``/usr/bin/docker-registry serve CONFIG`` on ``127.0.0.1:<free port>`` with filesystem
  storage under a tmp folder: anonymous, with htpasswd basic auth, or with token auth against :class:`TokenIssuer`
  (a small test token service signing RS256 JWTs with a throwaway key whose self-signed certificate is the
  registry's ``rootcertbundle``).
* :class:`RegistryProxy` sits in front of a registry to misbehave on purpose: ignore ``Range``, redirect blob GETs
  to another origin (a "blob store" serving the registry's own files, which records whether ``Authorization``
  reached it), or redirect in a loop.
* :func:`registry_tools` finds ``docker-registry``, ``htpasswd`` and ``oras`` (scripts/test.sh installs them) or
  skips the test, saying what to install.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ORAS_VERSION = "v1.3.6"  # scripts/test.sh builds this one
SERVICE = "modelherd-test-registry"
ISSUER = "modelherd-test-issuer"
#: distribution accepts a token up to this long after its ``exp`` (its clock-skew leeway)
REGISTRY_LEEWAY_S = 60


@dataclass(frozen=True)
class RegistryTools:
    registry: Path
    htpasswd: Path
    oras: Path


def _find_oras() -> Path | None:
    cache = Path(os.environ.get("MODELHERD_CACHE", Path.home() / ".cache" / "modelherd"))
    for candidate in (cache / "tools" / f"oras-{ORAS_VERSION}" / "bin" / "oras", shutil.which("oras")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def find_registry_tools() -> RegistryTools | str:
    """The tools, or why they are missing."""
    registry = shutil.which("docker-registry") or ("/usr/bin/docker-registry"
                                                   if os.access("/usr/bin/docker-registry", os.X_OK) else None)
    htpasswd = shutil.which("htpasswd")
    oras = _find_oras()
    missing = [name for name, path in (("docker-registry (Debian package docker-registry)", registry),
                                       ("htpasswd (Debian package apache2-utils)", htpasswd),
                                       (f"oras {ORAS_VERSION} (go install oras.land/oras/cmd/oras)", oras)) if not path]
    if missing:
        return "missing " + ", ".join(missing) + "; scripts/test.sh installs them"
    assert registry and htpasswd and oras
    return RegistryTools(Path(registry), Path(htpasswd), oras)


@pytest.fixture(scope="session")
def registry_tools() -> RegistryTools:
    found = find_registry_tools()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- token issuer ------------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenIssuer:
    """``GET /token?service=&scope=`` with basic auth -> a JWT the registry trusts (the distribution token flow).

    ``lifetime_s``: how long a token is accepted by the registry (its 60 s leeway included). ``refuse`` makes every
    later request a 401. ``issued`` counts tokens; ``requests`` records (user, scopes) of each request."""

    users: dict[str, str]
    folder: Path
    lifetime_s: float = 300.0
    refuse: bool = False
    issued: int = 0
    requests: list[tuple[str, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.cert_path = self.folder / "token-cert.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                issuer._answer(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sign(self, sub: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        der = self._cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": ISSUER, "sub": sub, "aud": SERVICE, "iat": now, "nbf": now - 1, "jti": uuid.uuid4().hex,
                  "exp": int(now + self.lifetime_s - REGISTRY_LEEWAY_S), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"

    def _answer(self, req: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        user = ""
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != password:
                user = "!"
        self.requests.append((user, scopes))
        if self.refuse or user == "!":
            req.send_response(401)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and user:  # anonymous: no access at all
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = self.sign(user or "anonymous", access)
        self.issued += 1
        body = json.dumps({"token": token, "access_token": token, "expires_in": int(self.lifetime_s)}).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


# -- the registry ------------------------------------------------------------------------------------------------


class Registry:
    """A running ``docker-registry`` on ``127.0.0.1:port``; ``storage`` is its filesystem storage root."""

    def __init__(self, tools: RegistryTools, folder: Path, *, auth: str = "none",
                 users: dict[str, str] | None = None) -> None:
        self.tools = tools
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.storage = folder / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = users or {}
        self.issuer: TokenIssuer | None = None
        lines = ["version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true", "storage:",
                 "  filesystem:", f"    rootdirectory: {self.storage}", "  delete:", "    enabled: true",
                 "  redirect:", "    disable: true", "http:", f"  addr: {self.host}", "  secret: modelherd-test"]
        if auth == "htpasswd":
            htfile = folder / "htpasswd"
            for i, (user, password) in enumerate(self.users.items()):
                subprocess.run([str(tools.htpasswd), "-B", "-b", *(["-c"] if i == 0 else []), str(htfile), user,
                                password], check=True, capture_output=True)
            lines += ["auth:", "  htpasswd:", "    realm: modelherd-test", f"    path: {htfile}"]
        elif auth == "token":
            self.issuer = TokenIssuer(self.users, folder)
            lines += ["auth:", "  token:", f"    realm: {self.issuer.realm}", f"    service: {SERVICE}",
                      f"    issuer: {ISSUER}", f"    rootcertbundle: {self.issuer.cert_path}"]
        elif auth != "none":
            raise ValueError(auth)
        config = folder / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        self.log = folder / "registry.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(tools.registry), "serve", str(config)], stdout=out,
                                         stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", "")})
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                conn.close()
                return
            time.sleep(0.05)
        raise RuntimeError("docker-registry did not start in 20 s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.issuer is not None:
            self.issuer.close()

    # -- pushing with the real oras CLI ----------------------------------------------------------------
    def oras(self, *args: str, cwd: Path | None = None, user: str | None = None) -> str:
        """Run ``oras ARGS --plain-http`` (with ``-u/-p`` of ``user``); its stdout."""
        cmd = [str(self.tools.oras), *args, "--plain-http"]
        if user is not None:
            cmd += ["-u", user, "-p", self.users[user]]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.folder), "DOCKER_CONFIG": str(self.folder)}
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"oras {' '.join(args[:1])} failed: {done.stderr[-2000:]}")
        return done.stdout

    def push_files(self, ref: str, folder: Path, names: list[str], *, user: str | None = None,
                   extra: tuple[str, ...] = ()) -> str:
        """``oras push HOST/REF name...`` from ``folder`` (an ORAS file artifact); the manifest digest."""
        out = self.oras("push", f"{self.host}/{ref}", *names, *extra, "--format", "go-template={{.digest}}",
                        cwd=folder, user=user)
        return out.strip().splitlines()[-1]

    def push_blob(self, repo: str, path: Path, *, user: str | None = None) -> str:
        """``oras blob push HOST/REPO PATH``; the blob's digest."""
        self.oras("blob", "push", f"{self.host}/{repo}", str(path), user=user)
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()

    def push_manifest(self, ref: str, manifest: dict[str, Any], tmp: Path, *, user: str | None = None) -> str:
        """``oras manifest push HOST/REF`` of ``manifest`` as it is (nothing checked on our side); its digest."""
        path = tmp / f"manifest-{uuid.uuid4().hex}.json"
        data = json.dumps(manifest).encode()
        path.write_bytes(data)
        self.oras("manifest", "push", f"{self.host}/{ref}", str(path), "--media-type",
                  str(manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")), user=user)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def blob_path(self, digest: str) -> Path:
        """The file the registry stores ``digest``'s bytes in (its filesystem driver's layout)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"


@contextlib.contextmanager
def running_registry(tools: RegistryTools, folder: Path, **kw: Any) -> Iterator[Registry]:
    reg = Registry(tools, folder, **kw)
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def registry(registry_tools: RegistryTools, tmp_path: Path) -> Iterator[Registry]:
    """An anonymous registry."""
    with running_registry(registry_tools, tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def basic_registry(registry_tools: RegistryTools, tmp_path: Path) -> Iterator[Registry]:
    """A registry with htpasswd basic auth; user ``puller``."""
    with running_registry(registry_tools, tmp_path / "registry-basic", auth="htpasswd",
                          users={"puller": "s3cret-Basic-pw"}) as reg:
        yield reg


@pytest.fixture
def token_registry(registry_tools: RegistryTools, tmp_path: Path) -> Iterator[Registry]:
    """A registry with token auth against a :class:`TokenIssuer`; user ``puller``."""
    with running_registry(registry_tools, tmp_path / "registry-token", auth="token",
                          users={"puller": "s3cret-Token-pw"}) as reg:
        yield reg


# -- a misbehaving front ---------------------------------------------------------------------------------------


class RegistryProxy:
    """An HTTP front for ``registry``: forwards everything, except what ``mode`` changes for blob GETs:
    ``ignore-range`` (drops ``Range``: the registry answers 200), ``redirect`` (307 to a blob store on another
    origin serving the registry's own files; ``blob_auth_seen`` records whether it got ``Authorization``),
    ``loop`` (302 to itself, forever)."""

    def __init__(self, registry: Registry, mode: str) -> None:
        self.registry = registry
        self.mode = mode
        self.blob_auth_seen: list[bool] = []
        self.blob_requests = 0
        proxy = self

        class Front(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                proxy._front(self)

            do_HEAD = do_GET

        class Store(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                proxy._store(self)

        self._front_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
        self._store_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Store)
        self.port = self._front_server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.store_port = self._store_server.server_address[1]
        for srv in (self._front_server, self._store_server):
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        for srv in (self._front_server, self._store_server):
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> RegistryProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _front(self, req: http.server.BaseHTTPRequestHandler) -> None:
        blob = "/blobs/sha256:" in req.path and req.command == "GET"
        if blob:
            self.blob_requests += 1
        if blob and self.mode == "redirect":
            digest = req.path.rsplit("/", 1)[-1]
            return _reply(req, 307, b"", {"Location": f"http://127.0.0.1:{self.store_port}/store/{digest}?sig=x"})
        if blob and self.mode == "loop":
            return _reply(req, 302, b"", {"Location": req.path})
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "connection")}
        if blob and self.mode == "ignore-range":
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        conn = http.client.HTTPConnection("127.0.0.1", self.registry.port, timeout=30)
        try:
            conn.request(req.command, req.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = {k: v for k, v in resp.getheaders()
                   if k.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive")}
            _reply(req, resp.status, body, out)
        finally:
            conn.close()

    def _store(self, req: http.server.BaseHTTPRequestHandler) -> None:
        self.blob_auth_seen.append("Authorization" in req.headers)
        digest = urllib.parse.urlsplit(req.path).path.rsplit("/", 1)[-1]
        path = self.registry.blob_path(digest)
        if not path.is_file():
            return _reply(req, 404, b"", {})
        _reply(req, 200, path.read_bytes(), {"Content-Type": "application/octet-stream"})


def _reply(req: http.server.BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
    req.send_response(status)
    for k, v in headers.items():
        req.send_header(k, v)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    if req.command != "HEAD":
        req.wfile.write(body)
