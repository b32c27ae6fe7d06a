"""Periodic verification and repair, and disk space, end to end: real ``modelherd agent`` processes against the
real kube-apiserver, a models folder shared by every node or one per node, a tmpfs that is too small, and the
loopback Hub counting the bytes it sends per file."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelherd.agent.ome.keys import configmap_key, node_label_key
from modelherd.storage.paths import staging_root
from modelherd.storage.verify import verify_deep

from tests.agent_fleet import Agent, Fleet, eventually
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

KiB, MiB = 1024, 1024 * 1024
REPO = "org/verify-llama"
SHARD = 256 * KiB
VERIFY = ("--verify-interval", "500ms", "--deep-verify-interval", "3s", "--verify-max-mbps", "0")


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "verify-llama"
    make_sharded_model(folder, n_shards=8, shard_bytes=SHARD)
    return folder


@pytest.fixture
def hub(model_src: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, model_src)
        yield server



def _shards(dest: Path) -> list[Path]:
    return sorted(dest.glob("model-*.safetensors"))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _served(hub: HubServer) -> dict[str, int]:
    """Body bytes the origin sent, by file name (CDN and resolve paths folded together)."""
    out: dict[str, int] = {}
    for path, n in hub.stats()["bytes_served_by_path"].items():
        if n:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            out[name] = out.get(name, 0) + n
    return out


def _metric(agent: Agent, name: str, default: float | None = None, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels``; ``default`` (else AssertionError) when there is none."""
    total, found = 0.0, False
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total, found = total + float(line.rsplit(" ", 1)[1]), True
    if not found and default is not None:
        return default
    assert found, f"no sample of {name} {labels}"
    return total


def _watch_until_ready(fleet: Fleet, nodes: list[str], key: str, timeout: float = 90) -> dict[str, list[str]]:
    """Poll every node's label until all are Ready again after having left Ready; the states each went through."""
    seen: dict[str, list[str]] = {n: [] for n in nodes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in nodes:
            state = fleet.labels(n).get(key, "")
            if not seen[n] or seen[n][-1] != state:
                seen[n].append(state)
        if all(len(s) > 1 and s[-1] == "Ready" for s in seen.values()):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"not every node came back to Ready: {seen}\n{fleet.logs()[-6000:]}")


def test_shared_storage_damage_is_seen_by_every_node_and_repaired_once_with_only_the_bad_files(
        fleet: Fleet, hub: HubServer, tmp_path: Path, model_src: Path) -> None:
    root = tmp_path / "shared-models"
    root.mkdir()
    nodes = [fleet.add_node(s) for s in ("a", "b", "c")]
    agents = [fleet.start(n, root, "--storage-mode", "shared", "--coordination", "kubernetes", *VERIFY)
              for n in nodes]
    for ag in agents:
        fleet.wait_ready(ag)
    name = f"verify-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in nodes), timeout=90, what="all Ready")
    dest = root / REPO
    s1, s2, s3 = _shards(dest)[1:4]
    # a repair at 64 KiB/s takes seconds, so every node's next pass (500 ms) sees the damage first
    hub.throttle("any", bytes_per_s=64 * KiB)

    def fetched_by() -> dict[str, float]:
        return {a.node: _metric(a, "modelherd_origin_bytes_total", 0.0) for a in agents}

    def repairers(before: dict[str, float]) -> list[str]:
        return [n for n, v in fetched_by().items() if v > before[n]]

    # 1. a flipped byte: sizes and headers intact; only deep verification (every 3 s) can see it
    hub.reset_counters()
    before = fetched_by()
    _flip(s2, s2.stat().st_size - 7)
    seen = _watch_until_ready(fleet, nodes, key)
    assert all("Failed" in states for states in seen.values()), seen
    assert _served(hub) == {s2.name: s2.stat().st_size}, "the origin sends the bad file once, nothing else"
    assert sum(_metric(a, "modelherd_verification_failures_total", 0.0, kind="deep") for a in agents) >= 1
    assert len(repairers(before)) == 1, "exactly one node fetched from the origin"
    messages = [m for a in agents for m in a.log.read_text().splitlines() if "sha256 mismatch" in m]
    assert messages, "the reason (the checksum that did not match) is logged"

    # 2. a truncated shard and a deleted one: quick verification catches both within one interval
    hub.reset_counters()
    before = fetched_by()
    os.truncate(s1, s1.stat().st_size - 1000)
    s3.unlink()
    failed_entries: dict[str, str] = {}

    def all_failed() -> bool:
        for n in nodes:
            entry = fleet.entry(n, cm_key) or {}
            if entry.get("status") == "Failed":
                failed_entries[n] = entry["modelherd"]["message"]
        return len(failed_entries) == len(nodes)
    eventually(all_failed, timeout=30, interval=0.05, what="every node's entry Failed")
    for message in failed_entries.values():
        assert "verification failed" in message and (s1.name in message or s3.name in message), message
    eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in nodes), timeout=90, what="Ready again")
    assert _served(hub) == {s1.name: (model_src / s1.name).stat().st_size,
                            s3.name: (model_src / s3.name).stat().st_size}
    assert len(repairers(before)) == 1, "exactly one node repaired (under the Lease); the others waited"
    assert verify_deep(dest, require_manifest=True) == []
    staging = staging_root(root)
    assert not staging.exists() or not any(staging.iterdir()), "staging is cleaned"


def test_local_storage_repairs_only_the_node_whose_copy_is_damaged(fleet: Fleet, hub: HubServer,
                                                                  tmp_path: Path) -> None:
    roots = {s: tmp_path / f"local-{s}" for s in ("a", "b")}
    nodes = {s: fleet.add_node(s) for s in roots}
    agents = {s: fleet.start(nodes[s], roots[s], "--storage-mode", "local", "--coordination", "none", *VERIFY)
              for s in roots}
    for ag in agents.values():
        fleet.wait_ready(ag)
    name = f"local-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key = node_label_key("ClusterBaseModel", "", name)
    eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in nodes.values()), timeout=90)
    hub.reset_counters()
    hub.throttle("any", bytes_per_s=128 * KiB)
    victim = _shards(roots["a"] / REPO)[0]
    size = victim.stat().st_size
    victim.unlink()
    seen = _watch_until_ready(fleet, [nodes["a"]], key)
    assert "Failed" in seen[nodes["a"]]
    assert fleet.labels(nodes["b"]).get(key) == "Ready"
    assert _served(hub) == {victim.name: size}
    assert verify_deep(roots["a"] / REPO, require_manifest=True) == []


@pytest.fixture
def tiny_root(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_not_enough_space_is_failed_with_the_numbers_nothing_partial_and_ready_once_space_is_freed(
        fleet: Fleet, hub: HubServer, tiny_root: Path, model_src: Path) -> None:
    need = sum(p.stat().st_size for p in model_src.rglob("*") if p.is_file())
    filler = tiny_root / "someone-else.bin"
    filler.write_bytes(b"\0" * (4 * MiB - need // 2))  # leaves about half the model's size free
    node = fleet.add_node("tiny")
    agent = fleet.start(node, tiny_root, "--storage-mode", "local", "--coordination", "none",
                        "--model-retry-max", "1")
    fleet.wait_ready(agent)
    name = f"tiny-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    entry = eventually(lambda: (e := fleet.entry(node, cm_key)) and e.get("status") == "Failed" and e,
                       timeout=60, what="Failed entry")
    message = entry["modelherd"]["message"]
    assert "not enough space" in message and "MiB free" in message and "need" in message, message
    assert fleet.labels(node).get(key) == "Failed"
    assert _metric(agent, "modelherd_model_failures_total", reason="InsufficientSpace") >= 1
    assert 0 < _metric(agent, "modelherd_models_root_free_bytes") < need
    time.sleep(2.0)  # a few retries with back-off: still nothing half-written
    assert not (tiny_root / REPO).exists()
    staging = staging_root(tiny_root)
    assert not staging.exists() or not any(staging.iterdir())
    assert hub.stats()["bytes_served"] == 0, "nothing is fetched that cannot fit"
    filler.unlink()
    eventually(lambda: fleet.labels(node).get(key) == "Ready", timeout=60, what="Ready once space is freed")
    assert verify_deep(tiny_root / REPO, require_manifest=True) == []
    assert _metric(agent, "modelherd_models_root_used_bytes") >= need
