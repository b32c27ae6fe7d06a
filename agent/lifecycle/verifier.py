"""Periodic verification of the models this node reports Ready: quick every ``--verify-interval``, deep every
``--deep-verify-interval``, throttled to ``--verify-max-mbps``.

The verifier only reads the disk and enqueues; every API write stays with the workers. A model that fails is
put on the work queue, where :meth:`Reconciler.reconcile` finds it no longer Ready by the fast path, reports it
Failed (reason ``VerificationFailed``, an Event, a metric) and runs the normal pull, which repairs it: only the
damaged files are fetched again (:func:`~modelherd.storage.engine.stage`), under the Lease on shared storage, so
exactly one node repairs while the others wait and re-verify.

- **Quick** (O(files): presence, sizes, safetensors headers and data ends, index shards,
  :func:`~modelherd.storage.ready.inspect_published`) over every Ready model, one pass per interval, each node at
  its own fixed phase within the interval (a hash of the node name), so a fleet on one filesystem does not stat
  it all at once.
- **Deep** (every checksum of the completion manifest — checksums that came from the origin — recomputed,
  :func:`~modelherd.storage.verify.rehash`), one model at a time, one thread, reads paced by a token bucket.
  A model is due when its last deep pass (or its publish, when every byte was hashed as it streamed) is older
  than the interval, plus a per-node delay of up to 10 % of it (≤ 1 h). The result is recorded beside the model
  (:mod:`~modelherd.storage.findings`): on shared storage one node's pass serves all nodes (the others see a
  fresh record and skip it), and its findings are damage for every node's quick check and for the repair.

Invariants: nothing here writes inside a model folder or to the API server; a pass never raises (a failure is
logged and the next pass runs); ``stop()`` ends a deep pass within one read (the bucket sleeps on the shutdown
Event).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ...storage import findings
from ...storage.errors import CancelledError, ModelherdError
from ...storage.manifest import Manifest, read_manifest
from ...storage.ready import inspect_published
from ...storage.throttle import RateLimiter
from ...storage.verify import Problem, rehash, verify_quick
from ..basemodels import ModelRef
from ..reporting.metrics import AgentMetrics
from ..settings import VerificationSettings

log = logging.getLogger("modelherd.agent")

TICK_MAX_S = 30.0  # the longest sleep between two looks at the schedule (deep due times, shutdown)


@dataclass(frozen=True)
class VerifyTarget:
    """A model this node reports Ready, as the reconciler last verified it."""

    ref: ModelRef
    dest: Path
    source_uri: str  # canonical
    revision: str | None
    managed: bool = True  # False: ``local://``, verified in place without a manifest (never repaired)


def node_phase(node_name: str, salt: str = "") -> float:
    """A fraction in [0, 1) fixed per node (and ``salt``): where in each interval this node works."""
    digest = hashlib.sha256(f"{salt}{node_name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


Fingerprint = tuple[tuple[str, int, int, int, int, int], ...]


def fingerprint(dest: Path) -> Fingerprint | None:
    """Every entry under ``dest`` (and the findings record beside it) with its inode, mode, size, mtime and ctime
    (``lstat``; a symlink's target too): any write, truncation, deletion, addition, rename or new deep finding
    changes it. ``None`` when ``dest`` cannot be listed. One ``stat`` per entry, no file is opened."""
    out: list[tuple[str, int, int, int, int, int]] = []

    def add(name: str, st: os.stat_result) -> None:
        out.append((name, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    stack = [(str(dest), "")]
    try:
        add(".", os.lstat(dest))
        while stack:
            folder, rel = stack.pop()
            with os.scandir(folder) as it:
                for e in it:
                    name = f"{rel}{e.name}"
                    st = e.stat(follow_symlinks=False)
                    add(name, st)
                    if stat.S_ISLNK(st.st_mode):
                        with contextlib.suppress(OSError):
                            add(name + " ->", os.stat(e.path))
                    elif stat.S_ISDIR(st.st_mode):
                        stack.append((e.path, name + "/"))
    except OSError:
        return None
    with contextlib.suppress(OSError):
        add("findings", os.lstat(findings.findings_path(dest)))
    out.sort()
    return tuple(out)


def _published_at(manifest: Manifest) -> float:
    try:
        return datetime.fromisoformat(manifest.completed_at).timestamp()
    except ValueError:
        return 0.0


class Verifier:
    def __init__(self, verification: VerificationSettings, *, node_name: str,
                 targets: Callable[[], list[VerifyTarget]], enqueue: Callable[[ModelRef], None], metrics: AgentMetrics,
                 shutdown: threading.Event) -> None:
        self.node_name = node_name
        self.quick_interval_s, self.deep_interval_s = verification.interval_s, verification.deep_interval_s
        self.max_mbps = verification.max_mbps
        self.targets, self.enqueue, self.metrics, self.shutdown = targets, enqueue, metrics, shutdown
        self._quick_phase = node_phase(node_name, "quick:")
        self._deep_delay_s = node_phase(node_name, "deep:") * min(0.1 * self.deep_interval_s, 3600.0)
        self._thread: threading.Thread | None = None
        self._clean: dict[ModelRef, Fingerprint] = {}  # the fingerprint each model had when it last verified clean
        self.beat = time.monotonic()
        self.passes = {"quick": 0, "deep": 0}

    # ------------------------------------------------------------------------------------------ one pass
    def quick_pass(self) -> list[tuple[ModelRef, list[Problem]]]:
        """Quick-verify every target; enqueue (and return) the ones that fail. Clears stale findings records."""
        started = time.monotonic()
        failed: list[tuple[ModelRef, list[Problem]]] = []
        targets = self.targets()
        for gone in set(self._clean) - {t.ref for t in targets}:
            del self._clean[gone]
        for t in targets:
            if self.shutdown.is_set():
                break
            problems = self._quick_one(t)
            self.metrics.last_verification.labels(**t.ref.metric_labels(), kind="quick").set(time.time())
            if problems:
                failed.append((t.ref, problems))
                self.metrics.verification_failures.labels(**t.ref.metric_labels(), kind="quick").inc()
                log.warning("%s: quick verification failed (%d problem(s), e.g. %s); re-checking it",
                            t.ref.display, len(problems), problems[0],
                            extra={"model": t.ref.display, "reason": str(problems[0])})
                self.enqueue(t.ref)
        self.metrics.verify_pass_seconds.labels(kind="quick").set(time.monotonic() - started)
        self.passes["quick"] += 1
        return failed

    def _quick_one(self, t: VerifyTarget) -> list[Problem]:
        """Quick verification of one target; a folder whose :func:`fingerprint` is what it was when it last
        verified clean is clean without reading a byte (nothing in it, nor the record beside it, changed)."""
        try:
            before = fingerprint(t.dest)
            if before is not None and self._clean.get(t.ref) == before:
                return []
            self._clean.pop(t.ref, None)
            if not t.managed:
                problems = verify_quick(t.dest)
            else:
                got = inspect_published(t.dest, t.source_uri, t.revision)
                if isinstance(got, list):
                    return got
                problems = []
                if findings.remove_stale(t.dest, got):
                    before = fingerprint(t.dest)
            if not problems and before is not None and fingerprint(t.dest) == before:
                self._clean[t.ref] = before
            return problems
        except Exception as e:  # a pass never dies; the reconcile re-checks with the same code
            log.warning("%s: quick verification could not run: %s", t.ref.display, e)
            return []

    def due_for_deep(self, now: float | None = None) -> list[tuple[float, VerifyTarget, Manifest]]:
        """Managed, Ready targets whose last deep pass (or publish) is older than the interval plus this node's
        delay, oldest first, with that age's reference time."""
        if self.deep_interval_s <= 0:
            return []
        now = time.time() if now is None else now
        due: list[tuple[float, VerifyTarget, Manifest]] = []
        for t in self.targets():
            if not t.managed:
                continue
            try:  # one small read: the quick pass, not this, tells whether the copy is whole
                got = read_manifest(t.dest)
            except (ModelherdError, OSError):
                continue
            if got is None:
                continue
            record = findings.read_findings(t.dest, got)
            last = max(_published_at(got), record.deep_verified_at if record else 0.0)
            if now - last >= self.deep_interval_s + self._deep_delay_s:
                due.append((last, t, got))
        due.sort(key=lambda d: d[0])
        return due

    def deep_one(self, t: VerifyTarget, manifest: Manifest) -> list[Problem]:
        """Re-hash every file of ``t`` against its manifest at ``--verify-max-mbps``; record the result beside the
        model (so every node and the repair see it); enqueue the model when anything is wrong."""
        stamp = findings.publish_stamp(t.dest, manifest)
        limiter = RateLimiter.mb_per_s(self.max_mbps, cancel=self.shutdown)
        labels = t.ref.metric_labels()
        hashed = 0

        def throttle(n: int) -> None:
            nonlocal hashed
            hashed += n
            self.metrics.deep_verify_bytes.labels(**labels).inc(n)
            if limiter is not None:
                limiter.take(n)
            elif self.shutdown.is_set():
                raise CancelledError("the agent is shutting down")

        started = time.monotonic()
        log.info("%s: deep verification of %s (%.1f MiB%s)", t.ref.display, t.dest, manifest.total_bytes / 2**20,
                 f" at <= {self.max_mbps:g} MB/s" if limiter else "")
        problems = rehash(t.dest, manifest, workers=1, throttle=throttle)
        elapsed = time.monotonic() - started
        self.metrics.last_verification.labels(**labels, kind="deep").set(time.time())
        if stamp is None or findings.publish_stamp(t.dest, manifest) != stamp:
            log.info("%s: republished during deep verification; its result is dropped", t.ref.display)
            return []
        try:
            findings.record_deep_pass(t.dest, manifest, [(p.path, p.message) for p in problems], by=self.node_name)
        except OSError as e:
            log.warning("%s: cannot record the deep verification result beside %s: %s", t.ref.display, t.dest, e)
        log.info("%s: deep verification: %d problem(s), %.1f MiB in %.1fs", t.ref.display, len(problems),
                 hashed / 2**20, elapsed)
        if problems:
            self.metrics.verification_failures.labels(**labels, kind="deep").inc()
            log.warning("%s: deep verification failed (%d file(s), e.g. %s); repairing", t.ref.display,
                        len(problems), problems[0], extra={"model": t.ref.display, "reason": str(problems[0])})
            self.enqueue(t.ref)
        return problems

    def deep_pass(self) -> int:
        """Deep-verify every model that is due, one at a time; returns how many were verified."""
        started = time.monotonic()
        n = 0
        for _, t, manifest in self.due_for_deep():
            if self.shutdown.is_set():
                break
            try:
                self.deep_one(t, manifest)
                n += 1
            except CancelledError:
                break
            except Exception as e:
                log.warning("%s: deep verification could not run: %s", t.ref.display, e)
        if n:
            self.metrics.verify_pass_seconds.labels(kind="deep").set(time.monotonic() - started)
            self.passes["deep"] += 1
        return n

    # ------------------------------------------------------------------------------------------ the loop
    def start(self) -> None:
        if self.quick_interval_s <= 0 and self.deep_interval_s <= 0:
            log.info("periodic verification is off")
            return
        self._thread = threading.Thread(target=self._run, name="modelherd-verifier", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive() or self.shutdown.is_set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        q = self.quick_interval_s
        next_quick = time.monotonic() + self._quick_phase * q if q > 0 else float("inf")
        while not self.shutdown.is_set():
            self.beat = time.monotonic()
            try:
                if time.monotonic() >= next_quick:
                    self.quick_pass()
                    next_quick += q * max(1, int((time.monotonic() - next_quick) // q) + 1)
                self.deep_pass()
            except Exception:
                log.exception("periodic verification failed unexpectedly; it continues")
            tick = min(TICK_MAX_S, max(0.05, next_quick - time.monotonic()))
            if self.deep_interval_s > 0:
                tick = min(tick, max(0.5, self.deep_interval_s / 10))
            self.shutdown.wait(tick)
