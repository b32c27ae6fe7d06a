"""This node's status ConfigMap, in OME's format, without OME's lost updates.

Invariants:
- Every write is a read-modify-write of exactly one key under the ``resourceVersion`` of the copy it started from
  (our last write's answer or the watch cache's, so a state change costs one request; else one read): the server
  refuses a stale copy (409), and then the map is read again and the change redone. Other keys, and fields of our
  key's JSON that we do not know, are kept as read. Nothing is ever written from a stale copy of the whole map
  (OME bug §11.1). This process's writes are serialised: its workers never conflict with one another.
- A delete of our key retries on conflict like any write (OME bug §11.2).
- The ConfigMap always carries ``models.ome/basemodel-status: "true"`` and ``node``, and OME's annotations,
  also when it is re-created after someone deleted it (OME bug §11.3): :meth:`restore` puts back every entry
  this process last wrote or found already in place (:meth:`own`: after a restart nothing needs writing, yet
  every entry is ours to restore).
- The API server refuses a ConfigMap whose keys and values (``data`` and ``binaryData``) exceed 1 MiB
  (:data:`DATA_LIMIT`, etcd's object size). A write that would grow the map past it is never sent: it raises
  :class:`ConfigMapFullError` naming the size, for that one model to be reported Failed; a write that keeps or
  shrinks the map (a state change of an existing entry to a shorter one, a removal) always goes through, so the
  other models' entries are never lost and a full map drains (one rule, :meth:`StatusConfigMap._check_room`, for the
  watch cache's copy and for the copy a write starts from). :meth:`StatusConfigMap.size` is the size in force (a
  metric and an alert watch it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ...storage.errors import ModelherdError
from ..kube import ApiError, request
from .freshness import OwnWrites

log = logging.getLogger(__name__)

STATUS_LABEL = "models.ome/basemodel-status"
NODE_NAME_ANNOTATION = "models.ome.io/node-name"
MANAGED_BY_ANNOTATION = "models.ome.io/managed-by"
MANAGED_BY = "model-agent"

Render = Callable[[str | None], str | None]

DATA_LIMIT = 1_048_576  # bytes of keys + values the API server accepts in one ConfigMap (corev1.MaxSecretSize)


def data_bytes(cm: dict[str, Any] | None) -> int:
    """What the API server counts against :data:`DATA_LIMIT`: the UTF-8 bytes of every key and value of ``data``
    and ``binaryData`` (binaryData values as sent, base64)."""
    total = 0
    for field in ("data", "binaryData"):
        for k, v in ((cm or {}).get(field) or {}).items():
            total += len(str(k).encode()) + len(str(v).encode())
    return total


class ConfigMapFullError(ModelherdError):
    """Writing an entry would take this node's status ConfigMap past the API server's 1 MiB limit."""

    def __init__(self, namespace: str, node: str, key: str, size: int, models: int) -> None:
        super().__init__(
            f"this node's status ConfigMap {namespace}/{node} would hold {size} bytes with this model's entry "
            f"({models} entries), over the API server's limit of {DATA_LIMIT} bytes (1 MiB); the entry is not written",
            hint="fewer models on this node (narrow the models' node selectors), or remove unused models; this model "
                 "is retried and becomes Ready once there is room")
        self.key, self.size = key, size


def _not_older(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    """``a`` is at least as recent as ``b`` by ``resourceVersion`` (etcd's revision; opaque ones compare as older,
    so the watch cache's copy is taken)."""
    if b is None:
        return True
    ra, rb = (str((o.get("metadata") or {}).get("resourceVersion") or "") for o in (a, b))
    return ra.isdigit() and rb.isdigit() and int(ra) >= int(rb)


class StatusConfigMap:
    """The ConfigMap ``<namespace>/<node>``. Thread-safe; every method is one logical write."""

    def __init__(self, api: Any, namespace: str, node: str, *, attempts: int = 10,
                 cache: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        self.api, self.namespace, self.node, self.attempts = api, namespace, node, attempts
        self._cache = cache
        self._lock = threading.Lock()
        self._ours: dict[str, str] = {}  # what we last wrote per key (for restore)
        self._own: OwnWrites[str] = OwnWrites()
        self._write_lock = threading.Lock()
        self._last: dict[str, Any] | None = None  # the map as our last write left it (the server's answer)

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
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return obj

    def size(self) -> int:
        """The map's size against :data:`DATA_LIMIT`, from the watch cache (else as our last write left it)."""
        cm = self._cache()
        return data_bytes(cm if cm is not None else self._last)

    def check_fits(self, key: str, render: Render) -> None:
        """Raise :class:`ConfigMapFullError` when ``render``'s entry for ``key`` would take the map as the watch cache
        has it past :data:`DATA_LIMIT` (and grow it); no request. :meth:`update` checks again on what it reads."""
        cm = self._cache()
        if cm is not None:
            self._check_room(cm, key, render(self.current(key)))

    def _check_room(self, cm: dict[str, Any] | None, key: str, new: str | None) -> None:
        """Raise :class:`ConfigMapFullError` when setting ``key`` to ``new`` in ``cm`` (``None``: no map yet) takes
        it past :data:`DATA_LIMIT` and grows it; a removal, or a change that keeps or shrinks the map, always fits."""
        if new is None:
            return
        data = {**((cm or {}).get("data") or {}), key: new}
        after = data_bytes({"data": data, "binaryData": (cm or {}).get("binaryData")})
        if after > DATA_LIMIT and after > data_bytes(cm):
            raise ConfigMapFullError(self.namespace, self.node, key, after, len(data))

    def get(self, key: str) -> str | None:
        """The current value of ``key`` on the server (``None``: absent)."""
        cm = self.read()
        data = (cm or {}).get("data") or {}
        value = data.get(key)
        return value if isinstance(value, str) else None

    def _base(self) -> dict[str, Any] | None:
        """What the next write starts from without a request: the newer of the object our last write returned and
        the watch cache's copy (either may be stale: the write carries its ``resourceVersion``, a 409 re-reads)."""
        cached, last = self._cache(), self._last
        cm = last if last is not None and _not_older(last, cached) else cached
        if cm is None:
            return None
        return {**cm, "metadata": dict(cm.get("metadata") or {})}  # what a write changes in place (its data: a copy)

    def update(self, key: str, render: Render) -> str | None:
        """Set ``key`` to ``render(current value)`` (``None`` from ``render`` removes the key).

        Returns what is stored afterwards. ``render`` may be called several times (once per conflict). Writes of
        this process are serialised (its workers never conflict with one another) and start from :meth:`_base`, so
        a state change costs one request; a 409 (another writer) reads the map again.
        """
        with self._write_lock:
            return self._update(key, render)

    def _update(self, key: str, render: Render) -> str | None:
        base = self._base()
        for attempt in range(self.attempts):
            fresh = base is None
            cm, base = (base if base is not None else self.read()), None
            if cm is None:
                new = render(None)
                if new is None:
                    return None
                self._check_room(None, key, new)
                try:
                    made = request(self.api, "POST", f"/api/v1/namespaces/{self.namespace}/configmaps",
                                   body=self._fresh({key: new}))
                except ApiError as e:
                    if e.status == 409:  # created by someone else meanwhile: read-modify-write it
                        self._last = None
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
                if not fresh:  # "nothing to write" is decided on what the server holds, never on a copy
                    continue
                self._remember(key, new, cm)
                return new
            self._check_room(cm, key, new)  # never sent past the limit: the API server would refuse it (422)
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
                if e.status in (409, 404):  # someone else wrote (or deleted it) since our copy: read again
                    self._last = None
                    if attempt:
                        time.sleep(min(0.05 * attempt, 0.5))
                    continue
                raise
            self._remember(key, new, written)
            return new
        raise ApiError(409, f"ConfigMap {self.namespace}/{self.node}: still conflicting after {self.attempts} tries")

    def remove(self, key: str) -> None:
        self.update(key, lambda _old: None)

    def _remember(self, key: str, value: str | None, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("resourceVersion"):
            self._last = obj
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
