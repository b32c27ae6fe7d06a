"""All environment and defaults, parsed in one place, then handed out by concern.

:class:`Settings` is the user's contract: every knob is one flat field, read from a ``MODELHERD_*`` variable (or
OME's / Kubernetes' name where one exists) and overridden by the CLI's flag of the same meaning. Nothing below
this module reads the environment for a modelherd knob.

Invariant: a collaborator receives only the group of its concern — :class:`TransferSettings` (how bytes move),
:class:`CoordinationSettings` (who may write), :class:`TenancySettings` (what a CR may ask for),
:class:`VerificationSettings`, :class:`AgentSettings` (the node agent's loops), :class:`ControllerSettings` and
:class:`ClusterSettings` (where this process runs) — frozen, so no room changes another's view. The namespace
rule is one: ``--namespace``, else the pod's namespace, else OME's ``ome`` (for every command, so a CLI pull and
the agents look for the same Leases).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..storage.dockerauth import auth_file_path
from ..storage.errors import ConfigError
from .durations import Duration

StorageMode = Literal["auto", "shared", "local"]
CoordinationMode = Literal["auto", "kubernetes", "file", "none"]

MiB = 1024 * 1024
DEFAULT_NAMESPACE = "ome"  # OME's namespace: where its agent and controller run, and where its ConfigMaps live
SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


class Settings(BaseSettings):
    """modelherd settings. Env vars are ``MODELHERD_<FIELD>`` unless an alias says otherwise."""

    model_config = SettingsConfigDict(env_prefix="MODELHERD_", extra="ignore", populate_by_name=True)

    models_root_dir: Path = Field(default=Path("/mnt/models"), description="--models-root-dir")
    concurrency: int = Field(default=4, ge=1, le=256, description="files downloaded in parallel")
    multipart_concurrency: int = Field(default=4, ge=1, le=64, description="ranged parts per large file")
    multipart_threshold_mib: int = Field(default=200, ge=1, description="files above this are split (OME: 200)")
    part_size_mib: int = Field(default=64, ge=1)
    download_retry: int = Field(default=5, ge=0, le=100, description="retries per request")
    retry_backoff_s: float = Field(default=0.5, gt=0)
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    retry_after_max_s: float = Field(
        default=300.0, gt=0, description="longest wait a server's Retry-After can ask for; longer asks are capped")
    fsync: bool = Field(default=True, description="fsync every file before publishing (durable publish)")
    direct_io: Literal["auto", "on", "off"] = Field(
        default="auto", description="write with O_DIRECT: auto = on node-local filesystems, off on shared ones")

    storage_mode: StorageMode = "auto"
    coordination: CoordinationMode = "auto"
    node_name: str = Field(default_factory=_default_node_name,
                           validation_alias=AliasChoices("MODELHERD_NODE_NAME", "NODE_NAME", "node_name"))
    namespace: str = Field(default="", validation_alias=AliasChoices("MODELHERD_NAMESPACE", "POD_NAMESPACE",
                                                                     "namespace"))
    kubeconfig: Path | None = Field(default=None, validation_alias=AliasChoices("MODELHERD_KUBECONFIG",
                                                                               "KUBECONFIG", "kubeconfig"))
    lease_duration_s: float = Field(default=30.0, gt=0)
    lease_renew_period_s: float = Field(default=10.0, gt=0)
    wait_jitter_s: float = Field(default=1.0, ge=0)
    poll_interval_s: float = Field(default=10.0, gt=0)

    gpu_shape: str = Field(default="auto", description="the node's GPU shape for TensorRT-LLM engines: auto (NVML, "
                           "then the instance-type map), none (keep every engine), or a shape such as H200x8")
    instance_type: str = Field(default="", description="node instance type label, GPU-shape fallback")
    instance_type_map: str | None = Field(default=None, description="a JSON file, or the JSON object itself "
                                          "(OME's INSTANCE_TYPE_MAP)", validation_alias=AliasChoices(
        "MODELHERD_INSTANCE_TYPE_MAP", "INSTANCE_TYPE_MAP", "instance_type_map"))

    hf_token: SecretStr | None = Field(default=None, validation_alias=AliasChoices(
        "MODELHERD_HF_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "hf_token"))
    hf_endpoint: str = Field(default="https://huggingface.co",
                             validation_alias=AliasChoices("MODELHERD_HF_ENDPOINT", "HF_ENDPOINT", "hf_endpoint"))

    oci_auth: Literal["auto", "instance_principal", "resource_principal", "workload_identity", "user"] = "auto"
    oci_config_file: Path = Field(default=Path("~/.oci/config"))
    oci_profile: str = "DEFAULT"
    oci_region: str = ""
    oci_endpoint: str = Field(default="", description="override the Object Storage endpoint (tests, realms)")

    # ---- OCI registries (oci://HOST/REPO:TAG) and plain HTTP(S) folders (https://HOST/PATH/ with a SHA256SUMS)
    registry_auth_file: Path | None = Field(
        default=None, description="a docker config JSON with registry credentials (podman's and oras' "
        "REGISTRY_AUTH_FILE); else $DOCKER_CONFIG/config.json, else ~/.docker/config.json when it exists. The "
        "agent's own (ambient) registry credentials: ClusterBaseModels, and BaseModels of "
        "ambient_credential_namespaces", validation_alias=AliasChoices(
            "MODELHERD_REGISTRY_AUTH_FILE", "REGISTRY_AUTH_FILE", "registry_auth_file"))
    docker_config: Path | None = Field(default=None, description="docker's DOCKER_CONFIG folder",
                                       validation_alias=AliasChoices("DOCKER_CONFIG", "docker_config"))
    insecure_registries: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="registries (host or host:port) that may be spoken to in plain HTTP, "
        "as containerd's and docker's insecure registries (the CLI's pull may also use loopback unlisted; a CR's "
        "model never: list a loopback registry here)")
    registry_mirrors: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="registry host[:port] -> mirror host[:port][/PREFIX] asked first (a "
        "Harbor proxy cache); the registry itself when the mirror fails. JSON object, or reg=mirror,reg2=mirror2")
    http_insecure_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="hosts (host or host:port) of http:// model folders that may be fetched "
        "in plain HTTP (the CLI's pull may also use loopback unlisted; a CR's model never)")
    http_token: SecretStr | None = Field(
        default=None, description="bearer token the CLI's `pull` sends to an https:// model folder's origin; "
        "never used by the agent (a CR names the URL, so a BaseModel's token comes from its own Secret)",
        validation_alias=AliasChoices("MODELHERD_HTTP_TOKEN", "http_token"))

    # ---- what a CR may ask for (agent/basemodels.py SpecPolicy); every CR field is untrusted input (docs/security.md)
    basemodel_path_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="folders (relative to the models root; {namespace} is the BaseModel's "
        "namespace) a BaseModel's files may live in; empty = anywhere in the models root, as OME allows. A "
        "multi-tenant cluster sets [\"{namespace}\"]. ClusterBaseModels are never confined")
    local_source_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="folders besides the models root that local:// models may name "
        "(absolute paths); anything else is refused without touching the disk")
    ambient_credential_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="namespaces whose BaseModels may use the agent's own credentials "
        "(HF_TOKEN, OCI instance/resource principal, the node's OCI config); \"*\" = every namespace. "
        "ClusterBaseModels always may; other BaseModels get only their own namespace's Secret")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(default="text", description="--log-format")

    # ---- the node agent (`modelherd agent`); OME's flag names where OME has one
    port: int = Field(default=8080, ge=0, le=65535, description="one HTTP server: /healthz /livez /readyz /metrics")
    bind_address: str = Field(default="0.0.0.0", description="address the HTTP server listens on")
    num_download_worker: int = Field(default=5, ge=1, le=64, description="models worked on in parallel")
    node_label_retry: int = Field(default=5, ge=0, le=100, description="attempts per node-label write")
    model_retry_base_s: float = Field(default=5.0, gt=0, description="first back-off after a model failed")
    model_retry_max_s: float = Field(default=600.0, gt=0, description="cap of the per-model back-off")
    startup_jitter_s: float = Field(default=10.0, ge=0,
                                    description="models needing origin work wait up to this long after start")
    progress_interval_s: float = Field(default=2.0, gt=0, description="ConfigMap progress writes, at most every")
    watch_timeout_s: float = Field(default=300.0, gt=0, description="server-side watch timeout (re-watch after)")
    heartbeat_max_age_s: float = Field(default=120.0, gt=0, description="/livez fails when a loop is older")
    staging_gc_interval_s: float = Field(default=600.0, gt=0, description="staging GC: one round every")
    staging_gc_orphan_age_s: float = Field(
        default=3600.0, gt=0, description="staging GC: staging no model wants, unchanged this long, is removed")
    staging_gc_stale_age_s: float = Field(
        default=86400.0, gt=0, description="staging GC: staging of a wanted model, unchanged this long, is removed")
    # ---- periodic verification (agent/lifecycle/verifier.py); durations as OME writes them ("10m", "168h", "90")
    verify_interval_s: Duration = Field(default=600.0, description="--verify-interval: quick verification of "
                                        "every Ready model this often (per-node jitter); 0 = off")
    deep_verify_interval_s: Duration = Field(default=168 * 3600.0, description="--deep-verify-interval: every "
                                             "checksum recomputed this often, one model at a time; 0 = off")
    verify_max_mbps: float = Field(default=100.0, ge=0, description="--verify-max-mbps: deep verification reads "
                                   "at most this many MB (10**6 bytes) per second; 0 = unthrottled")

    # ---- the status controller (`modelherd controller`), client-go's leader-election timings
    controller_port: int = Field(default=8081, ge=0, le=65535, description="the controller's HTTP server")
    leader_elect: bool = Field(default=True, description="one active controller, elected with a Lease")
    leader_elect_lease_duration_s: Duration = Field(default=15.0, gt=0, description="standbys wait this long")
    leader_elect_renew_deadline_s: Duration = Field(default=10.0, gt=0, description="the leader gives up after")
    leader_elect_retry_period_s: Duration = Field(default=2.0, gt=0, description="renew / retry interval")

    @field_validator("basemodel_path_prefixes", "local_source_roots", "ambient_credential_namespaces",
                     "insecure_registries", "http_insecure_hosts", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        """A list from the environment: a JSON array, or comma-separated words (``team-a,team-b``)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("registry_mirrors", mode="before")
    @classmethod
    def _map(cls, value: Any) -> Any:
        """A map from the environment: a JSON object, or comma-separated ``key=value`` pairs (or a list of them:
        repeated flags)."""
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = [part.strip() for part in text.split(",") if part.strip()]
            if any("=" not in p for p in pairs):
                raise ValueError("registry_mirrors: expected a JSON object or registry=mirror pairs")
            return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in pairs)}
        return value

    @field_validator("local_source_roots")
    @classmethod
    def _absolute(cls, value: list[Path]) -> list[Path]:
        for p in value:
            if not p.is_absolute():
                raise ValueError(f"local_source_roots: {p} is not an absolute path")
        return value

    @property
    def multipart_threshold(self) -> int:
        return self.multipart_threshold_mib * MiB

    @property
    def part_size(self) -> int:
        return self.part_size_mib * MiB

    def registry_auth_path(self) -> Path | None:
        """The docker config of this process's own registry credentials: ``registry_auth_file``
        (``REGISTRY_AUTH_FILE``), else ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` when it exists
        (:func:`~modelherd.storage.dockerauth.auth_file_path`). A named file that is missing is returned as named:
        a registry pull then fails reading it (the user asked for that file), every other command is unaffected."""
        environ = {k: str(v) for k, v in (("REGISTRY_AUTH_FILE", self.registry_auth_file),
                                           ("DOCKER_CONFIG", self.docker_config)) if v}
        try:
            return auth_file_path(environ, Path.home())
        except ConfigError:
            if self.registry_auth_file:
                return self.registry_auth_file.expanduser()
            assert self.docker_config is not None
            return self.docker_config.expanduser() / "config.json"

    def effective_namespace(self) -> str:
        """The one namespace rule: ``--namespace``, else the pod's namespace (POD_NAMESPACE, else the mounted
        ServiceAccount's), else :data:`DEFAULT_NAMESPACE`."""
        if self.namespace:
            return self.namespace
        try:
            return SERVICEACCOUNT_NAMESPACE.read_text().strip() or DEFAULT_NAMESPACE
        except OSError:
            return DEFAULT_NAMESPACE

    def named_node(self) -> str:
        """The node rule of a process that must know which node it is about (the agent, ``explain``):
        ``--node-name``, else ``MODELHERD_NODE_NAME`` / ``NODE_NAME`` — never the hostname default that a one-shot
        ``pull`` uses as its holder identity. A :class:`~modelherd.storage.errors.ConfigError` when none is set."""
        name = self.node_name.strip() if "node_name" in self.model_fields_set else ""
        if not name:
            raise ConfigError("no node name: the agent must know which node it runs on",
                              hint="set NODE_NAME from the downward API (spec.nodeName), or pass --node-name")
        return name

    # ------------------------------------------------------------------ the groups, one per concern
    @property
    def cluster(self) -> ClusterSettings:
        return ClusterSettings(models_root=self.models_root_dir, node_name=self.node_name,
                               namespace=self.effective_namespace(), kubeconfig=self.kubeconfig)

    @property
    def transfer(self) -> TransferSettings:
        return TransferSettings(
            concurrency=self.concurrency, multipart_concurrency=self.multipart_concurrency,
            multipart_threshold=self.multipart_threshold, part_size=self.part_size,
            download_retry=self.download_retry, retry_backoff_s=self.retry_backoff_s,
            retry_backoff_max_s=self.retry_backoff_max_s, retry_after_max_s=self.retry_after_max_s,
            fsync=self.fsync, direct_io=self.direct_io,
            hf_token=self.hf_token, hf_endpoint=self.hf_endpoint,
            oci_auth=self.oci_auth, oci_config_file=self.oci_config_file, oci_profile=self.oci_profile,
            oci_region=self.oci_region, oci_endpoint=self.oci_endpoint,
            registry_auth_file=self.registry_auth_path(), insecure_registries=tuple(self.insecure_registries),
            registry_mirrors=tuple(sorted(self.registry_mirrors.items())),
            http_insecure_hosts=tuple(self.http_insecure_hosts), http_token=self.http_token,
            gpu_shape=self.gpu_shape,
            instance_type=self.instance_type, instance_type_map=self.instance_type_map)

    @property
    def leases(self) -> CoordinationSettings:
        return CoordinationSettings(
            storage_mode=self.storage_mode, mode=self.coordination, lease_duration_s=self.lease_duration_s,
            lease_renew_period_s=self.lease_renew_period_s, wait_jitter_s=self.wait_jitter_s,
            poll_interval_s=self.poll_interval_s)

    @property
    def tenancy(self) -> TenancySettings:
        return TenancySettings(basemodel_path_prefixes=tuple(self.basemodel_path_prefixes),
                               local_source_roots=tuple(self.local_source_roots),
                               ambient_credential_namespaces=tuple(self.ambient_credential_namespaces))

    @property
    def verification(self) -> VerificationSettings:
        return VerificationSettings(interval_s=self.verify_interval_s, deep_interval_s=self.deep_verify_interval_s,
                                    max_mbps=self.verify_max_mbps)

    @property
    def agent(self) -> AgentSettings:
        return AgentSettings(
            port=self.port, bind_address=self.bind_address, workers=self.num_download_worker,
            node_label_retry=self.node_label_retry, model_retry_base_s=self.model_retry_base_s,
            model_retry_max_s=self.model_retry_max_s, startup_jitter_s=self.startup_jitter_s,
            progress_interval_s=self.progress_interval_s, watch_timeout_s=self.watch_timeout_s,
            heartbeat_max_age_s=self.heartbeat_max_age_s, staging_gc_interval_s=self.staging_gc_interval_s,
            staging_gc_orphan_age_s=self.staging_gc_orphan_age_s, staging_gc_stale_age_s=self.staging_gc_stale_age_s)

    @property
    def controller(self) -> ControllerSettings:
        return ControllerSettings(
            port=self.controller_port, bind_address=self.bind_address, leader_elect=self.leader_elect,
            lease_duration_s=self.leader_elect_lease_duration_s, renew_deadline_s=self.leader_elect_renew_deadline_s,
            retry_period_s=self.leader_elect_retry_period_s, watch_timeout_s=self.watch_timeout_s)


@dataclass(frozen=True)
class ClusterSettings:
    """Where this process runs: the models root, this node, the namespace (the one rule) and the credentials."""

    models_root: Path
    node_name: str
    namespace: str
    kubeconfig: Path | None


@dataclass(frozen=True)
class TransferSettings:
    """How bytes move: the engine's parallelism, retries, durability and the sources' endpoints and identities.
    ``hf_token`` is the agent's own (ambient) token, a ``SecretStr`` (never printed); the one token chain
    (agent/lifecycle/credentials.py) decides who may use it."""

    concurrency: int
    multipart_concurrency: int
    multipart_threshold: int  # bytes
    part_size: int  # bytes
    download_retry: int
    retry_backoff_s: float
    retry_backoff_max_s: float
    retry_after_max_s: float
    fsync: bool
    direct_io: str
    hf_token: SecretStr | None
    hf_endpoint: str
    oci_auth: str
    oci_config_file: Path
    oci_profile: str
    oci_region: str
    oci_endpoint: str
    registry_auth_file: Path | None  # the agent's/CLI's own docker config (ambient), read per pull
    insecure_registries: tuple[str, ...]
    registry_mirrors: tuple[tuple[str, str], ...]  # (registry, mirror) pairs, hashable
    http_insecure_hosts: tuple[str, ...]
    http_token: SecretStr | None  # the CLI's only; the agent never sends it (agent/lifecycle/credentials.py)
    gpu_shape: str
    instance_type: str
    instance_type_map: str | None


@dataclass(frozen=True)
class CoordinationSettings:
    """Who may write: the storage mode, the coordination mode and the Lease timings."""

    storage_mode: str
    mode: str
    lease_duration_s: float
    lease_renew_period_s: float
    wait_jitter_s: float
    poll_interval_s: float


@dataclass(frozen=True)
class TenancySettings:
    """What a CR may ask for (agent/basemodels.py SpecPolicy; docs/security.md)."""

    basemodel_path_prefixes: tuple[str, ...]
    local_source_roots: tuple[Path, ...]
    ambient_credential_namespaces: tuple[str, ...]


@dataclass(frozen=True)
class VerificationSettings:
    """Periodic verification (agent/lifecycle/verifier.py); 0 turns a kind off."""

    interval_s: float
    deep_interval_s: float
    max_mbps: float


@dataclass(frozen=True)
class AgentSettings:
    """The node agent's loops: its HTTP server, workers, back-off, progress writes, watches, staging GC."""

    port: int
    bind_address: str
    workers: int
    node_label_retry: int
    model_retry_base_s: float
    model_retry_max_s: float
    startup_jitter_s: float
    progress_interval_s: float
    watch_timeout_s: float
    heartbeat_max_age_s: float
    staging_gc_interval_s: float
    staging_gc_orphan_age_s: float
    staging_gc_stale_age_s: float


@dataclass(frozen=True)
class ControllerSettings:
    """The status controller: its HTTP server and client-go's leader-election timings."""

    port: int
    bind_address: str
    leader_elect: bool
    lease_duration_s: float
    renew_deadline_s: float
    retry_period_s: float
    watch_timeout_s: float
