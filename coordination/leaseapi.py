"""What the Kubernetes lease backend needs from an API-server client: ``coordination.k8s.io/v1`` Leases as JSON.

Coordination imports no Kubernetes client. The process that runs a coordinated pull injects a :class:`LeaseApi`
over the client it already holds (the node agent and the CLI: ``modelherd.agent.kube.leases.KubeLeases`` over
their one ``KubeClient``), so a pull opens no connection pool and loads no credentials of its own.

Invariants every implementation keeps:
- Objects go in and come out as the API server's JSON (camelCase dicts); nothing is re-serialised, so MicroTime
  strings written by :func:`~.microtime.format_microtime` reach the server byte for byte.
- One call is one request (no hidden retries), bounded by the timeout it is given.
- Any failure is a :class:`LeaseApiError` carrying the HTTP status (0: the API server could not be reached or
  the stream broke) and the Status ``reason`` when the server sent one; the backend classifies it
  (:mod:`.kube`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["LeaseApi", "LeaseApiError", "LeaseWatch"]

Lease = dict[str, Any]


class LeaseApiError(Exception):
    """A Lease request failed: ``status`` is the HTTP status (0: unreachable, or a broken stream), ``reason`` the
    API server's Status reason (``Conflict``, ``Expired``) or the name of the network error, ``message`` its
    message."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {message or reason}".strip() if status else (message or reason))


class LeaseWatch(Protocol):
    """An open watch on one Lease: iterate for ``(type, lease)`` events (``ADDED``, ``MODIFIED``, ``DELETED``);
    an ``ERROR`` event is raised as :class:`LeaseApiError` with its code (410: the resourceVersion is too old).
    The iteration ends when the server ends the watch; :meth:`close` (from any thread) cuts it at once."""

    def __iter__(self) -> Iterator[tuple[str, Lease]]: ...

    def close(self) -> None: ...


class LeaseApi(Protocol):
    """Leases of one API server. Every method raises :class:`LeaseApiError` on failure."""

    def get(self, namespace: str, name: str, *, timeout_s: float) -> Lease | None:
        """The Lease, or ``None`` when it does not exist (404)."""
        ...

    def create(self, namespace: str, body: Lease, *, timeout_s: float) -> Lease:
        """Create it (409 when it exists); the stored object."""
        ...

    def replace(self, namespace: str, name: str, body: Lease, *, timeout_s: float) -> Lease:
        """PUT ``body`` (409 when its ``metadata.resourceVersion`` is not the current one); the stored object."""
        ...

    def list(self, namespace: str, label_selector: str, *, timeout_s: float) -> list[Lease]:
        """Every Lease in ``namespace`` matching ``label_selector`` (one request)."""
        ...

    def watch(self, namespace: str, name: str, resource_version: str, *, timeout_s: int,
              connect_timeout_s: float, read_timeout_s: float) -> LeaseWatch:
        """Open a watch on the Lease ``name`` (``fieldSelector=metadata.name=``) from ``resource_version``; the
        server ends it after ``timeout_s``; a read that waits longer than ``read_timeout_s`` fails."""
        ...
