"""The agent's metrics, on an injected registry: OME's ``model_agent_*`` (names, types, labels and help as
OME's agent registers them) plus ``modelherd_*`` for what OME has no metric for.

Nothing is registered at import time and no server starts here (see :mod:`modelherd.agent.server`). A model
that left the node leaves no series behind (:meth:`AgentMetrics.forget_model`): the exposition grows with the
models on the node, not with every model it ever saw.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import INF

from ...coordination import Role
from ..ome.states import WRITTEN_STATUSES

OME_LABELS = ("model_type", "namespace", "name")
STATES = WRITTEN_STATUSES
ROLES = tuple(Role)


def _exp(start: float, factor: float, count: int) -> tuple[float, ...]:
    """Go's ``prometheus.ExponentialBuckets``."""
    return (*tuple(start * factor ** i for i in range(count)), INF)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # ---- OME's model agent (pkg/modelagent/metrics.go)
        self.downloads_success = Counter("model_agent_downloads_success", "The total number of successful model "
                                         "downloads", OME_LABELS, registry=r)
        self.downloads_failed = Counter("model_agent_downloads_failed", "The total number of failed model downloads",
                                        OME_LABELS, registry=r)
        self.verifications = Counter("model_agent_verifications", "The total number of model verification attempts",
                                     (*OME_LABELS, "result"), registry=r)
        # OME name parity: OME registers these two, and dashboards built for OME query them; modelherd verifies
        # sha256/etag checksums (a mismatch is a VerificationFailed failure) and waits out 429s inside the storage
        # layer's retry policy, so neither is ever updated here — they stay at 0 rather than go missing.
        self.md5_failed = Counter("model_agent_md5_checksum_failed", "The total number of MD5 checksum failures",
                                  OME_LABELS, registry=r)
        self.rate_limits = Counter("model_agent_rate_limit", "The total number of rate limit (429) responses "
                                   "encountered", OME_LABELS, registry=r)
        self.download_bytes = Counter("model_agent_download_bytes", "The total bytes transferred while downloading "
                                      "models", OME_LABELS, registry=r)
        self.download_duration = Histogram("model_agent_download_duration_seconds", "The duration of model downloads "
                                           "in seconds", OME_LABELS, buckets=_exp(0.1, 2, 10), registry=r)
        self.verification_duration = Histogram("model_agent_verification_duration_seconds", "The duration of model "
                                               "verifications in seconds", buckets=_exp(0.1, 2, 10), registry=r)
        self.rate_limit_wait = Histogram("model_agent_rate_limit_wait_seconds", "The duration waited due to rate "
                                         "limits in seconds", OME_LABELS, buckets=_exp(1, 2, 10), registry=r)
        # ---- modelherd
        self.model_state = Gauge("modelherd_model_state", "1 for the state each model is in on this node",
                                 (*OME_LABELS, "state"), registry=r)
        self.lease_role = Gauge("modelherd_lease_role", "1 for how this node got the model the last time: holder "
                                "(downloaded under the Lease), follower (waited, verified), pulled (own download, "
                                "local storage), ready (already on disk)", (*OME_LABELS, "role"), registry=r)
        self.origin_bytes = Counter("modelherd_origin_bytes", "Bytes this node fetched from the origin",
                                    OME_LABELS, registry=r)
        self.verified_bytes = Counter("modelherd_verified_bytes", "Bytes of models this node verified (published by "
                                      "itself or by another node)", OME_LABELS, registry=r)
        self.download_progress = Gauge("modelherd_download_progress_bytes", "Bytes in place of the model being "
                                       "downloaded by this node", OME_LABELS, registry=r)
        self.download_total = Gauge("modelherd_download_total_bytes", "Size of the model being downloaded by this "
                                    "node", OME_LABELS, registry=r)
        self.download_last_progress = Gauge(
            "modelherd_download_last_progress_timestamp_seconds", "Unix time bytes last moved in the download this "
            "node runs (as the Lease holder, or its own pull); absent when it runs none", OME_LABELS, registry=r)
        self.lease_holder_progress = Gauge(
            "modelherd_lease_holder_progress_timestamp_seconds", "While this node waits for a Lease another node "
            "holds: Unix time the holder's reported bytes (or the holder) last changed; absent otherwise",
            OME_LABELS, registry=r)
        self.failures = Counter("modelherd_model_failures", "Times a model was marked Failed on this node, by reason",
                                (*OME_LABELS, "reason"), registry=r)
        self.queue_depth = Gauge("modelherd_queue_depth", "Models waiting in the work queue", registry=r)
        self.active_workers = Gauge("modelherd_active_workers", "Workers busy with a model", registry=r)
        self.workers = Gauge("modelherd_workers", "Workers configured (--num-download-worker)", registry=r)
        self.storage_mode = Gauge("modelherd_storage_mode", "1 for the storage mode of the models root",
                                  ("mode",), registry=r)
        self.root_free = Gauge("modelherd_models_root_free_bytes", "Free bytes of the models root filesystem",
                               registry=r)
        self.root_used = Gauge("modelherd_models_root_used_bytes", "Used bytes of the models root filesystem",
                               registry=r)
        self.root_size = Gauge("modelherd_models_root_size_bytes", "Size of the models root filesystem",
                               registry=r)
        self.watch_restarts = Counter("modelherd_watch_restarts", "Watches restarted after an error or 410 Gone",
                                      ("resource",), registry=r)
        self.api_requests = Gauge("modelherd_api_requests", "Requests this agent sent to the API server (watch "
                                  "streams included), by verb and resource", ("verb", "resource"), registry=r)
        self.status_configmap_bytes = Gauge(
            "modelherd_status_configmap_bytes", "Bytes of keys and values in this node's status ConfigMap (the API "
            "server refuses more than 1048576)", registry=r)
        self.synced = Gauge("modelherd_informers_synced", "1 once the initial lists are in", registry=r)
        self.last_heartbeat = Gauge("modelherd_loop_heartbeat_timestamp_seconds", "Unix time of the last worker "
                                    "loop and watch heartbeat", registry=r)
        # ---- periodic verification (agent/lifecycle/verifier.py)
        self.verification_failures = Counter("modelherd_verification_failures", "Times a Ready model failed "
                                             "periodic verification on this node, by kind (quick: metadata, deep: "
                                             "checksums)", (*OME_LABELS, "kind"), registry=r)
        self.last_verification = Gauge("modelherd_last_verification_timestamp_seconds", "Unix time this node last "
                                       "verified the model, by kind (quick, deep)", (*OME_LABELS, "kind"), registry=r)
        self.deep_verify_bytes = Counter("modelherd_deep_verify_bytes", "Bytes re-hashed by deep verification",
                                         OME_LABELS, registry=r)
        self.verify_pass_seconds = Gauge("modelherd_verification_pass_seconds", "Duration of the last periodic "
                                         "verification pass, by kind", ("kind",), registry=r)
        self.info = Gauge("modelherd_agent_info", "Static facts about this agent", ("node", "version"), registry=r)

    def init_model(self, labels: dict[str, str]) -> None:
        """Create the per-model failure counters at 0 when a model is first handled on this node, so the first
        failure is an increase Prometheus sees (``increase()`` cannot see a series born at 1)."""
        self.downloads_failed.labels(**labels)
        self.rate_limits.labels(**labels)
        for result in ("success", "failure"):
            self.verifications.labels(**labels, result=result)

    def set_state(self, labels: dict[str, str], state: str | None) -> None:
        """Exactly one of the states is 1 (none when the model left the node)."""
        _one_hot(self.model_state, labels, "state", STATES, state)

    def set_role(self, labels: dict[str, str], role: str | None) -> None:
        """Exactly one of the roles is 1 (none when the model left the node)."""
        _one_hot(self.lease_role, labels, "role", ROLES, role)

    def forget_verification(self, labels: dict[str, str]) -> None:
        """The model left the node: drop its per-model verification series."""
        for kind in ("quick", "deep"):
            with contextlib.suppress(KeyError):
                self.last_verification.remove(*labels.values(), kind)

    def clear_progress(self, labels: dict[str, str]) -> None:
        """No download and no wait of this model is running on this node: its progress series are gone."""
        for g in (self.download_progress, self.download_total, self.download_last_progress,
                  self.lease_holder_progress):
            with contextlib.suppress(KeyError):
                g.remove(*labels.values())

    def per_model(self) -> list[MetricWrapperBase]:
        """Every metric whose first labels are a model's (:data:`OME_LABELS`), whatever labels follow."""
        return [m for m in vars(self).values()
                if isinstance(m, MetricWrapperBase) and tuple(m._labelnames[:len(OME_LABELS)]) == OME_LABELS]

    def forget_model(self, labels: dict[str, str]) -> None:
        """The model left the node: remove every series of every metric carrying exactly its ``labels``
        (``model_type``, ``namespace``, ``name``), whatever its other labels (result, reason, role, state, kind)."""
        model_type, namespace, name = (str(labels[k]) for k in OME_LABELS)
        for metric in self.per_model():
            with metric._lock:  # a worker may add a series meanwhile: copy the keys, then remove one by one
                keys = [k for k in metric._metrics if k[2] == name and k[1] == namespace and k[0] == model_type]
            for key in keys:
                with contextlib.suppress(KeyError):
                    metric.remove(*key)

    def watch_root(self, root: Path) -> None:
        """Free/total bytes of ``root`` computed at scrape time."""

        def stat(field: Callable[[os.statvfs_result], int]) -> Callable[[], float]:
            def read() -> float:
                try:
                    return float(field(os.statvfs(root)))
                except OSError:
                    return float("nan")
            return read

        self.root_free.set_function(stat(lambda s: s.f_bavail * s.f_frsize))
        self.root_size.set_function(stat(lambda s: s.f_blocks * s.f_frsize))
        self.root_used.set_function(stat(lambda s: (s.f_blocks - s.f_bfree) * s.f_frsize))


def _one_hot(gauge: Gauge, labels: dict[str, str], name: str, values: Sequence[str], chosen: str | None) -> None:
    """``gauge{labels, name=v}`` is 1 for ``v == chosen`` and 0 for every other value; ``chosen`` None removes
    every series of ``labels``."""
    for v in values:
        if chosen is None:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels.values(), v)
        else:
            gauge.labels(**labels, **{name: v}).set(1 if v == chosen else 0)
