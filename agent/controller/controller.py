"""``modelherd controller``: what OME's BaseModel controller does with the per-node ConfigMaps, for clusters
without OME's controller. One active replica (leader-elected); never run it next to OME's controller.

Wiring: informers on BaseModels (all namespaces), ClusterBaseModels, the labelled status ConfigMaps in
``--namespace`` and Nodes → ``WorkQueue[ModelRef]`` → workers (leader only) → :meth:`ModelController.reconcile`.

Invariants:
- Handlers only read caches and enqueue. A ConfigMap change enqueues every model whose key was *added, changed or
  removed* in it (OME's map function sees only present keys, so a removal never updated ``nodesReady`` nor let a
  finalizer go — contract §11.16); a ConfigMap deleted or unlabelled enqueues every key it had; a Node created or
  deleted enqueues the keys of its ConfigMap.
- ``reconcile`` reads only caches (no API read), then writes at most: the finalizer (added once, on a live CR),
  ``status.state/nodesReady/nodesFailed`` through the status subresource when they differ, and the finalizer's
  removal once no existing node holds the model's key (see :mod:`.status`). The CR's spec is never written.
- Finalizer edits are merge patches carrying the ``resourceVersion`` read (409 → retried from a fresh cache), and
  keep every other finalizer.
- Only the leader reconciles. Workers wait while not leading; becoming leader enqueues every model, so what
  changed while another replica led (or nobody did) is caught up from the caches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..basemodels import GROUP, PLURALS, VERSION, ModelRef
from ..kube import MERGE_PATCH, REQUESTS, ApiError, KubeClient, request
from ..ome.keys import ModelKind
from ..ome.states import LifecycleState
from ..process import WatchProcess, reconcile_once
from ..reporting.configmap import STATUS_LABEL
from ..settings import ClusterSettings, ControllerSettings
from ..watching.informer import EventType
from ..watching.workqueue import WorkQueue
from .leader import LeaderElector, candidate_identity
from .status import node_statuses, status_patch

log = logging.getLogger("modelherd.controller")

LEASE_NAME = "modelherd-controller"
FINALIZERS: dict[ModelKind, str] = {"BaseModel": "basemodels.ome.io/finalizer",
                                    "ClusterBaseModel": "clusterbasemodels.ome.io/finalizer"}
#: While a deletion is held, look again this often anyway (OME: 30 s); changes arrive by watch before that.
DELETION_RECHECK_S = 30.0


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.is_leader = Gauge("modelherd_controller_is_leader", "1 while this replica is the leader", registry=r)
        self.reconciles = Counter("modelherd_controller_reconciles", "Model reconciles by result (ok, error)",
                                  ("result",), registry=r)
        self.writes = Counter("modelherd_controller_writes", "Writes to model CRs by kind (status, finalizer_add, "
                              "finalizer_remove)", ("kind",), registry=r)
        self.queue_depth = Gauge("modelherd_controller_queue_depth", "Models waiting in the work queue", registry=r)
        self.models = Gauge("modelherd_controller_models", "Models by status.state as last written or seen",
                            ("state",), registry=r)
        self.watch_restarts = Counter("modelherd_controller_watch_restarts", "Watch restarts by resource",
                                      ("resource",), registry=r)
        self.api_requests = Gauge("modelherd_controller_api_requests", "API requests made, by verb and resource",
                                  ("verb", "resource"),
                                  registry=r)


def _model_path(ref: ModelRef) -> str:
    plural = PLURALS[ref.kind]
    if ref.kind == "ClusterBaseModel":
        return f"/apis/{GROUP}/{VERSION}/{plural}/{ref.name}"
    return f"/apis/{GROUP}/{VERSION}/namespaces/{ref.namespace}/{plural}/{ref.name}"


def changed_keys(new: Mapping[str, Any] | None, old: Mapping[str, Any] | None) -> set[str]:
    """The data keys added, changed or removed between two versions of a ConfigMap (``None``: no object)."""
    nd = (new or {}).get("data") or {}
    od = (old or {}).get("data") or {}
    return {k for k in set(nd) | set(od) if nd.get(k) != od.get(k)}


class ModelController:
    """The controller process: informers, leader election, workers, HTTP server. See the module docstring.
    ``controller`` gives its server and election timings, ``cluster`` the namespace of the status ConfigMaps and
    of the leader Lease."""

    def __init__(self, api: KubeClient | Any, controller: ControllerSettings, cluster: ClusterSettings, *,
                 workers: int = 2, identity: str | None = None, registry: CollectorRegistry | None = None) -> None:
        self.api, self.namespace = api, cluster.namespace
        namespace = cluster.namespace
        self.registry = registry or CollectorRegistry()
        self.metrics = ControllerMetrics(self.registry)
        self.process = WatchProcess(api, watch_timeout_s=controller.watch_timeout_s,
                                    restarts=self.metrics.watch_restarts, log=log)
        self.shutdown = self.process.shutdown
        self.queue: WorkQueue[ModelRef] = WorkQueue(backoff_base_s=0.5, backoff_max_s=60.0)
        self._leading = threading.Event()
        self._busy = 0
        self._busy_cond = threading.Condition()
        self._n_workers = workers
        self._workers: list[threading.Thread] = []
        self.watch_timeout_s = controller.watch_timeout_s
        informer = self.process.informer

        self.models = {kind: informer(f"/apis/{GROUP}/{VERSION}/{plural}", plural, self._model_handler(kind))
                       for kind, plural in PLURALS.items()}
        self.cm_informer = informer(f"/api/v1/namespaces/{namespace}/configmaps", "configmaps", self._on_configmap,
                                    label_selector=f"{STATUS_LABEL}=true")
        self.node_informer = informer("/api/v1/nodes", "nodes", self._on_node)
        self.informers = self.process.informers

        self.identity = identity or candidate_identity()
        self.elector: LeaderElector | None = None
        if controller.leader_elect:
            self.elector = LeaderElector(api, namespace, LEASE_NAME, self.identity,
                                         on_started_leading=self._started_leading,
                                         on_stopped_leading=self._stopped_leading,
                                         lease_duration_s=controller.lease_duration_s,
                                         renew_deadline_s=controller.renew_deadline_s,
                                         retry_period_s=controller.retry_period_s)
        self._elector_thread: threading.Thread | None = None
        self.server = self.process.serve(controller.bind_address, controller.port, registry=self.registry, checks={
            "healthz": {"ping": lambda: None},
            "livez": {"ping": lambda: None, "loops": self._check_loops},
            "readyz": {"informers-synced": self.process.unsynced, "api-server": self._check_api},
        }, before_scrape=self._before_scrape)

    # ------------------------------------------------------------------------------------------ caches
    def _model(self, ref: ModelRef) -> dict[str, Any] | None:
        key = ref.name if ref.kind == "ClusterBaseModel" else f"{ref.namespace}/{ref.name}"
        return self.models[ref.kind].get(key)

    def _all_refs(self) -> list[ModelRef]:
        return [ModelRef.of({**obj, "kind": kind}) for kind, inf in self.models.items() for obj in inf.list()]

    def _node_exists(self, name: str) -> bool:
        return self.node_informer.get(name) is not None

    def _refs_for_keys(self, keys: Iterable[str]) -> set[ModelRef]:
        """The live models whose ConfigMap key is one of ``keys``: the key computed from each CR is compared with
        ``keys``, never a key parsed back into a name (a truncated key parses into a name no CR has); every CR
        that computes one of ``keys`` is in the result."""
        keys = set(keys)
        if not keys:
            return set()
        return {ref for ref in self._all_refs() if ref.cm_key in keys}

    # ------------------------------------------------------------------------------------------ handlers
    def _model_handler(self, kind: ModelKind) -> Callable[[EventType, dict[str, Any], dict[str, Any] | None], None]:
        def handle(etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            ref = ModelRef.of({**obj, "kind": kind})
            if etype == "DELETED":
                self.queue.remove(ref)
                return
            self.queue.add(ref)
        return handle

    def _on_configmap(self, etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        if etype == "DELETED":  # deleted, or lost the label: every key it had is gone from the view
            keys = set(obj.get("data") or {}) | set((old or {}).get("data") or {})
        else:
            keys = changed_keys(obj, old)
        for ref in self._refs_for_keys(keys):
            self.queue.add(ref)

    def _on_node(self, etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        if etype == "MODIFIED":
            return  # only a Node's existence matters
        name = str((obj.get("metadata") or {}).get("name") or "")
        cm = self.cm_informer.get(f"{self.namespace}/{name}")
        for ref in self._refs_for_keys((cm or {}).get("data") or {}):
            self.queue.add(ref)

    # ------------------------------------------------------------------------------------------ reconcile
    def reconcile(self, ref: ModelRef) -> bool:
        """Converge one model's finalizer and status on what the caches say; False: retry with back-off."""
        obj = self._model(ref)
        if obj is None:
            return True
        meta = obj.get("metadata") or {}
        finalizer = FINALIZERS[ref.kind]
        finalizers = [str(f) for f in meta.get("finalizers") or []]
        deleting = bool(meta.get("deletionTimestamp"))
        statuses = node_statuses(ref.cm_key, self.cm_informer.list(), self._node_exists)
        try:
            if not deleting and finalizer not in finalizers:
                self._patch(ref, {"metadata": {"finalizers": [*finalizers, finalizer],
                                               "resourceVersion": meta.get("resourceVersion")}})
                self.metrics.writes.labels(kind="finalizer_add").inc()
                log.info("%s: finalizer %s added", ref.display, finalizer)
            releasing = deleting and finalizer in finalizers and not statuses.holding
            patch = status_patch(obj.get("status"), statuses)
            if patch is not None and not releasing:  # a CR about to go needs no last status write
                self._patch(ref, {"status": patch}, subresource="/status")
                self.metrics.writes.labels(kind="status").inc()
                log.info("%s: status %s (ready %s, failed %s)", ref.display, statuses.state,
                         list(statuses.ready), list(statuses.failed),
                         extra={"model": ref.display, "state": statuses.state})
            if deleting and finalizer in finalizers:
                if not releasing:
                    log.info("%s: deletion waits for %d node(s) to remove their entry: %s", ref.display,
                             len(statuses.holding), ", ".join(statuses.holding[:10]))
                    self.queue.add_after(ref, DELETION_RECHECK_S)
                else:
                    self._patch(ref, {"metadata": {"finalizers": [f for f in finalizers if f != finalizer],
                                                   "resourceVersion": meta.get("resourceVersion")}})
                    self.metrics.writes.labels(kind="finalizer_remove").inc()
                    log.info("%s: no node holds it any more; finalizer removed", ref.display)
        except ApiError as e:
            if e.status == 404:
                return True  # gone meanwhile: nothing left to do
            if e.status == 409:
                log.info("%s: changed meanwhile (409); retrying from the watch cache", ref.display)
            else:
                log.warning("%s: write failed: %s", ref.display, e)
            return False
        return True

    def _patch(self, ref: ModelRef, body: dict[str, Any], subresource: str = "") -> None:
        request(self.api, "PATCH", _model_path(ref) + subresource, body=body, content_type=MERGE_PATCH)

    # ------------------------------------------------------------------------------------------ leadership
    def _started_leading(self) -> None:
        self.metrics.is_leader.set(1)
        self._leading.set()
        for ref in self._all_refs():
            self.queue.add(ref)

    def _stopped_leading(self, grace_s: float = 5.0) -> None:
        """Workers stop taking work; returns once none is mid-reconcile (or after ``grace_s``)."""
        self._leading.clear()
        self.metrics.is_leader.set(0)
        deadline = time.monotonic() + grace_s
        with self._busy_cond:
            while self._busy and time.monotonic() < deadline:
                self._busy_cond.wait(max(0.01, deadline - time.monotonic()))

    def is_leader(self) -> bool:
        return self._leading.is_set()

    # ------------------------------------------------------------------------------------------ loops
    def _worker(self) -> None:
        while not self.shutdown.is_set():
            if not self._leading.wait(0.5):
                continue
            ref = self.queue.get(timeout=0.5)
            if ref is None:
                continue
            with self._busy_cond:
                leading = self._leading.is_set()
                if leading:
                    self._busy += 1
            if not leading:  # leadership went while we waited: leave it for the next leader's full resync
                self.queue.done(ref)
                continue
            try:
                ok = reconcile_once(self.queue, ref, self.reconcile, self.shutdown, log)
                self.metrics.reconciles.labels(result="ok" if ok else "error").inc()
            finally:
                self.queue.done(ref)
                with self._busy_cond:
                    self._busy -= 1
                    self._busy_cond.notify_all()

    def _check_loops(self) -> str | None:
        dead = [t.name for t in self._workers if not t.is_alive()]
        if self._elector_thread is not None and not self._elector_thread.is_alive() and not self.shutdown.is_set():
            dead.append(self._elector_thread.name)
        return f"threads died: {dead}" if dead and not self.shutdown.is_set() else None

    def _check_api(self) -> str | None:
        return self.process.unanswered(2 * self.watch_timeout_s + 60)

    def _before_scrape(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        for (verb, resource), n in REQUESTS.snapshot().items():
            self.metrics.api_requests.labels(verb=verb, resource=resource).set(n)
        counts: dict[str, int] = {s: 0 for s in (LifecycleState.READY, LifecycleState.FAILED,
                                                  LifecycleState.IN_TRANSIT)}
        for inf in self.models.values():
            for obj in inf.list():
                state = str((obj.get("status") or {}).get("state") or "")
                if state in counts:
                    counts[state] += 1
        for state, n in counts.items():
            self.metrics.models.labels(state=state).set(n)

    # ------------------------------------------------------------------------------------------ run
    def _started(self) -> None:
        log.info("controller %s: serving /healthz /livez /readyz /metrics on port %d; ConfigMaps in %s",
                 self.identity, self.server.port, self.namespace)

    def _synced(self) -> None:
        log.info("controller: caches synced (%d models, %d status ConfigMaps, %d nodes)", len(self._all_refs()),
                 len(self.cm_informer.list()), len(self.node_informer.list()))
        for i in range(self._n_workers):
            t = threading.Thread(target=self._worker, name=f"modelherd-controller-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if self.elector is None:
            log.info("controller: leader election off; reconciling")
            self._started_leading()
        else:
            elector = self.elector
            self._elector_thread = threading.Thread(target=elector.run, args=(self.shutdown,),
                                                    name="modelherd-leader-election", daemon=True)
            self._elector_thread.start()

    def _stopping(self) -> None:
        log.info("controller %s: shutting down", self.identity)
        self.queue.shutdown()
        if self._elector_thread is not None:
            self._elector_thread.join(timeout=15.0)  # stops leading, then releases the Lease
        else:
            self._stopped_leading()
        for t in self._workers:
            t.join(timeout=5.0)

    def run(self, cancel: threading.Event) -> int:
        """Serve, watch and (while leading) reconcile until ``cancel`` is set; then stop in order."""
        code = self.process.run(cancel, started=self._started, synced=self._synced, stopping=self._stopping,
                                sync_thread="modelherd-controller-sync")
        log.info("controller %s: stopped", self.identity)
        return code
