"""This node's status ConfigMap, in OME's format, without OME's lost updates.

Invariants:
- Every write is a read-modify-write of exactly one key under the ``resourceVersion`` just read (a 409 means
  someone else wrote in between: read again and redo); other keys, and fields of our key's JSON that we do not
  know, are kept as read. Nothing is ever written from a stale copy of the whole map (OME bug §11.1).
- A delete of our key retries on conflict like any write (OME bug §11.2).
- The ConfigMap always carries ``models.ome/basemodel-status: "true"`` and ``node``, and OME's annotations,
  also when it is re-created after someone deleted it (OME bug §11.3): :meth:`restore` puts back every entry
  this process last wrote or found already in place (:meth:`own`: after a restart nothing needs writing, yet
  every entry is ours to restore).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..kube import ApiError, request
from .freshness import OwnWrites

log = logging.getLogger(__name__)

STATUS_LABEL = "models.ome/basemodel-status"
NODE_NAME_ANNOTATION = "models.ome.io/node-name"
MANAGED_BY_ANNOTATION = "models.ome.io/managed-by"
MANAGED_BY = "model-agent"

Render = Callable[[str | None], str | None]


class StatusConfigMap:
    """The ConfigMap ``<namespace>/<node>``. Thread-safe; every method is one logical write."""

    def __init__(self, api: Any, namespace: str, node: str, *, attempts: int = 10,
                 cache: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        self.api, self.namespace, self.node, self.attempts = api, namespace, node, attempts
        self._cache = cache
        self._lock = threading.Lock()
        self._ours: dict[str, str] = {}  # what we last wrote per key (for restore)
        self._own: OwnWrites[str] = OwnWrites()

    def current(self, key: str) -> str | None:
        """The entry as the watch cache has it, or our own later write while the cache has not caught up."""
        cm = self._cache() or {}
        value = (cm.get("data") or {}).get(key)
        rv = (cm.get("metadata") or {}).get("resourceVersion")
        return self._own.current(key, value if isinstance(value, str) else None, rv)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/configmaps/{self.node}"

    def _labels(self) -> dict[str, str]:
        labels = {STATUS_LABEL: "true"}
        if len(self.node) <= 63:  # a label value; OME fails to create the ConfigMap for longer node names
            labels["node"] = self.node
        return labels

    def _annotations(self) -> dict[str, str]:
        return {NODE_NAME_ANNOTATION: self.node, MANAGED_BY_ANNOTATION: MANAGED_BY}

    def _fresh(self, data: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": self.node, "namespace": self.namespace, "labels": self._labels(),
                             "annotations": self._annotations()},
                "data": data}

    def read(self) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = request(self.api, "GET", self.path)
            return obj
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def get(self, key: str) -> str | None:
        """The current value of ``key`` on the server (``None``: absent)."""
        cm = self.read()
        data = (cm or {}).get("data") or {}
        value = data.get(key)
        return value if isinstance(value, str) else None

    def update(self, key: str, render: Render) -> str | None:
        """Set ``key`` to ``render(current value)`` (``None`` from ``render`` removes the key).

        Returns what is stored afterwards. ``render`` may be called several times (once per conflict).
        """
        for attempt in range(self.attempts):
            cm = self.read()
            if cm is None:
                new = render(None)
                if new is None:
                    return None
                try:
                    made = request(self.api, "POST", f"/api/v1/namespaces/{self.namespace}/configmaps",
                                   body=self._fresh({key: new}))
                except ApiError as e:
                    if e.status == 409:  # created by someone else meanwhile: read-modify-write it
                        continue
                    raise
                self._remember(key, new, made)
                return new
            data: dict[str, str] = dict(cm.get("data") or {})
            old = data.get(key)
            new = render(old)
            meta = cm.setdefault("metadata", {})
            labels, annotations = dict(meta.get("labels") or {}), dict(meta.get("annotations") or {})
            identity_ok = all(labels.get(k) == v for k, v in self._labels().items()) and \
                all(annotations.get(k) == v for k, v in self._annotations().items())
            if new == old and identity_ok:
                self._remember(key, new, cm)
                return new
            if new is None:
                data.pop(key, None)
            else:
                data[key] = new
            meta["labels"] = {**labels, **self._labels()}
            meta["annotations"] = {**annotations, **self._annotations()}
            cm["data"] = data
            try:
                written = request(self.api, "PUT", self.path, body=cm)  # carries the resourceVersion we read
            except ApiError as e:
                if e.status in (409, 404):
                    time.sleep(min(0.05 * (attempt + 1), 0.5))
                    continue
                raise
            self._remember(key, new, written)
            return new
        raise ApiError(409, f"ConfigMap {self.namespace}/{self.node}: still conflicting after {self.attempts} tries")

    def remove(self, key: str) -> None:
        self.update(key, lambda _old: None)

    def _remember(self, key: str, value: str | None, obj: dict[str, Any]) -> None:
        self._own.wrote(key, value, (obj.get("metadata") or {}).get("resourceVersion"))
        with self._lock:
            if value is None:
                self._ours.pop(key, None)
            else:
                self._ours[key] = value

    def own(self, key: str, value: str) -> None:
        """``value`` is what we would write for ``key`` and the server already holds it (e.g. after a restart):
        it is ours to restore from now on, with no request."""
        with self._lock:
            self._ours[key] = value

    def remembered(self) -> dict[str, str]:
        with self._lock:
            return dict(self._ours)

    def restore(self) -> int:
        """Put back every entry we last wrote that is missing or different, and our labels and annotations;
        returns how many keys had to be restored. Called when the ConfigMap was deleted or lost its labels."""
        restored = 0
        for key, value in self.remembered().items():
            changed: list[bool] = []

            def put_back(old: str | None, value: str = value, changed: list[bool] = changed) -> str:
                changed.append(old != value)
                return value

            self.update(key, put_back)
            restored += bool(changed and changed[-1])
        return restored
