"""Where one pull's time goes on this node: the marks a pull passes, written once as one INFO line when it ends.

A :class:`Timeline` starts when the reconciler finds a model not Ready here and takes the first time each
:class:`Mark` is reached (a later repeat of a mark, e.g. the Lease seen again while waiting, is not a new mark).
:meth:`Timeline.summary` gives the seconds from the start to each mark reached, in order, for the log line an
operator reads ("where did the 30 s go?", :func:`describe`) and the herd benchmark parses (``bench/bench_agent.py``).

Invariants: marking is cheap and thread-safe (the engine's workers, the coordinator and the reconciler mark the same
timeline); marks are monotonic-clock offsets, and the start's wall-clock time is kept so marks of different nodes
can be put on one axis; nothing here writes anything but the log line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from enum import StrEnum


class Mark(StrEnum):
    """The marks of a pull, in the order a pull reaches them (a holder skips ``complete``, a follower the holder's)."""

    CHECKED = "checked"  # the copy on disk was looked at (not Ready here)
    JITTER = "jitter"  # the start-up jitter was waited out (only right after the agent started)
    UPDATING = "updating"  # label and ConfigMap entry say Updating
    LEASE = "lease"  # the Lease was first seen: held by another node (we follow) or acquired (we hold)
    DOWNLOADING = "downloading"  # the holder's first byte fetch starts
    STAGED = "staged"  # the holder has every file, hashed and fsynced, in its staging folder
    PUBLISHED = "published"  # the holder renamed the verified copy into place
    RELEASED = "released"  # the holder released the Lease as Complete (followers wake on this)
    COMPLETE = "complete"  # a follower saw the Lease Complete; it verifies the copy next
    PULLED = "pulled"  # the pull (or follow) returned a verified, published copy
    REPORTED = "reported"  # label, ConfigMap entry and Event say Ready


class Timeline:
    """The marks of one pull (see the module docstring). ``clock`` is monotonic; ``wall`` the epoch clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started = clock()
        self.started_wall = wall()
        self._marks: dict[Mark, float] = {}
        self._lock = threading.Lock()

    def mark(self, mark: Mark) -> None:
        """Record ``mark`` now, unless it was reached before."""
        now = self._clock()
        with self._lock:
            self._marks.setdefault(mark, now)

    def phase(self, name: str) -> None:
        """A phase the engine or the coordinator reports by name (``PhaseFn``); names that are not marks pass."""
        if name in Mark.__members__.values():
            self.mark(Mark(name))

    def summary(self) -> dict[str, float]:
        """Seconds from the start to each mark reached, in the order reached (rounded to the millisecond)."""
        with self._lock:
            marks = sorted(self._marks.items(), key=lambda kv: kv[1])
        return {m.value: round(t - self.started, 3) for m, t in marks}


def describe(summary: Mapping[str, float]) -> str:
    """A :meth:`Timeline.summary` as one line: each mark and the seconds the step before it took
    (``lease +0.12s, ...``)."""
    out, last = [], 0.0
    for name, t in summary.items():
        out.append(f"{name} +{t - last:.2f}s")
        last = t
    return ", ".join(out)
