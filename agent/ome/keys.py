"""Node-label keys and ConfigMap data keys exactly as OME computes them (``pkg/constants/constants.go``).

Invariants:
- lengths are counted in UTF-8 **bytes**, as Go's ``len(string)`` does, and truncation cuts bytes: a character split
  by the cut becomes one U+FFFD per dangling byte (what Go's JSON encoder sends to the API server for those bytes);
- the hash is the lowercase hex SHA-256 of the UTF-8 bytes of the *whole* original string, and truncation keeps a
  *suffix* of the string: ``<hash[:8]>-<suffix>``;
- namespace and name are truncated independently; the budgets are OME's (label part after ``models.ome.io/``: 49,
  ConfigMap key: 253), including OME's off-by-14 label budget, because consumers recompute the same key.
"""

from __future__ import annotations

import hashlib
from typing import Literal

ModelKind = Literal["BaseModel", "ClusterBaseModel"]

LABEL_DOMAIN = "models.ome.io"
CLUSTER_TYPE = "clusterbasemodel"
NAMESPACED_TYPE = "basemodel"
MAX_LABEL_NAME = 49  # OME's MaxLabelNameLength (Kubernetes would allow 63)
MAX_CONFIGMAP_KEY = 253
HASH_PREFIX = 8
_MIN_PART = 8  # OME's minLength for the namespace share


def _blen(s: str) -> int:
    return len(s.encode("utf-8"))


def truncate_with_hash(s: str, max_len: int) -> str:
    """``s`` unchanged when it fits in ``max_len`` bytes, else ``<sha256(s)[:8]>-<last max_len-9 bytes of s>``.

    When ``max_len - 9 <= 0`` the result is just the first ``max_len`` hex digits of the hash. The result is at most
    ``max_len`` bytes unless a split character had to become U+FFFD (see the module docstring).
    """
    raw = s.encode("utf-8")
    if len(raw) <= max_len:
        return s
    digest = hashlib.sha256(raw).hexdigest()
    keep = max_len - HASH_PREFIX - 1
    if keep <= 0:
        return digest[:max(max_len, 0)]
    return f"{digest[:HASH_PREFIX]}-{raw[len(raw) - keep:].decode('utf-8', errors='replace')}"


def _split_budget(namespace: str, name: str, budget: int) -> tuple[str, str]:
    """OME's namespace/name split: both kept when they fit; else the name gets priority and the namespace 8 bytes."""
    if _blen(namespace) + _blen(name) <= budget:
        return namespace, name
    if budget < _MIN_PART * 2:
        ns_max = budget // 2
    elif _blen(namespace) <= _MIN_PART:
        ns_max = _blen(namespace)
    else:
        ns_max = _MIN_PART
    return truncate_with_hash(namespace, ns_max), truncate_with_hash(name, budget - ns_max)


def _key(kind: ModelKind, namespace: str, name: str, total: int) -> str:
    if kind == "ClusterBaseModel":
        return f"{CLUSTER_TYPE}.{truncate_with_hash(name, total - len(CLUSTER_TYPE) - 1)}"
    ns, nm = _split_budget(namespace, name, total - len(NAMESPACED_TYPE) - 2)
    return f"{ns}.{NAMESPACED_TYPE}.{nm}"


def node_label_key(kind: ModelKind, namespace: str, name: str) -> str:
    """The full node-label key, e.g. ``models.ome.io/clusterbasemodel.llama-3-1-8b-instruct``.

    CBM: the name gets 32 bytes. BM: ``namespace + name`` share 38 bytes (``namespace`` is ignored for a CBM).
    """
    return f"{LABEL_DOMAIN}/{_key(kind, namespace, name, MAX_LABEL_NAME)}"


def configmap_key(kind: ModelKind, namespace: str, name: str) -> str:
    """The data key of this model in the node's ConfigMap: ``clusterbasemodel.{name}`` or ``{ns}.basemodel.{name}``.

    Same truncation scheme as the labels with budgets 236 (CBM name) and 242 (BM namespace + name).
    """
    return _key(kind, namespace, name, MAX_CONFIGMAP_KEY)


def parse_configmap_key(key: str) -> tuple[ModelKind, str, str] | None:
    """Invert :func:`configmap_key` as OME's controller does (``ParseModelInfoFromConfigMapKey``).

    A ``clusterbasemodel.`` prefix is a CBM (namespace ``""``, the rest is the name); otherwise the key splits on
    the *first* ``.basemodel.``. Anything else is ``None``. A truncated key yields the truncated parts, as in Go.
    """
    prefix = CLUSTER_TYPE + "."
    if key.startswith(prefix):
        return "ClusterBaseModel", "", key[len(prefix):]
    sep = f".{NAMESPACED_TYPE}."
    if sep in key:
        ns, name = key.split(sep, 1)
        return "BaseModel", ns, name
    return None
