"""What this node reports about one model: its node label, its ConfigMap entry, the state metric, an Event.

:class:`ModelStatusWriter` is the reconciler's one way to say where a model stands on this node (Ready, Updating,
Failed, removed); it composes :class:`~.labels.NodeLabels`, :class:`~.configmap.StatusConfigMap` and
:class:`~.events.EventRecorder` and decides nothing about the model itself.

Invariants:
- the label is written before the ConfigMap entry (OME's order), and neither is written when it already says
  exactly this: a restart with every model on disk sends no write (the entry found in place is still ours to
  restore), and no label ever leaves Ready for nothing;
- an Event and an INFO line are emitted only for a change (a state written), never for a rewrite of the same state;
- an entry that would take the ConfigMap past the API server's 1 MiB is written without the model's metadata, and
  when even that does not fit the model is Failed by label and Event alone (:class:`~.configmap.ConfigMapFullError`
  from :meth:`ModelStatusWriter.write` for any other state, before its label changes); other entries never move;
- a status write refused with 403 (the agent's RBAC was removed) is logged once per refused verb, recorded as a
  Warning Event, and reported by :meth:`denied` until a write goes through again.
"""

from __future__ import annotations

import logging
from typing import Any

from ...coordination import Role
from ..basemodels import ModelRef, ModelSpec
from ..kube import ApiError
from ..ome.entry import KEEP, DownloadProgress, EntryStatus, parse_entry, render_entry
from ..ome.states import ModelStatus
from .configmap import ConfigMapFullError, Render, StatusConfigMap
from .events import EventRecorder
from .labels import NodeLabels
from .metrics import AgentMetrics

log = logging.getLogger("modelherd.agent")

MESSAGE_MAX = 1000  # characters of a message kept in the entry's ``modelherd`` object

READY_HOW = {Role.READY: "already on disk, verified", Role.HOLDER: "downloaded under the Lease",
             Role.FOLLOWER: "verified the copy another node downloaded", Role.PULLED: "downloaded"}


class ModelStatusWriter:
    """Writes the status of the models of node ``node_name`` (storage ``storage_kind``)."""

    def __init__(self, *, configmap: StatusConfigMap, labels: NodeLabels, events: EventRecorder,
                 metrics: AgentMetrics, node_name: str, storage_kind: str) -> None:
        self.cm, self.labels, self.events, self.metrics = configmap, labels, events, metrics
        self.node_name, self.storage_kind = node_name, storage_kind
        self._denied: str | None = None  # "patch nodes": the last status write the API server refused (403)

    # ----------------------------------------------------------------------------- what is in place
    def label(self, ref: ModelRef) -> str | None:
        return self.labels.current(ref.label_key)

    def entry(self, ref: ModelRef) -> dict[str, Any] | None:
        """The model's ConfigMap entry, parsed (``None``: absent or not an entry)."""
        return parse_entry(self.cm.current(ref.cm_key) or "")

    def has_entry(self, ref: ModelRef) -> bool:
        """An entry is in place, or one we wrote is remembered (to be restored)."""
        return self.cm.current(ref.cm_key) is not None or ref.cm_key in self.cm.remembered()

    def denied(self) -> str | None:
        """The verb and resource of the last status write refused with 403, ``None`` once writes succeed."""
        return self._denied

    # ----------------------------------------------------------------------------- writes
    def write(self, ref: ModelRef, spec: ModelSpec, status: EntryStatus, *, config: Any = KEEP, progress: Any = KEEP,
              message: str = "", revision: str = "", write_label: bool = True) -> bool:
        """Label, then ConfigMap entry; returns True when anything was written (a state change).
        ``write_label`` False: the label key is another model's (a collision), only the entry is ours."""
        ours = {"node": self.node_name, **spec.identity, "storageMode": self.storage_kind}
        if revision:
            ours["revision"] = revision
        if spec.reserve:
            ours["reserve"] = "true"  # kept with the entry: a CR deleted while the agent was down keeps it too
        if status != ModelStatus.READY and message:
            ours["message"] = message[:MESSAGE_MAX]

        def renderer(config: Any) -> Render:
            def render(old: str | None) -> str:
                return render_entry(old, name=ref.name, status=status, config=config, progress=progress,
                                    extra={"modelherd": ours})
            return render

        render, room = self._fitting(ref, status, renderer(config), renderer(None))
        cached = self.cm.current(ref.cm_key)
        label_changed = self.labels.set(ref.label_key, status) if write_label else False
        if not room:
            entry_changed = False  # Failed in a full ConfigMap: the label and the Event say it
        elif cached is not None and render(cached) == cached and not label_changed:
            entry_changed = False  # the ConfigMap already says exactly this: no request at all
            self.cm.own(ref.cm_key, cached)  # ...and it is ours to restore (a restart writes nothing)
        else:
            try:
                entry_changed = self.cm.update(ref.cm_key, render) != cached
            except ConfigMapFullError:
                if status != ModelStatus.FAILED:
                    raise
                entry_changed = False
        changed = label_changed or entry_changed
        if changed:
            self._denied = None  # the API server takes our writes again
        self.metrics.set_state(ref.metric_labels(), status)
        if changed:
            extra = {"model": ref.display, "state": status}
            if message and status != ModelStatus.READY:
                extra["reason"] = message
            if label_changed or (parse_entry(cached or "") or {}).get("status") != status:
                why = f" ({message})" if message and status != ModelStatus.READY else ""
                log.info("%s: %s%s", ref.display, status, why, extra=extra)
        return changed

    def _fitting(self, ref: ModelRef, status: EntryStatus, full: Render, compact: Render) -> tuple[Render, bool]:
        """The entry that fits the ConfigMap (judged on the watch cache, before the label is touched, so a full
        map never flaps a label): ``full``, else ``compact`` (without the model's metadata), with True; for Failed
        in a map with room for neither, ``(full, False)`` (the label alone says it). Raises
        :class:`ConfigMapFullError` for any other state with no room."""
        try:
            self.cm.check_fits(ref.cm_key, full)
            return full, True
        except ConfigMapFullError as e:
            try:
                self.cm.check_fits(ref.cm_key, compact)
            except ConfigMapFullError:
                if status != ModelStatus.FAILED:
                    raise
                return full, False
            log.warning("%s: the entry goes without the model's metadata (config): %s", ref.display, e.message,
                        extra={"model": ref.display, "reason": "ConfigMapFull"})
            return compact, True

    def ready(self, ref: ModelRef, spec: ModelSpec, *, config: dict[str, Any] | None, revision: str,
              role: Role) -> bool:
        """Ready, with the model's metadata and how this node got it (``role``); an Event when it changed."""
        changed = self.write(ref, spec, ModelStatus.READY, config=config, progress=None, revision=revision)
        self.metrics.set_role(ref.metric_labels(), role)
        if changed:
            how = READY_HOW[role]
            self.events.record(ref, spec.uid, reason="Ready", message=f"Ready at {spec.dest} ({how})")
        return changed

    def failed(self, ref: ModelRef, spec: ModelSpec, message: str, *, reason: str, download: bool = True) -> bool:
        """Failed with ``message``, counted by ``reason`` (and as a failed download unless ``download`` is False);
        a Warning Event when it changed."""
        labels = ref.metric_labels()
        if download:
            self.metrics.downloads_failed.labels(**labels).inc()
        self.metrics.failures.labels(**labels, reason=reason).inc()
        changed = self.write(ref, spec, ModelStatus.FAILED, progress=None, message=message)
        if changed:
            self.events.record(ref, spec.uid, reason="Failed", message=message, warning=True)
        return changed

    def removed(self, ref: ModelRef, why: str, *, deleted: bool, uid: str, label: bool = True,
                entry: bool = True) -> None:
        """The model left this node: its label and entry go (each only where it is ours), and its state metrics;
        an Event unless the CR itself is gone."""
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

    def progress(self, ref: ModelRef, progress: DownloadProgress) -> None:
        """A download's progress: the label Updating and the entry's progress; never re-creates a deleted entry."""

        def render(old: str | None) -> str | None:
            if old is None:  # the entry is gone (deleted meanwhile): progress never re-creates it
                return None
            return render_entry(old, name=ref.name, status=ModelStatus.UPDATING, config=KEEP, progress=progress)

        self.labels.set(ref.label_key, ModelStatus.UPDATING)
        self.cm.update(ref.cm_key, render)

    def event(self, ref: ModelRef, uid: str, *, reason: str, message: str, warning: bool = False) -> None:
        self.events.record(ref, uid, reason=reason, message=message, warning=warning)

    def forbidden(self, ref: ModelRef, uid: str, e: ApiError) -> None:
        """The API server refused a status write (RBAC removed): one line naming the verb and resource, an
        Event (best effort), and :meth:`denied` set until a write succeeds again."""
        what = e.action or "a request"
        message = f"the agent may not {what} (403 Forbidden): it cannot report this model; restore the agent's RBAC"
        first = self._denied != what
        self._denied = what
        self.metrics.failures.labels(**ref.metric_labels(), reason="Forbidden").inc()
        if first:
            log.error("%s: %s", ref.display, message,
                      extra={"model": ref.display, "state": "Failed", "reason": message})
        self.events.record(ref, uid, reason="Forbidden", message=message, warning=True)  # best effort, never raises
