"""Shared storage on real nodes (sshfs, one client per node), the chart installed with helm, driven as a user would.

One release serves the whole module (installing takes a DaemonSet rollout); every test brings its own model and
deletes it, so they do not depend on each other's models. Origin traffic is read from the Hub's ``/_stats``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from modelherd.agent.ome.keys import configmap_key, node_label_key

from e2e.conftest import Cluster, wait_for
from tests.modelgen import make_sharded_model

KiB, MiB = 1024, 1024 * 1024
# Quick verification every 5 s; Leases short enough that a dead holder is taken over in seconds.
SHARED_VALUES: dict[str, Any] = {
    "agent": {"verifyInterval": "5s",
              "extraArgs": ["--lease-duration", "15", "--renew-period", "5", "--startup-jitter", "1"]},
}


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[str]:
    if cluster.env.get("STORAGE") != "shared":
        pytest.skip("needs a cluster with --storage shared")
    ns = f"mh-shared-{uuid.uuid4().hex[:6]}"
    cluster.install(ns, cluster.chart_values(**SHARED_VALUES))  # storage.mode auto: sshfs must be detected
    yield ns
    cluster.uninstall(ns)
    cluster.kubectl("delete", "namespace", ns, "--wait=false")


class Model:
    """A generated model published on the Hub as ``e2e/<name>`` and its ClusterBaseModel (deleted on exit)."""

    def __init__(self, cluster: Cluster, tmp: Path, shards: int, shard_bytes: int) -> None:
        self.cluster = cluster
        self.name = f"m-{uuid.uuid4().hex[:6]}"
        self.repo = f"e2e/{self.name}"
        src = tmp / self.name
        self.files = make_sharded_model(src, n_shards=shards, shard_bytes=shard_bytes)
        self.size = sum(p.stat().st_size for p in self.files)
        self.shards = sorted(p.name for p in self.files if p.name.endswith(".safetensors"))
        cluster.publish(self.repo, src)
        self.label = node_label_key("ClusterBaseModel", "", self.name)
        self.key = configmap_key("ClusterBaseModel", "", self.name)
        self.created = False

    def create(self) -> None:
        self.cluster.create_cbm(self.name, f"hf://{self.repo}")
        self.created = True

    @property
    def export(self) -> Path:
        """The model's folder on the server side of the shared filesystem."""
        return Path(self.cluster.env["SHARED_EXPORT"]) / self.repo

    def states(self) -> dict[str, str | None]:
        return {n: self.cluster.node_labels(n).get(self.label) for n in self.cluster.nodes()}

    def all(self, state: str) -> bool:
        return all(v == state for v in self.states().values())

    def lease(self, namespace: str) -> dict[str, Any] | None:
        raw = client.CoordinationV1Api(self.cluster.api).list_namespaced_lease(
            namespace, label_selector="app.kubernetes.io/managed-by=modelherd", _preload_content=False).data
        for item in json.loads(raw)["items"]:
            if self.repo in item["metadata"].get("annotations", {}).get("modelherd.io/source", ""):
                return dict(item)
        return None

    def delete(self) -> None:
        if self.created:
            self.cluster.delete_cbm(self.name)
            wait_for(lambda: all(v is None for v in self.states().values()), 60, f"{self.label} gone from nodes")
            self.created = False


@pytest.fixture
def new_model(cluster: Cluster, tmp_path: Path) -> Iterator[Any]:
    made: list[Model] = []

    def make(shards: int = 4, shard_bytes: int = 512 * KiB) -> Model:
        m = Model(cluster, tmp_path, shards, shard_bytes)
        made.append(m)
        return m
    yield make
    cluster.hub_throttle(0)
    for m in made:
        m.delete()


class LabelWatch:
    """Every value the model's node label takes on every node, as a watch on Nodes delivers them (no poll can miss
    a short-lived state)."""

    def __init__(self, cluster: Cluster, label: str) -> None:
        self.cluster, self.label = cluster, label
        self.seen: list[tuple[str, str | None]] = []
        self._stop = threading.Event()
        self._w = watch.Watch()
        rv = cluster.core.list_node().metadata.resource_version
        self._t = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self._t.start()

    def _run(self, rv: str) -> None:
        last: dict[str, str | None] = {}
        while not self._stop.is_set():
            try:
                for ev in self._w.stream(self.cluster.core.list_node, resource_version=rv, timeout_seconds=30):
                    node = ev["object"].metadata
                    rv = node.resource_version
                    value = (node.labels or {}).get(self.label)
                    if last.get(node.name, "") != value:
                        last[node.name] = value
                        self.seen.append((node.name, value))
                    if self._stop.is_set():
                        return
            except Exception:  # a watch expired or broke: re-list from now on
                if self._stop.is_set():
                    return
                rv = self.cluster.core.list_node().metadata.resource_version

    def values(self, node: str) -> list[str | None]:
        return [v for n, v in self.seen if n == node]

    def stop(self) -> None:
        self._stop.set()
        self._w.stop()


def _events(cluster: Cluster, name: str, reason: str, text: str = "") -> int:
    """How many times Events with ``reason`` (and ``text`` in the message) were recorded about the
    ClusterBaseModel ``name`` (counts summed)."""
    evs = cluster.core.list_namespaced_event("default", field_selector=f"involvedObject.name={name}").items
    return sum(e.count or 1 for e in evs if e.reason == reason and text in (e.message or ""))


def _logged(cluster: Cluster, namespace: str, model: str, state: str) -> int:
    """How many agents' JSON log records say ``state`` about ``clusterbasemodel/<model>``."""
    return sum(1 for r in cluster.agent_logs(namespace)
               if r.get("state") == state and r.get("model") == f"clusterbasemodel/{model}")


def _lease_in_progress(m: Model, release: str, *, more_than: int, timeout: float) -> dict[str, Any]:
    """The model's Lease once it names a holder that has reported more than ``more_than`` bytes done."""
    lease: dict[str, Any] = wait_for(
        lambda: (le := m.lease(release)) and le["spec"].get("holderIdentity")
        and int(le["metadata"]["annotations"].get("modelherd.io/bytes-done", "0")) > more_than and le,
        timeout, f"a Lease naming its holder with more than {more_than} bytes done")
    return lease


def test_one_cluster_base_model_is_ready_on_every_node_after_one_download(
        cluster: Cluster, release: str, new_model: Any) -> None:
    nodes = cluster.nodes()
    assert len(nodes) >= 3
    m = new_model(shards=4, shard_bytes=4 * MiB)
    cluster.hub_throttle(256 * KiB)  # ~16 s of download: the Lease shows the holder and its progress meanwhile
    before = cluster.hub_stats()["body_bytes"]
    m.create()
    lease = _lease_in_progress(m, release, more_than=0, timeout=60)
    holder = lease["spec"]["holderIdentity"]
    assert any(holder.startswith(n) for n in nodes), holder
    ann = lease["metadata"]["annotations"]
    assert int(ann["modelherd.io/bytes-total"]) == m.size, ann
    out = cluster.kubectl("get", "leases", "-n", release, "-l", "app.kubernetes.io/managed-by=modelherd")
    assert lease["metadata"]["name"] in out and holder in out, out
    cluster.hub_throttle(0)
    wait_for(lambda: m.all("Ready"), 180, f"{m.label}=Ready on {nodes}")
    assert cluster.hub_stats()["body_bytes"] - before == m.size, "origin bytes must be exactly one model"
    for n in nodes:
        # OME's order: the label first, then the entry (one more request) — read the entry once it had its time
        wait_for(lambda n=n: json.loads(cluster.core.read_namespaced_config_map(n, release).data[m.key])["status"]
                 == "Ready", 10, f"{n}'s entry Ready after its label")
        cm = cluster.core.read_namespaced_config_map(n, release)
        assert cm.metadata.labels["models.ome/basemodel-status"] == "true"
        entry = json.loads(cm.data[m.key])
        assert entry["status"] == "Ready", entry
    if cluster.env.get("STORAGE_MODE", "auto") == "auto":  # shared because the filesystem says so (sshfs)
        pod = cluster.agent_pods(release)[nodes[0]]
        detected = json.loads(cluster.kubectl("exec", "-n", release, pod, "--", "modelherd", "detect",
                                              cluster.env["MODELS_ROOT"]))
        assert detected["storage"] == "shared", detected


def test_a_serving_pod_scheduled_by_the_ready_label_reads_the_model_through_its_host_path(
        cluster: Cluster, release: str, new_model: Any) -> None:
    m = new_model(shards=3)
    m.create()
    wait_for(lambda: m.all("Ready"), 120, f"{m.label}=Ready")
    root = cluster.env["MODELS_ROOT"]
    script = f"cd {root}/{m.repo} && for f in {' '.join(m.shards)}; do wc -c < $f; done"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"serve-{m.name}"},
           "spec": {"restartPolicy": "Never", "nodeSelector": {m.label: "Ready"}, "hostNetwork": True,
                    "containers": [{"name": "c", "image": cluster.busybox,
                                    "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                                    "volumeMounts": [{"name": "m", "mountPath": root, "readOnly": True}]}],
                    "volumes": [{"name": "m", "hostPath": {"path": root, "type": "Directory"}}]}}
    cluster.core.create_namespaced_pod(release, pod)
    try:
        wait_for(lambda: cluster.core.read_namespaced_pod(f"serve-{m.name}", release).status.phase
                 in ("Succeeded", "Failed"), 90, "serving pod finished")
        got = cluster.core.read_namespaced_pod(f"serve-{m.name}", release)
        assert got.status.phase == "Succeeded", cluster.kubectl("logs", "-n", release, f"serve-{m.name}")
        assert got.spec.node_name in cluster.nodes()
        sizes = [int(x) for x in cluster.kubectl("logs", "-n", release, f"serve-{m.name}").split()]
        assert sizes == [(Path(m.export) / s).stat().st_size for s in m.shards]
    finally:
        cluster.core.delete_namespaced_pod(f"serve-{m.name}", release, grace_period_seconds=0)


def test_a_truncated_shard_is_failed_on_every_node_and_repaired_once(
        cluster: Cluster, release: str, new_model: Any) -> None:
    nodes = cluster.nodes()
    m = new_model(shards=4, shard_bytes=2 * MiB)
    m.create()
    wait_for(lambda: m.all("Ready"), 120, f"{m.label}=Ready")
    bad = m.export / m.shards[1]
    good_size = bad.stat().st_size
    seen = LabelWatch(cluster, m.label)
    cluster.hub_throttle(512 * KiB)  # the repair takes seconds: every node has time to see the damage too
    before = cluster.hub_stats()
    try:
        with open(bad, "r+b") as f:  # on the server side: every node's client sees it
            f.truncate(good_size - 1000)
        wait_for(lambda: all("Failed" in seen.values(n) for n in nodes), 60, "Failed on every node",
                 interval=0.2)
        cluster.hub_throttle(0)
        wait_for(lambda: m.all("Ready"), 120, "Ready again on every node")
    finally:
        seen.stop()
    after = cluster.hub_stats()
    assert bad.stat().st_size == good_size
    sent = after["body_bytes"] - before["body_bytes"]
    assert sent == good_size, f"the origin must send the one damaged shard once: {sent} != {good_size}"
    assert _events(cluster, m.name, "Failed", "verification failed") >= len(nodes), "each node said why, once"


def test_deleting_the_cluster_base_model_removes_labels_entries_and_files_exactly_once(
        cluster: Cluster, release: str, new_model: Any) -> None:
    nodes = cluster.nodes()
    m = new_model(shards=2)
    m.create()
    wait_for(lambda: m.all("Ready"), 120, f"{m.label}=Ready")
    assert m.export.is_dir()
    m.delete()  # waits for every label to go
    wait_for(lambda: all(m.key not in (cluster.core.read_namespaced_config_map(n, release).data or {})
                         for n in nodes), 60, "every ConfigMap entry gone")
    wait_for(lambda: not m.export.exists(), 60, "the files gone from the shared filesystem")
    wait_for(lambda: _logged(cluster, release, m.name, "FilesRemoved") + _logged(cluster, release, m.name, "FilesKept")
             >= len(nodes), 30, "every node decided about the files")
    assert _logged(cluster, release, m.name, "FilesRemoved") == 1, "exactly one node removes shared files"
    assert _events(cluster, m.name, "FilesRemoved") == 1
    assert all(v is None for v in m.states().values()), "a deleted model's label never comes back"
    staging = Path(cluster.env["SHARED_EXPORT"]) / ".modelherd-staging"
    assert not any(m.name in p.name for p in staging.glob("*")) if staging.exists() else True


def _holder(m: Model, release: str, nodes: list[str]) -> str:
    holder = str(_lease_in_progress(m, release, more_than=2 * MiB, timeout=90)["spec"]["holderIdentity"])
    return next(n for n in nodes if holder.startswith(n))


def _takeover(cluster: Cluster, release: str, m: Model, kill: Any) -> None:
    nodes = cluster.nodes()
    cluster.hub_throttle(256 * KiB)  # 32 MiB at ~1 MiB/s: the holder is mid-download when it dies
    before = cluster.hub_stats()["body_bytes"]
    m.create()
    victim = _holder(m, release, nodes)
    kill(victim)
    # a survivor takes the Lease over and resumes from the staged bytes
    wait_for(lambda: (le := m.lease(release)) and not le["spec"].get("holderIdentity", "").startswith(victim)
             and le["spec"].get("holderIdentity"), 90, "another node holding the Lease", interval=0.3)
    cluster.hub_throttle(0)
    survivors = [n for n in nodes if n != victim]
    wait_for(lambda: all(cluster.node_labels(n).get(m.label) == "Ready" for n in survivors), 180,
             f"Ready on the survivors {survivors}")
    sent = cluster.hub_stats()["body_bytes"] - before
    print(f"\ntakeover after losing {victim}: origin sent {sent / m.size:.3f} x the model")
    assert sent <= 1.1 * m.size, f"origin sent {sent} bytes for a {m.size}-byte model (> 1.1x)"


def test_force_deleting_the_holders_pod_mid_download_hands_the_download_over(
        cluster: Cluster, release: str, new_model: Any) -> None:
    m = new_model(shards=64, shard_bytes=512 * KiB)  # small files: the Lease's progress moves file by file

    def kill(node: str) -> None:
        cluster.kubectl("delete", "pod", "-n", release, cluster.agent_pods(release)[node],
                        "--grace-period=0", "--force")
    _takeover(cluster, release, m, kill)
    # the DaemonSet brings the agent back on that node, which finds the model published and Ready
    wait_for(lambda: m.all("Ready"), 180, "Ready on every node, the replaced agent too")


def test_killing_the_holders_node_mid_download_hands_the_download_over(
        cluster: Cluster, release: str, new_model: Any) -> None:
    m = new_model(shards=64, shard_bytes=512 * KiB)
    stopped: list[str] = []

    def kill(node: str) -> None:
        cluster.run("node", "stop", node)  # kubelet, containerd, the agent, its sshfs client: all SIGKILLed
        stopped.append(node)
    try:
        _takeover(cluster, release, m, kill)
    finally:
        for node in stopped:
            cluster.run("node", "start", node)
    wait_for(lambda: all(c.status == "True" for c in cluster.core.read_node(stopped[0]).status.conditions
                         if c.type == "Ready"), 180, f"{stopped[0]} Ready again")
    wait_for(lambda: m.all("Ready"), 240, "Ready on every node, the restarted one too")


def test_helm_upgrade_rolls_every_agent_without_a_model_leaving_ready(
        cluster: Cluster, release: str, new_model: Any) -> None:
    m = new_model(shards=2)
    m.create()
    wait_for(lambda: m.all("Ready"), 120, f"{m.label}=Ready")
    old = set(cluster.agent_pods(release).values())
    seen = LabelWatch(cluster, m.label)
    before = cluster.hub_stats()
    try:
        cluster.install(release, cluster.chart_values(**SHARED_VALUES, podAnnotations={"roll": uuid.uuid4().hex}),
                        upgrade=True)
        wait_for(lambda: len(pods := cluster.agent_pods(release)) == len(cluster.nodes())
                 and not set(pods.values()) & old, 240, "every agent replaced")
        time.sleep(8)  # the new agents have listed, verified and reported
    finally:
        seen.stop()
    assert all(v is None or v == "Ready" for _, v in seen.seen) and m.all("Ready"), seen.seen
    after = cluster.hub_stats()
    assert after["body_bytes"] == before["body_bytes"], "an upgrade downloads nothing"
    origin = {k: v for k, v in after["requests"].items() if k != "other"}  # "other": our own /_stats reads
    assert origin == {k: v for k, v in before["requests"].items() if k != "other"}, "no request to the origin"
