"""One short operation done by exactly one node, under a model's lease (removal of shared files, staging GC).

``run_exclusive(lease, operation, done_phase=...)``::

    observe the lease
      held by someone we have seen change within its duration -> wait for a change (wait=False: give up)
      released with phase == done_phase                         -> someone already did it: return None
      else (absent, released, expired)                          -> try to take it (compare-and-swap; one wins)
    holding it: operation() -> release with done_phase when it returned True, else with the phase it had

Invariants:
- ``operation`` runs only while we hold the lease, and only if the acquisition was less than
  ``duration - margin`` ago on our monotonic clock; it must be short (a rename), as nothing renews the lease.
- The lease is always released after the operation (also when it raised), so a download that follows (the
  model created again) takes it at once; a recorded ``done_phase`` makes every later caller a no-op.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..storage.errors import CancelledError
from ..storage.fsid import filesystem_id
from .backend import LeaseBackend, LeaseRecord, LeaseStatus, Observation
from .errors import CoordinationError, LeaseLostError, LeaseUnavailableError
from .filelease import list_file_leases
from .kubelease import list_leases
from .leaseapi import LeaseApi

log = logging.getLogger(__name__)


def run_exclusive(lease: LeaseBackend, operation: Callable[[], bool], *, done_phase: str | None,
                  working_phase: str, wait: bool = True, max_wait_s: float = 300.0, jitter_s: float = 0.5,
                  cancel: threading.Event | None = None) -> bool | None:
    """Run ``operation`` once under ``lease``; its result, or ``None`` when it was not run (see the module).

    ``None`` means: another node recorded ``done_phase`` (the work is done), or ``wait=False`` and someone
    holds the lease. Raises :class:`CoordinationError` when the lease stays unavailable for ``max_wait_s``
    and :class:`CancelledError` on ``cancel``.
    """
    cancel = cancel or threading.Event()
    deadline = time.monotonic() + max_wait_s
    margin = max(0.5, lease.duration_s / 10)
    observation = Observation()
    record = _observe(lease, cancel, deadline)
    observation.see(record)
    while True:
        if cancel.is_set():
            raise CancelledError("stopped while waiting for the lease", hint="it is retried")
        if time.monotonic() > deadline:
            raise CoordinationError(f"lease {lease.name} stayed held for {max_wait_s:.0f}s",
                                    hint="check `modelherd leases` for its holder")
        if record is not None and record.held and not observation.expired(lease.duration_s):
            if not wait:
                return None
            left = observation.remaining(lease.duration_s) + random.uniform(0, jitter_s)
            end = time.monotonic() + min(left, max(0.1, deadline - time.monotonic()))
            while time.monotonic() < end and not cancel.is_set():
                seen = lease.wait_for_change(record, min(1.0, max(0.05, end - time.monotonic())))
                if (seen.version if seen else None) != record.version:
                    record = seen
                    break
            observation.see(record)
            continue
        if record is not None and not record.held and done_phase is not None and record.phase == done_phase:
            return None
        previous = record.status if record is not None else LeaseStatus()
        try:
            held = lease.try_acquire(record, LeaseStatus(phase=working_phase))
        except LeaseUnavailableError as e:
            log.warning("lease %s: %s; retrying", lease.name, e.message)
            cancel.wait(0.5 + random.uniform(0, jitter_s))
            record = _observe(lease, cancel, deadline)
            observation.see(record)
            continue
        if held is None:  # someone else wrote first
            record = _observe(lease, cancel, deadline)
            observation.see(record)
            continue
        acquired = time.monotonic()
        return _hold(lease, held, operation, acquired, margin, previous, done_phase)


def _hold(lease: LeaseBackend, held: LeaseRecord, operation: Callable[[], bool], acquired: float, margin: float,
          previous: LeaseStatus, done_phase: str | None) -> bool | None:
    done = False
    try:
        if time.monotonic() - acquired >= lease.duration_s - margin:
            log.warning("lease %s: acquired too long ago to act on; not running the operation", lease.name)
            return None
        done = operation()
        return done
    finally:
        status = LeaseStatus(phase=done_phase) if done and done_phase is not None else previous
        try:
            lease.release(held, status)
        except (LeaseLostError, LeaseUnavailableError, CoordinationError) as e:
            log.warning("releasing lease %s failed (%s); it expires by itself", lease.name, e.message)


def _observe(lease: LeaseBackend, cancel: threading.Event, deadline: float) -> LeaseRecord | None:
    while True:
        try:
            return lease.observe()
        except LeaseUnavailableError as e:
            if time.monotonic() > deadline or cancel.is_set():
                raise
            log.warning("lease %s: %s; retrying", lease.name, e.message)
            cancel.wait(1.0)


def held_destinations(kind: str, *, models_root: Path, namespace: str = "default",
                      lease_api: LeaseApi | None = None) -> set[str] | None:
    """Destinations (relative to the models root, as leases record them) of every modelherd lease someone holds
    now, expired or not, on this filesystem; ``None`` when the lease store cannot be read (then nothing may be
    collected). The ``kubernetes`` store is read through ``lease_api`` (the caller's client)."""
    try:
        here = filesystem_id(models_root, create=False)
        if kind == "kubernetes":
            if lease_api is None:
                raise CoordinationError("the Kubernetes lease store needs an API client")
            return {v.dest for v in list_leases(lease_api, namespace or "default")
                    if v.holder and (not v.filesystem or not here or v.filesystem == here)}
        if kind == "file":
            return {r.dest for r in list_file_leases(models_root) if r.held}
    except (CoordinationError, OSError) as e:
        log.warning("listing leases failed (%s); not collecting staging this round", e)
        return None
    return set()
