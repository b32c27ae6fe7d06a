"""Pytest plugin: a real Kubernetes control plane (etcd + kube-apiserver) for tests.

Fixtures
--------
``kube_cluster`` (session)
    Starts one control plane for the run with ``e2e/controlplane/up`` in a temporary directory
    (stopped with ``down`` at the end), or uses an existing cluster when ``KUBECONFIG`` is set and
    ``MODELHERD_USE_EXISTING_CLUSTER=1`` (e.g. kind).
``api_client`` (session)
    ``kubernetes.client.ApiClient`` authenticated as cluster admin.
``kube_namespace``
    A fresh namespace per test, deleted best-effort at teardown.

Helper
------
``mint_sa_kubeconfig(cluster, namespace, sa_name, path)``
    Creates the ServiceAccount if needed, mints a token with the TokenRequest API and writes a
    kubeconfig using it, so code can run with exactly the RBAC a chart grants.

The control plane is built from Go modules on first use (several minutes on 2 cores; cached
afterwards). That build happens at collection time -- outside per-test timeouts -- and only when
a selected test is marked ``k8s``. Without Go, such tests are skipped, or fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTROLPLANE_DIR = REPO_ROOT / "e2e" / "controlplane"
CRD_DIR = REPO_ROOT / "charts" / "modelherd" / "files" / "crds"

_BUILD_TIMEOUT_S = 3600
_UP_TIMEOUT_S = 600
# Set at collection time when the build could not run: (reason, go_missing).
_build_error: tuple[str, bool] | None = None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _use_existing() -> bool:
    return os.environ.get("MODELHERD_USE_EXISTING_CLUSTER") == "1" and bool(os.environ.get("KUBECONFIG"))


def _go_available() -> bool:
    return shutil.which("go") is not None or Path("/usr/local/go/bin/go").is_file()


def _unavailable(reason: str) -> None:
    """Fail loudly in CI, skip with a reason elsewhere."""
    if _in_ci():
        pytest.fail(f"k8s control plane unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"k8s control plane unavailable: {reason}")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the control plane (and kubectl/helm if missing) before any test's timeout starts."""
    global _build_error
    if session.config.option.collectonly or _use_existing():
        return
    if not any(item.get_closest_marker("k8s") for item in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("k8s_fixtures: building/checking the control plane (first build takes minutes)...")
    try:
        proc = subprocess.run(
            [str(CONTROLPLANE_DIR / "build"), "up"],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _build_error = (f"building the control plane took more than {_BUILD_TIMEOUT_S}s", False)
        return
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        go_missing = not _go_available() and "Go is not installed" in proc.stderr
        _build_error = (f"e2e/controlplane/build failed (exit {proc.returncode}):\n{tail}", go_missing)


@dataclass
class KubeCluster:
    """A running API server and how to reach it."""

    kubeconfig: Path
    bin_dir: Path
    server: str
    #: Directory given to ``e2e/controlplane/up``; ``None`` for an existing cluster.
    data_dir: Path | None = None
    _env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def managed(self) -> bool:
        """True when this session started the control plane (so it may restart it)."""
        return self.data_dir is not None

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``KUBECONFIG`` and ``bin_dir`` first on ``PATH``."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def stop(self) -> None:
        if self.data_dir is None:
            raise RuntimeError("cannot stop a cluster this session did not start")
        _run_script("down", self.data_dir)

    def start(self) -> None:
        if self.data_dir is None:
            raise RuntimeError("cannot start a cluster this session did not start")
        _run_script("up", self.data_dir)
        self.server = _server_from_kubeconfig(self.kubeconfig)

    def restart(self) -> None:
        """``down`` + ``up`` on the same data directory (etcd data is kept)."""
        self.stop()
        self.start()


def _run_script(name: str, data_dir: Path) -> str:
    try:
        proc = subprocess.run(
            [str(CONTROLPLANE_DIR / name), str(data_dir)],
            capture_output=True,
            text=True,
            timeout=_UP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"e2e/controlplane/{name} {data_dir} timed out after {_UP_TIMEOUT_S}s") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"e2e/controlplane/{name} {data_dir} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _load_kubeconfig(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a kubeconfig")
    return data


def _current_cluster_entry(path: Path) -> dict[str, Any]:
    """The ``cluster`` mapping of the current context, with file paths made absolute."""
    cfg = _load_kubeconfig(path)
    ctx_name = cfg.get("current-context")
    contexts = {c["name"]: c["context"] for c in cfg.get("contexts") or []}
    clusters = {c["name"]: c["cluster"] for c in cfg.get("clusters") or []}
    if ctx_name not in contexts:
        raise ValueError(f"{path}: current-context {ctx_name!r} not found")
    cluster = dict(clusters[contexts[ctx_name]["cluster"]])
    ca = cluster.get("certificate-authority")
    if ca and not os.path.isabs(ca):
        cluster["certificate-authority"] = str((path.parent / ca).resolve())
    return cluster


def _server_from_kubeconfig(path: Path) -> str:
    return str(_current_cluster_entry(path)["server"])


def _existing_cluster(tmp: Path) -> KubeCluster:
    kubeconfig = Path(os.environ["KUBECONFIG"].split(os.pathsep)[0]).resolve()
    bin_dir = tmp / "bin"
    # kubectl/helm from PATH, else built from Go modules like `up` does.
    proc = subprocess.run(
        [str(CONTROLPLANE_DIR / "build"), "tools", str(bin_dir)],
        capture_output=True,
        text=True,
        timeout=_BUILD_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:  # no Go: link whatever PATH has; tests needing the rest fail clearly
        bin_dir.mkdir(exist_ok=True)
        for tool in ("kubectl", "helm"):
            found = shutil.which(tool)
            if found and not (bin_dir / tool).exists():
                (bin_dir / tool).symlink_to(found)
    return KubeCluster(kubeconfig=kubeconfig, bin_dir=bin_dir, server=_server_from_kubeconfig(kubeconfig))


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    tmp = Path(tempfile.mkdtemp(prefix="modelherd-k8s-"))
    if _use_existing():
        yield _existing_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if _build_error is not None:
        reason, go_missing = _build_error
        if go_missing:
            _unavailable(reason)
        pytest.fail(reason, pytrace=False)
    data_dir = tmp / "controlplane"
    cluster = KubeCluster(kubeconfig=data_dir / "kubeconfig", bin_dir=data_dir / "bin", server="", data_dir=data_dir)
    try:
        cluster.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        except RuntimeError as exc:
            print(f"k8s_fixtures: stopping the control plane failed: {exc}")
        finally:
            if os.environ.get("MODELHERD_KEEP_CLUSTER_DIR") != "1":
                shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def api_client(kube_cluster: KubeCluster) -> Iterator[Any]:
    """``kubernetes.client.ApiClient`` for the cluster admin."""
    yield admin_api_client(kube_cluster)


def admin_api_client(cluster: KubeCluster) -> Any:
    """A new admin ``ApiClient`` (re-reads the kubeconfig, e.g. after a restart)."""
    from kubernetes import config

    return config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig), persist_config=False
    )


@pytest.fixture
def kube_namespace(api_client: Any) -> Iterator[str]:
    """A fresh namespace for one test; deleted best-effort afterwards.

    There is no namespace controller in the test control plane, so a deleted namespace stays
    ``Terminating``; names are unique per test, so that is harmless.
    """
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"mh-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):  # best-effort cleanup
            core.delete_namespace(name)


def mint_sa_kubeconfig(
    cluster: KubeCluster,
    namespace: str,
    sa_name: str,
    path: Path,
    *,
    expiration_seconds: int = 3600,
) -> Path:
    """Write a kubeconfig at ``path`` that authenticates as ServiceAccount ``namespace/sa_name``.

    Creates the ServiceAccount if it does not exist (no controller-manager creates ``default``
    here) and mints a bound token through the TokenRequest API.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = admin_api_client(cluster)
    try:
        core = client.CoreV1Api(api)
        try:
            core.create_namespaced_service_account(
                namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa_name))
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        status = core.create_namespaced_service_account_token(sa_name, namespace, req).status
        if status is None or not status.token:
            raise RuntimeError(f"TokenRequest for {namespace}/{sa_name} returned no token")
        token = status.token
    finally:
        api.close()
    user = f"system:serviceaccount:{namespace}:{sa_name}"
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": _current_cluster_entry(cluster.kubeconfig)}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "cluster", "user": user, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
    path.chmod(0o600)
    return path
