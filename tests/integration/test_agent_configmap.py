"""The node's status ConfigMap at scale, against the real kube-apiserver: one real agent holding hundreds of models,
and one whose ConfigMap reaches the API server's 1 MiB limit.

Every ``local://`` model is a generated folder (shards, index, config, tokenizer) verified in place: no byte moves,
so the figures are the agent's reporting alone (a ``local://`` entry carries no ``config``, as OME's agent writes
it; ``bench/bench_configmap.py`` sizes entries with the metadata of real models). Requests are read from the
agent's own count (``modelherd_api_requests{verb,resource}``, watch streams included).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.ome.keys import configmap_key, node_label_key
from modelherd.agent.reporting.configmap import DATA_LIMIT, data_bytes

from tests.agent_fleet import Agent, Fleet, eventually
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

MODELS = 200


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """The fleet fixture wants a Hub; these models never ask it."""
    with HubServer() as server:
        yield server


def requests_by(agent: Agent) -> dict[tuple[str, str], int]:
    """(verb, resource) -> requests this agent sent so far."""
    out: dict[tuple[str, str], int] = {}
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith("modelherd_api_requests{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
            out[(labels["verb"].strip('"'), labels["resource"].strip('"'))] = int(float(line.split()[-1]))
    return out


def gauge(agent: Agent, name: str) -> float:
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def cm_writes(counts: dict[tuple[str, str], int]) -> int:
    return sum(n for (verb, res), n in counts.items() if res == "configmaps" and verb in ("create", "update"))


def local_models(root: Path, n: int) -> list[Path]:
    folders = []
    for i in range(n):
        folder = root / "local" / f"m{i:03d}"
        make_sharded_model(folder, n_shards=2, shard_bytes=1024, seed=i)
        folders.append(folder)
    return folders


def test_200_models_on_one_node_cost_one_configmap_write_per_state_change_and_none_when_idle(
        fleet: Fleet, tmp_path: Path) -> None:
    root = tmp_path / "models"
    folders = local_models(root, MODELS)
    node = fleet.add_node("many")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    names = [f"m{i:03d}-{fleet.tag}" for i in range(MODELS)]
    t0 = time.monotonic()
    for name, folder in zip(names, folders, strict=True):
        fleet.create_cbm(name, f"local://{folder}")
    keys = [node_label_key("ClusterBaseModel", "", n) for n in names]
    eventually(lambda: all(fleet.labels(node).get(k) == "Ready" for k in keys), timeout=240,
               what=f"{MODELS} models Ready")
    ready_s = time.monotonic() - t0
    cm = fleet.configmap(node) or {}
    eventually(lambda: all(json.loads(((fleet.configmap(node) or {}).get("data") or {}).get(
        configmap_key("ClusterBaseModel", "", n), "{}")).get("status") == "Ready" for n in names), timeout=60,
        what="every entry Ready")
    cm = fleet.configmap(node) or {}
    size = data_bytes(cm)
    entries = [v for k, v in (cm.get("data") or {}).items() if k.startswith("clusterbasemodel.")]
    assert len(entries) == MODELS
    busy = requests_by(agent)
    writes = cm_writes(busy)
    print(f"\n{MODELS} models Ready in {ready_s:.1f}s; ConfigMap {size} bytes ({size / MODELS:.0f} per entry, "
          f"{100 * size / DATA_LIMIT:.1f}% of the limit); ConfigMap writes {writes}; requests by verb and resource: "
          f"{dict(sorted(busy.items()))}")
    # one write per state change (absent -> Ready) and no read before it: the agent's workers do not conflict with
    # one another on the one map (before: 329 writes and 329 reads for these 200 models, 409s between workers)
    assert MODELS <= writes <= MODELS + 3, writes
    assert busy.get(("get", "configmaps"), 0) <= 3, busy
    assert gauge(agent, "modelherd_status_configmap_bytes") == pytest.approx(size, rel=0.02)

    time.sleep(15)  # idle: nothing changed, so nothing is written (watch streams may be re-opened)
    idle = requests_by(agent)
    delta = {k: idle.get(k, 0) - busy.get(k, 0) for k in idle if idle.get(k, 0) != busy.get(k, 0)}
    print(f"idle 15 s: {delta}")
    assert cm_writes(idle) == writes, f"ConfigMap written while idle: {delta}"
    assert not any(verb in ("create", "update", "patch", "delete") for verb, _ in delta), delta


def test_a_full_configmap_fails_only_the_model_that_does_not_fit_and_drains(fleet: Fleet, tmp_path: Path) -> None:
    """Someone else's key fills the ConfigMap to just under 1 MiB: a new model is Failed (label, Event) with the
    reason, the filler and the agent's other entry stay, the agent stays live; once the filler goes, the model is
    retried and Ready."""
    root = tmp_path / "models"
    first, second = local_models(root, 2)
    node = fleet.add_node("full")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    a, b = f"fits-{fleet.tag}", f"spills-{fleet.tag}"
    fleet.create_cbm(a, f"local://{first}")
    akey, bkey = (node_label_key("ClusterBaseModel", "", n) for n in (a, b))
    eventually(lambda: fleet.labels(node).get(akey) == "Ready", timeout=60, what="the first model Ready")
    eventually(lambda: (fleet.entry(node, configmap_key("ClusterBaseModel", "", a)) or {}).get("status") == "Ready",
               timeout=15, what="the first model's entry Ready")
    cm = fleet.configmap(node) or {}
    used = data_bytes(cm)
    filler = "x" * (DATA_LIMIT - used - len("zz-filler") - 200)  # room for no entry of ~1-2 KiB
    fleet.core.patch_namespaced_config_map(node, fleet.namespace, {"data": {"zz-filler": filler}})
    fleet.create_cbm(b, f"local://{second}")
    eventually(lambda: fleet.labels(node).get(bkey) == "Failed", timeout=60, what="the second model Failed")
    events = fleet.core.list_namespaced_event(fleet.namespace).items + fleet.core.list_namespaced_event(
        "default").items
    said = [e.message for e in events if e.involved_object.name == b and e.reason == "Failed"]
    assert said and "1 MiB" in said[0], said
    cm = fleet.configmap(node) or {}
    data: dict[str, Any] = cm.get("data") or {}
    assert data["zz-filler"] == filler, "someone else's key untouched"
    assert json.loads(data[configmap_key("ClusterBaseModel", "", a)])["status"] == "Ready"
    assert configmap_key("ClusterBaseModel", "", b) not in data
    assert fleet.labels(node).get(akey) == "Ready"
    assert agent.proc.poll() is None and agent.get("/livez")[0] == 200
    assert gauge(agent, "modelherd_status_configmap_bytes") > 0.99 * DATA_LIMIT - 2048
    assert "ConfigMapFull" in agent.get("/metrics")[1]

    fleet.core.patch_namespaced_config_map(node, fleet.namespace, {"data": {"zz-filler": None}})
    eventually(lambda: fleet.labels(node).get(bkey) == "Ready", timeout=90, what="Ready once there is room")
    # the label is written first, the entry right after (OME's order)
    entry = eventually(lambda: (e := fleet.entry(node, configmap_key("ClusterBaseModel", "", b)))
                       and e.get("status") == "Ready" and e, timeout=15, what="the entry Ready once there is room")
    assert entry["status"] == "Ready"
