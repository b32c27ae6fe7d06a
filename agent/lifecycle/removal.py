"""What happens to the files when a model leaves this node, and who collects staging nobody resumes.

``Remover.remove(ref, target, deleted=...)`` decides and acts, after the label and key are gone, and says what
happened as a :class:`Removal` (an outcome the caller branches on, and the one-line sentence it logs):

    local:// model                                  -> nothing (those files are verified in place, never modified)
    reserved (models.ome/reserve-model-artifact)    -> nothing
    another BaseModel/ClusterBaseModel wants dest   -> nothing
    local storage (deleted or deselected)           -> remove this node's copy and its staging
    shared storage, deselected                      -> nothing (the other nodes read those files)
    shared storage, deleted                         -> under the model's Lease: re-check the above, remove the
                                                       copy and every staging folder of dest, release with phase
                                                       Removed; a node that finds Removed (or no copy) does nothing

``StagingCollector.collect_once()`` removes staging entries nobody resumes (``storage.cleanup.collect_staging``):
orphans (no model points at their destination) unchanged for ``staging_gc_orphan_age_s``, others unchanged for
``staging_gc_stale_age_s``; never a destination this node downloads now or one whose Lease someone holds. On
shared storage a round runs only while this node holds the staging-GC Lease (no waiting: another node's round
is enough).

Invariants: files are removed only by ``storage.cleanup`` (inside the models root, only a modelherd-published
folder of the same source, one rename out of the destination); on shared storage only while holding a Lease,
so one node removes and every other finds nothing to do.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...coordination import LeaseApi, Phase, choose_backend, held_destinations, open_lease, run_exclusive
from ...storage.cleanup import Removal as FilesRemoval
from ...storage.cleanup import collect_staging, remove_published, remove_staging_of, staging_key
from ...storage.destination import root_writable
from ...storage.paths import STAGING_DIRNAME
from ...storage.uri import ModelURI, parse_uri
from ..basemodels import OPEN, RESERVE_LABEL, ModelRef, ModelSpec, SpecPolicy, model_spec
from ..settings import AgentSettings, CoordinationSettings

log = logging.getLogger("modelherd.agent")


@dataclass(frozen=True)
class RemovalTarget:
    """The files a model had on this node: its source, destination, and whether they are reserved."""

    uri: ModelURI
    dest: Path
    reserve: bool = False


class RemovalOutcome(enum.StrEnum):
    """What :meth:`Remover.remove` did with a model's files."""

    REMOVED = "removed"  # this node removed the copy (and its staging)
    KEPT = "kept"  # left in place on purpose (local://, reserved, wanted by another model, shared and deselected)
    ABSENT = "absent"  # nothing to remove here
    REMOVED_ELSEWHERE = "removed elsewhere"  # another node already removed them under the Lease


@dataclass(frozen=True)
class Removal:
    """The outcome, and the sentence that says why (logged as the reason)."""

    outcome: RemovalOutcome
    message: str

    @property
    def removed(self) -> bool:
        return self.outcome is RemovalOutcome.REMOVED


def target_of(spec: ModelSpec) -> RemovalTarget | None:
    """The files of ``spec``; ``None`` when it names none modelherd could have written (a problem)."""
    if spec.uri is None or spec.dest is None:
        return None
    return RemovalTarget(spec.uri, spec.dest, spec.reserve)


def target_from_entry(ref: ModelRef, ours: Mapping[str, Any], models_root: Path,
                      policy: SpecPolicy = OPEN) -> RemovalTarget | None:
    """The files recorded in an entry's ``modelherd`` object (when the CR is gone and no tombstone is left),
    read through :func:`model_spec` so the same checks apply (a path outside the root names nothing)."""
    uri, path = ours.get("storageUri"), ours.get("path")
    if not isinstance(uri, str) or not isinstance(path, str) or not uri:
        return None
    meta: dict[str, Any] = {"name": ref.name, "namespace": ref.namespace}
    if str(ours.get("reserve", "")).lower() == "true":
        meta["labels"] = {RESERVE_LABEL: "true"}
    obj = {"kind": ref.kind, "metadata": meta, "spec": {"storage": {"storageUri": uri, "path": path}}}
    return target_of(model_spec(obj, models_root, policy))


class Remover:
    """Removes a model's files when this node should (see the module); ``leases``: the coordination group."""

    def __init__(self, leases: CoordinationSettings, *, kubeconfig: Path | None, lease_api: LeaseApi | None,
                 models_root: Path, storage_kind: str, node_name: str, namespace: str,
                 list_models: Callable[[], list[Mapping[str, Any]]], shutdown: threading.Event,
                 policy: SpecPolicy = OPEN) -> None:
        self.leases, self.kubeconfig, self.lease_api = leases, kubeconfig, lease_api
        self.models_root, self.storage_kind = models_root, storage_kind
        self.policy = policy
        self.node_name, self.namespace, self.list_models, self.shutdown = node_name, namespace, list_models, shutdown

    def wanted_elsewhere(self, ref: ModelRef, dest: Path) -> ModelRef | None:
        """Another model (not being deleted) that points at ``dest``, from the informer caches."""
        real = os.path.realpath(dest)
        for obj in self.list_models():
            other = model_spec(obj, self.models_root, self.policy)
            if other.ref != ref and not other.deleting and other.dest is not None \
                    and os.path.realpath(other.dest) == real:
                return other.ref
        return None

    def remove(self, ref: ModelRef, target: RemovalTarget, *, deleted: bool) -> Removal:
        """Remove the files of ``ref`` if this node should (see the module); returns what happened."""
        kept = RemovalOutcome.KEPT
        if target.uri.scheme == "local":
            return Removal(kept, "local:// files are never modified")
        if self.storage_kind == "shared" and not deleted:
            return Removal(kept, "shared storage: files kept for the other nodes")
        if self.storage_kind == "shared" and not root_writable(self.models_root):
            return Removal(kept, "read-only models root: a writable node removes the files")
        keep = self._keep(ref, target)
        if keep:
            return Removal(kept, keep)
        if self.storage_kind != "shared":
            return self._describe(self._remove_files(target))
        leases = self.leases
        backend = choose_backend(leases.mode, "shared", self.kubeconfig)
        if backend == "none":
            return self._describe(self._remove_files(target))
        lease = open_lease(backend, uri=target.uri, dest=target.dest, models_root=self.models_root,
                           node_name=self.node_name, namespace=self.namespace, lease_api=self.lease_api,
                           lease_duration_s=leases.lease_duration_s,
                           poll_interval_s=leases.poll_interval_s, jitter_s=leases.wait_jitter_s)
        outcome: list[FilesRemoval] = []
        reason: list[str] = []

        def operation() -> bool:
            why = self._keep(ref, target)  # again, under the Lease: a model created meanwhile keeps them
            if why:
                reason.append(why)
                return False
            outcome.append(self._remove_files(target))
            return outcome[-1].outcome != "kept"

        try:
            done = run_exclusive(lease, operation, done_phase=Phase.REMOVED, working_phase=Phase.REMOVING,
                                 max_wait_s=max(60.0, 4 * leases.lease_duration_s),
                                 jitter_s=leases.wait_jitter_s, cancel=self.shutdown)
        finally:
            lease.close()
        if done is None:
            return Removal(RemovalOutcome.REMOVED_ELSEWHERE, "another node already removed the files")
        return Removal(kept, reason[0]) if reason else self._describe(outcome[0])

    def _keep(self, ref: ModelRef, target: RemovalTarget) -> str:
        if target.reserve:
            return f"files kept: the model carries {RESERVE_LABEL}=true"
        other = self.wanted_elsewhere(ref, target.dest)
        if other is not None:
            return f"files kept: {other.display} points at {target.dest}"
        return ""

    def _remove_files(self, target: RemovalTarget) -> FilesRemoval:
        removal = remove_published(self.models_root, target.dest, writer=self.node_name,
                                   source_uri=target.uri.canonical)
        remove_staging_of(self.models_root, target.dest)
        return removal

    @staticmethod
    def _describe(removal: FilesRemoval) -> Removal:
        if removal.outcome == "removed":
            return Removal(RemovalOutcome.REMOVED, "files removed")
        if removal.outcome == "absent":
            return Removal(RemovalOutcome.ABSENT, "no files to remove")
        return Removal(RemovalOutcome.KEPT, removal.detail)


class StagingCollector:
    """Periodic staging GC (see the module docstring): ``agent`` gives its interval and ages, ``leases`` the
    coordination group."""

    def __init__(self, agent: AgentSettings, leases: CoordinationSettings, *, kubeconfig: Path | None,
                 lease_api: LeaseApi | None, models_root: Path, storage_kind: str, node_name: str, namespace: str,
                 list_models: Callable[[], list[Mapping[str, Any]]], busy_dests: Callable[[], list[str]],
                 shutdown: threading.Event, policy: SpecPolicy = OPEN) -> None:
        self.agent, self.leases, self.kubeconfig, self.lease_api = agent, leases, kubeconfig, lease_api
        self.models_root, self.storage_kind, self.policy = models_root, storage_kind, policy
        self.node_name, self.namespace, self.list_models = node_name, namespace, list_models
        self.busy_dests, self.shutdown = busy_dests, shutdown

    def run(self) -> None:
        interval = self.agent.staging_gc_interval_s
        while not self.shutdown.wait(interval):
            try:
                self.collect_once()
            except Exception:
                log.warning("staging GC round failed; retrying in %.0fs", interval, exc_info=True)

    def collect_once(self) -> list[str]:
        """One round; returns the staging entries removed."""
        root = self.models_root
        if not root_writable(root):
            return []  # a read-only node collects nothing; a writable one does
        if self.storage_kind != "shared":
            return self._collect(set())
        leases = self.leases
        backend = choose_backend(leases.mode, "shared", self.kubeconfig)
        if backend == "none":
            return []  # nobody to agree with: staging on shared storage is only collected under a Lease
        held = held_destinations(backend, models_root=root, namespace=self.namespace,
                                 lease_api=self.lease_api)
        if held is None:
            return []
        protected = {staging_key(root, root / d) for d in held if d}
        lease = open_lease(backend, uri=parse_uri(f"local://{root / STAGING_DIRNAME}"), dest=root / STAGING_DIRNAME,
                           models_root=root, node_name=self.node_name, namespace=self.namespace,
                           lease_api=self.lease_api, lease_duration_s=leases.lease_duration_s,
                           poll_interval_s=leases.poll_interval_s, jitter_s=leases.wait_jitter_s)
        removed: list[str] = []

        def operation() -> bool:
            removed.extend(self._collect(protected))
            return True

        try:
            run_exclusive(lease, operation, done_phase=None, working_phase="Collecting", wait=False,
                          cancel=self.shutdown)
        finally:
            lease.close()
        return removed

    def _collect(self, protected: set[str]) -> list[str]:
        root = self.models_root
        wanted: set[str] = set()
        for obj in self.list_models():
            spec = model_spec(obj, root, self.policy)
            if spec.dest is not None and not spec.deleting:
                wanted.add(staging_key(root, spec.dest))
        protected = protected | {staging_key(root, Path(d)) for d in self.busy_dests() if d}
        return collect_staging(root, wanted=wanted, protected=protected,
                               orphan_age_s=self.agent.staging_gc_orphan_age_s,
                               stale_age_s=self.agent.staging_gc_stale_age_s)
