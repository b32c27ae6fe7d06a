"""Leader election on a ``coordination.k8s.io/v1`` Lease with client-go's ``leaderelection`` semantics.

Invariants:
- Expiry is judged on *our* monotonic clock from the moment we last saw the record change (``Observation``); the
  other candidate's ``renewTime`` (its wall clock) is never compared with ours. A record held by someone else is
  taken only once ``leaseDurationSeconds`` (the record's) passed without a change, or at once when released
  (empty holder).
- Every write carries the ``resourceVersion`` it is based on, so two candidates never both win: the loser gets 409.
- The leader renews every ``retry_period_s`` (optimistically from its own last write, falling back to a GET on a
  conflict) and gives leadership up when no renewal succeeded for ``renew_deadline_s`` — which is shorter than
  ``lease_duration_s``, so it stops acting before anyone else may start. ``on_stopped_leading`` runs (and
  returns) before the Lease is released, so the next leader never overlaps a write of ours that we know of.
- ``run`` returns when ``stop`` is set; a leader then releases the Lease (holder ``""``, duration 1 s), so a
  standby takes over within one retry period instead of a lease duration.
- The Lease is read and written through :class:`~modelherd.agent.kube.leases.KubeLeases` (the agent's one client
  and pool, the same Lease access the coordinated pulls use) and decoded by coordination's ``record_from_raw``.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ...coordination.backend import LeaseRecord, Observation
from ...coordination.kubelease import record_from_raw
from ...coordination.leaseapi import LeaseApiError
from ...coordination.microtime import now_microtime
from ...storage.errors import ConfigError
from ..kube.leases import KubeLeases

log = logging.getLogger(__name__)

JITTER_FACTOR = 1.2  # client-go's JitterFactor for the acquire loop


def candidate_identity() -> str:
    """``<hostname>_<uuid4>`` (client-go's convention): unique per process, readable in ``kubectl get lease``."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


class LeaderElector:
    """One candidate for the Lease ``namespace/name``. Call :meth:`run` on a thread of its own."""

    def __init__(self, api: Any, namespace: str, name: str, identity: str, *,
                 on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None],
                 lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0, retry_period_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < retry_period_s < renew_deadline_s < lease_duration_s:
            raise ConfigError(
                f"leader election needs retry period < renew deadline < lease duration, got {retry_period_s}s, "
                f"{renew_deadline_s}s, {lease_duration_s}s",
                hint="e.g. --leader-elect-lease-duration 15s --leader-elect-renew-deadline 10s "
                     "--leader-elect-retry-period 2s")
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self._leases = KubeLeases(api)
        self.on_started_leading, self.on_stopped_leading = on_started_leading, on_stopped_leading
        self.lease_duration_s = max(1, math.ceil(lease_duration_s))
        self.renew_deadline_s, self.retry_period_s = renew_deadline_s, retry_period_s
        self._clock = clock
        self._observation = Observation(clock)
        self._observed: LeaseRecord | None = None
        self._observed_raw: dict[str, Any] | None = None
        self._leading = threading.Event()
        self._last_holder = ""
        self.transitions_seen = 0

    def is_leader(self) -> bool:
        return self._leading.is_set()

    @property
    def holder(self) -> str:
        """The holder we last observed ("" when released or unknown)."""
        return self._observed.holder if self._observed is not None else ""

    # ------------------------------------------------------------------------------------------ one attempt
    def _body(self, *, holder: str, duration: int, acquire_time: str, renew_time: str, transitions: int,
              version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if version is not None:
            meta["resourceVersion"] = version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "acquireTime": acquire_time,
                         "renewTime": renew_time, "leaseTransitions": transitions}}

    def _see(self, raw: dict[str, Any]) -> LeaseRecord:
        record = record_from_raw(raw)
        self._observation.see(record)
        self._observed, self._observed_raw = record, raw
        if record.holder != self._last_holder:
            self._last_holder = record.holder
            if record.holder and record.holder != self.identity:
                log.info("leader election: %s/%s is held by %s", self.namespace, self.name, record.holder)
        return record

    def _valid(self, record: LeaseRecord) -> bool:
        return not self._observation.expired(max(record.duration_s, 1))

    def try_acquire_or_renew(self, timeout_s: float = 10.0) -> bool:
        """One client-go ``tryAcquireOrRenew``: True when we hold the Lease afterwards."""
        now = now_microtime()
        mine = self._observed
        if self.is_leader() and mine is not None and mine.holder == self.identity and self._valid(mine):
            body = self._body(holder=self.identity, duration=self.lease_duration_s, acquire_time=mine.acquire_time,
                              renew_time=now, transitions=mine.transitions, version=mine.version)
            try:
                self._see(self._leases.replace(self.namespace, self.name, body, timeout_s=timeout_s))
                return True
            except LeaseApiError as e:
                if e.status not in (404, 409):
                    raise
        raw = self._leases.get(self.namespace, self.name, timeout_s=timeout_s)
        if raw is None:
            body = self._body(holder=self.identity, duration=self.lease_duration_s, acquire_time=now,
                              renew_time=now, transitions=0, version=None)
            try:
                made = self._leases.create(self.namespace, body, timeout_s=timeout_s)
            except LeaseApiError as e:
                if e.status == 409:  # another candidate created it first
                    return False
                raise
            self._see(made)
            return True
        old = self._see(raw)
        if old.holder and old.holder != self.identity and self._valid(old):
            return False
        ours = old.holder == self.identity
        body = self._body(holder=self.identity, duration=self.lease_duration_s,
                          acquire_time=old.acquire_time if ours and old.acquire_time else now, renew_time=now,
                          transitions=old.transitions if ours else old.transitions + 1, version=old.version)
        try:
            self._see(self._leases.replace(self.namespace, self.name, body, timeout_s=timeout_s))
        except LeaseApiError as e:
            if e.status in (404, 409):
                return False
            raise
        return True

    def release(self) -> bool:
        """Give the Lease up (holder ``""``, 1 s), if we hold it by our last write; True when released."""
        mine = self._observed
        if mine is None or mine.holder != self.identity:
            return False
        now = now_microtime()
        body = self._body(holder="", duration=1, acquire_time=now, renew_time=now, transitions=mine.transitions,
                          version=mine.version)
        try:
            self._see(self._leases.replace(self.namespace, self.name, body, timeout_s=5.0))
        except LeaseApiError as e:
            log.warning("leader election: releasing %s/%s failed (%s); it expires in %ds", self.namespace,
                        self.name, e, mine.duration_s)
            return False
        log.info("leader election: released %s/%s", self.namespace, self.name)
        return True

    # ------------------------------------------------------------------------------------------ loops
    def _attempt(self, timeout_s: float) -> bool:
        try:
            return self.try_acquire_or_renew(timeout_s=max(0.5, timeout_s))
        except LeaseApiError as e:
            log.warning("leader election: %s/%s: %s", self.namespace, self.name, e)
            return False

    def _acquire(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self._attempt(self.renew_deadline_s):
                return True
            stop.wait(self.retry_period_s * (1 + random.uniform(0, JITTER_FACTOR)))
        return False

    def _lead(self, stop: threading.Event) -> None:
        """Renew every retry period until stop is set or no renewal succeeded for the renew deadline."""
        last_ok = self._clock()
        while not stop.wait(self.retry_period_s):
            left = self.renew_deadline_s - (self._clock() - last_ok)
            if left > 0 and self._attempt(left):
                last_ok = self._clock()
                continue
            if self._clock() - last_ok >= self.renew_deadline_s:
                log.error("leader election: no renewal of %s/%s for %.1fs: leadership lost", self.namespace,
                          self.name, self.renew_deadline_s)
                return

    def run(self, stop: threading.Event) -> None:
        """Campaign, lead, and campaign again after a loss, until ``stop``; a leader releases the Lease on stop."""
        while not stop.is_set():
            if not self._acquire(stop):
                break
            log.info("leader election: %s is the leader (%s/%s)", self.identity, self.namespace, self.name)
            self.transitions_seen += 1
            self._leading.set()
            try:
                self.on_started_leading()
                self._lead(stop)
            finally:
                self._leading.clear()
                self.on_stopped_leading()
            if stop.is_set():
                self.release()
