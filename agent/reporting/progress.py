"""A running pull's progress, fed into metrics at once and into the model's status at most every interval.

:class:`ProgressReporter` is the callback the engine and the coordinator call (bytes, phases, the Lease holder
seen while waiting); a thread of its own writes the ConfigMap entry and label, so the engine's workers never wait
for the API server.

Stall metrics (what the stuck-download alerts read): ``download_last_progress`` is the wall-clock time bytes last
moved in our own download (set when it starts); ``lease_holder_progress`` is, while we follow another node's
Lease, the time its reported bytes or its holder last changed — so a holder that stopped (SIGSTOP, hung origin)
shows as a timestamp that no longer moves on the nodes still alive.

Invariants: origin bytes are counted once (bytes hashed in place while adopting a copy are not origin bytes); a
progress write never re-creates an entry deleted meanwhile, and none is written once the pull is cancelled or
while a migrated copy is kept Ready; a failed progress write is logged at DEBUG and never fails the pull.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from ...storage.adopt import Adoption
from ..basemodels import ModelRef
from ..kube import ApiError
from ..ome.entry import DownloadProgress
from .configmap import ConfigMapFullError
from .metrics import AgentMetrics
from .timeline import Mark, Timeline

log = logging.getLogger("modelherd.agent")


class PullTask(Protocol):
    """The running pull, as the reporter reads and updates it."""

    done: int
    total: int
    files: int
    keep_ready: bool
    cancel: threading.Event
    timeline: Timeline


class ProgressSink(Protocol):
    """Where a progress write goes (:meth:`~.status.ModelStatusWriter.progress`)."""

    def progress(self, ref: ModelRef, progress: DownloadProgress) -> None: ...


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressReporter:
    """Progress of ``task`` (the pull of ``ref``). ``on_damaged`` is called once when a migration adoption
    found the copy it kept Ready damaged (after ``task.keep_ready`` is cleared)."""

    def __init__(self, ref: ModelRef, task: PullTask, *, status: ProgressSink, metrics: AgentMetrics,
                 interval_s: float, on_damaged: Callable[[Adoption], None]) -> None:
        self.ref, self.task, self.status, self.metrics = ref, task, status, metrics
        self.interval_s, self.on_damaged = interval_s, on_damaged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"modelherd-progress-{ref.name}", daemon=True)
        self._written = -1
        self._last_done, self._last_t = 0, time.monotonic()
        self._first: int | None = None
        self._followed: tuple[str, int] | None = None
        self._hashing = False  # adopting: progress counts bytes hashed in place, not bytes from the origin

    def __call__(self, done: int, total: int) -> None:
        labels = self.ref.metric_labels()
        m = self.metrics
        if self._first is None:
            self._first = done
            m.download_last_progress.labels(**labels).set(time.time())
        elif not self._hashing:
            delta = done - self.task.done
            if delta > 0:
                m.origin_bytes.labels(**labels).inc(delta)
                m.download_bytes.labels(**labels).inc(delta)
                m.download_last_progress.labels(**labels).set(time.time())
        self.task.done, self.task.total = done, total
        m.download_progress.labels(**labels).set(done)
        m.download_total.labels(**labels).set(total)

    def phase(self, name: str, adoption: Adoption | None) -> None:
        """The engine's phases of this pull (``adopting`` → ``adopted`` → ``downloading``). A migration adoption
        whose hashing found damage takes the copy out of service before it is repaired. The coordinator's phases
        (``staged``, ``published``, ``released``, ``complete``) are marks of the task's timeline only."""
        self.task.timeline.phase(name)
        if name == "adopting":
            self._hashing = True  # until the download starts, progress counts bytes hashed in place
        elif name == "downloading" and self._hashing:
            self._hashing = False
            self._first = None  # the next progress call re-bases: hashed bytes are not origin bytes
        if name == "adopted" and adoption is not None and not adoption.intact and self.task.keep_ready:
            self.task.keep_ready = False
            self.on_damaged(adoption)

    def follow(self, record: Any) -> None:
        """The coordinator saw ``record`` (a ``LeaseRecord`` held by another node) while we wait; ``None``: we
        hold the Lease now. The timestamp moves only when the holder or its reported bytes change."""
        self.task.timeline.mark(Mark.LEASE)
        gauge = self.metrics.lease_holder_progress
        if record is None:
            self._followed = None
            with contextlib.suppress(KeyError):
                gauge.remove(*self.ref.metric_labels().values())
            return
        seen = (str(record.holder), int(record.status.bytes_done))
        if seen != self._followed:
            self._followed = seen
            gauge.labels(**self.ref.metric_labels()).set(time.time())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.write_once()

    def write_once(self) -> bool:
        """One progress write, when bytes moved since the last; True when one was written."""
        done, total = self.task.done, self.task.total
        if done == self._written or total <= 0 or self.task.cancel.is_set() or self.task.keep_ready:
            return False
        now = time.monotonic()
        speed = max(0.0, (done - self._last_done) / max(now - self._last_t, 1e-6))
        self._last_done, self._last_t = done, now
        progress = DownloadProgress(phase="downloading", total_bytes=total, completed_bytes=done,
                                    total_files=self.task.files, completed_files=0,
                                    speed_bytes_per_sec=round(speed, 1), last_updated=_now_rfc3339())
        try:
            self.status.progress(self.ref, progress)
        except (ApiError, ConfigMapFullError) as e:  # progress is best effort; the state writes report a full map
            log.debug("progress write for %s failed: %s", self.ref.display, e)
            return False
        self._written = done
        return True
