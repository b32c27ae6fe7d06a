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
from .kubeapi import REQUESTS
from .lifecycle.reconciler import Env, Reconciler
from .lifecycle.removal import StagingCollector
from .lifecycle.verifier import Verifier
from .models import GROUP, PLURALS, VERSION, ModelRef, SpecPolicy, model_spec
from .reporting.configmap import STATUS_LABEL, StatusConfigMap
from .reporting.events import EventRecorder
from .reporting.keys import ModelKind, parse_configmap_key
from .reporting.labels import NodeLabels
from .reporting.metrics import AgentMetrics
from .server import HealthServer
from .settings import Settings
from .watching.informer import EventType, Informer
from .watching.selection import evaluate
from .watching.workqueue import WorkQueue

log = logging.getLogger("modelherd.agent")
LABEL_PREFIX = "models.ome.io/"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("modelherd")
    except Exception:
        return "0+unknown"


class NodeAgent:
    def __init__(self, settings: Settings, api: Any, *, node_name: str, registry: CollectorRegistry | None = None
                 ) -> None:
        self.settings, self.api, self.node_name = settings, api, node_name
        self.namespace = settings.effective_namespace("ome")
        self.models_root = Path(os.path.realpath(Path(settings.models_root_dir).expanduser()))
        if self.models_root.exists() and not self.models_root.is_dir():
            raise ConfigError(f"the models root {self.models_root} is not a directory",
                              hint="point --models-root-dir at a directory")
        self.models_root.mkdir(parents=True, exist_ok=True)
        fs = fsdetect.detect_filesystem(self.models_root)
        self.storage_kind = fsdetect.resolve_storage_mode(settings.storage_mode, fs)
        log.info("models root %s: %s storage (%s)", self.models_root, self.storage_kind, fs.evidence)

        self.registry = registry or CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.metrics.info.labels(node=node_name, version=_version()).set(1)
        self.metrics.workers.set(settings.num_download_worker)
        for mode in ("shared", "local"):
            self.metrics.storage_mode.labels(mode=mode).set(1 if mode == self.storage_kind else 0)
        self.metrics.watch_root(self.models_root)

        self.shutdown = threading.Event()
        self.queue: WorkQueue[ModelRef] = WorkQueue(backoff_base_s=settings.model_retry_base_s,
                                                    backoff_max_s=settings.model_retry_max_s)
        timeout = settings.watch_timeout_s

        def informer(path: str, name: str, handler: Any, **kw: Any) -> Informer:
            def restarted(why: str) -> None:
                self._watch_restarted(name, why)
            return Informer(api, path, handler=handler, name=name, watch_timeout_s=timeout, on_restart=restarted, **kw)

        self.models = {
            kind: informer(f"/apis/{GROUP}/{VERSION}/{plural}", plural, self._model_handler(kind))
            for kind, plural in PLURALS.items()
        }
        self.node_informer = informer("/api/v1/nodes", "node", self._on_node,
                                      field_selector=f"metadata.name={node_name}")
        self.cm_informer = informer(f"/api/v1/namespaces/{self.namespace}/configmaps", "configmap",
                                    self._on_configmap, field_selector=f"metadata.name={node_name}")
        self.informers = [*self.models.values(), self.node_informer, self.cm_informer]

        self.configmap = StatusConfigMap(api, self.namespace, node_name,
                                         cache=lambda: self.cm_informer.get(f"{self.namespace}/{node_name}"))
        self.labels = NodeLabels(api, node_name, cache=self._node, attempts=settings.node_label_retry)
        env = Env(settings=settings, api=api, node_name=node_name, namespace=self.namespace,
                  models_root=self.models_root, storage_kind=self.storage_kind, get_model=self._model,
                  get_node=self._node, list_models=self._all_models, policy=SpecPolicy.from_settings(settings))
        self.reconciler = Reconciler(env, configmap=self.configmap, labels=self.labels,
                                     events=EventRecorder(api, node_name), metrics=self.metrics,
                                     shutdown=self.shutdown)
        self.verifier = Verifier(node_name=node_name, quick_interval_s=settings.verify_interval_s,
                                 deep_interval_s=settings.deep_verify_interval_s, max_mbps=settings.verify_max_mbps,
                                 targets=self.reconciler.verify_targets, enqueue=self.queue.add, metrics=self.metrics,
                                 shutdown=self.shutdown)
        self.server = HealthServer(settings.bind_address, settings.port, registry=self.registry, checks={
            "healthz": {"models-root": self._check_root},
            "livez": {"ping": lambda: None, "loops": self._check_loops},
            "readyz": {"informers-synced": self._check_synced, "api-server": self._check_api,
                       "status-writes": self._check_writes},
        }, before_scrape=self._before_scrape)
        self._restore = threading.Event()
        self._workers: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._beat = time.monotonic()
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
            for other in self.reconciler.claims.sharing_keys(ref):  # a model refused for sharing its keys
                self.queue.add(other)
        elif (obj.get("metadata") or {}).get("deletionTimestamp"):
            self.reconciler.cancel(ref, "the model is being deleted")
        elif old is not None and ref in self.reconciler.running():
            policy = self.reconciler.env.policy
            new_id = model_spec(obj, self.models_root, policy).identity
            if new_id != model_spec(old, self.models_root, policy).identity:
                self.reconciler.cancel(ref, "its storage changed")
            elif not evaluate((obj.get("spec") or {}).get("storage"), self._node() or {}).selected:
                self.reconciler.cancel(ref, "this node is no longer selected")
        self.queue.add(ref)

    def _on_node(self, etype: EventType, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        def user_labels(o: Mapping[str, Any] | None) -> dict[str, str]:
            labels = ((o or {}).get("metadata") or {}).get("labels") or {}
            return {k: v for k, v in labels.items() if not k.startswith(LABEL_PREFIX)}

        if old is not None and user_labels(old) == user_labels(obj):
            # only model labels moved (ours, or someone removed one): re-check the models whose label changed
            new_l = (obj.get("metadata") or {}).get("labels") or {}
            old_l = (old.get("metadata") or {}).get("labels") or {}
            changed = {k for k in set(new_l) | set(old_l)
                       if k.startswith(LABEL_PREFIX) and new_l.get(k) != old_l.get(k)}
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

    def _watch_restarted(self, resource: str, why: str) -> None:
        self.metrics.watch_restarts.labels(resource=resource).inc()
        log.warning("watch of %s restarted: %s", resource, why)

    # ------------------------------------------------------------------------------------------ loops
    def _worker(self) -> None:
        while not self.shutdown.is_set():
            self._beat = time.monotonic()
            ref = self.queue.get(timeout=1.0)
            if ref is None:
                continue
            with self._busy_lock:
                self._busy += 1
            try:
                ok = self.reconciler.reconcile(ref)
                if ok:
                    self.queue.forget(ref)
                elif not self.shutdown.is_set():
                    self.queue.add_rate_limited(ref)
            except Exception:
                log.exception("%s: reconcile failed unexpectedly; retrying with back-off", ref.display)
                if not self.shutdown.is_set():
                    self.queue.add_rate_limited(ref)
            finally:
                with self._busy_lock:
                    self._busy -= 1
                self.queue.done(ref)

    def _housekeeping(self) -> None:
        """Restores a deleted or relabelled ConfigMap; keeps the loop heartbeat."""
        while not self.shutdown.wait(0.5):
            self._beat_hk = time.monotonic()
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
        hk = getattr(self, "_beat_hk", time.monotonic())
        if time.monotonic() - hk > bound:
            return "the housekeeping loop is stuck"
        dead = [t.name for t in self._workers if not t.is_alive()]
        if not self.verifier.alive():
            dead.append("modelherd-verifier")
        if dead and not self.shutdown.is_set():
            return f"worker threads died: {dead}"
        watch_bound = max(bound, 2 * self.settings.watch_timeout_s + 60)
        stale = [i.name for i in self.informers if self._synced and not i.healthy(watch_bound)]
        return f"watches without a heartbeat: {stale}" if stale else None

    def _check_synced(self) -> str | None:
        missing = [i.name for i in self.informers if not i.has_synced()]
        return f"not synced yet: {missing}" if missing else None

    def _check_writes(self) -> str | None:
        denied = self.reconciler.status_write_denied()
        return f"the API server refuses the agent's status writes (403: may not {denied})" if denied else None

    def _check_api(self) -> str | None:
        bound = max(self.settings.heartbeat_max_age_s, 2 * self.settings.watch_timeout_s + 60)
        stale = [i.name for i in self.informers if not i.healthy(bound)]
        return f"no answer from the API server for {stale}" if stale else None

    def _before_scrape(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        with self._busy_lock:
            self.metrics.active_workers.set(self._busy)
        for verb, n in REQUESTS.snapshot().items():
            self.metrics.api_requests.labels(verb=verb).set(n)
        self.metrics.synced.set(1 if self._synced else 0)
        self.metrics.last_heartbeat.set(time.time())

    # ------------------------------------------------------------------------------------------ run
    def start(self) -> None:
        self.server.start()
        log.info("agent %s: serving /healthz /livez /readyz /metrics on %s:%d", self.node_name,
                 self.settings.bind_address, self.server.port)
        for inf in self.informers:
            inf.start()
        threading.Thread(target=self._housekeeping, name="modelherd-housekeeping", daemon=True).start()
        collector = StagingCollector(self.settings, models_root=self.models_root, storage_kind=self.storage_kind,
                                     node_name=self.node_name, namespace=self.namespace,
                                     list_models=self._all_models, busy_dests=self._busy_dests,
                                     shutdown=self.shutdown)
        threading.Thread(target=collector.run, name="modelherd-staging-gc", daemon=True).start()

    def _busy_dests(self) -> list[str]:
        """Destinations this node downloads into now (the staging GC never touches them)."""
        return [t.identity.get("path", "") for t in self.reconciler.running().values()]

    def wait_synced(self) -> bool:
        while not self.shutdown.is_set():
            if all(i.wait_synced(1.0) for i in self.informers):
                self._synced = True
                log.info("agent %s: initial lists synced (%d models known); starting %d workers", self.node_name,
                         len(self._all_refs()), self.settings.num_download_worker)
                self._enqueue_orphans()
                for i in range(self.settings.num_download_worker):
                    t = threading.Thread(target=self._worker, name=f"modelherd-worker-{i}", daemon=True)
                    t.start()
                    self._workers.append(t)
                self.verifier.start()
                return True
        return False

    def stop(self, grace_s: float = 10.0) -> None:
        log.info("agent %s: shutting down", self.node_name)
        self.shutdown.set()
        self.queue.shutdown()
        self.reconciler.cancel_all("the agent is shutting down")
        deadline = time.monotonic() + grace_s
        for t in self._workers:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        self.verifier.join(timeout=max(0.1, deadline - time.monotonic()))
        for inf in self.informers:
            inf.stop()
        self.server.stop()
        log.info("agent %s: stopped", self.node_name)

    def run(self, cancel: threading.Event) -> int:
        self.start()
        try:
            threading.Thread(target=self.wait_synced, name="modelherd-sync", daemon=True).start()
            cancel.wait()
        finally:
            self.stop()
        return 0
