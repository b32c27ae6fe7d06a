"""Checks every lease backend must pass (FileLease, KubernetesLease): run by each backend's own tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from modelherd.coordination import LeaseBackend, LeaseLostError, LeaseStatus, ModelIdentity, Phase

IDENTITY = ModelIdentity("hf://Org/Llama-3.1-8B_Instruct@main", "main", "Org/Llama-3.1-8B_Instruct")

MakeLease = Callable[[str], LeaseBackend]


def stale_holder_is_fenced(make_lease: MakeLease) -> None:
    """After a takeover the old holder can neither renew nor release, and the new holder's record stands."""
    old, new = make_lease("node-a"), make_lease("node-b")
    held_by_old = old.try_acquire(None, LeaseStatus())
    assert held_by_old is not None
    assert new.try_acquire(new.observe(), LeaseStatus()) is not None
    with pytest.raises(LeaseLostError):
        old.renew(held_by_old, LeaseStatus(bytes_done=1))
    with pytest.raises(LeaseLostError):
        old.release(held_by_old, LeaseStatus(phase=Phase.COMPLETE))
    final = new.observe()
    assert final is not None and final.holder == "node-b" and final.phase == Phase.DOWNLOADING


def transitions_count_holder_changes(make_lease: MakeLease) -> None:
    """``transitions`` is 0 for the first holder and grows by one with every new holder."""
    record = None
    for i in range(4):
        record = make_lease(f"node-{i}").try_acquire(record, LeaseStatus())
        assert record is not None and record.transitions == i and record.holder == f"node-{i}"
