"""A read-only models root.

Local storage: a model already published there is Ready; a new one is Failed with the typed root error (never
Updating forever, never a traceback per retry), and the other models carry on. Shared storage (sites mount the
models filesystem read-write on a few nodes and read-only on the inference nodes): a read-only node is a follower
that never takes a Lease; it waits, verifies and is Ready, and damage it finds is repaired by a writable node.

The read-only agent runs in a mount namespace of its own (``unshare -m``) where the models root is a read-only bind
mount, as a node that mounts the shared models filesystem read-only sees it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.agent_fleet as agent_fleet
from tests.agent_fleet import Fleet, can_unshare_mounts, eventually, in_mount_namespace
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess]

agent_fleet_modelherd = agent_fleet.MODELHERD  # the plain binary, before any test wraps it

KiB = 1024


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def readonly_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make :meth:`Fleet.start` run the agent with ``root`` bind-mounted read-only in its own mount namespace."""
    if not can_unshare_mounts():
        pytest.skip("needs root and unshare(1) for a private read-only bind mount")
    root = tmp_path / "models"
    root.mkdir()
    wrapper = in_mount_namespace(tmp_path / "modelherd-ro",
                                 f"mount --bind {root} {root} && mount -o remount,bind,ro {root} {root}",
                                 agent_fleet.MODELHERD)
    monkeypatch.setattr(agent_fleet, "MODELHERD", wrapper)
    return root


def test_a_read_only_local_root_fails_a_new_model_with_the_root_error_and_keeps_a_published_one_ready(
        fleet: Fleet, hub: HubServer, readonly_agent: Path, tmp_path: Path) -> None:
    from modelherd.agent.ome.keys import configmap_key
    from modelherd.storage.engine import pull
    from modelherd.storage.options import EngineOptions
    from modelherd.storage.sources import open_source
    from modelherd.storage.uri import parse_uri

    root = readonly_agent
    src = tmp_path / "src"
    make_sharded_model(src, n_shards=2, shard_bytes=32 * KiB)
    hub.add_repo("ro/published", src)
    hub.add_repo("ro/new", src, revision="main")
    uri = parse_uri("hf://ro/published")
    source = open_source(uri, hf_endpoint=fleet.hub_endpoint)
    try:  # published before the node went read-only (another node wrote it)
        pull(source, root / "ro/published", models_root=root, options=EngineOptions(), writer="other-node")
    finally:
        source.close()

    node = fleet.add_node("ro")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    fleet.create_cbm(f"published-{fleet.tag}", "hf://ro/published")
    fleet.create_cbm(f"new-{fleet.tag}", "hf://ro/new")
    eventually(lambda: (fleet.entry(node, configmap_key("ClusterBaseModel", "", f"published-{fleet.tag}")) or {})
               .get("status") == "Ready", timeout=60, what="the published model Ready on the read-only node")
    entry = eventually(lambda: (e := fleet.entry(node, configmap_key("ClusterBaseModel", "", f"new-{fleet.tag}")))
                       and e["status"] == "Failed" and e, timeout=60, what="the new model Failed")
    message = entry["modelherd"]["message"]
    assert "is not writable" in message and str(root) in message, message
    assert agent.proc.poll() is None
    logs = fleet.logs()
    assert "Traceback" not in logs and "unexpectedly" not in logs, logs[-3000:]
    assert not (root / "ro/new").exists()


def test_a_read_only_node_on_shared_storage_follows_without_a_lease_and_a_writable_node_repairs_its_damage(
        fleet: Fleet, hub: HubServer, readonly_agent: Path, tmp_path: Path, api_client: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes import client
    from modelherd.agent.ome.keys import node_label_key

    root = readonly_agent
    src = tmp_path / "src"
    make_sharded_model(src, n_shards=3, shard_bytes=64 * KiB)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    hub.add_repo("ro/shared", src)
    reader = fleet.add_node("reader")
    ro_agent = fleet.start(reader, root, "--storage-mode", "shared", "--coordination", "kubernetes",
                           "--verify-interval", "500ms")
    monkeypatch.setattr(agent_fleet, "MODELHERD", agent_fleet_modelherd)  # the writer: a plain agent
    writer = fleet.add_node("writer")
    rw_agent = fleet.start(writer, root, "--storage-mode", "shared", "--coordination", "kubernetes",
                           "--verify-interval", "500ms")
    for agent in (ro_agent, rw_agent):
        fleet.wait_ready(agent)
    assert ro_agent.get("/healthz")[0] == 200, "a read-only shared root is healthy: the node follows"
    holders: set[str] = set()
    leases = client.CoordinationV1Api(api_client)
    name = f"shared-{fleet.tag}"
    fleet.create_cbm(name, "hf://ro/shared")
    key = node_label_key("ClusterBaseModel", "", name)

    def ready_everywhere() -> bool:
        resp: object = leases.list_namespaced_lease(fleet.namespace, _preload_content=False)
        holders.update(it["spec"].get("holderIdentity") or "" for it in json.loads(resp.data)["items"])  # type: ignore[attr-defined]
        return all(fleet.labels(n).get(key) == "Ready" for n in (reader, writer))
    eventually(ready_everywhere, timeout=90, what="Ready on the writable and the read-only node")
    assert hub.stats()["bytes_served"] == size
    assert reader not in holders, "the read-only node took a Lease"

    # damage seen from the read-only node: Failed there, repaired by the writable node, Ready again on both
    shard = sorted((root / "ro/shared").glob("*.safetensors"))[0]
    hub.reset_counters()
    # the writer's repair takes ~4 s, many of the reader's 0.5 s verification passes: the reader must see it
    hub.throttle("any", bytes_per_s=16 * KiB)
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    eventually(lambda: fleet.labels(reader).get(key) == "Failed", timeout=30, what="the reader reporting Failed")
    eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in (reader, writer)), timeout=90,
               what="repaired by the writable node")
    assert hub.stats()["bytes_served"] == (src / shard.name).stat().st_size
    assert reader not in holders
    assert "Traceback" not in fleet.logs()
