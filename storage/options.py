"""What one pull is handed besides its source, listing and destination: its knobs and its callbacks.

Invariants:
- :class:`EngineOptions` is valid once built: every count and size is at least 1 (else :class:`ConfigError`), so
  no module of the engine checks them again.
- A set cancel Event is seen the same way everywhere (:func:`check_cancel`): one :class:`CancelledError` that
  says staging is removed and a rerun restarts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from . import adopt
from .directio import DirectMode
from .errors import CancelledError, ConfigError
from .retry import RetryPolicy
from .verify import MAX_FILES

__all__ = ["EngineOptions", "MiB", "PhaseFn", "Progress", "cancelled", "check_cancel"]

MiB = 1024 * 1024

Progress = Callable[[int, int], None]
"""``progress(done, total)`` in bytes."""

PhaseFn = Callable[[str, adopt.Adoption | None], None]
"""``on_phase(name, adoption)``: ``("adopting", None)`` when the hashing of a folder being adopted starts,
``("adopted", Adoption)`` when it ends (what is kept, what is fetched), ``("downloading", None)`` when fetching
starts (every stage); a coordinated pull adds its own steps (``staged``, ``published``, ``released`` as the
holder, ``complete`` as a follower). A name a callee does not know is passed over."""


@dataclass(frozen=True)
class EngineOptions:
    """Knobs of one pull. ``concurrency * multipart_concurrency`` is the number of GETs that may be in flight.

    A model with at most that many files to fetch runs them all at once; a larger one ``concurrency`` files at a
    time. Files larger than ``multipart_threshold`` are fetched as ``part_size``
    ranges, ``multipart_concurrency`` at a time, but only when fewer than ``concurrency`` files of the listing
    are that large: with enough files, whole-file streams fill the slots without any read-back for hashing.
    """

    concurrency: int = 4
    multipart_concurrency: int = 4
    multipart_threshold: int = 200 * MiB
    part_size: int = 64 * MiB
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_size: int = 4 * MiB
    checkpoint_size: int = 16 * MiB
    progress_interval_s: float = 0.1
    fsync: bool = True
    direct_io: DirectMode = "auto"
    record_sha256: bool = True
    cancel_grace_s: float = 1.0
    max_files: int = MAX_FILES  # 20,000: a longer listing is refused as malformed before anything is planned

    def __post_init__(self) -> None:
        for name in ("concurrency", "multipart_concurrency", "multipart_threshold", "part_size", "chunk_size",
                     "checkpoint_size", "max_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine option {name} must be at least 1, got {getattr(self, name)}",
                                  hint="fix the download settings")

    def hash_algos(self, expect: dict[str, str]) -> list[str]:
        """The algorithms a file is hashed with: the one it is checked against, plus sha256 to record."""
        algos = list(expect)
        if self.record_sha256 and "sha256" not in algos:
            algos.append("sha256")
        return algos


def cancelled() -> CancelledError:
    """The error of a pull whose cancel Event was set."""
    return CancelledError("pull cancelled", hint="staging is removed; run the pull again to restart")


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise :func:`cancelled` when ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise cancelled()
