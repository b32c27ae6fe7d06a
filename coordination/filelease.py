"""A lease in a shared folder, for clusters without Kubernetes (e.g. Slurm nodes on Lustre or NFS).

The record lives in ``<models_root>/.modelherd-leases/<lease-name>.json``; semantics match
:class:`~modelherd.coordination.kubelease.KubernetesLease` (holder, transitions as epoch, phase, bytes).

Invariants:
- The record is only ever replaced whole (temp file + rename), so a reader sees an old or a new record,
  never half of one. Its ``counter`` goes up by one on every write and is the record's version.
- Creation is exclusive: the first record is written to a uniquely named temp file opened with
  ``O_CREAT|O_EXCL`` and then hard-linked to the final name; ``link(2)`` fails with ``EEXIST`` when the record
  exists. (This is the exclusive-create recipe that also holds on NFS, where a plain ``O_EXCL`` open of the
  final name was not atomic before NFSv3 and the reader could see an empty file.)
- Every other write is a compare-and-swap under ``<lease-name>.lock`` (``filelock``): read, compare the
  counter with the one the writer last saw, write, all while holding the lock. The lock is held for
  microseconds; waiting for it is bounded.
- Expiry is never judged from the timestamps in the record: followers watch the counter change and time that
  on their own monotonic clock (see :class:`~modelherd.coordination.backend.Observation`).

Caveats: ``filelock`` uses ``flock(2)``. On Linux NFS clients flock is emulated with POSIX byte-range locks
and works across clients with NFSv4 (or NLM on v3); Lustre needs the ``flock`` mount option (``localflock``
only locks within one node, which breaks the CAS across nodes). Attribute caching on NFS (``actimeo``) can
delay when a follower sees a renewal; keep the lease duration well above the attribute cache time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import filelock

from .backend import LeaseRecord, LeaseStatus, RequestCounter, next_holder_record
from .errors import CoordinationError, LeaseLostError, LeaseUnavailableError
from .identity import ModelIdentity
from .microtime import now_microtime

__all__ = ["LEASES_DIRNAME", "FileLease", "list_file_leases"]

LEASES_DIRNAME = ".modelherd-leases"


def leases_dir(models_root: Path) -> Path:
    return Path(models_root) / LEASES_DIRNAME


def _to_json(record: LeaseRecord, counter: int) -> str:
    s = record.status
    return json.dumps({
        "name": record.name, "counter": counter, "holder": record.holder, "transitions": record.transitions,
        "duration_s": record.duration_s, "acquire_time": record.acquire_time, "renew_time": record.renew_time,
        "source": record.source, "dest": record.dest, "updated": record.updated, "phase": str(s.phase),
        "bytes_done": s.bytes_done, "bytes_total": s.bytes_total, "staging": s.staging, "message": s.message,
        "filesystem": record.filesystem,
    }, sort_keys=True)


def _from_json(text: str) -> LeaseRecord:
    d: dict[str, Any] = json.loads(text)
    status = LeaseStatus(phase=str(d.get("phase", "")), bytes_done=int(d.get("bytes_done", 0)),
                         bytes_total=int(d.get("bytes_total", 0)), staging=str(d.get("staging", "")),
                         message=str(d.get("message", "")))
    return LeaseRecord(name=str(d["name"]), version=str(int(d["counter"])), holder=str(d.get("holder", "")),
                       transitions=int(d.get("transitions", 0)), duration_s=int(d.get("duration_s", 0)),
                       acquire_time=str(d.get("acquire_time", "")), renew_time=str(d.get("renew_time", "")),
                       source=str(d.get("source", "")), dest=str(d.get("dest", "")),
                       updated=str(d.get("updated", "")), status=status, filesystem=str(d.get("filesystem", "")))


def read_record(path: Path) -> LeaseRecord | None:
    """The record at ``path``; ``None`` when there is none. A malformed record is a :class:`CoordinationError`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LeaseUnavailableError(f"reading lease file {path} failed: {e.strerror}",
                                    hint="check the shared folder is mounted") from None
    try:
        return _from_json(text)
    except (KeyError, TypeError, ValueError) as e:
        raise CoordinationError(f"lease file {path} is malformed ({type(e).__name__})",
                                hint="delete it; the next node re-creates it") from None


class FileLease:
    """The lease of one model as a file in the shared models root, held (or waited for) by ``node``."""

    def __init__(
        self,
        models_root: Path,
        identity: ModelIdentity,
        node: str,
        *,
        duration_s: float = 30.0,
        poll_interval_s: float = 2.0,
        jitter_s: float = 0.5,
        lock_timeout_s: float = 10.0,
        counter: RequestCounter | None = None,
    ) -> None:
        if not node:
            raise CoordinationError("the node name is empty", hint="set --node-name or NODE_NAME")
        self.identity = identity
        self.node = node
        self.duration_s = max(1, math.ceil(duration_s))
        self.poll_interval_s = poll_interval_s
        self.jitter_s = jitter_s
        self.lock_timeout_s = lock_timeout_s
        self.counter = counter or RequestCounter()
        self.dir = leases_dir(models_root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{identity.lease_name}.json"
        self._lock_path = str(self.dir / f"{identity.lease_name}.lock")

    @property
    def name(self) -> str:
        return self.identity.lease_name

    # ------------------------------------------------------------------ helpers
    def _record(self, *, holder: str, transitions: int, acquire_time: str, status: LeaseStatus) -> LeaseRecord:
        now = now_microtime()
        return LeaseRecord(name=self.name, version="", holder=holder, transitions=transitions,
                           duration_s=self.duration_s, acquire_time=acquire_time, renew_time=now,
                           source=self.identity.source_uri, dest=self.identity.dest, updated=now, status=status,
                           filesystem=self.identity.filesystem)

    def _write_temp(self, record: LeaseRecord, counter: int) -> str:
        tmp = str(self.dir / f".{self.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_to_json(record, counter))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    @contextlib.contextmanager
    def _locked(self, timeout_s: float | None = None) -> Any:
        self.counter.add("lock")
        lock = filelock.FileLock(self._lock_path, timeout=timeout_s if timeout_s is not None else self.lock_timeout_s)
        try:
            with lock:
                yield
        except filelock.Timeout:
            raise LeaseUnavailableError(f"lease lock {self._lock_path} is busy",
                                        hint="another node holds the lock file; retrying") from None

    def _swap(self, expect_version: str, record: LeaseRecord, timeout_s: float | None = None) -> LeaseRecord | None:
        """Replace the record if its version is still ``expect_version``; ``None`` when it is not."""
        with self._locked(timeout_s):
            self.counter.add("update")
            current = read_record(self.path)
            if current is None or current.version != expect_version:
                return None
            counter = int(current.version) + 1
            tmp = self._write_temp(record, counter)
            os.replace(tmp, self.path)
        return _from_json(_to_json(record, counter))

    # ------------------------------------------------------------------ LeaseBackend
    def observe(self) -> LeaseRecord | None:
        self.counter.add("get")
        return read_record(self.path)

    def try_acquire(self, observed: LeaseRecord | None, status: LeaseStatus) -> LeaseRecord | None:
        transitions, acquired = next_holder_record(observed, node=self.node, now=now_microtime())
        record = self._record(holder=self.node, transitions=transitions, acquire_time=acquired, status=status)
        if observed is not None:
            return self._swap(observed.version, record)
        self.counter.add("create")
        tmp = self._write_temp(record, 1)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return _from_json(_to_json(record, 1))

    def _write_held(self, held: LeaseRecord, status: LeaseStatus, holder: str,
                    timeout_s: float | None) -> LeaseRecord:
        record = self._record(holder=holder, transitions=held.transitions, acquire_time=held.acquire_time,
                              status=status)
        written = self._swap(held.version, record, timeout_s)
        if written is None:
            raise LeaseLostError(f"lease {self.path} was taken over",
                                 hint="another node holds it now; this node stops writing")
        return written

    def renew(self, held: LeaseRecord, status: LeaseStatus, *, timeout_s: float | None = None) -> LeaseRecord:
        return self._write_held(held, status, self.node, timeout_s)

    def release(self, held: LeaseRecord, status: LeaseStatus) -> LeaseRecord:
        return self._write_held(held, status, "", None)

    def wait_for_change(self, since: LeaseRecord | None, timeout_s: float) -> LeaseRecord | None:
        """Poll the record (every ``poll_interval_s`` plus jitter) until its version differs or time is up."""
        want = since.version if since is not None else None
        deadline = time.monotonic() + max(0.0, timeout_s)
        current = since
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return current
            time.sleep(min(left, self.poll_interval_s + random.uniform(0, self.jitter_s)))
            try:
                current = self.observe()
            except LeaseUnavailableError:
                continue
            if (current.version if current is not None else None) != want:
                return current

    def close(self) -> None:
        return None


def list_file_leases(models_root: Path) -> list[LeaseRecord]:
    """Every file lease under ``models_root`` (unreadable ones skipped), sorted by name."""
    out: list[LeaseRecord] = []
    folder = leases_dir(models_root)
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.json")):
        with contextlib.suppress(CoordinationError):
            record = read_record(p)
            if record is not None:
                out.append(record)
    return out


