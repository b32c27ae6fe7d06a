"""This node's model labels (``models.ome.io/...: Ready|Updating|Failed``), one label per patch.

Invariant: a write touches exactly one label key (a JSON merge patch of ``metadata.labels.<key>``), so it can
never clobber other labels or another writer's change; a value that is already in place is not written again; one
key is patched at most ``burst`` times at once and ``rate_per_s`` times a second after that (the writer waits), so
a model whose label flips cannot flood the API server and everything that watches Nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..kube import MERGE_PATCH, ApiError, request
from .freshness import OwnWrites
from .ratelimit import KeyedRateLimiter

log = logging.getLogger(__name__)


class NodeLabels:
    """Writes model labels on the Node ``node``. ``cache`` returns the agent's cached Node object (watch)."""

    def __init__(self, api: Any, node: str, *, cache: Callable[[], Mapping[str, Any] | None],
                 attempts: int = 5, pause_s: float = 0.1, burst: int = 10, rate_per_s: float = 0.5) -> None:
        self.api, self.node, self._cache = api, node, cache
        self.attempts, self.pause_s = max(1, attempts), pause_s
        self._limit = KeyedRateLimiter(burst=burst, rate_per_s=rate_per_s)
        self._own: OwnWrites[str] = OwnWrites()

    def current(self, key: str) -> str | None:
        """The label's value: the Node cache, or our own later write while the cache has not caught up."""
        meta = (self._cache() or {}).get("metadata") or {}
        labels = meta.get("labels") or {}
        return self._own.current(key, labels.get(key), meta.get("resourceVersion"))

    def set(self, key: str, value: str | None) -> bool:
        """Make label ``key`` equal ``value`` (``None``: absent); True when a patch was sent.

        Retries ``attempts`` times; a missing Node is not an error (nothing to label), as in OME.
        """
        if self.current(key) == value:
            return False
        wait = self._limit.reserve(key)
        if wait > 0:
            log.warning("label %s changes too often: waiting %.1fs before the next patch", key, wait)
            time.sleep(wait)
        body = {"metadata": {"labels": {key: value}}}
        last: ApiError | None = None
        for attempt in range(self.attempts):
            try:
                node = request(self.api, "PATCH", f"/api/v1/nodes/{self.node}", body=body,
                               content_type=MERGE_PATCH)
                self._own.wrote(key, value, (node.get("metadata") or {}).get("resourceVersion"))
                return True
            except ApiError as e:
                if e.status == 404:
                    log.warning("node %s not found: label %s not written", self.node, key)
                    return False
                if e.status in (400, 422):
                    raise
                last = e
                time.sleep(self.pause_s * (attempt + 1))
        assert last is not None
        raise last
