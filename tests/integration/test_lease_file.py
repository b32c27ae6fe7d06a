"""FileLease in a shared folder: same semantics as the Kubernetes Lease, contenders in separate processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from modelherd.coordination import LeaseStatus, Observation, Phase
from modelherd.coordination.filelease import FileLease, list_file_leases

from tests import lease_contract
from tests.lease_contract import IDENTITY


def _lease(root: Path, node: str, duration_s: float = 5.0) -> FileLease:
    return FileLease(root, IDENTITY, node, duration_s=duration_s, poll_interval_s=0.1, jitter_s=0.05)


def _contend(root: str, node: str, barrier: Any, out: Any) -> None:
    lease = _lease(Path(root), node)
    barrier.wait()
    out.put((node, lease.try_acquire(None, LeaseStatus()) is not None))


def _take_over(root: str, node: str, barrier: Any, out: Any) -> None:
    lease = _lease(Path(root), node)
    observed = lease.observe()  # every contender saw the same released record before anyone writes
    barrier.wait()
    out.put((node, lease.try_acquire(observed, LeaseStatus()) is not None))


@pytest.mark.multiprocess
@pytest.mark.parametrize("target", [_contend, _take_over], ids=["create", "takeover"])
def test_of_many_processes_exactly_one_acquires(tmp_path: Path, target: Any) -> None:
    if target is _take_over:
        first = _lease(tmp_path, "node-first")
        held = first.try_acquire(None, LeaseStatus())
        assert held is not None
        first.release(held, LeaseStatus())
    ctx = mp.get_context("fork")  # no threads run in the test process here
    out = ctx.Queue()
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=target, args=(str(tmp_path), f"node-{i}", barrier, out)) for i in range(6)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    winners = [node for node, won in results.items() if won]
    assert len(winners) == 1
    record = _lease(tmp_path, "observer").observe()
    assert record is not None and record.holder == winners[0]
    assert record.transitions == (1 if target is _take_over else 0)
    assert not [n for n in os.listdir(tmp_path / ".modelherd-leases") if n.endswith(".tmp")]


def test_takeover_happens_only_after_the_holder_is_unseen_for_the_lease_duration(tmp_path: Path) -> None:
    holder, follower = _lease(tmp_path, "node-a", 1), _lease(tmp_path, "node-b", 1)
    held = holder.try_acquire(None, LeaseStatus())
    assert held is not None
    seen = Observation()
    record = follower.observe()
    seen.see(record)
    time.sleep(0.6)
    held = holder.renew(held, LeaseStatus(bytes_done=10))  # a heartbeat: the follower's clock restarts
    record = follower.wait_for_change(record, 2.0)
    assert seen.see(record) and not seen.expired(1)
    assert follower.wait_for_change(record, 0.5) == record
    assert not seen.expired(1)
    time.sleep(seen.remaining(1) + 0.05)
    assert seen.expired(1)
    taken = follower.try_acquire(record, LeaseStatus())
    assert taken is not None and taken.holder == "node-b" and taken.transitions == 1


def test_a_stale_holder_cannot_renew_or_release_after_a_takeover(tmp_path: Path) -> None:
    lease_contract.stale_holder_is_fenced(lambda node: _lease(tmp_path, node))


def test_transitions_increase_on_every_change_of_holder(tmp_path: Path) -> None:
    lease_contract.transitions_count_holder_changes(lambda node: _lease(tmp_path, node))


def test_the_record_carries_progress_phase_and_microtime_stamps(tmp_path: Path) -> None:
    lease = _lease(tmp_path, "node-a")
    held = lease.try_acquire(None, LeaseStatus(bytes_total=4096))
    assert held is not None
    lease.renew(held, LeaseStatus(bytes_done=1024, bytes_total=4096, staging="node-a/0"))
    [record] = list_file_leases(tmp_path)
    assert (record.holder, record.phase, record.status.bytes_done, record.status.bytes_total) == (
        "node-a", "Downloading", 1024, 4096)
    assert record.source == IDENTITY.source_uri and record.dest == IDENTITY.dest
    assert record.renew_time.endswith("Z") and len(record.renew_time.rsplit(".", 1)[1]) == 7
    assert (tmp_path / ".modelherd-leases" / f"{IDENTITY.lease_name}.json").is_file()


def test_a_waiting_follower_is_woken_by_the_release(tmp_path: Path) -> None:
    holder, follower = _lease(tmp_path, "node-a"), _lease(tmp_path, "node-b")
    held = holder.try_acquire(None, LeaseStatus())
    assert held is not None
    record = follower.observe()
    timer = threading.Timer(0.5, lambda: holder.release(held, LeaseStatus(phase=Phase.COMPLETE)))
    timer.start()
    started = time.monotonic()
    released = follower.wait_for_change(record, 10.0)
    waited = time.monotonic() - started
    timer.join()
    assert released is not None and released.holder == "" and released.phase == Phase.COMPLETE
    assert 0.4 < waited < 2.0
