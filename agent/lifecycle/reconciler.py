"""One model on this node: from what the CR asks to what the node reports — the agent's state machine.

``Reconciler.reconcile(ref)`` is called by a worker for one model at a time (the work queue never hands one key
to two workers). It reads the CR and this Node from the informer caches (:class:`NodeContext`) and converges:

    CR gone / being deleted / node not selected  -> cancel any download, remove the label and ConfigMap key
    CR malformed, unsupported scheme, path outside the root -> Failed with the reason (no retry until it changes)
    already published and quick-verified on disk   -> Ready, with no origin request and no lease; nothing is
                                                       written when the label and entry already say so
    else -> (start-up jitter) Updating -> coordinated pull (shared) or own pull (local) -> Ready | Failed

It decides; its collaborators act, each injected as the small Protocol below (client-go style): the status writer
(label, entry, Events: agent/reporting/status.py), the puller (source, token, Lease: :mod:`.puller`), the file
remover (:mod:`.removal`), the claims on folders and keys (:mod:`.claims`), and a clock.

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

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ...coordination import Role
from ...storage.adopt import Adoption, looks_adoptable, unpublished
from ...storage.destination import ensure_writable, fs_error, root_writable
from ...storage.errors import CancelledError, ModelherdError, RateLimitedError
from ...storage.manifest import Manifest
from ...storage.paths import quote_name
from ...storage.ready import inspect_published, published_model
from ...storage.types import Listing
from ...storage.verify import LOCAL_DEADLINE_S, verify_quick
from ..basemodels import OPEN, ModelRef, ModelSpec, SpecPolicy, model_spec
from ..kube import ApiError
from ..ome.entry import KEEP, MODELHERD_FIELD, DownloadProgress, EntryStatus
from ..ome.states import ModelStatus
from ..reporting.metrics import AgentMetrics
from ..reporting.modelconfig import ModelConfigs
from ..reporting.progress import ProgressReporter
from ..reporting.timeline import Mark, Timeline, describe
from ..settings import AgentSettings, CoordinationSettings
from ..watching.selection import evaluate
from .claims import Conflict
from .puller import Pulled, PullProgress
from .removal import Removal, RemovalTarget, target_from_entry, target_of
from .verifier import VerifyTarget

log = logging.getLogger("modelherd.agent")


class PermanentFailure(ModelherdError):
    """Retrying cannot help until the CR (or the cluster) changes: Failed (InvalidSpec), no back-off retry."""

    exit_code = 2


# ----------------------------------------------------------------------------------------------- collaborators
class StatusWriter(Protocol):
    """Label, ConfigMap entry, state metrics and Events of a model (agent/reporting/status.py)."""

    def label(self, ref: ModelRef) -> str | None: ...
    def entry(self, ref: ModelRef) -> dict[str, Any] | None: ...
    def has_entry(self, ref: ModelRef) -> bool: ...
    def denied(self) -> str | None: ...
    def write(self, ref: ModelRef, spec: ModelSpec, status: EntryStatus, *, config: Any = KEEP, progress: Any = KEEP,
              message: str = "", revision: str = "", write_label: bool = True) -> bool: ...
    def ready(self, ref: ModelRef, spec: ModelSpec, *, config: dict[str, Any] | None, revision: str,
              role: Role) -> bool: ...
    def failed(self, ref: ModelRef, spec: ModelSpec, message: str, *, reason: str,
               download: bool = True) -> bool: ...
    def removed(self, ref: ModelRef, why: str, *, deleted: bool, uid: str, label: bool = True,
                entry: bool = True) -> None: ...
    def event(self, ref: ModelRef, uid: str, *, reason: str, message: str, warning: bool = False) -> None: ...
    def forbidden(self, ref: ModelRef, uid: str, e: ApiError) -> None: ...
    def progress(self, ref: ModelRef, progress: DownloadProgress) -> None: ...


class ModelPuller(Protocol):
    """Puts a model's published copy at its destination (:class:`.puller.Puller`)."""

    def pull(self, spec: ModelSpec, *, cancel: threading.Event, progress: PullProgress,
             on_listing: Callable[[Listing], None]) -> Pulled: ...


class FileRemover(Protocol):
    """Removes a model's files when this node should (:class:`.removal.Remover`)."""

    def remove(self, ref: ModelRef, target: RemovalTarget, *, deleted: bool) -> Removal: ...


class ModelClaims(Protocol):
    """Who holds a folder and the status keys among the live CRs (:class:`.claims.Claims`)."""

    def key_conflict(self, spec: ModelSpec) -> tuple[Conflict | None, Conflict | None]: ...
    def path_conflict(self, spec: ModelSpec) -> Conflict | None: ...
    def shares_keys(self, ref: ModelRef, spec: ModelSpec | None) -> tuple[bool, bool]: ...


class ConfigSource(Protocol):
    """A Ready model's OME ``config`` (agent/reporting/modelconfig.py)."""

    def config(self, ref: ModelRef, spec: ModelSpec, manifest: Manifest | None) -> dict[str, Any] | None: ...
    def forget(self, ref: ModelRef) -> None: ...


@dataclass(frozen=True)
class NodeContext:
    """This node as the reconciler sees it: its name, namespace and models root, and the informer caches."""

    node_name: str
    namespace: str
    models_root: Path
    storage_kind: str  # "local" | "shared", the mode in force
    get_model: Callable[[ModelRef], Mapping[str, Any] | None]
    get_node: Callable[[], Mapping[str, Any] | None]
    policy: SpecPolicy = OPEN  # what a CR may ask for (paths, local:// folders, credentials)


@dataclass
class Task:
    """A running origin pull (or read-only wait) of one model on this node."""

    uid: str
    identity: dict[str, str]
    started: float
    cancel: threading.Event = field(default_factory=threading.Event)
    why: str = ""
    done: int = 0
    total: int = 0
    files: int = 0
    keep_ready: bool = False  # migration: the node already serves this copy (OME's Ready); adopting keeps it Ready
    timeline: Timeline = field(default_factory=Timeline)  # where this pull's time goes (one INFO line at the end)

    def stop(self, why: str) -> None:
        self.why = self.why or why
        self.cancel.set()


class Reconciler:
    def __init__(self, node: NodeContext, *, agent: AgentSettings, leases: CoordinationSettings,
                 status: StatusWriter, puller: ModelPuller, remover: FileRemover, claims: ModelClaims,
                 metrics: AgentMetrics, shutdown: threading.Event, configs: ConfigSource | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node, self.agent, self.leases = node, agent, leases
        self.status, self.puller, self.remover, self.claims = status, puller, remover, claims
        self.metrics, self.shutdown, self.clock = metrics, shutdown, clock
        self.configs: ConfigSource = configs if configs is not None else ModelConfigs()
        self._tasks: dict[ModelRef, Task] = {}
        self._lock = threading.Lock()
        self._tombstones: dict[ModelRef, Mapping[str, Any]] = {}
        self._pending: dict[ModelRef, tuple[RemovalTarget, bool]] = {}  # files still to remove (or keep) after a leave
        self._collisions: dict[ModelRef, str] = {}  # models refused for a shared key (message last reported)
        self._verified: dict[ModelRef, VerifyTarget] = {}  # Ready here, as last verified: what the Verifier checks
        self._started = clock()
        digest = hashlib.sha256(node.node_name.encode()).digest()
        self._jitter_s = agent.startup_jitter_s * (int.from_bytes(digest[:4], "big") / 2**32)

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

    def status_write_denied(self) -> str | None:
        """The verb and resource of the last status write refused with 403, ``None`` once writes succeed."""
        return self.status.denied()

    # ----------------------------------------------------------------------------- the worker's entry point
    def reconcile(self, ref: ModelRef) -> bool:
        """Converge ``ref`` on this node; returns False when it failed and should be retried with back-off."""
        try:
            return self._reconcile(ref)
        except ApiError as e:
            if e.status != 403:
                raise
            uid = str(((self.node.get_model(ref) or {}).get("metadata") or {}).get("uid") or "")
            self.status.forbidden(ref, uid, e)
            return False

    def _reconcile(self, ref: ModelRef) -> bool:
        obj = self.node.get_model(ref)
        if obj is None:
            return self._leave(ref, "deleted", deleted=True)
        spec = model_spec(obj, self.node.models_root, self.node.policy)
        if spec.deleting:
            return self._leave(ref, "being deleted", deleted=True, uid=spec.uid, spec=spec)
        node = self.node.get_node() or {"metadata": {"name": self.node.node_name}}
        placement = evaluate(spec.storage, node)
        if not placement.selected:
            return self._leave(ref, f"not selected: {placement.reason}", deleted=False, uid=spec.uid, spec=spec)
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
            err = fs_error(e, spec.dest or self.node.models_root)
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
            changed = self.status.write(ref, spec, ModelStatus.FAILED, progress=None, message=message,
                                        write_label=False)
        elif self._collisions.get(ref) != message:
            changed = True
            log.warning("%s: Failed (%s)", ref.display, message,
                        extra={"model": ref.display, "state": "Failed", "reason": message})
        self._collisions[ref] = message
        if changed:
            self.status.event(ref, spec.uid, reason="Failed", message=message, warning=True)

    # ----------------------------------------------------------------------------- wanted here
    def _ensure(self, ref: ModelRef, spec: ModelSpec) -> bool:
        assert spec.uri is not None and spec.dest is not None
        if spec.uri.scheme == "local":
            return self._local(ref, spec)
        timeline = Timeline(self.clock)
        manifest = published_model(spec.dest, spec.uri.canonical, spec.uri.revision)
        self.metrics.verification_duration.observe(self.clock() - timeline.started)
        if manifest is not None:
            self.metrics.verifications.labels(**ref.metric_labels(), result="success").inc()
            self._ready(ref, spec, manifest, role=Role.READY)
            return True
        self._lost_verification(ref, spec)
        if self.node.storage_kind == "shared" and not root_writable(self.node.models_root):
            return self._follow_read_only(ref, spec)
        ensure_writable(self.node.models_root)  # a read-only root is a typed ModelsRootError, not a traceback
        if spec.uri.scheme == "oci" and not spec.ambient:
            raise PermanentFailure(
                f"oci:// models of namespace {ref.namespace} may not use the node's OCI identity; a "
                "ClusterBaseModel may, or the operator opts the namespace in (ambient_credential_namespaces)")
        timeline.mark(Mark.CHECKED)
        migrating = self._serving_unpublished(ref, spec)
        if not migrating and self._wait_startup_jitter(ref):
            timeline.mark(Mark.JITTER)
        task = Task(uid=spec.uid, identity=spec.identity, started=self.clock(), keep_ready=migrating,
                    timeline=timeline)
        try:
            self._track(ref, task)
            if migrating:
                log.info("%s: %s holds a copy this node already serves (Ready) that modelherd did not publish: "
                         "adopting it in place; the label stays Ready unless the copy is damaged", ref.display,
                         spec.dest)
            elif self.status.label(ref) != ModelStatus.FAILED:
                self.status.write(ref, spec, ModelStatus.UPDATING, progress=None, message="downloading")
                timeline.mark(Mark.UPDATING)
            # a retry after a failure stays Failed until bytes move (the progress reporter flips it to
            # Updating), so an origin that keeps answering 404 does not make the label flap
            pulled = self._pull(ref, spec, task)
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
        self.metrics.download_duration.labels(**ref.metric_labels()).observe(self.clock() - task.started)
        timeline.mark(Mark.PULLED)
        self._ready(ref, spec, pulled.manifest, role=pulled.role)
        timeline.mark(Mark.REPORTED)
        summary = timeline.summary()
        log.info("%s: Ready as %s %.2fs after it was found missing here: %s", ref.display, pulled.role,
                 summary[Mark.REPORTED], describe(summary),
                 extra={"model": ref.display, "role": str(pulled.role), "timeline": summary,
                        "timeline_start": round(timeline.started_wall, 3)})
        return True

    def _pull(self, ref: ModelRef, spec: ModelSpec, task: Task) -> Pulled:
        progress = ProgressReporter(ref, task, status=self.status, metrics=self.metrics,
                                    interval_s=self.agent.progress_interval_s,
                                    on_damaged=lambda adoption: self._adoption_damaged(ref, spec, adoption))

        def listed(listing: Listing) -> None:
            task.files = len(listing.files)
            self._adoption_gate(ref, spec, task, listing)

        progress.start()
        try:
            return self.puller.pull(spec, cancel=task.cancel, progress=progress, on_listing=listed)
        finally:
            progress.stop()

    def _track(self, ref: ModelRef, task: Task) -> None:
        """``task`` is this node's running work on ``ref``: :meth:`cancel` stops it, the verifier skips ``ref``."""
        with self._lock:
            self._tasks[ref] = task

    def _untrack(self, ref: ModelRef) -> None:
        with self._lock:
            self._tasks.pop(ref, None)

    def _wait_startup_jitter(self, ref: ModelRef) -> bool:
        """Wait out what is left of this node's start-up jitter; True when there was any."""
        left = self._jitter_s - (self.clock() - self._started)
        if left > 0:
            log.info("%s: needs origin work; waiting %.1fs of start-up jitter", ref.display, left)
            if self.shutdown.wait(left):
                raise CancelledError("agent shutting down")
        return left > 0

    def _follow_read_only(self, ref: ModelRef, spec: ModelSpec) -> bool:
        """A shared models root mounted read-only here (sites mount it read-write on a few nodes): this node never
        takes a Lease nor touches the origin; it waits until a writable node has published (or repaired) the model,
        verifies it, and is Ready. Cancelled like a pull (delete, deselect, spec change, SIGTERM)."""
        assert spec.uri is not None and spec.dest is not None
        task = Task(uid=spec.uid, identity=spec.identity, started=self.clock())
        try:
            self._track(ref, task)
            if self.status.label(ref) != ModelStatus.FAILED:
                self.status.write(ref, spec, ModelStatus.UPDATING, progress=None,
                                  message="read-only models root: waiting for a writable node to publish it")
            log.info("%s: read-only models root: waiting for a writable node to publish %s", ref.display, spec.dest)
            self.metrics.set_role(ref.metric_labels(), Role.FOLLOWER)
            interval = min(2.0, self.leases.poll_interval_s)
            while True:
                manifest = published_model(spec.dest, spec.uri.canonical, spec.uri.revision)
                if manifest is not None:
                    break
                if task.cancel.wait(interval) or self.shutdown.is_set():
                    raise CancelledError(task.why or "cancelled")
        finally:
            self._untrack(ref)
        self.metrics.verifications.labels(**ref.metric_labels(), result="success").inc()
        self._ready(ref, spec, manifest, role=Role.FOLLOWER)
        return True

    def _serving_unpublished(self, ref: ModelRef, spec: ModelSpec) -> bool:
        """Migration from OME's agent (or any earlier copy a node already serves): the label and the entry say
        Ready, and the destination holds files but no completion manifest. Then the pull adopts the copy in place
        while the label stays Ready; :meth:`_adoption_gate` takes it out of service if the copy does not even look
        whole (sizes, safetensors headers)."""
        assert spec.dest is not None
        if self.status.label(ref) != ModelStatus.READY:
            return False
        entry = self.status.entry(ref) or {}
        return entry.get("status") == ModelStatus.READY and unpublished(spec.dest)

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

    def _adoption_damaged(self, ref: ModelRef, spec: ModelSpec, adoption: Adoption) -> None:
        """A migration adoption hashed the copy it kept Ready and found damage: out of service, then repaired."""
        bad = [*adoption.failed, *adoption.missing]
        self.metrics.verifications.labels(**ref.metric_labels(), result="failure").inc()
        self._failed(ref, spec, f"verification failed: {len(bad)} file(s) of the copy at {spec.dest} are not the "
                                f"origin's ({quote_name(bad[0])}); repairing", reason="VerificationFailed",
                     download=False)

    def _lost_verification(self, ref: ModelRef, spec: ModelSpec) -> None:
        """A model this node reported Ready (same destination and source) no longer verifies: Failed with the
        reason, an Event and the metrics, before the pull that follows repairs it (the label stays Failed until
        bytes move)."""
        assert spec.uri is not None and spec.dest is not None
        with self._lock:
            was = self._verified.pop(ref, None)
        if was is None or was.dest != spec.dest or was.source_uri != spec.uri.canonical \
                or self.status.label(ref) != ModelStatus.READY:
            return
        got = inspect_published(spec.dest, spec.uri.canonical, spec.uri.revision)
        problems = got if isinstance(got, list) else []
        first = str(problems[0]) if problems else "it no longer verifies"
        message = f"verification failed: {len(problems) or 1} problem(s) in {spec.dest}: {first}; repairing"
        self.metrics.verifications.labels(**ref.metric_labels(), result="failure").inc()
        self._failed(ref, spec, message, reason="VerificationFailed", download=False)

    def _local(self, ref: ModelRef, spec: ModelSpec) -> bool:
        """``local://``: the files are already on the node; verify them in place, never modify them."""
        assert spec.dest is not None
        problems = verify_quick(spec.dest, deadline_s=LOCAL_DEADLINE_S)  # bounded: files and time
        if problems:
            self.metrics.verifications.labels(**ref.metric_labels(), result="failure").inc()
            self._failed(ref, spec, f"{len(problems)} problem(s) in {spec.dest}: {problems[0]}",
                         reason="VerificationFailed")
            return False
        self.metrics.verifications.labels(**ref.metric_labels(), result="success").inc()
        self._ready(ref, spec, None, role=Role.READY)
        return True

    def _ready(self, ref: ModelRef, spec: ModelSpec, manifest: Manifest | None, *, role: Role) -> None:
        assert spec.dest is not None
        config = self.configs.config(ref, spec, manifest)
        self.status.ready(ref, spec, config=config, revision=manifest.revision if manifest else "", role=role)
        if spec.uri is not None:
            with self._lock:
                self._verified[ref] = VerifyTarget(ref, spec.dest, spec.uri.canonical, spec.uri.revision,
                                                   managed=manifest is not None)
        if manifest is not None and role != Role.READY:
            self.metrics.verified_bytes.labels(**ref.metric_labels()).inc(manifest.total_bytes)

    def _failed(self, ref: ModelRef, spec: ModelSpec, message: str, *, reason: str, download: bool = True) -> None:
        with self._lock:
            self._verified.pop(ref, None)
        self.status.failed(ref, spec, message, reason=reason, download=download)

    # ----------------------------------------------------------------------------- not wanted here
    def _leave(self, ref: ModelRef, why: str, *, deleted: bool, uid: str = "", spec: ModelSpec | None = None
               ) -> bool:
        """The model is not (or no longer) wanted on this node: cancel, remove label and entry, then its files
        where the remover says so. False (retry with back-off) when removing the files failed."""
        self.cancel(ref, why)
        with self._lock:
            self._verified.pop(ref, None)
        self.metrics.forget_verification(ref.metric_labels())
        # a key another live CR holds (OME's truncation made them one) is that CR's to write, never ours to remove
        label_shared, cm_shared = self.claims.shares_keys(ref, None if deleted else spec)
        with self._lock:
            self._collisions.pop(ref, None)
        had_label = not label_shared and self.status.label(ref) is not None
        had_entry = not cm_shared and self.status.has_entry(ref)
        if had_label or had_entry:
            target = self._target(ref, spec)
            if target is not None:
                with self._lock:
                    was = self._pending.get(ref)
                    self._pending[ref] = (target, deleted or (was is not None and was[1]))
            self.status.removed(ref, why, deleted=deleted, uid=uid, label=not label_shared, entry=not cm_shared)
        else:
            self.metrics.set_state(ref.metric_labels(), None)
        ok = self._remove_files(ref, uid)
        with self._lock:
            done = ref not in self._pending
        if done:  # nothing of this model is left on this node: its series and cached metadata go too
            self.metrics.forget_model(ref.metric_labels())
            self.configs.forget(ref)
        return ok

    def _target(self, ref: ModelRef, spec: ModelSpec | None) -> RemovalTarget | None:
        """The files this model had here: from the CR, else its last state, else what our entry recorded."""
        if spec is not None:
            return target_of(spec)
        with self._lock:
            last = self._tombstones.get(ref)
        if last is not None:
            return target_of(model_spec(last, self.node.models_root, self.node.policy))
        ours = (self.status.entry(ref) or {}).get(MODELHERD_FIELD)
        return target_from_entry(ref, ours, self.node.models_root, self.node.policy) if isinstance(ours, dict) \
            else None

    def _remove_files(self, ref: ModelRef, uid: str) -> bool:
        with self._lock:
            pending = self._pending.get(ref)
        if pending is None:
            return True
        target, deleted = pending
        try:
            removal = self.remover.remove(ref, target, deleted=deleted)
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
        state = "FilesRemoved" if removal.removed else "FilesKept"
        log.info("%s: %s (%s)", ref.display, removal.message, target.dest,
                 extra={"model": ref.display, "state": state, "reason": removal.message})
        if removal.removed:  # a deleted model's uid may be unknown here; the Event names it anyway
            self.status.event(ref, uid, reason="FilesRemoved", message=f"removed {target.dest} from this node")
        return True
