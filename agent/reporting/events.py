"""Kubernetes Events on a BaseModel/ClusterBaseModel for this node's state changes.

Invariant: an Event never carries a credential (messages come from typed errors, which never quote tokens or
signed URLs), and a failure to record one is logged, never raised: Events are best effort. Each model gets at most
``burst`` Events at once and one more every ``1 / rate_per_s`` seconds (client-go's spam filter does the same);
the rest are dropped and counted in :attr:`EventRecorder.dropped`.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from ..basemodels import GROUP, VERSION, ModelRef
from ..kube import ApiError, request
from .ratelimit import KeyedRateLimiter

log = logging.getLogger(__name__)
COMPONENT = "modelherd-agent"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    def __init__(self, api: Any, node: str, *, burst: int = 10, rate_per_s: float = 1 / 30) -> None:
        self.api, self.node = api, node
        self._limit = KeyedRateLimiter(burst=burst, rate_per_s=rate_per_s)
        self.dropped = 0

    def record(self, ref: ModelRef, uid: str, *, reason: str, message: str, warning: bool = False) -> None:
        if not self._limit.allow(f"{ref.kind}/{ref.namespace}/{ref.name}"):
            self.dropped += 1
            log.debug("event %s on %s dropped: too many for this model", reason, ref.display)
            return
        ns = ref.event_namespace
        now = _now()
        involved: dict[str, Any] = {"apiVersion": f"{GROUP}/{VERSION}", "kind": ref.kind, "name": ref.name}
        if ref.namespace:
            involved["namespace"] = ref.namespace
        if uid:
            involved["uid"] = uid
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{ref.name[:200]}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": f"node {self.node}: {message}"[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node[:128],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            request(self.api, "POST", f"/api/v1/namespaces/{ns}/events", body=body, timeout_s=5.0)
        except ApiError as e:
            log.warning("recording event %s on %s failed: %s", reason, ref.display, e)
