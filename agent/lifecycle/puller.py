"""One model's bytes onto this node: its source, its token, the GPU-shape filter and the coordinated pull.

:meth:`Puller.pull` opens the model's source with the credentials of the one token chain
(:mod:`.credentials`), lists it (TensorRT-LLM engines filtered to this node's GPU shape on local storage, the
shape detected once per process by :func:`~modelherd.agent.transfer.gpu_shape` from the Node's instance-type
label), and runs the pull under the model's Lease on shared storage (one download per models root) or alone on
local storage. It reports how this node got the model as a :class:`Pulled` role.

Invariants: the credentials (a Hugging Face token, a registry's docker config, an HTTP bearer token) are resolved
per pull, passed to the source and dropped (never logged or kept); the source
is closed whatever happens; an empty listing is a ``SourceNotFoundError`` before anything is written; ``cancel``
stops the listing's back-offs and the pull at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...coordination import LeaseApi, Role, choose_backend, coordinated_pull
from ...storage.adopt import Adoption
from ...storage.errors import AuthError, SourceNotFoundError
from ...storage.manifest import Manifest
from ...storage.types import Listing
from ..basemodels import ModelSpec
from ..settings import CoordinationSettings, TransferSettings
from ..transfer import engine_options, filter_for_shape, open_model_source
from .credentials import ReadSecret, hf_token, http_token, registry_auth

OCI_AUTH = {"InstancePrincipal": "instance_principal", "UserPrincipal": "user",
            "ResourcePrincipal": "resource_principal", "OkeWorkloadIdentity": "workload_identity"}
INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")


class PullProgress(Protocol):
    """What a pull reports into (:class:`~modelherd.agent.reporting.progress.ProgressReporter`)."""

    def __call__(self, done: int, total: int) -> None: ...

    def follow(self, record: Any) -> None: ...

    def phase(self, name: str, adoption: Adoption | None) -> None: ...


@dataclass(frozen=True)
class Pulled:
    """A published copy at the model's destination, and how this node got it (holder, follower, ready, pulled)."""

    manifest: Manifest
    role: Role


def instance_type(node: Mapping[str, Any] | None) -> str:
    """The Node's instance-type label (the GPU-shape fallback when NVML sees no GPU); ``""`` when it has none."""
    labels = ((node or {}).get("metadata") or {}).get("labels") or {}
    return next((str(labels[k]) for k in INSTANCE_TYPE_LABELS if labels.get(k)), "")


class Puller:
    """Pulls models into ``models_root`` (storage ``storage_kind``) as node ``node_name``."""

    def __init__(self, transfer: TransferSettings, leases: CoordinationSettings, *, kubeconfig: Path | None,
                 lease_api: LeaseApi | None, models_root: Path, storage_kind: str, node_name: str, namespace: str,
                 read_secret: ReadSecret | None, get_node: Callable[[], Mapping[str, Any] | None]) -> None:
        self.transfer, self.leases, self.kubeconfig, self.lease_api = transfer, leases, kubeconfig, lease_api
        self.models_root, self.storage_kind = models_root, storage_kind
        self.node_name, self.namespace = node_name, namespace
        self.read_secret, self.get_node = read_secret, get_node

    def pull(self, spec: ModelSpec, *, cancel: threading.Event, progress: PullProgress,
             on_listing: Callable[[Listing], None]) -> Pulled:
        """Put ``spec``'s model at its destination; ``on_listing`` sees the (filtered) listing before any byte
        moves (it may raise to stop the pull)."""
        assert spec.uri is not None and spec.dest is not None
        uri, transfer, leases = spec.uri, self.transfer, self.leases
        token = hf_token(spec, namespace=self.namespace, read_secret=self.read_secret,
                         ambient=transfer.hf_token) if uri.scheme == "hf" else None
        docker_config = registry_auth(spec, namespace=self.namespace, read_secret=self.read_secret,
                                      ambient=transfer.registry_auth_file) if uri.scheme == "oci-registry" else None
        bearer = http_token(spec, namespace=self.namespace, read_secret=self.read_secret,
                            ambient=None) if uri.scheme in ("https", "http") else None
        source = open_model_source(uri, transfer, hf_token=token, trust_loopback=False,
                                   oci_auth=OCI_AUTH.get(spec.oci_auth) if spec.oci_auth else None,
                                   oci_region=spec.oci_region or None, registry_auth=docker_config,
                                   http_token=bearer, cancel=cancel)
        del token, docker_config, bearer
        shape_filter = spec.trtllm and self.storage_kind == "local"
        itype = instance_type(self.get_node()) if shape_filter else ""

        def listing_fn() -> Listing:
            listing = source.list_files()
            if shape_filter:
                listing = filter_for_shape(listing, transfer, instance_type=itype)
            if not listing.files:
                raise SourceNotFoundError(f"{uri.canonical} has no files to download",
                                          hint="check the repository, revision or prefix")
            on_listing(listing)
            return listing

        backend = choose_backend(leases.mode, self.storage_kind, self.kubeconfig)
        try:
            result = coordinated_pull(
                backend=backend, uri=uri, source=source, listing_fn=listing_fn, dest=spec.dest,
                models_root=self.models_root, options=engine_options(transfer, self.storage_kind),
                node_name=self.node_name, namespace=self.namespace, lease_api=self.lease_api,
                lease_duration_s=leases.lease_duration_s, renew_period_s=leases.lease_renew_period_s,
                jitter_s=leases.wait_jitter_s, poll_interval_s=leases.poll_interval_s,
                cancel=cancel, progress=progress, on_follow=progress.follow,
                on_phase=progress.phase)
        except AuthError as e:
            if uri.scheme == "oci-registry" and not spec.secret_name and not spec.ambient \
                    and transfer.registry_auth_file is not None:
                raise AuthError(f"{e.message} (the agent's own registry credentials serve only ClusterBaseModels "
                                f"and BaseModels of the namespaces in ambient_credential_namespaces, not "
                                f"{spec.ref.namespace})",
                                hint="give the model a kubernetes.io/dockerconfigjson Secret in its namespace and "
                                     "name it in spec.storage.key") from None
            raise
        finally:
            source.close()
        return Pulled(result.manifest, Role(result.role))
