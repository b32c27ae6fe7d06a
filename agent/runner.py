"""``modelherd agent``: the node agent's wiring — informers → work queue → workers → reconciler, plus the HTTP
server, the ConfigMap guard and shutdown.

Invariants:
- Informer handlers only look at caches, set cancel Events and enqueue; they never block on a worker or the
  API server (OME's unbuffered channel stalls every watch behind one busy worker).
- Workers start once every initial list is in (``/readyz`` turns ready then), so a model is never judged against
  a Node or ConfigMap the agent has not seen yet.
- SIGTERM: the queue stops handing out work, every running pull is cancelled (a holder releases its Lease with
  its staging named, so another node resumes at once), the workers are joined, then the process exits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from ..storage import fsdetect
from ..storage.errors import ConfigError
from .basemodels import GROUP, PLURALS, VERSION, ModelRef, SpecPolicy, model_spec
from .kube import REQUESTS, KubeClient
from .kube.leases import KubeLeases
from .kube.secrets import read_secret_key
from .lifecycle.claims import Claims
from .lifecycle.puller import Puller
from .lifecycle.reconciler import NodeContext, Reconciler
from .lifecycle.removal import Remover, StagingCollector
from .lifecycle.verifier import Verifier
from .ome.keys import LABEL_DOMAIN, ModelKind, parse_configmap_key
from .process import WatchProcess, reconcile_once
from .reporting.configmap import STATUS_LABEL, StatusConfigMap
from .reporting.events import EventRecorder
from .reporting.labels import NodeLabels
from .reporting.metrics import AgentMetrics
from .reporting.status import ModelStatusWriter
from .settings import Settings
from .watching.informer import EventType
from .watching.selection import evaluate
from .watching.workqueue import WorkQueue

log = logging.getLogger("modelherd.agent")
_MODEL_LABEL = LABEL_DOMAIN + "/"  # the prefix of the node labels the agent writes (one per model)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("modelherd")
    except Exception:
        return "0+unknown"


class NodeAgent:
    """The node agent of ``node_name`` (``settings.cluster``): the composition root that hands every collaborator
    only its settings group (see the module docstring)."""

    def __init__(self, settings: Settings, api: KubeClient | Any, *, registry: CollectorRegistry | None = None
                 ) -> None:
        cluster, agent = settings.cluster, settings.agent
        self.settings, self.api, self.node_name = agent, api, cluster.node_name
        node_name = self.node_name
        self.namespace = cluster.namespace
        self.models_root = Path(os.path.realpath(Path(cluster.models_root).expanduser()))
        if self.models_root.exists() and not self.models_root.is_dir():
            raise ConfigError(f"the models root {self.models_root} is not a directory",
                              hint="point --models-root-dir at a directory")
        self.models_root.mkdir(parents=True, exist_ok=True)
        fs = fsdetect.detect_filesystem(self.models_root)
        leases = settings.leases
        self.storage_kind = fsdetect.resolve_storage_mode(settings.storage_mode, fs)
        log.info("models root %s: %s storage (%s)", self.models_root, self.storage_kind, fs.evidence)

        self.registry = registry or CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.metrics.info.labels(node=node_name, version=_version()).set(1)
        self.metrics.workers.set(agent.workers)
        for mode in ("shared", "local"):
            self.metrics.storage_mode.labels(mode=mode).set(1 if mode == self.storage_kind else 0)
        self.metrics.watch_root(self.models_root)

        self.process = WatchProcess(api, watch_timeout_s=agent.watch_timeout_s,
                                    restarts=self.metrics.watch_restarts, log=log)
        self.shutdown = self.process.shutdown
        self.queue: WorkQueue[ModelRef] = WorkQueue(backoff_base_s=agent.model_retry_base_s,
                                                    backoff_max_s=agent.model_retry_max_s)
        informer = self.process.informer
        self.models = {
            kind: informer(f"/apis/{GROUP}/{VERSION}/{plural}", plural, self._model_handler(kind))
            for kind, plural in PLURALS.items()
        }
        self.node_informer = informer("/api/v1/nodes", "node", self._on_node,
                                      field_selector=f"metadata.name={node_name}")
        self.cm_informer = informer(f"/api/v1/namespaces/{self.namespace}/configmaps", "configmap",
                                    self._on_configmap, field_selector=f"metadata.name={node_name}")
        self.informers = self.process.informers

        self.policy = SpecPolicy.from_settings(settings.tenancy)
        self.configmap = StatusConfigMap(api, self.namespace, node_name,
                                         cache=lambda: self.cm_informer.get(f"{self.namespace}/{node_name}"))
        self.metrics.status_configmap_bytes.set_function(self.configmap.size)
        self.labels = NodeLabels(api, node_name, cache=self._node, attempts=agent.node_label_retry)
        lease_api = KubeLeases(api)
        place: dict[str, Any] = {"models_root": self.models_root, "storage_kind": self.storage_kind,
                                 "node_name": node_name, "namespace": self.namespace}
        self.claims = Claims(self.models_root, self.policy, self._all_models)
        self.reconciler = Reconciler(
            NodeContext(node_name=node_name, namespace=self.namespace, models_root=self.models_root,
                        storage_kind=self.storage_kind, get_model=self._model, get_node=self._node, policy=self.policy),
            agent=agent, leases=leases, metrics=self.metrics, shutdown=self.shutdown, claims=self.claims,
            status=ModelStatusWriter(configmap=self.configmap, labels=self.labels,
                                     events=EventRecorder(api, node_name), metrics=self.metrics,
                                     node_name=node_name, storage_kind=self.storage_kind),
            puller=Puller(settings.transfer, leases, kubeconfig=cluster.kubeconfig, lease_api=lease_api,
                          read_secret=lambda ns, name, key: read_secret_key(api, ns, name, key),
                          get_node=self._node, **place),
            remover=Remover(leases, kubeconfig=cluster.kubeconfig, lease_api=lease_api, list_models=self._all_models,
                            shutdown=self.shutdown, policy=self.policy, **place))
        self.verifier = Verifier(settings.verification, node_name=node_name, targets=self.reconciler.verify_targets,
                                 enqueue=self.queue.add, metrics=self.metrics, shutdown=self.shutdown)
        self.collector = StagingCollector(agent, leases, kubeconfig=cluster.kubeconfig, lease_api=lease_api,
                                          list_models=self._all_models, busy_dests=self._busy_dests,
                                          shutdown=self.shutdown, policy=self.policy, **place)
        self.server = self.process.serve(agent.bind_address, agent.port, registry=self.registry, checks={
            "healthz": {"models-root": self._check_root},
            "livez": {"ping": lambda: None, "loops": self._check_loops},
            "readyz": {"informers-synced": self.process.unsynced, "api-server": self._check_api,
                       "status-writes": self._check_writes},
        }, before_scrape=self._before_scrape)
        self._restore = threading.Event()
        self._workers: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._housekeeping_beat = time.monotonic()
        self._synced = False

    # ------------------------------------------------------------------------------------------ caches
    def _model(self, ref: ModelRef) -> Mapping[str, Any] | None:
        key = ref.name if ref.kind == "ClusterBaseModel" else f"{ref.namespace}/{ref.name}"
        return self.models[ref.kind].get(key)

    def _node(self) -> Mapping[str, Any] | None:
        return self.node_informer.get(self.node_name)

    def _all_models(self) -> list[Mapping[str, Any]]:
        return [{**obj, "kind": kind} for kind, inf in self.models.items() for obj in inf.list()]

    def _all_refs(self) -> list[ModelRef]:
        return [ModelRef.of({**obj, "kind": kind}) for kind, inf in self.models.items() for obj in inf.list()]

    # ------------------------------------------------------------------------------------------ handlers
    def _model_handler(self, kind: ModelKind) -> Callable[[EventType, dict[str, Any], dict[str, Any] | None], None]:
        def handle(etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            self._on_model(kind, etype, {**obj, "kind": kind}, None if old is None else {**old, "kind": kind})
        return handle

    def _on_model(self, kind: ModelKind, etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        ref = ModelRef.of(obj)
        if etype == "DELETED":
            self.reconciler.forget(ref, obj)
            self.reconciler.cancel(ref, "the model was deleted")
            for other in self.claims.sharing_keys(ref):  # a model refused for sharing its keys
                self.queue.add(other)
        elif (obj.get("metadata") or {}).get("deletionTimestamp"):
            self.reconciler.cancel(ref, "the model is being deleted")
        elif old is not None and ref in self.reconciler.running():
            policy = self.policy
            new_id = model_spec(obj, self.models_root, policy).identity
            if new_id != model_spec(old, self.models_root, policy).identity:
                self.reconciler.cancel(ref, "its storage changed")
            elif not evaluate((obj.get("spec") or {}).get("storage"), self._node() or {}).selected:
                self.reconciler.cancel(ref, "this node is no longer selected")
        self.queue.add(ref)

    def _on_node(self, etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        def user_labels(o: Mapping[str, Any] | None) -> dict[str, str]:
            labels = ((o or {}).get("metadata") or {}).get("labels") or {}
            return {k: v for k, v in labels.items() if not k.startswith(_MODEL_LABEL)}

        if old is not None and user_labels(old) == user_labels(obj):
            # only model labels moved (ours, or someone removed one): re-check the models whose label changed
            new_l = (obj.get("metadata") or {}).get("labels") or {}
            old_l = (old.get("metadata") or {}).get("labels") or {}
            changed = {k for k in set(new_l) | set(old_l)
                       if k.startswith(_MODEL_LABEL) and new_l.get(k) != old_l.get(k)}
            for ref in self._all_refs():
                if ref.label_key in changed:
                    self.queue.add(ref)
            return
        running = self.reconciler.running()
        for ref in self._all_refs():
            if ref in running:
                model = self._model(ref)
                storage = ((model or {}).get("spec") or {}).get("storage")
                if not evaluate(storage, obj).selected:
                    self.reconciler.cancel(ref, "this node is no longer selected")
            self.queue.add(ref)

    def _on_configmap(self, etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if etype == "DELETED" or labels.get(STATUS_LABEL) != "true":
            self._restore.set()
            return
        # an entry of ours edited by someone else: its model's reconcile writes it back (serialised per model,
        # so it never races our own write of the same key)
        data = obj.get("data") or {}
        edited = {k for k, v in self.configmap.remembered().items() if data.get(k) != v}
        if edited:
            for ref in self._all_refs():
                if ref.cm_key in edited:
                    self.queue.add(ref)

    # ------------------------------------------------------------------------------------------ loops
    def _worker(self) -> None:
        while not self.shutdown.is_set():
            ref = self.queue.get(timeout=1.0)
            if ref is None:
                continue
            with self._busy_lock:
                self._busy += 1
            try:
                reconcile_once(self.queue, ref, self.reconciler.reconcile, self.shutdown, log)
            finally:
                with self._busy_lock:
                    self._busy -= 1
                self.queue.done(ref)

    def _housekeeping(self) -> None:
        """Restores a deleted or relabelled ConfigMap; keeps the loop heartbeat (read by ``/livez``)."""
        while not self.shutdown.wait(0.5):
            self._housekeeping_beat = time.monotonic()
            if self._restore.is_set():
                self._restore.clear()
                try:
                    n = self.configmap.restore()
                    log.warning("ConfigMap %s/%s was deleted or lost its labels: restored %d entries",
                                self.namespace, self.node_name, n)
                except Exception as e:
                    log.warning("restoring ConfigMap %s/%s failed (%s); retrying", self.namespace, self.node_name, e)
                    self._restore.set()
                    self.shutdown.wait(2.0)

    def _enqueue_orphans(self) -> None:
        """Entries and labels left for models that no longer exist (deleted while the agent was down).

        An orphan is a key no live CR maps to: keys are compared with the keys of the live CRs, never parsed back
        into names first (a truncated key parses into a name no CR has). An orphan's parsed ref is what the
        reconciler then removes, so it is enqueued only when its ``cm_key`` is that very key."""
        live = {ref.cm_key for ref in self._all_refs()}
        cm = self.cm_informer.get(f"{self.namespace}/{self.node_name}") or {}
        for key in (cm.get("data") or {}):
            if key in live:
                continue
            parsed = parse_configmap_key(key)
            if parsed is None:
                continue
            ref = ModelRef(*parsed)
            if ref.cm_key == key:
                self.queue.add(ref)
            else:
                log.warning("ConfigMap key %r maps to no model and cannot be removed as one; left as it is", key)

    # ------------------------------------------------------------------------------------------ health
    def _check_root(self) -> str | None:
        root = self.models_root
        if not root.is_dir():
            return f"{root} is not a directory"
        if not os.access(root, os.W_OK) and self.storage_kind != "shared":
            return f"{root} is not writable"
        return None  # shared and read-only: this node follows (waits, verifies, never downloads)

    def _check_loops(self) -> str | None:
        bound = self.settings.heartbeat_max_age_s
        if time.monotonic() - self._housekeeping_beat > bound:
            return "the housekeeping loop is stuck"
        dead = [t.name for t in self._workers if not t.is_alive()]
        if not self.verifier.alive():
            dead.append("modelherd-verifier")
        if dead and not self.shutdown.is_set():
            return f"worker threads died: {dead}"
        watch_bound = max(bound, 2 * self.settings.watch_timeout_s + 60)
        stale = self.process.silent(watch_bound) if self._synced else []
        return f"watches without a heartbeat: {stale}" if stale else None

    def _check_writes(self) -> str | None:
        denied = self.reconciler.status_write_denied()
        return f"the API server refuses the agent's status writes (403: may not {denied})" if denied else None

    def _check_api(self) -> str | None:
        return self.process.unanswered(max(self.settings.heartbeat_max_age_s, 2 * self.settings.watch_timeout_s + 60))

    def _before_scrape(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        with self._busy_lock:
            self.metrics.active_workers.set(self._busy)
        for (verb, resource), n in REQUESTS.snapshot().items():
            self.metrics.api_requests.labels(verb=verb, resource=resource).set(n)
        self.metrics.synced.set(1 if self._synced else 0)
        self.metrics.last_heartbeat.set(time.time())

    # ------------------------------------------------------------------------------------------ run
    def _started(self) -> None:
        log.info("agent %s: serving /healthz /livez /readyz /metrics on %s:%d", self.node_name,
                 self.settings.bind_address, self.server.port)
        threading.Thread(target=self._housekeeping, name="modelherd-housekeeping", daemon=True).start()
        threading.Thread(target=self.collector.run, name="modelherd-staging-gc", daemon=True).start()

    def _busy_dests(self) -> list[str]:
        """Destinations this node downloads into now (the staging GC never touches them)."""
        return [t.identity.get("path", "") for t in self.reconciler.running().values()]

    def _synced_start_workers(self) -> None:
        self._synced = True
        log.info("agent %s: initial lists synced (%d models known); starting %d workers", self.node_name,
                 len(self._all_refs()), self.settings.workers)
        self._enqueue_orphans()
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._worker, name=f"modelherd-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        self.verifier.start()

    def _stopping(self, grace_s: float = 10.0) -> None:
        log.info("agent %s: shutting down", self.node_name)
        self.queue.shutdown()
        self.reconciler.cancel_all("the agent is shutting down")
        deadline = time.monotonic() + grace_s
        for t in self._workers:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        self.verifier.join(timeout=max(0.1, deadline - time.monotonic()))

    def run(self, cancel: threading.Event) -> int:
        """Serve, watch and work until ``cancel`` is set (SIGTERM), then stop in order (module docstring)."""
        code = self.process.run(cancel, started=self._started, synced=self._synced_start_workers,
                                stopping=self._stopping, sync_thread="modelherd-sync")
        log.info("agent %s: stopped", self.node_name)
        return code
