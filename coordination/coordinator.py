"""The coordinated pull: on shared storage, exactly one node downloads a model; the others wait and verify.

State machine (one model, one node)::

    fast path: dest has a completion manifest for this source and selection, and no damage -> Ready (no lease)
    loop:
      observe the lease
      follow: while someone holds it and we have not seen it unchanged for leaseDuration -> wait for a change
              released + Complete + dest verifies -> Ready (no origin request)
              released + Failed while we were waiting -> HolderFailedError (the holder already tried)
      acquire: create (none yet) or replace exactly the record we observed (released or expired); one wins
      hold: undo an earlier holder's publish killed mid-swap, adopt the previous holder's staging, download into
            our own staging (writer=node, epoch=transitions) while a renewer thread renews every renew period; a
            missed deadline or a 409 stops the download (``engine.stage``: a damaged published copy of the same
            listing is repaired, its good files kept; a folder holding the model's files but no manifest is
            adopted: phase Adopting with bytes hashed of those to hash, then Downloading for the rest)
            renew (phase Verifying) -> publish at once -> release with phase Complete -> Ready

Invariants:
- We publish only right after a renewal succeeded, and only if that renewal was sent less than
  ``lease_duration - safety_margin`` ago on our monotonic clock; a holder that lost the lease (409, or no
  successful renewal within ``lease_duration - safety_margin`` of the last one) stops writing at once (the
  engine's cancel Event) and never publishes.
- Expiry of another holder is judged only from when *we* last saw its record change (monotonic clock).
- A follower never calls the source: not even the listing (``listing_fn`` is called by the holder only).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..storage.adopt import Adoption
from ..storage.destination import check_destination
from ..storage.engine import stage
from ..storage.errors import CancelledError, ModelherdError
from ..storage.fsid import filesystem_id
from ..storage.manifest import Manifest
from ..storage.options import EngineOptions, PhaseFn
from ..storage.publish import publish, recover_interrupted_publish
from ..storage.ready import published_model
from ..storage.staging import adopt_staging, own_staging, remove_tree, staging_dir_for
from ..storage.types import ALL_FILES, Listing, Selection, Source
from .backend import LeaseBackend, LeaseRecord, LeaseStatus, Observation, Phase
from .errors import CoordinationError, HolderFailedError, LeaseLostError, LeaseUnavailableError
from .identity import ModelIdentity

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Follow = Callable[[LeaseRecord | None], None]


class Role(StrEnum):
    """How a node got the model: the ``role`` of a :class:`PullResult`, reported in logs and metrics."""

    READY = "ready"  # the fast path: already published here for this source and selection, verified; no lease
    HOLDER = "holder"  # downloaded and published it under the lease
    FOLLOWER = "follower"  # waited for the holder, then verified its copy; no origin request
    PULLED = "pulled"  # a plain pull without coordination (backend ``none``): each node for itself


@dataclass(frozen=True)
class LeaseTiming:
    """Lease clock settings. ``safety_margin_s`` defaults to a tenth of the duration (at least 0.5 s)."""

    duration_s: float = 30.0
    renew_period_s: float = 10.0
    jitter_s: float = 1.0
    safety_margin_s: float | None = None
    max_wait_s: float = 24 * 3600.0
    progress_period_s: float = 2.0  # while bytes move, the Lease's progress is written at least this often

    @property
    def margin_s(self) -> float:
        if self.safety_margin_s is not None:
            return self.safety_margin_s
        return max(0.5, self.duration_s / 10)

    def check(self) -> None:
        if self.renew_period_s >= self.duration_s - self.margin_s:
            raise CoordinationError(
                f"renew period {self.renew_period_s}s must be shorter than the lease duration "
                f"{self.duration_s}s minus the safety margin {self.margin_s}s",
                hint="use e.g. --lease-duration 30 --renew-period 10")


@dataclass(frozen=True)
class PullResult:
    """How this node got the model. ``epoch`` is the lease transition we wrote under (holders only)."""

    manifest: Manifest
    role: Role
    epoch: int | None = None
    took_over: bool = False
    lease_requests: int = 0


# ------------------------------------------------------------------------------------------- renewer
class _Progress:
    def __init__(self, downstream: Progress | None) -> None:
        self.done = 0
        self.total = 0
        self._downstream = downstream

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._downstream is not None:
            self._downstream(done, total)


class _Renewer(threading.Thread):
    """Renews ``held`` every renew period, and sooner (every ``progress_period_s``) while the download's byte
    count moves, so ``kubectl get lease -o yaml`` / ``modelherd leases`` show progress that advances at any origin
    speed; on a 409 or a missed deadline sets ``stop_writing`` and exits.

    The deadline is ``last successful renewal (time the request was sent) + duration - margin`` on our
    monotonic clock; it is checked before every attempt, so a process resumed after SIGSTOP stops writing
    before it sends anything.
    """

    def __init__(self, lease: LeaseBackend, held: LeaseRecord, acquired_at: float, timing: LeaseTiming,
                 status: Callable[[], LeaseStatus], stop_writing: threading.Event,
                 user_cancel: threading.Event) -> None:
        super().__init__(name=f"modelherd-renew-{lease.name}", daemon=True)
        self.lease, self.held, self.timing = lease, held, timing
        self.last_ok = acquired_at
        self._status = status
        self._stop_writing = stop_writing
        self._user_cancel = user_cancel
        self._done = threading.Event()
        self._nudged = threading.Event()
        self._lock = threading.Lock()
        self.lost: str | None = None
        self._written_done: int | None = None  # bytes_done of the status we last wrote

    def _progress_due(self, now: float) -> bool:
        return now - self.last_ok >= self.timing.progress_period_s and \
            self._status().bytes_done != self._written_done

    def deadline(self) -> float:
        return self.last_ok + self.timing.duration_s - self.timing.margin_s

    def nudge(self) -> None:
        """Renew within ~0.2 s instead of at the next period, so a new phase shows on the Lease at once."""
        self._nudged.set()

    def _lose(self, why: str) -> None:
        with self._lock:
            if self.lost is None:
                self.lost = why
        log.warning("lease %s lost (%s): stopping the download", self.lease.name, why)
        self._stop_writing.set()

    def run(self) -> None:
        next_at = self.last_ok + self.timing.renew_period_s
        while not self._done.is_set():
            if self._user_cancel.is_set():
                self._stop_writing.set()
            now = time.monotonic()
            if now >= self.deadline():
                self._lose("no successful renewal within the lease duration")
                return
            if now < next_at and not self._nudged.is_set() and not self._progress_due(now):
                self._done.wait(min(0.2, next_at - now))
                continue
            self._nudged.clear()
            sent = time.monotonic()
            try:
                with self._lock:
                    if self._done.is_set():
                        return
                    status = self._status()
                    self.held = self.lease.renew(self.held, status, timeout_s=self.deadline() - sent)
                    self.last_ok = sent
                    self._written_done = status.bytes_done
                next_at = sent + self.timing.renew_period_s
            except LeaseLostError as e:
                self._lose(e.message)
                return
            except (LeaseUnavailableError, CoordinationError) as e:
                log.warning("renewing lease %s failed (%s); retrying", self.lease.name, e.message)
                next_at = time.monotonic() + min(1.0, self.timing.renew_period_s / 3)

    def finish(self) -> tuple[LeaseRecord, float]:
        """Stop renewing; return the last record we wrote and when that write was sent."""
        self._done.set()
        self.join()
        return self.held, self.last_ok


# ------------------------------------------------------------------------------------------- coordinator
class _Lost(Exception):
    """Internal: we lost the lease while holding it; go back to following."""


class Coordinator:
    """One coordinated pull of one model by one node (see the module docstring for the state machine)."""

    def __init__(self, lease: LeaseBackend, *, source: Source, listing_fn: Callable[[], Listing], dest: Path,
                 models_root: Path, node: str, options: EngineOptions, timing: LeaseTiming,
                 cancel: threading.Event | None = None, progress: Progress | None = None,
                 selection: Selection = ALL_FILES, on_follow: Follow | None = None,
                 on_phase: PhaseFn | None = None) -> None:
        timing.check()
        self._on_follow = on_follow
        self._on_phase = on_phase
        self._phase: str = Phase.DOWNLOADING
        self._renewer: _Renewer | None = None
        self.selection = selection
        self.lease, self.source, self.listing_fn = lease, source, listing_fn
        self.models_root = Path(models_root)
        self.dest: Path = check_destination(self.models_root, Path(dest))
        self.node, self.options, self.timing = node, options, timing
        self.cancel = cancel or threading.Event()
        self.progress = _Progress(progress)
        self.identity = lease.identity
        self._abandoned: list[Path] = []  # staging folders of epochs we lost: removed once the model is Ready

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise CancelledError("pull cancelled", hint="run the pull again")

    def _ready(self) -> Manifest | None:
        return published_model(self.dest, self.identity.source_uri, self.identity.revision, self.selection)

    def run(self) -> PullResult:
        manifest = self._ready()
        if manifest is not None:
            log.info("%s is already Ready at %s", self.identity.source_uri, self.dest)
            return PullResult(manifest, Role.READY, lease_requests=self.lease.counter.total)
        observation = Observation()
        saw_holder = False
        took_over = False
        deadline = time.monotonic() + self.timing.max_wait_s
        record = self._observe_with_retry(deadline)
        observation.see(record)
        while True:
            self._check_cancel()
            if time.monotonic() > deadline:
                raise CoordinationError(f"waited {self.timing.max_wait_s:.0f}s for {self.identity.source_uri}",
                                        hint="check `modelherd leases` for the holder's progress")
            if record is not None and record.held:
                # someone holds it (an earlier process of this node too: it may still be writing)
                saw_holder = True
                if self._on_follow is not None and record.holder != self.node:
                    self._on_follow(record)  # another node holds it: we follow (metrics watch its progress)
                if not observation.expired(self.timing.duration_s):
                    wait = observation.remaining(self.timing.duration_s) + random.uniform(0, self.timing.jitter_s)
                    record = self._wait(record, min(wait, max(0.1, deadline - time.monotonic())))
                    observation.see(record)
                    continue
                log.info("lease %s: holder %s unseen for %.1fs; taking over", self.lease.name, record.holder,
                         observation.age())
            elif record is not None and not record.held:
                if record.phase == Phase.COMPLETE:
                    self._report("complete")
                    manifest = self._ready()
                    if manifest is not None:
                        self._remove_abandoned()
                        return PullResult(manifest, Role.FOLLOWER, lease_requests=self.lease.counter.total)
                elif record.phase == Phase.FAILED and saw_holder:
                    raise HolderFailedError(f"{record.source}: the download by another node failed: "
                                            f"{record.status.message or 'no reason given'}",
                                            hint="fix the cause and run the pull again")
            # released, absent, or expired: try to take it (one contender wins)
            expired_holder = record is not None and record.held
            try:
                held = self.lease.try_acquire(record, LeaseStatus(staging=self._staging_tag(record)))
            except LeaseUnavailableError as e:
                log.warning("lease %s: %s; retrying", self.lease.name, e.message)
                self.cancel.wait(1.0 + random.uniform(0, self.timing.jitter_s))
                record = self._observe_with_retry(deadline)
                observation.see(record)
                continue
            if held is None:
                record = self._observe_with_retry(deadline)
                observation.see(record)
                continue
            took_over = took_over or expired_holder
            acquired_at = time.monotonic()
            if self._on_follow is not None:
                self._on_follow(None)  # we hold it now: no longer following anyone
            try:
                return self._hold(record, held, acquired_at, took_over)
            except _Lost:
                self._abandoned.append(self._staging(held.transitions))
                saw_holder = True
                record = self._observe_with_retry(deadline)
                observation.see(record)

    def _remove_abandoned(self) -> None:
        """Remove what a stopped writer of ours may have re-created after the next holder adopted our staging.

        Safe only once the model is published and the lease released: nobody adopts from these any more.
        """
        for folder in self._abandoned:
            if folder.exists():
                log.info("removing abandoned staging %s", folder.name)
                remove_tree(folder)

    # ---------------------------------------------------------------- follower helpers
    def _observe_with_retry(self, deadline: float) -> LeaseRecord | None:
        while True:
            self._check_cancel()
            try:
                return self.lease.observe()
            except LeaseUnavailableError as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("lease %s: %s; retrying", self.lease.name, e.message)
                self.cancel.wait(1.0 + random.uniform(0, self.timing.jitter_s))

    def _wait(self, record: LeaseRecord, timeout_s: float) -> LeaseRecord | None:
        # wake up in slices so a cancel is noticed; the backend keeps its watch open across calls
        end = time.monotonic() + timeout_s
        current: LeaseRecord | None = record
        while True:
            left = end - time.monotonic()
            if left <= 0 or self.cancel.is_set():
                return current
            current = self.lease.wait_for_change(record, min(left, 1.0))
            if (current.version if current else None) != record.version:
                return current

    # ---------------------------------------------------------------- holder
    def _staging(self, epoch: int) -> Path:
        staging: Path = staging_dir_for(self.models_root, self.dest, self.node, epoch)
        return staging

    def _staging_tag(self, previous: LeaseRecord | None) -> str:
        epoch = 0 if previous is None else previous.transitions + 1
        return f"{self.node}/{epoch}"

    def _adopt_previous(self, previous: LeaseRecord | None, staging: Path) -> None:
        """Move the previous writer's staging (named in the record) into ours, so the download resumes."""
        if previous is None or not previous.status.staging:
            return
        writer, _, epoch = previous.status.staging.rpartition("/")
        try:
            old = staging_dir_for(self.models_root, self.dest, writer, int(epoch))
        except ValueError:
            return
        if old != staging and old.is_dir():
            log.info("adopting %s's staging %s (epoch %s)", writer, old.name, epoch)
            adopt_staging(old, staging)

    def _report(self, name: str) -> None:
        """Tell the caller's ``on_phase`` a step of the coordination itself: ``staged``, ``published`` and
        ``released`` (the holder), ``complete`` (a follower saw the Lease Complete and verifies the copy next)."""
        if self._on_phase is not None:
            self._on_phase(name, None)

    def _phase_changed(self, name: str, adoption: Adoption | None) -> None:
        """``stage`` reports a phase: the Lease shows Adopting while the holder hashes a copy it adopts, then
        Downloading; the caller's ``on_phase`` hears every report."""
        phase = {"adopting": Phase.ADOPTING, "downloading": Phase.DOWNLOADING}.get(name)
        if phase is not None and phase != self._phase:
            self._phase = phase
            if self._renewer is not None:
                self._renewer.nudge()
        if self._on_phase is not None:
            self._on_phase(name, adoption)

    def _status(self, phase: str, staging_tag: str, message: str = "") -> LeaseStatus:
        return LeaseStatus(phase=phase, bytes_done=self.progress.done, bytes_total=self.progress.total,
                           staging=staging_tag, message=message)

    def _hold(self, previous: LeaseRecord | None, held: LeaseRecord, acquired_at: float,
              took_over: bool) -> PullResult:
        """Download and publish as the holder, owning our staging folder (``own_staging``) throughout."""
        with contextlib.ExitStack() as owned:
            return self._hold_owned(previous, held, acquired_at, took_over, owned)

    def _hold_owned(self, previous: LeaseRecord | None, held: LeaseRecord, acquired_at: float,
                    took_over: bool, owned: contextlib.ExitStack) -> PullResult:
        epoch = held.transitions
        staging = self._staging(epoch)
        tag = f"{self.node}/{epoch}"
        log.info("lease %s acquired by %s (epoch %d)%s", self.lease.name, self.node, epoch,
                 " by takeover" if took_over else "")
        stop_writing = threading.Event()
        self._phase = Phase.DOWNLOADING
        renewer = _Renewer(self.lease, held, acquired_at, self.timing,
                           lambda: self._status(self._phase, tag), stop_writing, self.cancel)
        self._renewer = renewer
        renewer.start()
        try:
            owned.enter_context(own_staging(staging, wait=False))
            recover_interrupted_publish(self.models_root, self.dest)  # we alone publish dest now
            manifest = self._ready()  # someone finished between our look and our acquisition
            if manifest is None:
                self._adopt_previous(previous, staging)
                listing = self.listing_fn()
                self.progress(0, listing.total_bytes)
                staged = stage(self.source, listing, staging, dest=self.dest, writer=self.node,
                                      options=self.options, cancel=stop_writing, progress=self.progress,
                                      on_phase=self._phase_changed)
        except BaseException as e:
            held, _ = renewer.finish()
            if self._lost(renewer):
                # e.g. CancelledError from our own stop, or an OSError because the next holder adopted our
                # staging folder under our feet: either way we are fenced off, so we only follow from here
                log.info("lease %s: download stopped after losing the lease (%s)", self.lease.name,
                         type(e).__name__)
                raise _Lost() from None
            if isinstance(e, CancelledError | KeyboardInterrupt) or not isinstance(e, ModelherdError):
                why = "cancelled" if isinstance(e, CancelledError | KeyboardInterrupt) else type(e).__name__
                self._release(held, self._status(Phase.DOWNLOADING, tag, f"{why} on {self.node}"))
            else:
                self._release(held, self._status(Phase.FAILED, tag, str(getattr(e, "message", e))))
            raise
        held, _ = renewer.finish()
        if self._lost(renewer):
            raise _Lost()
        if manifest is not None:
            self._release(held, self._status(Phase.COMPLETE, tag))
            return PullResult(manifest, Role.HOLDER, epoch, took_over, self.lease.counter.total)
        self._report("staged")
        held, published = self._renew_then_publish(held, staging, staged, tag)
        self._report("published")
        self._release(held, self._status(Phase.COMPLETE, tag))
        self._report("released")
        log.info("published %s at %s (epoch %d)", listing.uri, self.dest, epoch)
        return PullResult(published, Role.HOLDER, epoch, took_over, self.lease.counter.total)

    @staticmethod
    def _lost(renewer: _Renewer) -> bool:
        """We lost the lease, or can no longer prove we hold it (our renewal deadline has passed)."""
        return renewer.lost is not None or time.monotonic() >= renewer.deadline()

    def _renew_then_publish(self, held: LeaseRecord, staging: Path, manifest: Manifest,
                            tag: str) -> tuple[LeaseRecord, Manifest]:
        """Publish only right after a renewal proves we still hold the lease (else :class:`_Lost`); returns the record
        and the manifest written."""
        budget = self.timing.duration_s - self.timing.margin_s
        for _attempt in range(5):
            sent = time.monotonic()
            try:
                held = self.lease.renew(held, self._status(Phase.VERIFYING, tag), timeout_s=budget / 2)
            except LeaseLostError as e:
                log.warning("lease %s lost before publishing (%s); not publishing", self.lease.name, e.message)
                raise _Lost() from None
            except LeaseUnavailableError as e:
                log.warning("renewal before publish failed (%s); retrying", e.message)
                self.cancel.wait(0.5)
                continue
            if time.monotonic() - sent >= budget / 2:
                continue  # the renewal took too long to trust; renew again
            return held, publish(staging, self.dest, manifest)
        raise _Lost()

    def _release(self, held: LeaseRecord, status: LeaseStatus) -> None:
        try:
            self.lease.release(held, status)
        except (LeaseLostError, LeaseUnavailableError, CoordinationError) as e:
            log.warning("releasing lease %s failed (%s); it expires by itself", self.lease.name, e.message)


def run_coordinated(lease: LeaseBackend, *, source: Source, listing_fn: Callable[[], Listing], dest: Path,
                    models_root: Path, node: str, options: EngineOptions, timing: LeaseTiming,
                    cancel: threading.Event | None = None, progress: Progress | None = None,
                    selection: Selection = ALL_FILES, on_follow: Follow | None = None,
                    on_phase: PhaseFn | None = None) -> PullResult:
    """Run the state machine with an already opened backend (tests and benchmarks use this directly).

    ``selection`` is the file selection asked for (the source's ``--allow``/``--ignore``): a published copy of
    another selection is not this model. ``on_follow`` is called with the record each time this node sees
    another node holding the lease while it waits, and with ``None`` when it acquires the lease itself. ``on_phase``
    (``PhaseFn``) hears the holder's phases: ``("adopting", None)`` when it starts hashing a folder it adopts
    (``progress`` then counts bytes hashed, not downloaded), ``("adopted", Adoption)`` with what it kept and what it
    fetches, ``("downloading", None)`` when fetching starts."""
    return Coordinator(lease, source=source, listing_fn=listing_fn, dest=dest, models_root=models_root, node=node,
                       options=options, timing=timing, cancel=cancel, progress=progress, selection=selection,
                       on_follow=on_follow, on_phase=on_phase).run()


def identity_for(source_uri: str, revision: str | None, dest: Path, models_root: Path) -> ModelIdentity:
    """The lease identity: canonical source URI, requested revision, destination relative to the root, and the id
    of the filesystem holding the root (created there by the first node to ask; ``""`` on a read-only root that has
    none yet)."""
    root = Path(models_root).resolve()
    real = Path(dest).resolve()
    try:
        rel = real.relative_to(root).as_posix()
    except ValueError:
        rel = real.as_posix()
    return ModelIdentity(source_uri=source_uri, revision=revision or "", dest=rel,
                         filesystem=filesystem_id(models_root))
