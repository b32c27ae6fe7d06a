"""Raw JSON requests to the API server through the ``kubernetes`` client's auth, TLS and connection pool.

The agent reads and writes objects as plain JSON dicts (custom and core objects alike), so no request goes
through the generated model classes. Every request made here is counted in :data:`REQUESTS` (per verb), which the
agent exposes as a metric and the benchmarks read.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import urllib3

from .kubeclient import transport

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """The API server answered with a non-2xx status (``status`` 0: it could not be reached)."""

    def __init__(self, status: int, reason: str, body: Mapping[str, Any] | None = None) -> None:
        self.status, self.reason, self.body = status, reason, dict(body or {})
        message = str(self.body.get("message") or reason)
        super().__init__(f"{status} {message}" if status else message)

    @property
    def message(self) -> str:
        return str(self.body.get("message") or self.reason)


class _Counts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def add(self, verb: str) -> None:
        with self._lock:
            self._c[verb] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._c.values())


REQUESTS = _Counts()


def request(api: Any, method: str, path: str, *, query: Sequence[tuple[str, str]] | None = None,
            body: Any = None, content_type: str = JSON, timeout_s: float = 15.0) -> Any:
    """One request; the decoded JSON answer, or :class:`ApiError` (status 0 when the server is unreachable).

    ``api`` is a :class:`~modelherd.agent.kubeclient.KubeClient` or a ``kubernetes.client.ApiClient``. One attempt
    is one request (no hidden urllib3 retries); callers decide what to retry.
    """
    client = transport(api)
    headers = {"Accept": JSON}
    data: bytes | None = None
    if body is not None:
        headers["Content-Type"] = content_type
        data = json.dumps(body).encode()
    url, headers = client.prepare(path, query, headers)
    REQUESTS.add(method.lower())
    try:
        resp = client.pool.request(method, url, body=data, headers=headers, retries=False,
                                   timeout=urllib3.Timeout(connect=min(5.0, timeout_s), read=timeout_s))
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise ApiError(0, f"API server unreachable: {type(e).__name__}") from None
    raw, status = resp.data, int(resp.status)
    try:
        decoded = json.loads(raw) if raw else {}
    except ValueError:
        decoded = {}
    if not 200 <= status < 300:
        raise ApiError(status, str(resp.reason or ""), decoded if isinstance(decoded, Mapping) else None)
    return decoded
