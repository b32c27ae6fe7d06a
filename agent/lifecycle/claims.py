"""Who holds a folder, a node label key and a ConfigMap key, among the live CRs in the informer caches.

Invariants:
- two live CRs never share a destination (or one inside the other's) with different content: the senior CR (the
  earlier ``creationTimestamp``; ties: a ClusterBaseModel first, then by namespace and name, the same order on
  every node) holds the folder, and the later one is refused with the holder named, before anything is written;
- two live CRs never write one node label key or one ConfigMap key: OME's 49-byte truncation can map two models
  to one label (``d61c7e60`` vs ``ml-platform-research``, or a namespace named ``clusterbasemodel``); the senior
  one writes it, and the later one writes nothing under the shared key;
- the answer depends only on the CRs, never on this node's selection, so every node decides the same.

Reading every CR per decision is O(models); the specs are cached by resourceVersion, so a steady cluster parses
each CR once.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..basemodels import ModelRef, ModelSpec, SpecPolicy, model_spec


class ClaimKind(enum.Enum):
    PATH = "path"
    LABEL_KEY = "label key"
    CONFIGMAP_KEY = "ConfigMap key"


@dataclass(frozen=True)
class Conflict:
    """``holder`` keeps what ``kind`` names; the model asking is refused."""

    kind: ClaimKind
    holder: ModelSpec
    message: str


class Claims:
    """Answers "may this spec have this folder / these keys" from ``list_models`` (every CR, with ``kind``)."""

    def __init__(self, models_root: Path, policy: SpecPolicy,
                 list_models: Callable[[], list[Mapping[str, Any]]]) -> None:
        self.models_root, self.policy, self._list = models_root, policy, list_models
        self._cache: dict[tuple[str, str, str, str], ModelSpec] = {}
        self._lock = threading.Lock()

    def live(self) -> list[ModelSpec]:
        """Every CR in the caches, as specs (a CR being deleted included: it still holds its keys)."""
        objs = self._list()
        out: list[ModelSpec] = []
        fresh: dict[tuple[str, str, str, str], ModelSpec] = {}
        with self._lock:
            for obj in objs:
                ref = ModelRef.of(obj)
                meta = obj.get("metadata") or {}
                key = (ref.kind, ref.namespace, ref.name,
                       str(meta.get("resourceVersion") or "") + "/" + str(meta.get("deletionTimestamp") or ""))
                spec = self._cache.get(key) or model_spec(obj, self.models_root, self.policy)
                fresh[key] = spec
                out.append(spec)
            self._cache = fresh
        return out

    def key_conflict(self, spec: ModelSpec) -> tuple[Conflict | None, Conflict | None]:
        """(label key held by a senior CR, ConfigMap key held by a senior CR) for ``spec``."""
        label = cm = None
        for other in self.live():
            if other.ref == spec.ref or other.seniority >= spec.seniority:
                continue
            if label is None and other.ref.label_key == spec.ref.label_key:
                label = Conflict(ClaimKind.LABEL_KEY, other,
                                 f"label key {spec.ref.label_key} collides with {other.ref.display} (OME truncates "
                                 "label keys to 49 bytes); rename one of the two models")
            if cm is None and other.ref.cm_key == spec.ref.cm_key:
                cm = Conflict(ClaimKind.CONFIGMAP_KEY, other,
                              f"ConfigMap key {spec.ref.cm_key} collides with {other.ref.display}; rename one of "
                              "the two models")
        return label, cm

    def shares_keys(self, ref: ModelRef, spec: ModelSpec | None) -> tuple[bool, bool]:
        """(label key, ConfigMap key) of ``ref`` belong to another live CR: ``ref`` must not remove them. ``spec``
        ``None``: ``ref`` is gone, so any other CR with the key holds it."""
        label = cm = False
        for other in self.live():
            if other.ref == ref or (spec is not None and other.seniority >= spec.seniority):
                continue
            label = label or other.ref.label_key == ref.label_key
            cm = cm or other.ref.cm_key == ref.cm_key
        return label, cm

    def sharing_keys(self, ref: ModelRef) -> list[ModelRef]:
        """The other live CRs with ``ref``'s label or ConfigMap key (to re-check when ``ref`` goes)."""
        return [o.ref for o in self.live() if o.ref != ref
                and (o.ref.label_key == ref.label_key or o.ref.cm_key == ref.cm_key)]

    def path_conflict(self, spec: ModelSpec) -> Conflict | None:
        """A senior live CR whose folder is ``spec``'s, or contains it, or lies inside it, with other content."""
        if spec.dest is None:
            return None
        mine = os.path.normpath(spec.dest)
        for other in sorted(self.live(), key=lambda s: s.seniority):
            if other.seniority >= spec.seniority:
                break
            if other.ref == spec.ref or other.deleting or other.problem or other.dest is None:
                continue
            theirs = os.path.normpath(other.dest)
            if theirs == mine:
                if other.content == spec.content:
                    continue  # the same model at the same folder: they share it
                why = f"{spec.dest} belongs to {other.ref.display} ({other.storage_uri})"
            elif mine.startswith(theirs.rstrip("/") + "/"):
                why = f"{spec.dest} is inside {other.dest}, which belongs to {other.ref.display} ({other.storage_uri})"
            elif theirs.startswith(mine.rstrip("/") + "/"):
                why = f"{spec.dest} contains {other.dest}, which belongs to {other.ref.display} ({other.storage_uri})"
            else:
                continue
            return Conflict(ClaimKind.PATH, other, why + "; choose another spec.storage.path")
        return None
