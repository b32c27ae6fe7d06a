"""A per-model ``coordination.k8s.io/v1`` Lease, through an injected :class:`~.leaseapi.LeaseApi`.

Coordination builds no Kubernetes client: the process hands in a :class:`~.leaseapi.LeaseApi` over the client it
already holds (the agent's one connection pool), and this module reads and writes the Lease as raw JSON.

Invariants:
- Every request to the API server goes through :meth:`KubernetesLease._call` (or the watch next to it), which
  counts it in :class:`RequestCounter` and bounds it with a client-side timeout.
- Bodies are sent and read as raw JSON dicts: MicroTime values are always :func:`format_microtime` strings (six
  fractional digits, UTC, ``Z``), never re-serialised datetimes.
- Every replace carries the ``resourceVersion`` we read (the server would accept a PUT without one as an
  unconditional overwrite), so a 409 Conflict always means "someone else wrote first".
- Failures are classified in one place (:meth:`KubernetesLease._call`): 401/403 are a :class:`CoordinationError`
  whose hint names the RBAC to grant; unreachable, 408, 429 and 5xx a :class:`LeaseUnavailableError` (retried by
  the caller); 404/409 on a write mean "lost" (``None`` from ``try_acquire``, :class:`LeaseLostError` from a renew
  or release).
- A waiting follower keeps one watch open on the single lease (fieldSelector ``metadata.name=``); when the
  watch breaks it falls back to a jittered GET every ``poll_interval_s`` until a watch works again; a 410 (our
  resourceVersion is too old) re-reads the lease and watches again from there.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

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
    ModelIdentity,
)
from .leaseapi import LeaseApi, LeaseApiError, LeaseWatch
from .leaseviews import LeaseView, format_leases, view_of
from .microtime import now_microtime

__all__ = ["KubernetesLease", "LeaseView", "format_leases", "list_leases", "record_from_raw"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_STATUS = {0, 408, 429, 500, 502, 503, 504}
#: A watch whose server-side timeout has passed is dead if nothing arrives for this much longer.
_WATCH_READ_GRACE_S = 30


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
    """The lease of one model in one namespace, held (or waited for) by ``node``, over ``api``."""

    def __init__(
        self,
        api: LeaseApi,
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
        self.api = api
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
    def _call(self, verb: str, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """Count, bound and classify one request: conflicts/404 pass through as :class:`LeaseApiError`, transient
        failures become :class:`LeaseUnavailableError`, RBAC refusals :class:`CoordinationError`."""
        self.counter.add(verb)
        timeout = max(0.5, timeout_s if timeout_s is not None else self.request_timeout_s)
        try:
            return fn(*args, timeout_s=timeout)
        except LeaseApiError as e:
            if e.status in (401, 403):
                raise CoordinationError(
                    f"{verb} lease {self.namespace}/{self.name} was refused ({e.status} {e.reason})",
                    hint="grant the agent's ServiceAccount get/list/watch/create/update on "
                         "coordination.k8s.io leases in this namespace") from None
            if e.status == 0:
                raise LeaseUnavailableError(f"{verb} lease {self.name}: {e.reason or e.message}",
                                            hint="the API server is unreachable; retrying") from None
            if e.status in _TRANSIENT_STATUS or e.status >= 500:
                raise LeaseUnavailableError(f"{verb} lease {self.name}: API server answered {e.status}",
                                            hint="retrying; check the API server") from None
            raise

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

    # ------------------------------------------------------------------ LeaseBackend
    def observe(self) -> LeaseRecord | None:
        try:
            raw = self._call("get", self.api.get, self.namespace, self.name)
        except LeaseApiError as e:
            raise CoordinationError(f"reading lease {self.name} failed: {e.status} {e.reason}") from None
        return None if raw is None else record_from_raw(raw)

    def try_acquire(self, observed: LeaseRecord | None, status: LeaseStatus) -> LeaseRecord | None:
        now = now_microtime()
        transitions, acquired = next_holder_record(observed, node=self.node, now=now)
        body = self._body(holder=self.node, transitions=transitions, acquire_time=acquired, renew_time=now,
                          status=status, version=None if observed is None else observed.version)
        try:
            if observed is None:
                raw = self._call("create", self.api.create, self.namespace, body)
            else:
                raw = self._call("update", self.api.replace, self.namespace, self.name, body)
        except LeaseApiError as e:
            if e.status in (404, 409):
                log.debug("lease %s: acquisition lost (%s %s)", self.name, e.status, e.reason)
                return None
            raise CoordinationError(f"acquiring lease {self.name} failed: {e.status} {e.reason}") from None
        return record_from_raw(raw)

    def _write_held(self, held: LeaseRecord, status: LeaseStatus, holder: str,
                    timeout_s: float | None) -> LeaseRecord:
        body = self._body(holder=holder, transitions=held.transitions, acquire_time=held.acquire_time,
                          renew_time=now_microtime(), status=status, version=held.version)
        try:
            raw = self._call("update", self.api.replace, self.namespace, self.name, body, timeout_s=timeout_s)
        except LeaseApiError as e:
            if e.status in (404, 409):
                raise LeaseLostError(f"lease {self.name} was taken over or removed ({e.status} {e.reason})",
                                     hint="another node holds it now; this node stops writing") from None
            raise CoordinationError(f"renewing lease {self.name} failed: {e.status} {e.reason}") from None
        return record_from_raw(raw)

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


class _Watcher(threading.Thread):
    """Keeps the latest snapshot of one lease up to date: one long watch, jittered GET polling as fallback."""

    def __init__(self, lease: KubernetesLease, start: LeaseRecord | None) -> None:
        super().__init__(name=f"modelherd-watch-{lease.name}", daemon=True)
        self.lease = lease
        self._cond = threading.Condition()
        self._latest: LeaseRecord | None = start
        self._stop = threading.Event()
        self._watch_lock = threading.Lock()
        self._watch: LeaseWatch | None = None

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
        with self._watch_lock:
            open_watch = self._watch
        if open_watch is not None:
            open_watch.close()

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
            except LeaseApiError as e:
                if e.status == 410:  # our resourceVersion is too old: re-read, then watch again
                    rv = None
                    continue
                log.debug("watch on lease %s failed (%s); polling", lease.name, e.status)
                rv = self._poll_once(rv)
            except (CoordinationError, ValueError) as e:
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
        lease.counter.add("watch")
        opened = lease.api.watch(lease.namespace, lease.name, rv, timeout_s=lease.watch_timeout_s,
                                 connect_timeout_s=lease.request_timeout_s,
                                 read_timeout_s=lease.watch_timeout_s + _WATCH_READ_GRACE_S)
        with self._watch_lock:
            self._watch = opened
        try:
            if self._stop.is_set():
                return rv
            for kind, raw in opened:
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
        finally:
            with self._watch_lock:
                self._watch = None
            opened.close()


def list_leases(api: LeaseApi, namespace: str) -> list[LeaseView]:
    """Every modelherd lease in ``namespace`` (one list request), sorted by name."""
    try:
        items = api.list(namespace, f"{MANAGED_BY_LABEL}={MANAGED_BY}", timeout_s=30)
    except LeaseApiError as e:
        if e.status == 0:
            raise LeaseUnavailableError(f"listing leases in {namespace} failed: {e.reason or e.message}",
                                        hint="the API server is unreachable") from None
        raise CoordinationError(f"listing leases in {namespace} failed: {e.status} {e.reason}",
                                hint="check --namespace and the agent's RBAC (list on leases)") from None
    return sorted((view_of(record_from_raw(it)) for it in items), key=lambda v: v.name)
