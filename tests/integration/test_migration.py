"""Migration from OME's model agent: its leftovers (the model's files without a completion manifest, ConfigMap
entries and node labels saying Ready) on three nodes sharing one models root; modelherd's agents start over them.
No label ever leaves Ready, no file body comes from the origin, the copy is adopted in place (same inodes) once, and
every entry is taken over (modelherd's fields, OME's config re-parsed)."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelherd.agent.ome.entry import render_entry
from modelherd.agent.ome.keys import configmap_key, node_label_key

from tests.agent_fleet import Fleet, eventually
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess]

KiB = 1024
REPO = "meta-llama/Llama-mig"


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "llama"
    make_sharded_model(folder, n_shards=4, shard_bytes=256 * KiB)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0"}))
    return folder


@pytest.fixture
def hub(model_src: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, model_src)
        yield server



def _ome_leftovers(fleet: Fleet, name: str, dest: Path, shorts: tuple[str, ...]) -> tuple[str, str, list[str]]:
    """What OME's agent leaves for a ClusterBaseModel ``name`` at ``dest``: nodes labelled Ready, a per-node
    ConfigMap with OME's Ready entry, and the CR. Returns (label key, ConfigMap key, nodes)."""
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    nodes = [fleet.add_node(s, {key: "Ready"}) for s in shorts]
    ome_entry = render_entry(None, name=name, status="Ready", config=None, progress=None)  # OME's, no metadata
    for node in nodes:
        fleet.core.create_namespaced_config_map(fleet.namespace, {
            "metadata": {"name": node, "labels": {"models.ome/basemodel-status": "true", "node": node}},
            "data": {cm_key: ome_entry}})
    fleet.create_cbm(name, f"hf://{REPO}", path=str(dest))
    return key, cm_key, nodes

def test_agents_started_over_omes_leftovers_keep_every_label_ready_and_fetch_no_body(
        fleet: Fleet, hub: HubServer, model_src: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    dest = root / REPO
    shutil.copytree(model_src, dest)  # what OME's agent left: the files, no completion manifest
    (dest / "NOTES.md").write_text("staged by the platform team\n")
    inodes = {p.name: p.stat().st_ino for p in dest.iterdir()}
    key, cm_key, nodes = _ome_leftovers(fleet, f"llama-{fleet.tag}", dest, ("a", "b", "c"))

    seen: set[str | None] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            for node in nodes:
                with contextlib.suppress(Exception):
                    seen.add(fleet.labels(node).get(key))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for node in nodes:
            fleet.start(node, root, "--storage-mode", "shared", "--coordination", "kubernetes")

        def taken_over() -> bool:
            entries = [fleet.entry(n, cm_key) or {} for n in nodes]
            return all(e.get("status") == "Ready" and "modelherd" in e for e in entries)
        eventually(taken_over, timeout=90, what="every entry taken over by modelherd")
    finally:
        stop.set()
        sampler.join(5)
    assert seen == {"Ready"}, f"a label left Ready during the migration: {seen}"
    assert (dest / ".modelherd-manifest.json").is_file(), "the copy was adopted (published)"
    assert hub.stats()["bytes_served"] == 0, "no file body from the origin"
    assert {p.name: p.stat().st_ino for p in dest.iterdir() if p.name in inodes} == inodes, "adopted in place"
    assert (dest / "NOTES.md").read_text() == "staged by the platform team\n"
    entry = fleet.entry(nodes[0], cm_key) or {}
    assert entry.get("config", {}).get("modelArchitecture") == "LlamaForCausalLM", entry  # re-parsed from the files
    assert "Traceback" not in fleet.logs()


def test_a_leftover_copy_that_is_not_whole_leaves_ready_and_is_repaired_fetching_only_the_damage(
        fleet: Fleet, hub: HubServer, model_src: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    dest = root / REPO
    shutil.copytree(model_src, dest)
    shard = sorted(dest.glob("*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    name = f"cut-{fleet.tag}"
    key, cm_key, (node,) = _ome_leftovers(fleet, name, dest, ("a",))
    fleet.start(node, root, "--storage-mode", "shared", "--coordination", "kubernetes")
    eventually(lambda: (dest / ".modelherd-manifest.json").is_file() and fleet.labels(node).get(key) == "Ready"
               and "modelherd" in (fleet.entry(node, cm_key) or {}), timeout=60, what="repaired and Ready")
    failed = [e for e in fleet.core.list_namespaced_event("default").items  # Failed may last only a moment
              if e.involved_object.name == name and e.reason == "Failed"]
    assert failed and "is not whole" in failed[0].message, [e.message for e in failed]
    assert hub.stats()["bytes_served"] == (model_src / shard.name).stat().st_size, "only the damaged shard"


def test_a_leftover_shard_with_other_bytes_of_the_same_size_is_taken_out_of_service_by_the_hash_and_repaired(
        fleet: Fleet, hub: HubServer, model_src: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    dest = root / REPO
    shutil.copytree(model_src, dest)
    shard = sorted(dest.glob("*.safetensors"))[-1]
    with shard.open("r+b") as f:  # same size, headers intact: only hashing can tell
        f.seek(shard.stat().st_size - 10)
        f.write(b"\xff" * 10)
    name = f"flip-{fleet.tag}"
    key, cm_key, (node,) = _ome_leftovers(fleet, name, dest, ("a",))
    seen: list[str | None] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(Exception):
                seen.append(fleet.labels(node).get(key))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fleet.start(node, root, "--storage-mode", "shared", "--coordination", "kubernetes")
        eventually(lambda: (dest / ".modelherd-manifest.json").is_file() and fleet.labels(node).get(key) == "Ready"
                   and "modelherd" in (fleet.entry(node, cm_key) or {}), timeout=60, what="repaired and Ready")
    finally:
        stop.set()
        sampler.join(5)
    events = [e for e in fleet.core.list_namespaced_event("default").items
              if e.involved_object.name == name and e.reason == "Failed"]
    assert events and "not the origin's" in events[0].message, [e.message for e in events]
    assert hub.stats()["bytes_served"] == (model_src / shard.name).stat().st_size, "only the damaged shard"
