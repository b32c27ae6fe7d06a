"""What a BaseModel / ClusterBaseModel asks of this node, read from the raw CR (camelCase JSON).

Invariant: :func:`model_spec` never raises on a malformed CR; whatever makes a model impossible to serve
(no ``spec.storage``, an unparsable or unsupported ``storageUri``, a ``path`` outside the models root) is
reported in :attr:`ModelSpec.problem`, so the agent marks that one model Failed and keeps serving the others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..storage.errors import ModelherdError
from ..storage.paths import ensure_inside_root
from ..storage.uri import ModelURI, parse_uri
from .reporting.keys import ModelKind, configmap_key, node_label_key

GROUP = "ome.io"
VERSION = "v1beta1"
PLURALS: dict[ModelKind, str] = {"BaseModel": "basemodels", "ClusterBaseModel": "clusterbasemodels"}
SKIP_CONFIG_ANNOTATION = "ome.oracle.com/skip-config-parsing"
RESERVE_LABEL = "models.ome/reserve-model-artifact"
SUPPORTED_SCHEMES = ("hf", "oci", "local")


@dataclass(frozen=True, order=True)
class ModelRef:
    """One model CR: the work-queue key. ``namespace`` is ``""`` for a ClusterBaseModel."""

    kind: ModelKind
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ModelRef:
        meta = obj.get("metadata") or {}
        kind: ModelKind = "ClusterBaseModel" if obj.get("kind") == "ClusterBaseModel" else "BaseModel"
        return cls(kind, "" if kind == "ClusterBaseModel" else str(meta.get("namespace") or ""),
                   str(meta.get("name") or ""))

    @property
    def cm_key(self) -> str:
        return configmap_key(self.kind, self.namespace, self.name)

    @property
    def label_key(self) -> str:
        return node_label_key(self.kind, self.namespace, self.name)

    @property
    def display(self) -> str:
        return f"clusterbasemodel/{self.name}" if self.kind == "ClusterBaseModel" else \
            f"basemodel/{self.namespace}/{self.name}"

    @property
    def event_namespace(self) -> str:
        """Where this model's Events live: its namespace, ``default`` for a cluster-scoped model."""
        return self.namespace or "default"

    def metric_labels(self) -> dict[str, str]:
        """OME's metric labels (``namespace`` is ``""`` for a ClusterBaseModel)."""
        return {"model_type": self.kind, "namespace": self.namespace, "name": self.name}


@dataclass(frozen=True)
class ModelSpec:
    """The parts of a CR the agent acts on. ``problem`` set means: Failed on every selected node, with it."""

    ref: ModelRef
    uid: str
    generation: int
    storage: Mapping[str, Any] | None = field(repr=False)
    storage_uri: str = ""
    uri: ModelURI | None = None
    dest: Path | None = None
    secret_name: str = ""
    secret_key: str = "token"
    inline_token: str = field(default="", repr=False)
    oci_auth: str = ""
    oci_region: str = ""
    trtllm: bool = False
    skip_config: bool = False
    reserve: bool = False
    deleting: bool = False
    problem: str = ""

    @property
    def identity(self) -> dict[str, str]:
        """What makes two specs the same model on disk (recorded in the ConfigMap entry)."""
        return {"storageUri": self.storage_uri, "path": str(self.dest) if self.dest else ""}


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def model_spec(obj: Mapping[str, Any], models_root: Path) -> ModelSpec:
    """Read ``obj`` (a BaseModel or ClusterBaseModel) into a :class:`ModelSpec`; never raises."""
    ref = ModelRef.of(obj)
    meta, spec = _dict(obj.get("metadata")), _dict(obj.get("spec"))
    annotations, labels = _dict(meta.get("annotations")), _dict(meta.get("labels"))
    base: dict[str, Any] = dict(
        ref=ref, uid=str(meta.get("uid") or ""), generation=int(meta.get("generation") or 0)
        if str(meta.get("generation") or "0").isdigit() else 0,
        storage=None,
        skip_config=str(annotations.get(SKIP_CONFIG_ANNOTATION, "")).lower() == "true",
        reserve=str(labels.get(RESERVE_LABEL, "")).lower() == "true",
        deleting=bool(meta.get("deletionTimestamp")),
        trtllm=_dict(spec.get("modelFormat")).get("name") == "tensorrtllm",
    )
    storage = spec.get("storage")
    if not isinstance(storage, Mapping):
        return ModelSpec(**base, problem="spec.storage is missing: nothing to download")
    base["storage"] = storage
    raw_uri = storage.get("storageUri")
    if not isinstance(raw_uri, str) or not raw_uri.strip():
        return ModelSpec(**base, problem="spec.storage.storageUri is missing")
    base["storage_uri"] = raw_uri
    params = {str(k): str(v) for k, v in _dict(storage.get("parameters")).items()}
    base.update(secret_name=str(storage.get("key") or ""), secret_key=params.get("secretKey") or "token",
                inline_token=params.get("token", ""), oci_auth=params.get("auth", ""),
                oci_region=params.get("region", ""))
    scheme = raw_uri.partition("://")[0].lower() if "://" in raw_uri else ""
    if scheme not in SUPPORTED_SCHEMES:
        shown = f"{scheme}://" if scheme else repr(raw_uri[:60])
        return ModelSpec(**base, problem=f"storage {shown} is not supported by modelherd "
                                         f"(supported: {', '.join(s + '://' for s in SUPPORTED_SCHEMES)})")
    try:
        uri = parse_uri(raw_uri)
    except ModelherdError as e:
        return ModelSpec(**base, problem=e.message)
    base["uri"] = uri
    path = storage.get("path")
    if uri.scheme == "local":
        return ModelSpec(**base, dest=Path(str(path)) if isinstance(path, str) and path else Path(uri.path))
    try:
        if isinstance(path, str) and path.strip():
            dest = Path(path)
            if not dest.is_absolute():
                dest = models_root / dest
        else:
            dest = models_root / uri.default_relpath()
        dest = ensure_inside_root(models_root, Path(os.path.normpath(dest)))
    except ModelherdError as e:
        return ModelSpec(**base, problem=f"spec.storage.path: {e.message}")
    return ModelSpec(**base, dest=dest)
