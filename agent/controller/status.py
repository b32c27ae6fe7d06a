"""From the per-node status ConfigMaps to a model's ``status`` and its deletion gate, as OME's BaseModel controller
computes them (``pkg/controller/v1beta1/basemodel/controller.go``), with pure functions only.

Invariants:
- A ConfigMap counts only while the Node of the same name exists (OME skips the others): a node that is gone can
  neither serve the model nor remove its entry, so it neither appears in the lists nor holds a deletion.
- ``nodesReady`` / ``nodesFailed`` are the sorted names of the nodes whose entry parses as a JSON object with
  ``status`` ``Ready`` / ``Failed``; ``Updating``, ``Deleted``, anything else and unparseable entries are in
  neither list.
- ``state``: ``Ready`` if any node is Ready, else ``Failed`` if any node Failed, else ``In_Transit``.
- A node *holds* a deletion while its ConfigMap has the model's key with any value but a parsed ``Deleted`` entry
  (an unparseable value holds, as in OME); the finalizer goes only when no node holds.
- :func:`status_patch` is ``None`` exactly when the stored status already says the same (missing list == empty
  list), so an unchanged model costs no write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..ome.entry import parse_entry
from ..ome.states import LifecycleState, ModelStatus


@dataclass(frozen=True)
class NodeStatuses:
    """What the ConfigMaps of existing nodes say about one model key."""

    ready: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    holding: tuple[str, ...] = ()  # nodes whose entry keeps the finalizer

    @property
    def state(self) -> LifecycleState:
        return lifecycle_state(self.ready, self.failed)


def lifecycle_state(ready: Iterable[str], failed: Iterable[str]) -> LifecycleState:
    """OME's ``calculateLifecycleState``: Ready if any node is Ready, else Failed if any failed, else In_Transit."""
    if any(True for _ in ready):
        return LifecycleState.READY
    if any(True for _ in failed):
        return LifecycleState.FAILED
    return LifecycleState.IN_TRANSIT


def node_statuses(cm_key: str, configmaps: Iterable[Mapping[str, Any]],
                  node_exists: Callable[[str], bool]) -> NodeStatuses:
    """Aggregate ``data[cm_key]`` over ``configmaps`` (each named after its node), skipping nodes that are gone."""
    ready: list[str] = []
    failed: list[str] = []
    holding: list[str] = []
    for cm in configmaps:
        node = str((cm.get("metadata") or {}).get("name") or "")
        data = cm.get("data") or {}
        if not node or not isinstance(data, Mapping) or cm_key not in data or not node_exists(node):
            continue
        value = data[cm_key]
        entry = parse_entry(value) if isinstance(value, str) else None
        status = entry.get("status") if entry is not None else None
        if status == ModelStatus.READY:
            ready.append(node)
        elif status == ModelStatus.FAILED:
            failed.append(node)
        if status != ModelStatus.DELETED:  # the one status that no longer blocks a deletion
            holding.append(node)
    return NodeStatuses(tuple(sorted(ready)), tuple(sorted(failed)), tuple(sorted(holding)))


def _names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def status_patch(current: Any, statuses: NodeStatuses) -> dict[str, Any] | None:
    """The JSON merge patch of ``status`` that makes ``current`` say ``statuses``, or ``None`` when it already does.

    Empty lists are removed (``null``), as OME's ``omitempty`` lists are absent; other status fields are untouched.
    """
    cur = current if isinstance(current, Mapping) else {}
    want_ready, want_failed = list(statuses.ready), list(statuses.failed)
    if (cur.get("state") == statuses.state and _names(cur.get("nodesReady")) == want_ready
            and _names(cur.get("nodesFailed")) == want_failed):
        return None
    return {"state": statuses.state, "nodesReady": want_ready or None, "nodesFailed": want_failed or None}
