"""What a BaseModel / ClusterBaseModel asks of this node, read from the raw CR (camelCase JSON).

Every field of a CR is untrusted input: a BaseModel is namespaced, so any tenant who may create one in its own
namespace drives an agent that runs on every GPU node with the platform's credentials (docs/security.md).

Invariants:
- :func:`model_spec` never raises on a malformed CR (a NUL in a path, a non-string, a wrong type anywhere);
  whatever makes a model impossible or not allowed to serve is reported in :attr:`ModelSpec.problem`, so the agent
  marks that one model Failed and keeps serving the others;
- a destination is inside the models root and, for a BaseModel, inside the folders :class:`SpecPolicy` allows its
  namespace; a ``local://`` folder is inside the models root or a folder the operator listed, decided from the
  path's text before the disk is touched;
- ``spec.storage.key`` is a Secret *name* (DNS-1123 subdomain), read only from the model's own namespace (a
  ClusterBaseModel: the agent's); ``parameters.secretKey`` is a Secret data key;
- the agent's own credentials (``HF_TOKEN``, OCI principals, its docker config for registries) serve
  ClusterBaseModels, and BaseModels only in the namespaces the operator opted in (:attr:`ModelSpec.ambient`); a
  registry artifact (``oci://REGISTRY/REPO:TAG``) of any other BaseModel uses its own ``dockerconfigjson`` Secret
  or goes anonymous, and an ``https://`` folder gets only the model's own Secret or inline token, never an agent's;
- ``http://`` is accepted here as a URI; the source refuses plain HTTP to a host not in ``http_insecure_hosts``
  (loopback included: the agent opens a CR's source with ``trust_loopback=False``), so such a model is Failed with
  that reason before any request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..storage.errors import ModelherdError
from ..storage.paths import ensure_inside_root, printable, safe_relpath
from ..storage.uri import ModelURI, parse_uri
from .ome.keys import ModelKind, configmap_key, node_label_key
from .settings import TenancySettings

GROUP = "ome.io"
VERSION = "v1beta1"
PLURALS: dict[ModelKind, str] = {"BaseModel": "basemodels", "ClusterBaseModel": "clusterbasemodels"}
SKIP_CONFIG_ANNOTATION = "ome.oracle.com/skip-config-parsing"
RESERVE_LABEL = "models.ome/reserve-model-artifact"  # honoured as a label or an annotation (fail safe)
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SECRET_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")
SUPPORTED_SCHEMES = ("hf", "oci", "ocios", "local", "https", "http")


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
class SpecPolicy:
    """What the operator lets a CR ask for (settings ``basemodel_path_prefixes``, ``local_source_roots``,
    ``ambient_credential_namespaces``). The default is OME's behaviour minus what no tenant should get: any path in
    the models root, ``local://`` only inside the models root, the agent's credentials for ClusterBaseModels only."""

    basemodel_path_prefixes: tuple[str, ...] = ()
    local_roots: tuple[Path, ...] = ()
    ambient_namespaces: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, tenancy: TenancySettings) -> SpecPolicy:
        return cls(tenancy.basemodel_path_prefixes, tuple(Path(p) for p in tenancy.local_source_roots),
                   frozenset(tenancy.ambient_credential_namespaces))

    def ambient_allowed(self, ref: ModelRef) -> bool:
        """May ``ref`` use the agent's own credentials (``HF_TOKEN``, the node's OCI identity, the agent's docker
        config)?"""
        return ref.kind == "ClusterBaseModel" or "*" in self.ambient_namespaces \
            or ref.namespace in self.ambient_namespaces

    def basemodel_roots(self, models_root: Path, namespace: str) -> list[Path]:
        """The folders a BaseModel of ``namespace`` may use; ``[]`` = anywhere in the models root."""
        roots = []
        for prefix in self.basemodel_path_prefixes:
            rel = safe_relpath(prefix.replace("{namespace}", namespace), what="basemodel path prefix")
            roots.append(Path(os.path.normpath(models_root / rel)))
        return roots


OPEN = SpecPolicy()


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
    created: str = ""  # metadata.creationTimestamp: who came first when two CRs want one folder or key
    ambient: bool = False  # may use the agent's own credentials (SpecPolicy.ambient_allowed)
    problem: str = ""

    @property
    def identity(self) -> dict[str, str]:
        """What makes two specs the same model on disk (recorded in the ConfigMap entry)."""
        return {"storageUri": self.storage_uri, "path": str(self.dest) if self.dest else ""}

    @property
    def content(self) -> str:
        """Which bytes this spec puts at :attr:`dest`: two specs at one folder must agree on it."""
        if self.uri is None:
            return ""
        if self.uri.scheme == "local":
            return f"local:{self.dest}"
        return str(self.uri.canonical)

    @property
    def seniority(self) -> tuple[str, int, str, str]:
        """Order of claims: the earlier CR holds a folder or key; ties by kind (cluster first), then name."""
        return (self.created or "~", 0 if self.ref.kind == "ClusterBaseModel" else 1, self.ref.namespace,
                self.ref.name)


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return str(value) if isinstance(value, str) else ""


def _control(value: str) -> bool:
    return not value.isprintable()


def model_spec(obj: Mapping[str, Any], models_root: Path, policy: SpecPolicy = OPEN) -> ModelSpec:
    """Read ``obj`` (a BaseModel or ClusterBaseModel) into a :class:`ModelSpec`; never raises."""
    try:
        ref = ModelRef.of(obj)
    except Exception:  # a CR whose metadata is not an object: nothing to serve, no key to write
        ref = ModelRef("BaseModel", "", "")
    try:
        return _model_spec(ref, obj, models_root, policy)
    except Exception as e:  # the invariant: one malformed CR is that model's problem only
        return ModelSpec(ref=ref, uid="", generation=0, storage=None,
                         problem=f"the model's spec could not be read ({type(e).__name__})")


def _model_spec(ref: ModelRef, obj: Mapping[str, Any], models_root: Path, policy: SpecPolicy) -> ModelSpec:
    meta, spec = _dict(obj.get("metadata")), _dict(obj.get("spec"))
    annotations, labels = _dict(meta.get("annotations")), _dict(meta.get("labels"))
    generation = str(meta.get("generation") or "0")
    base: dict[str, Any] = dict(
        ref=ref, uid=_text(meta.get("uid")), generation=int(generation) if generation.isdigit() else 0,
        storage=None,
        skip_config=str(annotations.get(SKIP_CONFIG_ANNOTATION, "")).lower() == "true",
        reserve=any(str(m.get(RESERVE_LABEL, "")).lower() == "true" for m in (labels, annotations)),
        deleting=bool(meta.get("deletionTimestamp")),
        trtllm=_dict(spec.get("modelFormat")).get("name") == "tensorrtllm",
        created=_text(meta.get("creationTimestamp")),
        ambient=policy.ambient_allowed(ref),
    )
    storage = spec.get("storage")
    if not isinstance(storage, Mapping):
        return ModelSpec(**base, problem="spec.storage is missing: nothing to download")
    base["storage"] = storage
    raw_uri = storage.get("storageUri")
    if not isinstance(raw_uri, str) or not raw_uri.strip():
        return ModelSpec(**base, problem="spec.storage.storageUri is missing")
    if _control(raw_uri):
        return ModelSpec(**base, problem="spec.storage.storageUri contains a control character")
    base["storage_uri"] = raw_uri
    params = {str(k): str(v) for k, v in _dict(storage.get("parameters")).items()}
    key = storage.get("key")
    secret_key = params.get("secretKey") or "token"
    base.update(secret_name=key if isinstance(key, str) else "", secret_key=secret_key,
                inline_token=params.get("token", ""), oci_auth=params.get("auth", ""),
                oci_region=params.get("region", ""))
    if key is not None and key != "" and not (isinstance(key, str) and len(key) <= 253
                                              and _DNS1123_SUBDOMAIN.fullmatch(key)):
        return ModelSpec(**base, problem="spec.storage.key must be the name of a Secret in the model's own "
                                         "namespace (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.')")
    if len(secret_key) > 253 or not _SECRET_DATA_KEY.fullmatch(secret_key):
        return ModelSpec(**base, problem="spec.storage.parameters.secretKey must be a Secret data key "
                                         "(letters, digits, '-', '_' and '.')")
    scheme = raw_uri.partition("://")[0].lower() if "://" in raw_uri else ""
    if scheme not in SUPPORTED_SCHEMES:
        shown = f"{printable(scheme[:20])}://" if scheme else repr(raw_uri[:60])
        return ModelSpec(**base, problem=f"storage {shown} is not supported by modelherd "
                                         f"(supported: {', '.join(s + '://' for s in SUPPORTED_SCHEMES)})")
    try:
        uri = parse_uri(raw_uri)
    except ModelherdError as e:
        return ModelSpec(**base, problem=e.message)
    base["uri"] = uri
    path = storage.get("path")
    if path is not None and not isinstance(path, str):
        return ModelSpec(**base, problem="spec.storage.path must be a string")
    if path and _control(path):
        return ModelSpec(**base, problem="spec.storage.path contains a control character")
    if uri.scheme == "local":
        return _local_spec(base, path or uri.path, models_root, policy)
    try:
        if path and path.strip():
            dest = Path(path)
            if not dest.is_absolute():
                dest = models_root / dest
        else:
            confined = policy.basemodel_roots(models_root, ref.namespace) if ref.kind == "BaseModel" else []
            dest = (confined[0] if confined else models_root) / uri.default_relpath()
        dest = ensure_inside_root(models_root, Path(os.path.normpath(dest)))
    except ModelherdError as e:
        return ModelSpec(**base, problem=f"spec.storage.path: {e.message}")
    if ref.kind == "BaseModel":
        allowed = policy.basemodel_roots(models_root, ref.namespace)
        if allowed and not _inside_any(dest, [Path(os.path.realpath(a)) for a in allowed]):
            return ModelSpec(**base, problem=f"spec.storage.path: {dest} is outside the folders BaseModels of "
                                             f"namespace {ref.namespace} may use "
                                             f"({', '.join(str(a) for a in allowed)})")
    return ModelSpec(**base, dest=dest)


def _inside_any(path: Path, roots: Iterable[Path]) -> bool:
    return any(path != root and root in path.parents for root in roots)


def _local_spec(base: dict[str, Any], raw: str, models_root: Path, policy: SpecPolicy) -> ModelSpec:
    """``local://``: a folder on the node, verified in place. Confined to the models root and the operator's
    ``local_source_roots``, judged on the normalised text first (nothing outside is ever stat'ed or walked), then
    with symlinks resolved (a link inside an allowed folder cannot lead out of it)."""
    roots = [Path(os.path.normpath(models_root)), *(Path(os.path.normpath(r)) for r in policy.local_roots)]
    lexical = Path(os.path.normpath(raw)) if raw.startswith("/") else None
    if lexical is None or not _inside_any(lexical, roots):
        return ModelSpec(**base, problem=f"local:// path {printable(raw[:200])} is outside the models root and "
                                         "the folders the operator allows for local models (local_source_roots)")
    real = Path(os.path.realpath(lexical))
    if not _inside_any(real, [Path(os.path.realpath(r)) for r in roots]):
        return ModelSpec(**base, problem=f"local:// path {lexical} resolves outside the models root and the "
                                         "folders the operator allows for local models (local_source_roots)")
    return ModelSpec(**base, dest=lexical)
