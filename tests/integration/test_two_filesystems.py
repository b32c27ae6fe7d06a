"""Two shared filesystems mounted at one path (one per node pool) are two places: one download each, at the same
time; a repair and a removal on each.

Every agent runs in a mount namespace of its own (``unshare -m``) where its pool's folder is bind-mounted at the
one models-root path all agents are given, as two Lustre/NFS filesystems mounted at ``/mnt/models`` on two node
pools look to the agents. The filesystem id (``.modelherd-filesystem-id``) is what tells them apart.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from modelherd.agent.ome.keys import node_label_key
from modelherd.coordination.identity import FILESYSTEM_LABEL, MANAGED_BY, MANAGED_BY_LABEL

import tests.agent_fleet as agent_fleet
from tests.agent_fleet import Fleet, can_unshare_mounts, eventually, in_mount_namespace
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess]

KiB = 1024
REPO = "pools/llama"


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("src") / "llama"
    make_sharded_model(folder, n_shards=4, shard_bytes=256 * KiB)
    return folder, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hub(model_src: tuple[Path, int]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, model_src[0])
        yield server


def test_two_filesystems_at_one_path_get_one_download_each_at_once_and_a_repair_and_removal_each(
        fleet: Fleet, hub: HubServer, api_client: object, tmp_path: Path, model_src: tuple[Path, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    if not can_unshare_mounts():
        pytest.skip("needs root and unshare(1) for a private bind mount per node pool")
    root = tmp_path / "mnt-models"  # the one path every agent is told; empty outside the agents' namespaces
    root.mkdir()
    pools = {"a": tmp_path / "pool-a", "b": tmp_path / "pool-b"}
    real = agent_fleet.MODELHERD
    nodes: dict[str, list[str]] = {}
    for pool, folder in pools.items():
        folder.mkdir()
        monkeypatch.setattr(agent_fleet, "MODELHERD", in_mount_namespace(tmp_path / f"modelherd-{pool}",
                                                                         f"mount --bind {folder} {root}", real))
        nodes[pool] = [fleet.add_node(f"{pool}{i}", {"pool": pool}) for i in (1, 2)]
        for node in nodes[pool]:
            fleet.start(node, root, "--storage-mode", "shared", "--coordination", "kubernetes",
                        "--verify-interval", "500ms")
    for agent in fleet.agents.values():
        fleet.wait_ready(agent)

    hub.throttle("cdn", bytes_per_s=128 * KiB)  # ~2 s per 256 KiB shard: long enough to see both at once
    leases = client.CoordinationV1Api(api_client)
    held_at_once: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            resp: object = leases.list_namespaced_lease(fleet.namespace, label_selector=f"{MANAGED_BY_LABEL}="
                                                        f"{MANAGED_BY}", _preload_content=False)
            items = json.loads(resp.data)["items"]  # type: ignore[attr-defined]
            held_at_once.append(len({it["metadata"]["labels"].get(FILESYSTEM_LABEL) for it in items
                                     if it["spec"].get("holderIdentity")}))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    name = f"llama-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key = node_label_key("ClusterBaseModel", "", name)
    everyone = nodes["a"] + nodes["b"]
    eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in everyone), timeout=120,
               what="Ready on every node of both pools")
    stop.set()
    sampler.join(5)
    size = model_src[1]
    assert hub.stats()["bytes_served"] == 2 * size, "one download per filesystem"
    assert max(held_at_once) == 2, "the two filesystems' downloads ran at the same time"
    ids = {(pools[p] / ".modelherd-filesystem-id").read_text().strip() for p in pools}
    assert len(ids) == 2, "each filesystem named itself"
    copies = {p: pools[p] / REPO for p in pools}
    assert all((c / ".modelherd-manifest.json").is_file() for c in copies.values())
    assert not list(root.iterdir()), "nothing was written at the path outside the pools' mounts"

    # a repair on each filesystem: a shard cut short in both copies, each repaired once by its own pool
    hub.clear_faults()
    hub.reset_counters()
    shard = sorted(copies["a"].glob("*.safetensors"))[0]
    for c in copies.values():
        with (c / shard.name).open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    eventually(lambda: all((c / shard.name).stat().st_size == (model_src[0] / shard.name).stat().st_size
                           for c in copies.values())
               and all(fleet.labels(n).get(key) == "Ready" for n in everyone), timeout=90,
               what="both copies repaired and Ready")
    assert hub.stats()["bytes_served"] == 2 * (model_src[0] / shard.name).stat().st_size, hub.stats()

    # a removal on each filesystem
    fleet.delete_model("clusterbasemodels", name)
    eventually(lambda: not any(c.exists() for c in copies.values()), timeout=90,
               what="the model's files removed from both filesystems")
    time.sleep(0.5)
    assert all(key not in fleet.labels(n) for n in everyone)
