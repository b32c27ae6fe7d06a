"""The lease abstraction shared by the Kubernetes and the file backend.

Invariants:
- A :class:`LeaseRecord` is a snapshot; ``version`` changes on every write (resourceVersion, or the file
  record's counter), so "the record changed" is ``version`` inequality and nothing else.
- Expiry is judged by :class:`Observation` only: the time, on *our* monotonic clock, since we last saw the
  version change. A record's ``renew_time`` is informational (another node's wall clock) and never compared
  with ours.
- Every write is conditional on the version the writer read (compare-and-swap); a conflict means someone
  else wrote first and is reported as "lost", never retried blindly.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from .identity import ModelIdentity


class Phase(StrEnum):
    ADOPTING = "Adopting"  # the holder hashes a copy modelherd did not publish (bytes = hashed of those to hash)
    DOWNLOADING = "Downloading"
    VERIFYING = "Verifying"
    COMPLETE = "Complete"
    FAILED = "Failed"
    REMOVING = "Removing"  # run_exclusive: a node removes the model's files
    REMOVED = "Removed"  # the files are gone; later removers do nothing


@dataclass(frozen=True)
class LeaseStatus:
    """What the holder reports with each write: phase, progress, its staging folder, a failure message."""

    phase: str = Phase.DOWNLOADING
    bytes_done: int = 0
    bytes_total: int = 0
    staging: str = ""
    message: str = ""


@dataclass(frozen=True)
class LeaseRecord:
    """One snapshot of a lease. ``holder == ""`` means released (nobody holds it)."""

    name: str
    version: str
    holder: str
    transitions: int
    duration_s: int
    acquire_time: str = ""
    renew_time: str = ""
    source: str = ""
    dest: str = ""
    updated: str = ""
    status: LeaseStatus = LeaseStatus()
    filesystem: str = ""  # the id of the filesystem the destination is on (storage/fsid.py)

    @property
    def held(self) -> bool:
        return bool(self.holder)

    @property
    def phase(self) -> str:
        return self.status.phase


class RequestCounter:
    """Counts every request a backend makes to its lease store, by verb (thread-safe).

    The benchmark's "Lease API requests per waiting node" is ``total`` of a follower's counter.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_verb: Counter[str] = Counter()

    def add(self, verb: str) -> None:
        with self._lock:
            self._by_verb[verb] += 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._by_verb.values())

    def by_verb(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_verb)


class Observation:
    """When did *we* last see the record change? Expiry is measured from there on our monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._version: str | None = None
        self._since = clock()

    def see(self, record: LeaseRecord | None) -> bool:
        """Note a snapshot; return True (and restart the expiry clock) when its version is new to us."""
        version = record.version if record is not None else None
        if version != self._version:
            self._version = version
            self._since = self._clock()
            return True
        return False

    def age(self) -> float:
        """Seconds since the last change we saw."""
        return self._clock() - self._since

    def expired(self, duration_s: float) -> bool:
        return self.age() >= duration_s

    def remaining(self, duration_s: float) -> float:
        return max(0.0, duration_s - self.age())


class LeaseBackend(Protocol):
    """One lease (one model) in one store. Implementations: ``KubernetesLease``, ``FileLease``.

    ``try_acquire`` creates the record when ``observed`` is ``None``, else replaces exactly ``observed`` (its
    version); it returns the new record, or ``None`` when another writer got there first. The caller decides
    *whether* to take over (released or expired-as-observed); the backend only makes it atomic.
    """

    identity: ModelIdentity
    node: str
    duration_s: int
    counter: RequestCounter

    @property
    def name(self) -> str: ...

    def observe(self) -> LeaseRecord | None: ...

    def try_acquire(self, observed: LeaseRecord | None, status: LeaseStatus) -> LeaseRecord | None: ...

    def renew(self, held: LeaseRecord, status: LeaseStatus, *, timeout_s: float | None = None) -> LeaseRecord: ...

    def release(self, held: LeaseRecord, status: LeaseStatus) -> LeaseRecord: ...

    def wait_for_change(self, since: LeaseRecord | None, timeout_s: float) -> LeaseRecord | None: ...

    def close(self) -> None: ...


def next_holder_record(observed: LeaseRecord | None, *, node: str, now: str) -> tuple[int, str]:
    """``(transitions, acquire_time)`` for a new acquisition: transitions go up on every acquisition after
    the first, so an epoch is never reused for a different writer."""
    if observed is None:
        return 0, now
    return observed.transitions + 1, now
