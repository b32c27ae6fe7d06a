"""KubernetesLease against the real kube-apiserver + etcd: acquisition, expiry, fencing, watch wake-up."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from modelherd.agent.kube import load
from modelherd.agent.kube.leases import KubeLeases
from modelherd.coordination import LeaseStatus, ModelIdentity, Observation, Phase
from modelherd.coordination.kubelease import KubernetesLease, format_leases, list_leases

from tests import lease_contract
from tests.k8s_fixtures import KubeCluster
from tests.lease_contract import IDENTITY

pytestmark = pytest.mark.k8s



@pytest.fixture
def make_lease(kube_cluster: KubeCluster, kube_namespace: str) -> Iterator[Any]:
    """Each contender gets its own client (and connection pool), as separate nodes would."""
    made: list[KubernetesLease] = []

    def make(node: str, duration_s: float = 5.0, identity: ModelIdentity = IDENTITY, **kw: Any) -> KubernetesLease:
        lease = KubernetesLease(KubeLeases(load(kube_cluster.kubeconfig)), kube_namespace, identity, node,
                                duration_s=duration_s, poll_interval_s=0.5, jitter_s=0.1, **kw)
        made.append(lease)
        return lease

    yield make
    for lease in made:
        lease.close()


def test_of_many_simultaneous_creators_exactly_one_wins(make_lease: Any) -> None:
    contenders = [make_lease(f"node-{i}") for i in range(8)]
    barrier = threading.Barrier(len(contenders))

    def attempt(lease: KubernetesLease) -> Any:
        barrier.wait()
        return lease.try_acquire(None, LeaseStatus())

    with ThreadPoolExecutor(len(contenders)) as pool:
        results = list(pool.map(attempt, contenders))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    on_server = contenders[0].observe()
    assert on_server is not None and on_server.holder == winners[0].holder and on_server.transitions == 0


def test_takeover_happens_only_after_the_holder_is_unseen_for_the_lease_duration(make_lease: Any) -> None:
    holder, follower = make_lease("node-a", duration_s=2), make_lease("node-b", duration_s=2)
    held = holder.try_acquire(None, LeaseStatus())
    assert held is not None
    seen = Observation()
    record = follower.observe()
    seen.see(record)
    # the holder renews at 1 s: that is a change, so the follower's expiry clock restarts
    time.sleep(1.0)
    held = holder.renew(held, LeaseStatus(bytes_done=10))
    record = follower.wait_for_change(record, 3.0)
    assert seen.see(record) and not seen.expired(2)
    assert record is not None and record.status.bytes_done == 10
    # then the holder goes quiet; nothing changes for the follower until the duration has passed
    assert follower.wait_for_change(record, 1.0) == record
    assert not seen.expired(2)
    time.sleep(max(0.0, seen.remaining(2)) + 0.05)
    assert seen.expired(2)
    taken = follower.try_acquire(record, LeaseStatus())
    assert taken is not None and taken.holder == "node-b" and taken.transitions == 1


def test_a_stale_holder_cannot_renew_after_a_takeover(make_lease: Any) -> None:
    lease_contract.stale_holder_is_fenced(make_lease)


def test_only_one_of_two_followers_wins_a_takeover_of_the_same_record(make_lease: Any) -> None:
    make_lease("node-a").try_acquire(None, LeaseStatus())
    b, c = make_lease("node-b"), make_lease("node-c")
    seen_b, seen_c = b.observe(), c.observe()
    assert seen_b == seen_c
    first = b.try_acquire(seen_b, LeaseStatus())
    second = c.try_acquire(seen_c, LeaseStatus())
    assert first is not None and second is None


def test_transitions_increase_on_every_change_of_holder(make_lease: Any) -> None:
    lease_contract.transitions_count_holder_changes(make_lease)


def test_renewals_carry_progress_and_are_visible_to_kubectl(make_lease: Any, kube_cluster: KubeCluster,
                                                           kube_namespace: str) -> None:
    lease = make_lease("node-a")
    held = lease.try_acquire(None, LeaseStatus(bytes_total=4096))
    assert held is not None
    before = lease.counter.total
    held = lease.renew(held, LeaseStatus(bytes_done=1024, bytes_total=4096, staging="node-a/0"))
    assert lease.counter.total == before + 1  # progress rides on the renewal, no extra request
    out = kube_cluster.kubectl("get", "leases", "-n", kube_namespace, "-l", "app.kubernetes.io/managed-by=modelherd",
                               "-o", "json").stdout
    items = json.loads(out)["items"]
    assert [it["metadata"]["name"] for it in items] == [IDENTITY.lease_name]
    item = items[0]
    ann = item["metadata"]["annotations"]
    assert ann["modelherd.io/source"] == IDENTITY.source_uri
    assert ann["modelherd.io/destination"] == IDENTITY.dest
    assert (ann["modelherd.io/phase"], ann["modelherd.io/bytes-done"], ann["modelherd.io/bytes-total"]) == (
        "Downloading", "1024", "4096")
    assert item["metadata"]["labels"]["modelherd.io/model-key"] == IDENTITY.key
    spec = item["spec"]
    assert spec["holderIdentity"] == "node-a" and spec["leaseDurationSeconds"] == 5
    for key in ("acquireTime", "renewTime"):
        stamp = spec[key]
        assert stamp.endswith("Z") and len(stamp.rsplit(".", 1)[1]) == 7, stamp  # six digits + Z

    table = format_leases(list_leases(KubeLeases(load(kube_cluster.kubeconfig)), kube_namespace))
    assert "node-a" in table and "Downloading" in table and "25%" in table


def test_a_waiting_follower_is_woken_by_the_release_through_its_watch(make_lease: Any) -> None:
    holder, follower = make_lease("node-a"), make_lease("node-b", watch_timeout_s=60)
    held = holder.try_acquire(None, LeaseStatus())
    assert held is not None
    record = follower.observe()
    woke: list[Any] = []

    def wait() -> None:
        started = time.monotonic()
        woke.append(follower.wait_for_change(record, 20.0))
        woke.append(time.monotonic() - started)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(1.0)
    holder.release(held, LeaseStatus(phase=Phase.COMPLETE, bytes_done=5, bytes_total=5))
    t.join(25)
    released, waited = woke
    assert released is not None and released.holder == "" and released.phase == Phase.COMPLETE
    assert 0.9 < waited < 3.0
    # one GET to look, one watch to wait: polling would have needed about one request per half second
    assert follower.counter.by_verb() == {"get": 1, "watch": 1}


def test_long_names_and_odd_characters_give_a_dns_label(make_lease: Any) -> None:
    odd = ModelIdentity("hf://Some.Org/" + "Very_Long.Model-Name" * 8 + "@refs/pr/1", "refs/pr/1", "x" * 300)
    lease = make_lease("node-a", identity=odd)
    held = lease.try_acquire(None, LeaseStatus())
    assert held is not None and held.name == odd.lease_name and len(held.name) <= 63
