"""Which lease store to use, and the one entry point the CLI and the agent call.

Invariant: coordination never builds a Kubernetes client. The ``kubernetes`` store works over the
:class:`~.leaseapi.LeaseApi` the caller injects (the agent's one client and connection pool); choosing that store
only looks for credentials (a kubeconfig file, a mounted ServiceAccount token) and reads none of them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ..storage import engine
from ..storage.errors import ConfigError
from ..storage.manifest import Manifest
from ..storage.options import EngineOptions, PhaseFn
from ..storage.types import ALL_FILES, Listing, Selection, Source
from ..storage.uri import ModelURI
from .backend import LeaseBackend, LeaseRecord, RequestCounter
from .coordinator import LeaseTiming, PullResult, Role, identity_for, run_coordinated
from .errors import CoordinationError
from .filelease import FileLease
from .kubelease import KubernetesLease
from .leaseapi import LeaseApi

log = logging.getLogger(__name__)

BackendKind = Literal["kubernetes", "file", "none"]
_DEFAULT_KUBECONFIG = Path("~/.kube/config")
#: The token a pod's ServiceAccount mounts (the agent's client reads the same folder: agent/kube/client.py).
SERVICEACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def kubernetes_reachable(kubeconfig: Path | None) -> bool:
    """A kubeconfig file is given or at ``~/.kube/config``, or a ServiceAccount token is mounted."""
    if kubeconfig is not None:
        return Path(kubeconfig).expanduser().is_file()
    return SERVICEACCOUNT_TOKEN.is_file() or _DEFAULT_KUBECONFIG.expanduser().is_file()


def choose_backend(mode: str, storage_kind: str, kubeconfig: Path | None) -> BackendKind:
    """``auto``: kubernetes on shared storage with Kubernetes credentials, file on shared storage without,
    none on local storage (each node downloads for itself). An explicit mode is honoured as given, except that
    ``kubernetes`` without any credentials is a :class:`ConfigError`."""
    if mode == "none":
        return "none"
    if mode == "file":
        return "file"
    if mode == "kubernetes":
        if not kubernetes_reachable(kubeconfig):
            raise ConfigError("--coordination kubernetes, but no kubeconfig or in-cluster ServiceAccount found",
                              hint="pass --kubeconfig, or use --coordination file|none")
        return "kubernetes"
    if mode != "auto":
        raise ConfigError(f"unknown coordination mode {mode!r}", hint="use auto, kubernetes, file or none")
    if storage_kind != "shared":
        return "none"
    return "kubernetes" if kubernetes_reachable(kubeconfig) else "file"


def open_lease(kind: BackendKind, *, uri: ModelURI, dest: Path, models_root: Path, node_name: str,
               namespace: str = "default", lease_api: LeaseApi | None = None, lease_duration_s: float = 30.0,
               poll_interval_s: float = 10.0, jitter_s: float = 1.0,
               counter: RequestCounter | None = None) -> LeaseBackend:
    """The lease of ``uri`` into ``dest`` in the chosen store (``kind`` must not be ``none``); the ``kubernetes``
    store needs ``lease_api`` (the caller's client)."""
    identity = identity_for(uri.canonical, uri.revision, dest, models_root)
    if kind == "kubernetes":
        if lease_api is None:
            raise CoordinationError("the Kubernetes lease store needs an API client",
                                    hint="pass lease_api (the agent's client), or use --coordination file|none")
        return KubernetesLease(lease_api, namespace or "default", identity, node_name,
                               duration_s=lease_duration_s, poll_interval_s=poll_interval_s, jitter_s=jitter_s,
                               request_timeout_s=max(1.0, min(10.0, lease_duration_s / 3)), counter=counter)
    if kind == "file":
        return FileLease(models_root, identity, node_name, duration_s=lease_duration_s,
                         poll_interval_s=min(poll_interval_s, max(0.2, lease_duration_s / 6)),
                         jitter_s=min(jitter_s, max(0.1, lease_duration_s / 10)), counter=counter)
    raise CoordinationError(f"no lease for coordination mode {kind!r}")


def coordinated_pull(
    *,
    backend: BackendKind,
    uri: ModelURI,
    source: Source,
    listing_fn: Callable[[], Listing],
    dest: Path,
    models_root: Path,
    options: EngineOptions,
    node_name: str,
    namespace: str = "default",
    lease_api: LeaseApi | None = None,
    lease_duration_s: float = 30.0,
    renew_period_s: float = 10.0,
    jitter_s: float = 1.0,
    poll_interval_s: float = 10.0,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    selection: Selection = ALL_FILES,
    on_follow: Callable[[LeaseRecord | None], None] | None = None,
    on_phase: PhaseFn | None = None,
) -> PullResult:
    """Put ``uri`` at ``dest`` with at most one download per shared models root; return how: the manifest, this
    node's role (``pulled`` without coordination), the epoch it wrote under, the lease requests it made.

    ``backend="none"`` is a plain engine pull by this node. ``lease_api`` is the caller's Kubernetes client for
    ``backend="kubernetes"`` (see :func:`open_lease`). ``selection`` is the
    file selection the source applies (``--allow``/``--ignore``), part of the model's identity. ``on_follow``
    (see :func:`run_coordinated`) lets a caller watch the holder's progress while this node waits; ``on_phase``
    (see :func:`run_coordinated`) tells when this node adopts a copy modelherd did not publish, and what it found.
    """
    if backend == "none":
        manifest: Manifest = engine.pull(source, dest, listing=listing_fn(), models_root=models_root,
                                         options=options, writer=node_name, cancel=cancel, progress=progress,
                                         on_phase=on_phase)
        return PullResult(manifest, role=Role.PULLED)
    timing = LeaseTiming(duration_s=lease_duration_s, renew_period_s=renew_period_s, jitter_s=jitter_s)
    lease = open_lease(backend, uri=uri, dest=dest, models_root=models_root, node_name=node_name,
                       namespace=namespace, lease_api=lease_api, lease_duration_s=lease_duration_s,
                       poll_interval_s=poll_interval_s, jitter_s=jitter_s)
    try:
        outcome = run_coordinated(lease, source=source, listing_fn=listing_fn, dest=dest, models_root=models_root,
                                  node=node_name, options=options, timing=timing, cancel=cancel, progress=progress,
                                  selection=selection, on_follow=on_follow, on_phase=on_phase)
    finally:
        lease.close()
    log.info("%s at %s: %s (epoch %s, %d lease requests)", uri.canonical, dest, outcome.role, outcome.epoch,
             outcome.lease_requests)
    return outcome
