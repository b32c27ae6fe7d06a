"""``coordination.k8s.io/v1`` Leases over the agent's one client: coordination's :class:`LeaseApi`, implemented.

Coordinated pulls (:mod:`modelherd.coordination.kubelease`), the staging GC and the controller's leader election
(:mod:`modelherd.agent.controller.leader`) all read and write Leases through :class:`KubeLeases`, so every Lease
request uses the process's :class:`~.client.KubeClient` and its connection pool: a pull opens no pool and loads
no credentials.

Invariants:
- Each method is one request (:func:`~.request.request`, counted in ``REQUESTS``; a watch is one streaming GET
  through :func:`~.watch.open_stream`), bounded by the timeout it is given; names are checked path segments.
- Every failure is a :class:`~modelherd.coordination.leaseapi.LeaseApiError` with the HTTP status (0: the API
  server could not be reached, or a watch stream broke) and the Status ``reason`` the server gave.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import urllib3

from ...coordination.leaseapi import LeaseApiError
from .request import ApiError, api_path, request
from .watch import open_stream, watch_events

__all__ = ["KubeLeases", "LeaseStream"]

Lease = dict[str, Any]


def _lease_error(e: ApiError) -> LeaseApiError:
    return LeaseApiError(e.status, str(e.body.get("reason") or e.reason or ""), e.message)


def _leases(namespace: str) -> str:
    return api_path("apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases")


class LeaseStream:
    """One open watch on a Lease; iterate for ``(type, lease)``; :meth:`close` cuts it from any thread."""

    def __init__(self, resp: urllib3.BaseHTTPResponse) -> None:
        self._resp = resp
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[tuple[str, Lease]]:
        try:
            for etype, obj in watch_events(self._resp):
                if etype == "ERROR":  # a Status: 410 when the resourceVersion is too old
                    raise LeaseApiError(int(obj.get("code") or 0), str(obj.get("reason") or ""),
                                        str(obj.get("message") or ""))
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    yield etype, obj
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            if self._closed.is_set():  # cut by close(): an end, not a failure
                return
            if isinstance(e, ValueError) and not isinstance(e, urllib3.exceptions.HTTPError):
                raise  # a line that is not a watch event
            raise LeaseApiError(0, type(e).__name__, "the watch stream broke") from None

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):  # already released or closed: nothing left to cut
            self._resp.shutdown()
        with contextlib.suppress(Exception):
            self._resp.close()


class KubeLeases:
    """:class:`~modelherd.coordination.leaseapi.LeaseApi` over ``api`` (the agent's ``KubeClient``)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def get(self, namespace: str, name: str, *, timeout_s: float) -> Lease | None:
        try:
            found: Lease = request(self.api, "GET", api_path("apis", "coordination.k8s.io", "v1", "namespaces",
                                                             namespace, "leases", name), timeout_s=timeout_s)
        except ApiError as e:
            if e.status == 404:
                return None
            raise _lease_error(e) from None
        return found

    def create(self, namespace: str, body: Lease, *, timeout_s: float) -> Lease:
        try:
            made: Lease = request(self.api, "POST", _leases(namespace), body=body, timeout_s=timeout_s)
        except ApiError as e:
            raise _lease_error(e) from None
        return made

    def replace(self, namespace: str, name: str, body: Lease, *, timeout_s: float) -> Lease:
        try:
            stored: Lease = request(self.api, "PUT", api_path("apis", "coordination.k8s.io", "v1", "namespaces",
                                                              namespace, "leases", name), body=body,
                                    timeout_s=timeout_s)
        except ApiError as e:
            raise _lease_error(e) from None
        return stored

    def list(self, namespace: str, label_selector: str, *, timeout_s: float) -> list[Lease]:
        try:
            page = request(self.api, "GET", _leases(namespace), query=[("labelSelector", label_selector)],
                           timeout_s=timeout_s)
        except ApiError as e:
            raise _lease_error(e) from None
        items = page.get("items") if isinstance(page, dict) else None
        return [it for it in items or [] if isinstance(it, dict)]

    def watch(self, namespace: str, name: str, resource_version: str, *, timeout_s: int,
              connect_timeout_s: float, read_timeout_s: float) -> LeaseStream:
        query = [("watch", "true"), ("fieldSelector", f"metadata.name={name}"),
                 ("resourceVersion", resource_version), ("timeoutSeconds", str(int(timeout_s)))]
        try:
            resp = open_stream(self.api, _leases(namespace), query, connect_timeout_s=connect_timeout_s,
                               read_timeout_s=read_timeout_s)
        except ApiError as e:
            raise _lease_error(e) from None
        return LeaseStream(resp)
