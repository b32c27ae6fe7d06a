"""One model on this node: from what the CR asks to what the node reports.

``Reconciler.reconcile(ref)`` is called by a worker for one model at a time (the work queue never hands one key
to two workers). It reads the CR and this Node from the informer caches and converges:

    CR gone / being deleted / node not selected  -> cancel any download, remove the label and ConfigMap key
    CR malformed, unsupported scheme, path outside the root -> Failed with the reason (no retry until it changes)
    already published and quick-verified on disk   -> Ready, with no origin request and no lease; nothing is
                                                       written when the label and entry already say so
    else -> (start-up jitter) Updating -> coordinated pull (shared) or own pull (local) -> Ready | Failed

Invariants:
- The label is written before the ConfigMap entry (OME's order); neither is written when already in place, so a
  restart with every model on disk sends no write and no label ever leaves Ready.
- A cancelled pull (delete, deselect, spec change, SIGTERM) writes nothing: the reconcile that follows (the queue
  re-runs the key once the worker is done) writes the final state, so a deleted model's label and entry never
  come back.
- A failure is Failed with its reason, counted, recorded as an Event and retried with capped exponential
  back-off; it never stops the other models.
- Credentials are read per pull and passed down; they are never logged, stored, or put into an entry or Event.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ...storage.adopt import Adoption, looks_adoptable, unpublished
from ...storage.credentials import check_token
from ...storage.destination import ensure_writable, fs_error, root_writable
from ...storage.errors import CancelledError, ConfigError, ModelherdError, RateLimitedError, SourceNotFoundError
from ...storage.manifest import Manifest
from ...storage.paths import quote_name
from ...storage.ready import published_model
from ...storage.types import Listing
from ..kubeapi import ApiError, UnsafeApiPathError, api_path, request
from ..logredact import register_secret
from ..models import OPEN, ModelRef, ModelSpec, SpecPolicy, model_spec
from ..reporting.configmap import StatusConfigMap
from ..reporting.entry import KEEP, MODELHERD_FIELD, DownloadProgress, parse_entry, render_entry
from ..reporting.events import EventRecorder
from ..reporting.labels import NodeLabels
from ..reporting.metadata import parse_model_config
from ..reporting.metrics import AgentMetrics
from ..settings import Settings
from ..watching.selection import evaluate
from .claims import Claims, Conflict
from .removal import Remover, Target, target_from_entry, target_of
from .verifier import Target as VerifyTarget

log = logging.getLogger("modelherd.agent")

Status = Literal["Ready", "Updating", "Failed"]
OCI_AUTH = {"InstancePrincipal": "instance_principal", "UserPrincipal": "user",
            "ResourcePrincipal": "resource_principal", "OkeWorkloadIdentity": "workload_identity"}
INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")


class PermanentFailure(ModelherdError):
    """Retrying cannot help until the CR (or the cluster) changes: no back-off retry."""

    exit_code = 2


@dataclass
class Task:
    """A running origin pull of one model on this node."""

    uid: str
    identity: dict[str, str]
    cancel: threading.Event = field(default_factory=threading.Event)
    why: str = ""
    done: int = 0
    total: int = 0
    files: int = 0
    started: float = field(default_factory=time.monotonic)
    keep_ready: bool = False  # migration: the node already serves this copy (OME's Ready); adopting keeps it Ready

    def stop(self, why: str) -> None:
        self.why = self.why or why
        self.cancel.set()


@dataclass(frozen=True)
class Env:
    """What the reconciler needs from the running agent (informer caches, clients, settings)."""

    settings: Settings
    api: Any
    node_name: str
    namespace: str
    models_root: Path
    storage_kind: str
    get_model: Callable[[ModelRef], Mapping[str, Any] | None]
    get_node: Callable[[], Mapping[str, Any] | None]
    list_models: Callable[[], list[Mapping[str, Any]]] | None = None  # every CR in the caches (with ``kind``)
    policy: SpecPolicy = OPEN  # what a CR may ask for (settings: paths, local:// folders, credentials)


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, env: Env, *, configmap: StatusConfigMap, labels: NodeLabels, events: EventRecorder,
                 metrics: AgentMetrics, shutdown: threading.Event) -> None:
        self.env, self.cm, self.labels, self.events, self.metrics = env, configmap, labels, events, metrics
        self.shutdown = shutdown
        self._tasks: dict[ModelRef, Task] = {}
        self._lock = threading.Lock()
        self._config_cache: dict[tuple[ModelRef, str, str], dict[str, Any] | None] = {}
        self._tombstones: dict[ModelRef, Mapping[str, Any]] = {}
        self._pending: dict[ModelRef, tuple[Target, bool]] = {}  # files still to remove (or keep) after a leave
        self._collisions: dict[ModelRef, str] = {}  # models refused for a shared key (message last reported)
        list_models = env.list_models or (lambda: [])
        self.remover = Remover(env.settings, models_root=env.models_root, storage_kind=env.storage_kind,
                               node_name=env.node_name, namespace=env.namespace, list_models=list_models,
                               shutdown=shutdown, policy=env.policy)
        self.claims = Claims(env.models_root, env.policy, list_models)
        self._denied: str | None = None  # "patch nodes": the last status write the API server refused (403)
        self._verified: dict[ModelRef, VerifyTarget] = {}  # Ready here, as last verified: what the Verifier checks
        self._started = time.monotonic()
        digest = hashlib.sha256(env.node_name.encode()).digest()
        self._jitter_s = env.settings.startup_jitter_s * (int.from_bytes(digest[:4], "big") / 2**32)

    # ----------------------------------------------------------------------------- called from event handlers
    def cancel(self, ref: ModelRef, why: str) -> bool:
        """Stop a running pull of ``ref`` at once (never blocks); True when one was running."""
        with self._lock:
            task = self._tasks.get(ref)
        if task is None:
            return False
        log.info("%s: cancelling the download (%s)", ref.display, why)
        task.stop(why)
        return True

    def forget(self, ref: ModelRef, last: Mapping[str, Any]) -> None:
        """The CR was deleted; ``last`` is its final state (its storage and reserve label decide what happens
        to the files). Never blocks."""
        with self._lock:
            self._tombstones[ref] = last

    def running(self) -> dict[ModelRef, Task]:
        with self._lock:
            return dict(self._tasks)

    def verify_targets(self) -> list[VerifyTarget]:
        """The models this node reports Ready (for :class:`~.verifier.Verifier`), none being worked on now."""
        with self._lock:
            return [t for ref, t in self._verified.items() if ref not in self._tasks]

    def cancel_all(self, why: str) -> None:
        for ref in self.running():
            self.cancel(ref, why)

    # ----------------------------------------------------------------------------- the worker's entry point
    def reconcile(self, ref: ModelRef) -> bool:
        """Converge ``ref`` on this node; returns False when it failed and should be retried with back-off."""
        try:
            return self._reconcile(ref)
        except ApiError as e:
            if e.status != 403:
                raise
            self._forbidden(ref, e)
            return False

    def _reconcile(self, ref: ModelRef) -> bool:
        obj = self.env.get_model(ref)
        if obj is None:
            return self._leave(ref, "deleted", deleted=True)
        spec = model_spec(obj, self.env.models_root, self.env.policy)
        if spec.deleting:
            return self._leave(ref, "being deleted", deleted=True, uid=spec.uid, spec=spec)
        node = self.env.get_node() or {"metadata": {"name": self.env.node_name}}
        selection = evaluate(spec.storage, node)
        if not selection.selected:
            return self._leave(ref, f"not selected: {selection.reason}", deleted=False, uid=spec.uid, spec=spec)
        with self._lock:  # wanted here again: what an earlier leave left to do is void
            self._pending.pop(ref, None)
            self._tombstones.pop(ref, None)
        label_clash, cm_clash = self.claims.key_conflict(spec)
        if label_clash or cm_clash:
            self._collided(ref, spec, label_clash, cm_clash)
            return False  # re-checked with back-off (and at once when the holder goes)
        self.metrics.init_model(ref.metric_labels())
        if spec.problem:
            self._failed(ref, spec, spec.problem, reason="InvalidSpec")
            return True  # retried when the CR changes, not by back-off
        conflict = self.claims.path_conflict(spec)
        if conflict is not None:
            self._failed(ref, spec, conflict.message, reason="PathConflict")
            return False  # re-checked with back-off: the holder may go away
        try:
            return self._ensure(ref, spec)
        except CancelledError:
            return True
        except PermanentFailure as e:
            self._failed(ref, spec, str(e), reason="InvalidSpec")
            return True
        except ModelherdError as e:
            self._failed(ref, spec, str(e), reason=type(e).__name__.removesuffix("Error") or "Failed")
            return False
        except OSError as e:  # anything the typed layers did not map: still this model's failure only
            err = fs_error(e, spec.dest or self.env.models_root)
            self._failed(ref, spec, str(err), reason=type(err).__name__.removesuffix("Error") or "Failed")
            return False

    def _collided(self, ref: ModelRef, spec: ModelSpec, label: Conflict | None, cm: Conflict | None) -> None:
        """``ref`` maps to a label or ConfigMap key a senior CR holds: it never writes that key; Failed is
        written where it has a key of its own, and recorded as an Event (rate-limited per model)."""
        message = (label or cm).message  # type: ignore[union-attr]
        self.cancel(ref, "its status keys collide with another model")
        self.metrics.failures.labels(**ref.metric_labels(), reason="KeyCollision").inc()
        changed = False
        if cm is None:
            changed = self._set(ref, spec, "Failed", progress=None, message=message, write_label=False)
        elif self._collisions.get(ref) != message:
            changed = True
            log.warning("%s: Failed (%s)", ref.display, message,
                        extra={"model": ref.display, "state": "Failed", "reason": message})
        self._collisions[ref] = message
        if changed:
            self.events.record(ref, spec.uid, reason="Failed", message=message, warning=True)

    def _forbidden(self, ref: ModelRef, e: ApiError) -> None:
        """The API server refused a status write (RBAC removed): one line naming the verb and resource, an
        Event (best effort), and /readyz failing until a write succeeds again."""
        what = e.action or "a request"
        message = f"the agent may not {what} (403 Forbidden): it cannot report this model; restore the agent's RBAC"
        first = self._denied != what
        self._denied = what
        self.metrics.failures.labels(**ref.metric_labels(), reason="Forbidden").inc()
        if first:
            log.error("%s: %s", ref.display, message,
                      extra={"model": ref.display, "state": "Failed", "reason": message})
        uid = str(((self.env.get_model(ref) or {}).get("metadata") or {}).get("uid") or "")
        self.events.record(ref, uid, reason="Forbidden", message=message, warning=True)  # best effort, never raises

    def status_write_denied(self) -> str | None:
        """The verb and resource of the last status write refused with 403, ``None`` once writes succeed."""
        return self._denied

    # ----------------------------------------------------------------------------- states
    def _ensure(self, ref: ModelRef, spec: ModelSpec) -> bool:
        assert spec.uri is not None and spec.dest is not None
        if spec.uri.scheme == "local":
            return self._local(ref, spec)
        started = time.monotonic()
        manifest = published_model(spec.dest, spec.uri.canonical, spec.uri.revision)
        self.metrics.verification_duration.observe(time.monotonic() - started)
        if manifest is not None:
            self.metrics.verifications.labels(**ref.metric_labels(), result="success").inc()
            self._ready(ref, spec, manifest, role="ready")
            return True
        self._lost_verification(ref, spec)
        if self.env.storage_kind == "shared" and not root_writable(self.env.models_root):
            return self._follow_read_only(ref, spec)
        ensure_writable(self.env.models_root)  # a read-only root is a typed ModelsRootError, not a traceback
        if spec.uri.scheme == "oci" and not spec.ambient:
            raise PermanentFailure(
                f"oci:// models of namespace {ref.namespace} may not use the node's OCI identity; a "
                "ClusterBaseModel may, or the operator opts the namespace in (ambient_credential_namespaces)")
        migrating = self._serving_unpublished(ref, spec)
        if not migrating:
            self._wait_startup_jitter(ref)
        task = Task(uid=spec.uid, identity=spec.identity, keep_ready=migrating)
        try:
            self._track(ref, task)
            if migrating:
                log.info("%s: %s holds a copy this node already serves (Ready) that modelherd did not publish: "
                         "adopting it in place; the label stays Ready unless the copy is damaged", ref.display,
                         spec.dest)
            elif self.labels.current(ref.label_key) != "Failed":
                self._set(ref, spec, "Updating", progress=None, message="downloading")
            # a retry after a failure stays Failed until bytes move (the progress reporter flips it to
            # Updating), so an origin that keeps answering 404 does not make the label flap
            manifest, role = self._pull(ref, spec, task)
        except CancelledError:
            log.info("%s: download stopped (%s)", ref.display, task.why or "cancelled")
            raise
        except RateLimitedError:
            self.metrics.rate_limits.labels(**ref.metric_labels()).inc()
            raise
        finally:
            self._untrack(ref)
            self.metrics.clear_progress(ref.metric_labels())
        if task.cancel.is_set():
            raise CancelledError(task.why or "cancelled")
        self.metrics.downloads_success.labels(**ref.metric_labels()).inc()
        self.metrics.download_duration.labels(**ref.metric_labels()).observe(time.monotonic() - task.started)
        self._ready(ref, spec, manifest, role=role)
        return True

    def _track(self, ref: ModelRef, task: Task) -> None:
        """``task`` is this node's running work on ``ref``: :meth:`cancel` stops it, the verifier skips ``ref``."""
        with self._lock:
            self._tasks[ref] = task

    def _untrack(self, ref: ModelRef) -> None:
        with self._lock:
            self._tasks.pop(ref, None)

    def _follow_read_only(self, ref: ModelRef, spec: ModelSpec) -> bool:
        """A shared models root mounted read-only here (sites mount it read-write on a few nodes): this node never
        takes a Lease nor touches the origin; it waits until a writable node has published (or repaired) the model,
        verifies it, and is Ready. Cancelled like a pull (delete, deselect, spec change, SIGTERM)."""
        assert spec.uri is not None and spec.dest is not None
        task = Task(uid=spec.uid, identity=spec.identity)
        try:
            self._track(ref, task)
            if self.labels.current(ref.label_key) != "Failed":
                self._set(ref, spec, "Updating", progress=None,
                          message="read-only models root: waiting for a writable node to publish it")
            log.info("%s: read-only models root: waiting for a writable node to publish %s", ref.display, spec.dest)
            self.metrics.set_role(ref.metric_labels(), "follower")
            interval = min(2.0, self.env.settings.poll_interval_s)
            while True:
                manifest = published_model(spec.dest, spec.uri.canonical, spec.uri.revision)
                if manifest is not None:
                    break
                if task.cancel.wait(interval) or self.shutdown.is_set():
                    raise CancelledError(task.why or "cancelled")
        finally:
            self._untrack(ref)
        self.metrics.verifications.labels(**ref.metric_labels(), result="success").inc()
        self._ready(ref, spec, manifest, role="follower")
        return True

    def _serving_unpublished(self, ref: ModelRef, spec: ModelSpec) -> bool:
        """Migration from OME's agent (or any earlier copy a node already serves): the label and the entry say
        Ready, and the destination holds files but no completion manifest. Then the pull adopts the copy in place
        while the label stays Ready; :meth:`_adoption_gate` takes it out of service if the copy does not even look
        whole (sizes, safetensors headers)."""
        assert spec.dest is not None
        if self.labels.current(ref.label_key) != "Ready":
            return False
        entry = parse_entry(self.cm.current(ref.cm_key) or "") or {}
        return entry.get("status") == "Ready" and unpublished(spec.dest)

    def _adoption_gate(self, ref: ModelRef, spec: ModelSpec, task: Task, listing: Listing) -> None:
        """Before a migration adoption hashes anything: a copy that does not look whole leaves Ready (Failed with
        the reason, an Event) and is then adopted and repaired as any damage; one that does stays Ready."""
        assert spec.dest is not None
        if not task.keep_ready:
            return
        verdict = looks_adoptable(spec.dest, listing)
        if verdict:
            return
        task.keep_ready = False
        self.metrics.verifications.labels(**ref.metric_labels(), result="failure").inc()
        self._failed(ref, spec, f"verification failed: the copy at {spec.dest} is not whole ({verdict.reason}); "
                                "repairing", reason="VerificationFailed", download=False)

    def _lost_verification(self, ref: ModelRef, spec: ModelSpec) -> None:
        """A model this node reported Ready (same destination and source) no longer verifies: Failed with the
        reason, an Event and the metrics, before the pull that follows repairs it (the label stays Failed until
        bytes move)."""
        from ...storage.ready import inspect_published

        assert spec.uri is not None and spec.dest is not None
        with self._lock:
            was = self._verified.pop(ref, None)
        if was is None or was.dest != spec.dest or was.source_uri != spec.uri.canonical \
                or self.labels.current(ref.label_key) != "Ready":
            return
        got = inspect_published(spec.dest, spec.uri.canonical, spec.uri.revision)
        problems = got if isinstance(got, list) else []
        first = str(problems[0]) if problems else "it no longer verifies"
        message = f"verification failed: {len(problems) or 1} problem(s) in {spec.dest}: {first}; repairing"
        self.metrics.verifications.labels(**ref.metric_labels(), result="failure").inc()
        self._failed(ref, spec, message, reason="VerificationFailed", download=False)

    def _local(self, ref: ModelRef, spec: ModelSpec) -> bool:
        """``local://``: the files are already on the node; verify them in place, never modify them."""
        from ...storage.verify import LOCAL_DEADLINE_S, verify_quick

        assert spec.dest is not None
        problems = verify_quick(spec.dest, deadline_s=LOCAL_DEADLINE_S)  # bounded: files and time
        if problems:
            self.metrics.verifications.labels(**ref.metric_labels(), result="failure").inc()
            self._failed(ref, spec, f"{len(problems)} problem(s) in {spec.dest}: {problems[0]}",
                         reason="VerificationFailed")
            return False
        self.metrics.verifications.labels(**ref.metric_labels(), result="success").inc()
        self._ready(ref, spec, None, role="ready")
        return True

    def _ready(self, ref: ModelRef, spec: ModelSpec, manifest: Manifest | None, *, role: str) -> None:
        assert spec.dest is not None
        config = self._config(ref, spec, manifest)
        changed = self._set(ref, spec, "Ready", config=config, progress=None,
                            revision=manifest.revision if manifest else "")
        if spec.uri is not None:
            with self._lock:
                self._verified[ref] = VerifyTarget(ref, spec.dest, spec.uri.canonical, spec.uri.revision,
                                             managed=manifest is not None)
        if manifest is not None and role != "ready":
            self.metrics.verified_bytes.labels(**ref.metric_labels()).inc(manifest.total_bytes)
        self.metrics.set_role(ref.metric_labels(), role)
        if changed:
            how = {"ready": "already on disk, verified", "holder": "downloaded under the Lease",
                   "follower": "verified the copy another node downloaded", "pulled": "downloaded"}.get(role, role)
            self.events.record(ref, spec.uid, reason="Ready", message=f"Ready at {spec.dest} ({how})")

    def _failed(self, ref: ModelRef, spec: ModelSpec, message: str, *, reason: str, download: bool = True) -> None:
        with self._lock:
            self._verified.pop(ref, None)
        if download:
            self.metrics.downloads_failed.labels(**ref.metric_labels()).inc()
        self.metrics.failures.labels(**ref.metric_labels(), reason=reason).inc()
        changed = self._set(ref, spec, "Failed", progress=None, message=message)
        if changed:
            self.events.record(ref, spec.uid, reason="Failed", message=message, warning=True)

    def _leave(self, ref: ModelRef, why: str, *, deleted: bool, uid: str = "", spec: ModelSpec | None = None
               ) -> bool:
        """The model is not (or no longer) wanted on this node: cancel, remove label and entry, then its files
        where :class:`Remover` says so. False (retry with back-off) when removing the files failed."""
        self.cancel(ref, why)
        with self._lock:
            self._verified.pop(ref, None)
        self.metrics.forget_verification(ref.metric_labels())
        # a key another live CR holds (OME's truncation made them one) is that CR's to write, never ours to remove
        label_shared, cm_shared = self.claims.shares_keys(ref, None if deleted else spec)
        with self._lock:
            self._collisions.pop(ref, None)
        had_label = not label_shared and self.labels.current(ref.label_key) is not None
        had_entry = not cm_shared and (self.cm.current(ref.cm_key) is not None
                                       or ref.cm_key in self.cm.remembered())
        if had_label or had_entry:
            target = self._target(ref, spec)
            if target is not None:
                with self._lock:
                    was = self._pending.get(ref)
                    self._pending[ref] = (target, deleted or (was is not None and was[1]))
            self._unlabel(ref, why, deleted=deleted, uid=uid, label=not label_shared, entry=not cm_shared)
        else:
            self.metrics.set_state(ref.metric_labels(), None)
        ok = self._remove_files(ref, uid)
        with self._lock:
            done = ref not in self._pending
        if done:  # nothing of this model is left on this node: its series and cached metadata go too
            self.metrics.forget_model(ref.metric_labels())
            self._config_cache = {k: v for k, v in self._config_cache.items() if k[0] != ref}
        return ok

    def _target(self, ref: ModelRef, spec: ModelSpec | None) -> Target | None:
        """The files this model had here: from the CR, else its last state, else what our entry recorded."""
        if spec is not None:
            return target_of(spec)
        with self._lock:
            last = self._tombstones.get(ref)
        if last is not None:
            return target_of(model_spec(last, self.env.models_root, self.env.policy))
        ours = (parse_entry(self.cm.current(ref.cm_key) or "") or {}).get(MODELHERD_FIELD)
        return target_from_entry(ref, ours, self.env.models_root, self.env.policy) if isinstance(ours, dict) \
            else None

    def _remove_files(self, ref: ModelRef, uid: str) -> bool:
        with self._lock:
            pending = self._pending.get(ref)
        if pending is None:
            return True
        target, deleted = pending
        try:
            what = self.remover.remove(ref, target, deleted=deleted)
        except CancelledError:
            return True  # shutting down; the entry is gone, so a restart finds nothing more to do here
        except ModelherdError as e:
            log.warning("%s: removing its files at %s failed: %s", ref.display, target.dest, e,
                        extra={"model": ref.display, "state": "RemoveFailed", "reason": str(e)})
            return False
        with self._lock:
            if self._pending.get(ref) == pending:
                del self._pending[ref]
            if deleted:
                self._tombstones.pop(ref, None)
        state = "FilesRemoved" if what == "files removed" else "FilesKept"
        log.info("%s: %s (%s)", ref.display, what, target.dest, extra={"model": ref.display, "state": state,
                                                                       "reason": what})
        if what == "files removed":  # a deleted model's uid may be unknown here; the Event names it anyway
            self.events.record(ref, uid, reason="FilesRemoved", message=f"removed {target.dest} from this node")
        return True

    def _unlabel(self, ref: ModelRef, why: str, *, deleted: bool, uid: str, label: bool = True,
                 entry: bool = True) -> None:
        if label:
            self.labels.set(ref.label_key, None)
        if entry:
            self.cm.remove(ref.cm_key)
        self.metrics.set_state(ref.metric_labels(), None)
        self.metrics.set_role(ref.metric_labels(), None)
        log.info("%s: removed from this node (%s)", ref.display, why,
                 extra={"model": ref.display, "state": "Removed", "reason": why})
        if not deleted:
            self.events.record(ref, uid, reason="Removed", message=f"removed from this node: {why}")

    # ----------------------------------------------------------------------------- writes
    def _set(self, ref: ModelRef, spec: ModelSpec, status: Status, *, config: Any = KEEP, progress: Any = KEEP,
             message: str = "", revision: str = "", write_label: bool = True) -> bool:
        """Label, then ConfigMap entry; returns True when anything was written (a state change).
        ``write_label`` False: the label key is another model's (a collision), only the entry is ours."""
        ours = {"node": self.env.node_name, **spec.identity, "storageMode": self.env.storage_kind}
        if revision:
            ours["revision"] = revision
        if spec.reserve:
            ours["reserve"] = "true"  # kept with the entry: a CR deleted while the agent was down keeps it too
        if status != "Ready" and message:
            ours["message"] = message[:1000]

        def render(old: str | None) -> str:
            return render_entry(old, name=ref.name, status=status, config=config, progress=progress,
                                extra={"modelherd": ours})

        cached = self.cm.current(ref.cm_key)
        label_changed = self.labels.set(ref.label_key, status) if write_label else False
        entry_changed = True
        if cached is not None and render(cached) == cached and not label_changed:
            entry_changed = False  # the ConfigMap already says exactly this: no request at all
            self.cm.own(ref.cm_key, cached)  # ...and it is ours to restore (a restart writes nothing)
        else:
            before = cached
            stored = self.cm.update(ref.cm_key, render)
            entry_changed = stored != before
        if label_changed or entry_changed:
            self._denied = None  # the API server takes our writes again
        self.metrics.set_state(ref.metric_labels(), status)
        if label_changed or entry_changed:
            extra = {"model": ref.display, "state": status}
            if message and status != "Ready":
                extra["reason"] = message
            if label_changed or (parse_entry(cached or "") or {}).get("status") != status:
                log.info("%s: %s%s", ref.display, status, f" ({message})" if message and status != "Ready" else "",
                         extra=extra)
        return label_changed or entry_changed

    def _config(self, ref: ModelRef, spec: ModelSpec, manifest: Manifest | None) -> dict[str, Any] | None:
        assert spec.dest is not None and spec.uri is not None
        stamp = (manifest.revision + manifest.completed_at) if manifest else "local"
        key = (ref, str(spec.dest), stamp)
        if key not in self._config_cache:
            sha = manifest.revision if (manifest is not None and spec.uri.scheme == "hf") else None
            try:
                self._config_cache[key] = parse_model_config(spec.dest, configmap_key=ref.cm_key,
                                                             dest=str(spec.dest), sha=sha, skip=spec.skip_config)
            except Exception:  # metadata is best effort; it never fails a Ready model
                log.warning("%s: reading the model's metadata failed", ref.display, exc_info=True)
                self._config_cache[key] = None
        return self._config_cache[key]

    # ----------------------------------------------------------------------------- the pull
    def _wait_startup_jitter(self, ref: ModelRef) -> None:
        left = self._jitter_s - (time.monotonic() - self._started)
        if left > 0:
            log.info("%s: needs origin work; waiting %.1fs of start-up jitter", ref.display, left)
            if self.shutdown.wait(left):
                raise CancelledError("agent shutting down")

    def _hf_token(self, ref: ModelRef, spec: ModelSpec) -> str | None:
        """The Secret named by ``spec.storage.key`` (the model's own namespace; a cluster model: the agent's), then
        ``parameters.token``, then the agent's ``HF_TOKEN`` (only for a model allowed the agent's credentials:
        :attr:`ModelSpec.ambient`). Every value is checked to be one printable line and registered for redaction
        before it is used; no message quotes it."""
        if spec.secret_name:
            ns = ref.namespace or self.env.namespace
            where = f"Secret {ns}/{spec.secret_name}"
            try:
                secret = request(self.env.api, "GET", api_path("api", "v1", "namespaces", ns, "secrets",
                                                               spec.secret_name))
            except UnsafeApiPathError:
                raise ConfigError(f"{where} (spec.storage.key) is not a Secret name", hint="fix spec.storage.key") \
                    from None
            except ApiError as e:
                if e.status == 404:
                    raise ConfigError(f"{where} (spec.storage.key) does not exist",
                                      hint="create it in the model's namespace, or fix spec.storage.key") from None
                if e.status == 403:
                    raise ConfigError(f"reading {where} is forbidden",
                                      hint="grant the agent get on secrets in the model's namespace "
                                           "(chart: rbac.secretNamespaces)") from None
                raise ConfigError(f"reading {where} failed: {e.status}") from None
            data = secret.get("data") if isinstance(secret, dict) else None
            raw = data.get(spec.secret_key) if isinstance(data, dict) else None
            if not isinstance(raw, str):
                raise ConfigError(f"{where} has no key {spec.secret_key!r}",
                                  hint="set spec.storage.parameters.secretKey, or add the key to the Secret")
            what = f"{where} (spec.storage.key) key {spec.secret_key!r}"
            try:
                value = base64.b64decode(raw, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(f"{what} is not text", hint="store the token itself in the Secret") from None
            register_secret(value)
            return check_token(value, what=what)
        if spec.inline_token:
            register_secret(spec.inline_token)
            return check_token(spec.inline_token, what="spec.storage.parameters.token")
        token = self.env.settings.hf_token
        if token is None or not spec.ambient:
            return None
        return check_token(token.get_secret_value(), what="the agent's HF_TOKEN")

    def _pull(self, ref: ModelRef, spec: ModelSpec, task: Task) -> tuple[Manifest, str]:
        from ...coordination import PullResult, choose_backend, coordinated_pull
        from ...storage.sources import open_source
        from ..commands import engine_options, filter_for_shape, retry_policy

        assert spec.uri is not None and spec.dest is not None
        settings = self.env.settings
        token = self._hf_token(ref, spec) if spec.uri.scheme == "hf" else None
        oci_auth = OCI_AUTH.get(spec.oci_auth, settings.oci_auth) if spec.oci_auth else settings.oci_auth
        source = open_source(
            spec.uri, hf_token=token, hf_endpoint=settings.hf_endpoint, oci_auth=oci_auth,
            oci_config_file=str(settings.oci_config_file), oci_profile=settings.oci_profile,
            oci_region=spec.oci_region or settings.oci_region, oci_endpoint=settings.oci_endpoint,
            retry=retry_policy(settings), pool_maxsize=max(32, settings.concurrency * settings.multipart_concurrency),
            cancel=task.cancel)
        del token
        shape_settings = self._shape_settings()
        progress = _ProgressReporter(self, ref, spec, task)
        canonical = spec.uri.canonical

        def listing_fn() -> Listing:
            listing = source.list_files()
            if spec.trtllm and self.env.storage_kind == "local":
                listing = filter_for_shape(listing, shape_settings.gpu_shape, shape_settings)
            if not listing.files:
                raise SourceNotFoundError(f"{canonical} has no files to download",
                                          hint="check the repository, revision or prefix")
            task.files = len(listing.files)
            self._adoption_gate(ref, spec, task, listing)
            return listing

        backend = choose_backend(settings.coordination, self.env.storage_kind, settings.kubeconfig)
        results: list[PullResult] = []
        progress.start()
        try:
            manifest = coordinated_pull(
                backend=backend, uri=spec.uri, source=source, listing_fn=listing_fn, dest=spec.dest,
                models_root=self.env.models_root, options=engine_options(settings, self.env.storage_kind),
                node_name=self.env.node_name, namespace=self.env.namespace, kubeconfig=settings.kubeconfig,
                lease_duration_s=settings.lease_duration_s, renew_period_s=settings.lease_renew_period_s,
                jitter_s=settings.wait_jitter_s, poll_interval_s=settings.poll_interval_s,
                cancel=task.cancel, progress=progress, result=results, on_follow=progress.follow,
                on_phase=progress.phase)
        finally:
            progress.stop()
            source.close()
        role = results[0].role if results else "pulled"
        return manifest, role

    def _shape_settings(self) -> Settings:
        node = self.env.get_node() or {}
        labels = (node.get("metadata") or {}).get("labels") or {}
        itype = next((str(labels[k]) for k in INSTANCE_TYPE_LABELS if labels.get(k)), "")
        settings = self.env.settings
        return settings.model_copy(update={"instance_type": itype or settings.instance_type})


class _ProgressReporter:
    """Feeds the engine's progress into metrics at once and into the ConfigMap entry at most every
    ``progress_interval_s`` (a thread of its own: the engine's workers never wait for the API server).

    Stall metrics (what the stuck-download alerts read): ``download_last_progress`` is the wall-clock time bytes
    last moved in our own download (set when it starts); ``lease_holder_progress`` is, while we follow another
    node's Lease, the time its reported bytes or its holder last changed — so a holder that stopped (SIGSTOP,
    hung origin) shows as a timestamp that no longer moves on the nodes still alive.
    """

    def __init__(self, rec: Reconciler, ref: ModelRef, spec: ModelSpec, task: Task) -> None:
        self.rec, self.ref, self.spec, self.task = rec, ref, spec, task
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"modelherd-progress-{ref.name}", daemon=True)
        self._written = -1
        self._last_done, self._last_t = 0, time.monotonic()
        self._first: int | None = None
        self._followed: tuple[str, int] | None = None
        self._hashing = False  # adopting: progress counts bytes hashed in place, not bytes from the origin

    def __call__(self, done: int, total: int) -> None:
        labels = self.ref.metric_labels()
        if self._first is None:
            self._first = done
            self.rec.metrics.download_last_progress.labels(**labels).set(time.time())
        elif not self._hashing:
            delta = done - self.task.done
            if delta > 0:
                self.rec.metrics.origin_bytes.labels(**labels).inc(delta)
                self.rec.metrics.download_bytes.labels(**labels).inc(delta)
                self.rec.metrics.download_last_progress.labels(**labels).set(time.time())
        self.task.done, self.task.total = done, total
        self.rec.metrics.download_progress.labels(**self.ref.metric_labels()).set(done)
        self.rec.metrics.download_total.labels(**self.ref.metric_labels()).set(total)

    def phase(self, name: str, adoption: Adoption | None) -> None:
        """The engine's phases of this pull (``adopting`` → ``adopted`` → ``downloading``). A migration adoption
        whose hashing found damage takes the copy out of service before it is repaired."""
        if name == "adopting":
            self._hashing = True  # until the download starts, progress counts bytes hashed in place
        elif name == "downloading" and self._hashing:
            self._hashing = False
            self._first = None  # the next progress call re-bases: hashed bytes are not origin bytes
        if name == "adopted" and adoption is not None and not adoption.intact and self.task.keep_ready:
            self.task.keep_ready = False
            bad = [*adoption.failed, *adoption.missing]
            self.rec.metrics.verifications.labels(**self.ref.metric_labels(), result="failure").inc()
            self.rec._failed(self.ref, self.spec, f"verification failed: {len(bad)} file(s) of the copy at "
                             f"{self.spec.dest} are not the origin's ({quote_name(bad[0])}); repairing",
                             reason="VerificationFailed", download=False)

    def follow(self, record: Any) -> None:
        """The coordinator saw ``record`` (a ``LeaseRecord`` held by another node) while we wait; ``None``: we
        hold the Lease now. The timestamp moves only when the holder or its reported bytes change."""
        gauge = self.rec.metrics.lease_holder_progress
        if record is None:
            self._followed = None
            with contextlib.suppress(KeyError):
                gauge.remove(*self.ref.metric_labels().values())
            return
        seen = (str(record.holder), int(record.status.bytes_done))
        if seen != self._followed:
            self._followed = seen
            gauge.labels(**self.ref.metric_labels()).set(time.time())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        interval = self.rec.env.settings.progress_interval_s
        while not self._stop.wait(interval):
            done, total = self.task.done, self.task.total
            if done == self._written or total <= 0 or self.task.cancel.is_set() or self.task.keep_ready:
                continue
            now = time.monotonic()
            speed = max(0.0, (done - self._last_done) / max(now - self._last_t, 1e-6))
            self._last_done, self._last_t = done, now
            progress = DownloadProgress(phase="downloading", total_bytes=total, completed_bytes=done,
                                        total_files=self.task.files, completed_files=0,
                                        speed_bytes_per_sec=round(speed, 1), last_updated=_now_rfc3339())
            def render(old: str | None, p: DownloadProgress = progress) -> str | None:
                if old is None:  # the entry is gone (deleted meanwhile): progress never re-creates it
                    return None
                return render_entry(old, name=self.ref.name, status="Updating", config=KEEP, progress=p)

            try:
                self.rec.labels.set(self.ref.label_key, "Updating")
                self.rec.cm.update(self.ref.cm_key, render)
                self._written = done
            except ApiError as e:
                log.debug("progress write for %s failed: %s", self.ref.display, e)

