"""Coordination: on shared storage, exactly one node downloads a model; the others wait, verify, and are Ready.

Entry points (the CLI and the agent call these)::

    choose_backend(mode: str, storage_kind: str, kubeconfig: Path | None) -> Literal["kubernetes", "file", "none"]

    coordinated_pull(*, backend: "kubernetes" | "file" | "none", uri: ModelURI, source: Source,
                     listing_fn: Callable[[], Listing], dest: Path, models_root: Path,
                     options: EngineOptions, node_name: str, namespace: str = "default",
                     lease_api: LeaseApi | None = None, lease_duration_s: float = 30.0,
                     renew_period_s: float = 10.0, jitter_s: float = 1.0, poll_interval_s: float = 10.0,
                     cancel: threading.Event | None = None, progress: Callable[[int, int], None] | None = None,
                     selection: Selection = ALL_FILES,
                     on_follow: Callable[[LeaseRecord | None], None] | None = None,
                     on_phase: PhaseFn | None = None) -> PullResult

    kube.list_leases(lease_api, namespace) -> list[LeaseView] / format_leases(rows)
    filelease.list_file_leases(models_root) -> list[LeaseRecord]   (view_of() turns one into a LeaseView)

The middle package (``storage`` <- ``coordination`` <- ``agent``): coordination builds no Kubernetes client and
imports no agent code; the Kubernetes store works over a :class:`LeaseApi` (``leaseapi``) that the caller implements
over the client it holds.

``listing_fn`` is called only by the node that downloads; followers never contact the origin.
Modules: ``backend`` (record, protocol, observation clock, request counter), ``leaseapi`` (what the Kubernetes
store needs from a client), ``kube`` (Lease over a LeaseApi),
``filelease`` (lease file), ``coordinator`` (state machine), ``choose`` (mode choice + entry point),
``exclusive`` (one short operation under a lease), ``identity`` (names/labels/annotations), ``views`` (printable
rows), ``errors``, ``microtime``.
"""

from .backend import LeaseBackend, LeaseRecord, LeaseStatus, Observation, Phase, RequestCounter
from .coordinator import LeaseTiming, PullResult, Role, run_coordinated
from .errors import CoordinationError, HolderFailedError, LeaseLostError, LeaseUnavailableError
from .exclusive import held_destinations, run_exclusive
from .identity import ModelIdentity
from .leaseapi import LeaseApi, LeaseApiError
from .leaseviews import LeaseView, format_leases
from .pull import choose_backend, coordinated_pull, open_lease

__all__ = [
    "CoordinationError",
    "HolderFailedError",
    "LeaseApi",
    "LeaseApiError",
    "LeaseBackend",
    "LeaseLostError",
    "LeaseRecord",
    "LeaseStatus",
    "LeaseTiming",
    "LeaseUnavailableError",
    "LeaseView",
    "ModelIdentity",
    "Observation",
    "Phase",
    "PullResult",
    "RequestCounter",
    "Role",
    "choose_backend",
    "coordinated_pull",
    "format_leases",
    "held_destinations",
    "open_lease",
    "run_coordinated",
    "run_exclusive",
]
