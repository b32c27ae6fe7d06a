"""Raw JSON requests to the API server through the agent's own :class:`~modelherd.agent.kube.client.KubeClient`.

The transport is the project's KubeClient (base URL, bearer token, one TLS-configured urllib3 pool per process);
a ``kubernetes.client.ApiClient`` is accepted too and adapted to it (its auth settings and its pool).

The agent reads and writes objects as plain JSON dicts (custom and core objects alike), so no request goes
through the generated model classes. Every request made here, and every watch stream opened by :mod:`.watch`, is
counted in :data:`REQUESTS` (per verb and resource, RBAC's words), which the agent exposes as a metric and the
benchmarks read.

Invariant: a request goes to exactly the object its caller named. A path is built from segments
(:func:`api_path`); any segment that is empty, ``.``/``..``, or holds ``/``, ``%``, ``?``, ``#``, a backslash or a
control character is refused before a request is made, so a name taken from a CR (``key: ../../ns/secrets/x``)
can never be normalised by the HTTP stack into another namespace's object.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import urllib3

from .client import transport

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """The API server answered with a non-2xx status (``status`` 0: it could not be reached). ``action`` names the
    request as RBAC does (``patch nodes``, ``get secrets in team-a``), for a message that says what was refused;
    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one (429, 503)."""

    def __init__(self, status: int, reason: str, body: Mapping[str, Any] | None = None, *, action: str = "",
                 retry_after: float | None = None) -> None:
        self.status, self.reason, self.body, self.action = status, reason, dict(body or {}), action
        self.retry_after = retry_after
        message = str(self.body.get("message") or reason)
        super().__init__(f"{status} {message}" if status else message)

    @property
    def message(self) -> str:
        return str(self.body.get("message") or self.reason)


class UnsafeApiPathError(ValueError):
    """A path segment the API layer did not build (a traversal, an escape, a separator)."""


_BAD_SEGMENT = re.compile(r"[/%?#\\\x00-\x1f\x7f]")
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def _check_segment(segment: str) -> str:
    if not isinstance(segment, str) or segment in ("", ".", "..") or _BAD_SEGMENT.search(segment):
        raise UnsafeApiPathError("refused an API path segment that is empty, '.', '..' or holds '/', '%', '?', "
                                 "'#', a backslash or a control character")
    return segment


def api_path(*segments: str) -> str:
    """``/seg/seg/...`` from segments that are each one name (see the module's invariant)."""
    return "/" + "/".join(_check_segment(s) for s in segments)


def check_path(path: str) -> None:
    """Refuse a path with any unsafe segment (see the module's invariant)."""
    if not path.startswith("/"):
        raise UnsafeApiPathError("an API path must start with '/'")
    for segment in path[1:].split("/"):
        _check_segment(segment)


def _scoped(path: str) -> tuple[str, list[str]]:
    """``(namespace, segments)`` of an API path after its group/version and namespace: ``("ome", ["configmaps",
    "n"])`` for ``/api/v1/namespaces/ome/configmaps/n``, ``("", ["nodes", "n", "status"])``."""
    parts = path.split("?")[0].strip("/").split("/")
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        return rest[1], rest[2:]
    return "", rest


def _resource_of(path: str) -> tuple[str, str]:
    """``(resource, namespace)`` of an API path: ``("configmaps", "ome")``, ``("nodes", "")``,
    ``("nodes/status", "")``."""
    namespace, rest = _scoped(path)
    resource = rest[0] if rest else "?"
    if len(rest) >= 3:
        resource += "/" + rest[2]
    return resource, namespace


def verb_of(method: str, path: str, query: Sequence[tuple[str, str]] | None = None) -> str:
    """RBAC's verb: ``get``/``list``/``watch`` for a GET (of one object, a collection, a watch), else by method."""
    if method.upper() != "GET":
        return _VERBS.get(method.upper(), method.lower())
    if any(k == "watch" and v.lower() in ("1", "true") for k, v in (query or ())):
        return "watch"
    rest = _scoped(path)[1]
    return "get" if len(rest) % 2 == 0 and rest else "list"


def action_of(method: str, path: str) -> str:
    """RBAC's words for a request: ``get secrets in team-a``, ``patch nodes``, ``update configmaps in ome``."""
    verb = _VERBS.get(method.upper(), method.lower())
    resource, namespace = _resource_of(path)
    return f"{verb} {resource}" + (f" in {namespace}" if namespace else "")


class _Counts:
    """Requests sent, by ``(verb, resource)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[tuple[str, str]] = Counter()

    def add(self, method: str, path: str, query: Sequence[tuple[str, str]] | None = None) -> None:
        key = (verb_of(method, path, query), _resource_of(path)[0])
        with self._lock:
            self._c[key] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
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

    ``api`` is a :class:`~modelherd.agent.kube.client.KubeClient` or a ``kubernetes.client.ApiClient``. One attempt
    is one request (no hidden urllib3 retries); callers decide what to retry.
    """
    check_path(path)
    client = transport(api)
    headers = {"Accept": JSON}
    data: bytes | None = None
    if body is not None:
        headers["Content-Type"] = content_type
        data = json.dumps(body).encode()
    url, headers = client.prepare(path, query, headers)
    REQUESTS.add(method, path, query)
    try:
        resp = client.pool.request(method, url, body=data, headers=headers, retries=False,
                                   timeout=urllib3.Timeout(connect=min(5.0, timeout_s), read=timeout_s))
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise ApiError(0, f"API server unreachable: {type(e).__name__}", action=action_of(method, path)) from None
    raw, status = resp.data, int(resp.status)
    try:
        decoded = json.loads(raw) if raw else {}
    except ValueError:
        decoded = {}
    if not 200 <= status < 300:
        raise ApiError(status, str(resp.reason or ""), decoded if isinstance(decoded, Mapping) else None,
                       action=action_of(method, path))
    return decoded
