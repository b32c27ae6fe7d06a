"""All environment and defaults, parsed in one place.

Every knob is a field here; the CLI maps its flags (OME's names where OME has one) onto these fields,
and lower layers receive plain values, never the environment.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .durations import Duration

StorageMode = Literal["auto", "shared", "local"]
CoordinationMode = Literal["auto", "kubernetes", "file", "none"]

MiB = 1024 * 1024


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

    # ---- what a CR may ask for (agent/models.py SpecPolicy); every CR field is untrusted input (docs/security.md)
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
    progress_interval_s: float = Field(default=5.0, gt=0, description="ConfigMap progress writes, at most every")
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
                     mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        """A list from the environment: a JSON array, or comma-separated words (``team-a,team-b``)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
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

    def effective_namespace(self, fallback: str = "default") -> str:
        """``--namespace``, else the pod's namespace (POD_NAMESPACE or the ServiceAccount's), else ``fallback``
        (``default`` for pulls; OME's ``ome`` for the agent)."""
        if self.namespace:
            return self.namespace
        sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        try:
            return sa_ns.read_text().strip() or fallback
        except OSError:
            return fallback
