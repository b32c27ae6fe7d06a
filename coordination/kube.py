"""A per-model ``coordination.k8s.io/v1`` Lease, through the official ``kubernetes`` client.

Invariants:
- Every request to the API server goes through :meth:`KubernetesLease._call` (or the watch wrapper next to
  it), which counts it in :class:`RequestCounter` and bounds it with a client-side timeout.
- Bodies are sent as raw dicts and read as raw JSON (``_preload_content=False``): MicroTime values are always
  :func:`format_microtime` strings (six fractional digits, UTC, ``Z``), never re-serialised datetimes.
- Every replace carries the ``resourceVersion`` we read (the server would accept a PUT without one as an
  unconditional overwrite), so a 409 Conflict always means "someone else wrote first".
- A waiting follower keeps one watch open on the single lease (fieldSelector ``metadata.name=``); when the
  watch breaks it falls back to a jittered GET every ``poll_interval_s`` until a watch works again.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import urllib3.exceptions
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from .backend import LeaseRecord, LeaseStatus, RequestCounter, next_holder_record
from .errors import CoordinationError, LeaseLostError, LeaseUnavailableError
from .identity import (
    A_BYTES_DONE,
    A_BYTES_TOTAL,
    A_DEST,
    A_FILESYSTEM,
    A_MESSAGE,
    A_PHASE,
    A_SOURCE,
    A_STAGING,
    A_UPDATED,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_KEY_LABEL,
    ModelIdentity,
)
from .microtime import format_microtime, now_microtime
from .views import LeaseView, format_leases, view_of

__all__ = ["KubernetesLease", "LeaseView", "MicroTimeApiClient", "api_client", "format_leases", "list_leases"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_STATUS = {0, 408, 429, 500, 502, 503, 504}
_IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def in_cluster_available() -> bool:
    """True when a ServiceAccount token is mounted (we run in a pod)."""
    return _IN_CLUSTER_TOKEN.is_file()


def api_client(kubeconfig: Path | None) -> client.ApiClient:
    """An ``ApiClient`` from ``kubeconfig``, else the in-cluster ServiceAccount, else ``~/.kube/config``."""
    try:
        if kubeconfig is not None:
            loaded: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), persist_config=False)
            return loaded
        if in_cluster_available():
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return client.ApiClient(cfg)
        default: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            persist_config=False)
        return default
    except (config.ConfigException, OSError, ValueError) as e:
        raise CoordinationError(f"cannot load Kubernetes credentials: {type(e).__name__}: {e}",
                                hint="pass --kubeconfig, run in a pod with a ServiceAccount, or use "
                                     "--coordination file|none") from None


def _status_of(exc: BaseException) -> int:
    return int(exc.status or 0) if isinstance(exc, ApiException) else 0


def _reason(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("reason", ""))
    except (TypeError, ValueError, AttributeError):
        return ""


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def record_from_raw(raw: dict[str, Any]) -> LeaseRecord:
    """A :class:`LeaseRecord` from a Lease as JSON (the API server's wire format)."""
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    ann = meta.get("annotations") or {}
    status = LeaseStatus(
        phase=str(ann.get(A_PHASE, "")),
        bytes_done=_int(ann.get(A_BYTES_DONE)),
        bytes_total=_int(ann.get(A_BYTES_TOTAL)),
        staging=str(ann.get(A_STAGING, "")),
        message=str(ann.get(A_MESSAGE, "")),
    )
    return LeaseRecord(
        name=str(meta.get("name", "")),
        version=str(meta.get("resourceVersion", "")),
        holder=str(spec.get("holderIdentity") or ""),
        transitions=_int(spec.get("leaseTransitions")),
        duration_s=_int(spec.get("leaseDurationSeconds")),
        acquire_time=str(spec.get("acquireTime") or ""),
        renew_time=str(spec.get("renewTime") or ""),
        source=str(ann.get(A_SOURCE, "")),
        dest=str(ann.get(A_DEST, "")),
        updated=str(ann.get(A_UPDATED, "")),
        status=status,
        filesystem=str(ann.get(A_FILESYSTEM, "")),
    )


class KubernetesLease:
    """The lease of one model in one namespace, held (or waited for) by ``node``."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        identity: ModelIdentity,
        node: str,
        *,
        duration_s: float = 30.0,
        request_timeout_s: float = 10.0,
        poll_interval_s: float = 10.0,
        jitter_s: float = 1.0,
        watch_timeout_s: int = 300,
        counter: RequestCounter | None = None,
    ) -> None:
        if not node:
            raise CoordinationError("the node name is empty", hint="set --node-name or NODE_NAME")
        self.api = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.identity = identity
        self.node = node
        self.duration_s = max(1, math.ceil(duration_s))
        self.request_timeout_s = request_timeout_s
        self.poll_interval_s = poll_interval_s
        self.jitter_s = jitter_s
        self.watch_timeout_s = watch_timeout_s
        self.counter = counter or RequestCounter()
        self._watcher: _Watcher | None = None

    @property
    def name(self) -> str:
        return self.identity.lease_name

    # ------------------------------------------------------------------ the one place requests go through
    def _call(self, verb: str, fn: Callable[..., T], *args: Any, timeout_s: float | None = None,
              **kwargs: Any) -> T:
        """Count, bound and classify one request: conflicts/404 pass through as ``ApiException``, transient
        failures become :class:`LeaseUnavailableError`, RBAC refusals :class:`CoordinationError`."""
        self.counter.add(verb)
        timeout = max(0.5, timeout_s if timeout_s is not None else self.request_timeout_s)
        try:
            return fn(*args, _request_timeout=timeout, **kwargs)
        except ApiException as e:
            status = _status_of(e)
            if status in (401, 403):
                raise CoordinationError(
                    f"{verb} lease {self.namespace}/{self.name} was refused ({status} {e.reason})",
                    hint="grant the agent's ServiceAccount get/list/watch/create/update on "
                         "coordination.k8s.io leases in this namespace") from None
            if status in _TRANSIENT_STATUS or status >= 500:
                raise LeaseUnavailableError(f"{verb} lease {self.name}: API server answered {status}",
                                            hint="retrying; check the API server") from None
            raise
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise LeaseUnavailableError(f"{verb} lease {self.name}: {type(e).__name__}",
                                        hint="the API server is unreachable; retrying") from None

    def _body(self, *, holder: str, transitions: int, acquire_time: str, renew_time: str,
              status: LeaseStatus, version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": self.identity.labels(),
            "annotations": {
                A_SOURCE: self.identity.source_uri,
                A_DEST: self.identity.dest,
                **({A_FILESYSTEM: self.identity.filesystem} if self.identity.filesystem else {}),
                A_PHASE: str(status.phase),
                A_BYTES_DONE: str(status.bytes_done),
                A_BYTES_TOTAL: str(status.bytes_total),
                A_STAGING: status.staging,
                A_MESSAGE: status.message[:1000],
                A_UPDATED: renew_time,
            },
        }
        if version is not None:
            meta["resourceVersion"] = version
        spec: dict[str, Any] = {"leaseDurationSeconds": self.duration_s, "leaseTransitions": transitions,
                                "acquireTime": acquire_time, "renewTime": renew_time}
        if holder:
            spec["holderIdentity"] = holder
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def _raw(self, resp: Any) -> LeaseRecord:
        return record_from_raw(json.loads(resp.data))

    # ------------------------------------------------------------------ LeaseBackend
    def observe(self) -> LeaseRecord | None:
        try:
            resp = self._call("get", self.api.read_namespaced_lease, self.name, self.namespace,
                              _preload_content=False)
        except ApiException as e:
            if _status_of(e) == 404:
                return None
            raise CoordinationError(f"reading lease {self.name} failed: {e.status} {e.reason}") from None
        return self._raw(resp)

    def try_acquire(self, observed: LeaseRecord | None, status: LeaseStatus) -> LeaseRecord | None:
        now = now_microtime()
        transitions, acquired = next_holder_record(observed, node=self.node, now=now)
        body = self._body(holder=self.node, transitions=transitions, acquire_time=acquired, renew_time=now,
                          status=status, version=None if observed is None else observed.version)
        try:
            if observed is None:
                resp = self._call("create", self.api.create_namespaced_lease, self.namespace, body,
                                  _preload_content=False)
            else:
                resp = self._call("update", self.api.replace_namespaced_lease, self.name, self.namespace, body,
                                  _preload_content=False)
        except ApiException as e:
            if _status_of(e) in (404, 409):
                log.debug("lease %s: acquisition lost (%s %s)", self.name, e.status, _reason(e))
                return None
            raise CoordinationError(f"acquiring lease {self.name} failed: {e.status} {e.reason}") from None
        return self._raw(resp)

    def _write_held(self, held: LeaseRecord, status: LeaseStatus, holder: str,
                    timeout_s: float | None) -> LeaseRecord:
        body = self._body(holder=holder, transitions=held.transitions, acquire_time=held.acquire_time,
                          renew_time=now_microtime(), status=status, version=held.version)
        try:
            resp = self._call("update", self.api.replace_namespaced_lease, self.name, self.namespace, body,
                              timeout_s=timeout_s, _preload_content=False)
        except ApiException as e:
            if _status_of(e) in (404, 409):
                raise LeaseLostError(f"lease {self.name} was taken over or removed ({e.status} {_reason(e)})",
                                     hint="another node holds it now; this node stops writing") from None
            raise CoordinationError(f"renewing lease {self.name} failed: {e.status} {e.reason}") from None
        return self._raw(resp)

    def renew(self, held: LeaseRecord, status: LeaseStatus, *, timeout_s: float | None = None) -> LeaseRecord:
        return self._write_held(held, status, self.node, timeout_s)

    def release(self, held: LeaseRecord, status: LeaseStatus) -> LeaseRecord:
        """Clear the holder and keep the record (so ``kubectl get leases`` shows the final phase)."""
        return self._write_held(held, status, "", None)

    def wait_for_change(self, since: LeaseRecord | None, timeout_s: float) -> LeaseRecord | None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = _Watcher(self, since)
            self._watcher.start()
        return self._watcher.wait(since, timeout_s)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None


_UNSET = object()


class _Watcher(threading.Thread):
    """Keeps the latest snapshot of one lease up to date: one long watch, jittered GET polling as fallback."""

    def __init__(self, lease: KubernetesLease, start: LeaseRecord | None) -> None:
        super().__init__(name=f"modelherd-watch-{lease.name}", daemon=True)
        self.lease = lease
        self._cond = threading.Condition()
        self._latest: LeaseRecord | None = start
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None

    def wait(self, since: LeaseRecord | None, timeout_s: float) -> LeaseRecord | None:
        """Block until the snapshot's version differs from ``since`` or ``timeout_s`` passes; return it."""
        want = since.version if since is not None else None
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while (self._latest.version if self._latest is not None else None) == want:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    break
                self._cond.wait(left)
            return self._latest

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]

    def _set(self, record: LeaseRecord | None) -> None:
        with self._cond:
            self._latest = record
            self._cond.notify_all()

    def _sleep_jittered(self, base: float) -> None:
        self._stop.wait(base + random.uniform(0, self.lease.jitter_s))

    def run(self) -> None:
        lease = self.lease
        rv = self._latest.version if self._latest is not None else None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if rv is None:
                    record = lease.observe()
                    self._set(record)
                    rv = record.version if record is not None else None
                    if rv is None:  # no lease at all: nothing to watch from; poll
                        self._sleep_jittered(lease.poll_interval_s)
                        continue
                rv = self._watch_from(rv)
            except ApiException as e:
                if _status_of(e) == 410:  # our resourceVersion is too old: re-read, then watch again
                    rv = None
                    continue
                log.debug("watch on lease %s failed (%s); polling", lease.name, e.status)
                rv = self._poll_once(rv)
            except (LeaseUnavailableError, CoordinationError, urllib3.exceptions.HTTPError, OSError,
                    ValueError) as e:
                log.debug("watch on lease %s failed (%s); polling", lease.name, type(e).__name__)
                rv = self._poll_once(rv)
            if time.monotonic() - started < 1.0:  # a watch that ends at once must not spin
                self._sleep_jittered(1.0)

    def _poll_once(self, rv: str | None) -> str | None:
        self._sleep_jittered(self.lease.poll_interval_s)
        if self._stop.is_set():
            return rv
        try:
            record = self.lease.observe()
        except CoordinationError:
            return rv
        self._set(record)
        return record.version if record is not None else None

    def _watch_from(self, rv: str) -> str | None:
        """Stream events from ``rv`` until the server ends the watch; return the last resourceVersion."""
        lease = self.lease
        api_list = lease.api.list_namespaced_lease

        def counted_list(*args: Any, **kwargs: Any) -> Any:
            lease.counter.add("watch")
            return api_list(*args, **kwargs)

        w = watch.Watch()  # type: ignore[no-untyped-call]
        self._watch = w
        stream = w.stream(  # type: ignore[no-untyped-call]
            counted_list, lease.namespace, field_selector=f"metadata.name={lease.name}",
                          resource_version=rv, timeout_seconds=lease.watch_timeout_s,
                          _request_timeout=(lease.request_timeout_s, lease.watch_timeout_s + 30))
        for event in stream:
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            raw = event.get("raw_object") or event.get("object") or {}
            if kind in ("ADDED", "MODIFIED"):
                record = record_from_raw(raw)
                rv = record.version
                self._set(record)
            elif kind == "DELETED":
                self._set(None)
                return None
            if self._stop.is_set():
                break
        return rv


def list_leases(api: client.ApiClient, namespace: str) -> list[LeaseView]:
    """Every modelherd lease in ``namespace`` (one list request), sorted by name."""
    coord = client.CoordinationV1Api(api)
    try:
        resp = coord.list_namespaced_lease(namespace, label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}",
                                           _preload_content=False, _request_timeout=30)
    except ApiException as e:
        raise CoordinationError(f"listing leases in {namespace} failed: {e.status} {e.reason}",
                                hint="check --namespace and the agent's RBAC (list on leases)") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise LeaseUnavailableError(f"listing leases in {namespace} failed: {type(e).__name__}",
                                    hint="the API server is unreachable") from None
    items = json.loads(resp.data).get("items") or []  # type: ignore[attr-defined]  # raw response
    return sorted((view_of(record_from_raw(it)) for it in items), key=lambda v: v.name)


def model_key_selector(identity: ModelIdentity) -> str:
    return f"{MODEL_KEY_LABEL}={identity.key}"


class MicroTimeApiClient(client.ApiClient):
    """``kubernetes.client.ApiClient`` that writes datetimes the way the API server parses them.

    Build one from an existing client's configuration:
    ``MicroTimeApiClient(configuration=api_client.configuration)``. Naive datetimes in a request
    body raise :class:`ValueError` before anything is sent.
    """

    def sanitize_for_serialization(self, obj: Any) -> Any:
        if isinstance(obj, datetime):
            return format_microtime(obj)
        return super().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
