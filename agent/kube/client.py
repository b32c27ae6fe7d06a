"""A light Kubernetes transport for the node agent: base URL, bearer token and a TLS-configured urllib3 pool.

Why not ``kubernetes.client`` for everything: importing it loads thousands of generated model classes (about
0.4 s of CPU and 30 MiB per process). A DaemonSet restart on 32 nodes starts 32 agents at once, and every
request the agent makes is raw JSON anyway (:mod:`modelherd.agent.kube.request`, the informers). So the agent loads
its credentials itself for the two common cases — the in-cluster ServiceAccount and a kubeconfig with a token or
a client certificate — and falls back to the ``kubernetes`` library's loader for anything else (exec and
auth-provider plugins), through the same :class:`KubeClient` interface; the library is imported only then.
Everything else — status writes, informers, Leases of coordinated pulls and of leader election — goes through
the one client this module loads (one urllib3 pool per process).

Invariants: credentials are never logged or put into an exception message; a rotated ServiceAccount token is
re-read from its file (at most once a minute); certificate/key data from a kubeconfig is written only to a
private temporary folder (0700) removed at exit.
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import urllib3

from ...storage.errors import ConfigError

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeClient:
    """Where the API server is, how to authenticate, and the connection pool to reach it."""

    def __init__(self, host: str, pool: urllib3.PoolManager, token: Callable[[], str | None]) -> None:
        self.host = host.rstrip("/")
        self.pool = pool
        self._token = token

    def prepare(self, path: str, query: Sequence[tuple[str, str]] | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
        """The URL and headers (with the bearer token, when there is one) of a request to ``path``."""
        url = self.host + path + (f"?{urllib.parse.urlencode(list(query))}" if query else "")
        out = dict(headers or {})
        token = self._token()
        if token:
            out["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        return url, out


def _file_token(path: Path) -> Callable[[], str | None]:
    """Read a (rotating) token file, again when it changed and at most once a minute otherwise."""
    state: dict[str, Any] = {"at": 0.0, "mtime": None, "token": None}
    lock = threading.Lock()

    def token() -> str | None:
        with lock:
            now = time.monotonic()
            if now - state["at"] >= 60 or state["token"] is None:
                try:
                    st = path.stat()
                    if st.st_mtime != state["mtime"] or state["token"] is None:
                        state["token"] = path.read_text().strip() or None
                        state["mtime"] = st.st_mtime
                except OSError:
                    pass
                state["at"] = now
            value: str | None = state["token"]
            return value
    return token


_private_dir: Path | None = None


def _private_file(data: bytes, suffix: str) -> str:
    global _private_dir
    if _private_dir is None:
        _private_dir = Path(tempfile.mkdtemp(prefix="modelherd-kube-"))
        os.chmod(_private_dir, 0o700)
        atexit.register(shutil.rmtree, _private_dir, True)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=_private_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return name


def _pool(*, ca_file: str | None, cert_file: str | None, key_file: str | None, verify: bool,
          maxsize: int = 16) -> urllib3.PoolManager:
    if not verify:
        return urllib3.PoolManager(maxsize=maxsize, cert_reqs=ssl.CERT_NONE)
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return urllib3.PoolManager(maxsize=maxsize, ssl_context=ctx)


def in_cluster() -> KubeClient | None:
    """The pod's ServiceAccount (``KUBERNETES_SERVICE_HOST`` + the mounted token and CA), else ``None``."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = SA_DIR / "token"
    if not host or not token.is_file():
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    ca = SA_DIR / "ca.crt"
    return KubeClient(f"https://{host}:{port}", _pool(ca_file=str(ca) if ca.is_file() else None, cert_file=None,
                                                       key_file=None, verify=True), _file_token(token))


def _data_or_file(entry: Mapping[str, Any], key: str, base: Path, suffix: str) -> str | None:
    if entry.get(f"{key}-data"):
        return _private_file(base64.b64decode(str(entry[f"{key}-data"])), suffix)
    if entry.get(key):
        p = Path(str(entry[key]))
        return str(p if p.is_absolute() else base / p)
    return None


def from_kubeconfig(path: Path) -> KubeClient | None:
    """A client for the current context of ``path`` (token or client certificate); ``None`` when the user needs
    a plugin (exec, auth-provider) this loader does not run."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the kubeconfig {path}: {type(e).__name__}",
                          hint="pass --kubeconfig with a readable kubeconfig") from None

    def named(kind: str, name: str) -> dict[str, Any]:
        for item in doc.get(kind) or []:
            if item.get("name") == name:
                return dict(item.get(kind[:-1]) or {})
        raise ConfigError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}", hint="fix the kubeconfig")

    ctx_name = doc.get("current-context")
    if not ctx_name:
        raise ConfigError(f"kubeconfig {path} has no current-context", hint="kubectl config use-context NAME")
    ctx = named("contexts", ctx_name)
    cluster, user = named("clusters", ctx.get("cluster", "")), named("users", ctx.get("user", ""))
    if user.get("exec") or user.get("auth-provider"):
        return None
    base = path.parent
    server = str(cluster.get("server") or "")
    if not server:
        raise ConfigError(f"kubeconfig {path}: the cluster has no server", hint="fix the kubeconfig")
    pool = _pool(ca_file=_data_or_file(cluster, "certificate-authority", base, ".crt"),
                 cert_file=_data_or_file(user, "client-certificate", base, ".crt"),
                 key_file=_data_or_file(user, "client-key", base, ".key"),
                 verify=not cluster.get("insecure-skip-tls-verify"))
    if user.get("token"):
        token = str(user["token"])
        return KubeClient(server, pool, lambda: token)
    if user.get("tokenFile"):
        return KubeClient(server, pool, _file_token(Path(str(user["tokenFile"]))))
    if user.get("username") and user.get("password"):
        basic = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
        return KubeClient(server, pool, lambda: f"Basic {basic}")
    return KubeClient(server, pool, lambda: None)


def from_api_client(api: Any) -> KubeClient:
    """Adapt a ``kubernetes.client.ApiClient`` (its host, auth settings — refreshed by its configuration — and
    its pool)."""
    cached: KubeClient | None = getattr(api, "_modelherd_kubeclient", None)
    if cached is not None:
        return cached
    cfg = api.configuration

    def token() -> str | None:
        value = cfg.auth_settings().get("BearerToken", {}).get("value")
        return str(value) if value else None

    client = KubeClient(cfg.host, api.rest_client.pool_manager, token)
    api._modelherd_kubeclient = client
    return client


def transport(api: Any) -> KubeClient:
    """A :class:`KubeClient` for either kind of client the agent is handed."""
    return api if isinstance(api, KubeClient) else from_api_client(api)


def load(kubeconfig: Path | None) -> KubeClient:
    """``--kubeconfig``, else the in-cluster ServiceAccount, else ``KUBECONFIG`` / ``~/.kube/config``."""
    if kubeconfig is None:
        found = in_cluster()
        if found is not None:
            return found
        env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        kubeconfig = Path(env) if env else Path("~/.kube/config").expanduser()
    kubeconfig = Path(kubeconfig).expanduser()
    if not kubeconfig.is_file():
        raise ConfigError(f"no Kubernetes credentials: {kubeconfig} does not exist and no ServiceAccount is mounted",
                          hint="run in a pod with a ServiceAccount, or pass --kubeconfig")
    client = from_kubeconfig(kubeconfig)
    if client is not None:
        return client
    return from_api_client(_library_client(kubeconfig))


def _library_client(kubeconfig: Path) -> Any:
    """A ``kubernetes.client.ApiClient`` from the library's own loader: the exec and auth-provider plugins this
    module does not implement. Imported here, on first use only (see the module: the import is the cost avoided)."""
    from kubernetes import config  # the one place the agent loads the kubernetes library

    try:
        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), persist_config=False)
    except (config.ConfigException, OSError, ValueError) as e:
        raise ConfigError(f"cannot load Kubernetes credentials from {kubeconfig}: {type(e).__name__}",
                          hint="pass --kubeconfig, or run in a pod with a ServiceAccount") from None
