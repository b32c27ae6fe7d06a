"""Model lifecycle end to end (issue #10): spec changes, leaving a node, deletion, staging GC.

Real ``modelherd agent`` processes (one per simulated node) against the real kube-apiserver, a shared (or per-node)
models folder, and the loopback Hub serving two revisions of one repository.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from modelherd.agent.ome.keys import configmap_key, node_label_key
from modelherd.storage.cleanup import staging_key
from modelherd.storage.manifest import MANIFEST_NAME
from modelherd.storage.paths import STAGING_DIRNAME
from modelherd.storage.verify import verify_deep

from tests.agent_fleet import Fleet, eventually
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

KiB = 1024
REPO = "org/life-llama"
SHARED = ("--storage-mode", "shared", "--coordination", "kubernetes")
LOCAL = ("--storage-mode", "local", "--coordination", "none")


@pytest.fixture(scope="module")
def revisions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Two revisions of one model: different bytes in every shard."""
    out: dict[str, tuple[Path, int]] = {}
    for rev, seed in (("v1", 1), ("v2", 2)):
        folder = tmp_path_factory.mktemp(f"src-{rev}") / "life-llama"
        make_sharded_model(folder, n_shards=4, shard_bytes=256 * KiB, seed=seed)
        out[rev] = (folder, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
    return out


@pytest.fixture
def hub(revisions: dict[str, tuple[Path, int]]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, revisions["v1"][0])  # main
        server.add_repo(REPO, revisions["v2"][0], revision="v2")
        yield server



def _root(tmp_path: Path, name: str = "shared-models") -> Path:
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    return root


def _label(fleet: Fleet, node: str, key: str) -> str | None:
    return fleet.labels(node).get(key)


def _log_states(fleet: Fleet, state: str) -> list[dict[str, Any]]:
    """Every JSON log record of every agent with ``state``."""
    out = []
    for line in fleet.logs().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("state") == state:
            out.append(rec)
    return out


def _staging_of(root: Path, dest: Path) -> list[str]:
    folder = root / STAGING_DIRNAME
    key = staging_key(root, dest)
    return sorted(n for n in os.listdir(folder) if n.startswith(key + ".")) if folder.is_dir() else []


class LabelHistory:
    """Every value one label takes on the given nodes, from a watch on Nodes that starts at a list made in
    ``__init__``: every write the API server accepts after that list is delivered (a 50 ms poll can miss a short
    ``Updating``). ``values[node]`` holds the distinct consecutive values (``None``: absent), the first one from the
    list; :meth:`caught_up` tells whether the watch has delivered a given resourceVersion of a node yet."""

    def __init__(self, fleet: Fleet, nodes: list[str], key: str) -> None:
        self.core, self.nodes, self.key = fleet.core, set(nodes), key
        self.selector = f"mh-test={fleet.tag}"
        self.values: dict[str, list[str | None]] = {n: [] for n in nodes}
        self.rv: dict[str, int] = dict.fromkeys(nodes, 0)
        self.relists = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._w = watch.Watch()
        rv = self._list()
        self._t = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self._t.start()

    def _record(self, node: Any) -> None:
        name = node.metadata.name
        if name not in self.nodes:
            return
        value = (node.metadata.labels or {}).get(self.key)
        with self._lock:
            self.rv[name] = max(self.rv[name], int(node.metadata.resource_version))
            if not self.values[name] or self.values[name][-1] != value:
                self.values[name].append(value)

    def _list(self) -> str:
        listed = self.core.list_node(label_selector=self.selector)
        for node in listed.items:
            self._record(node)
        return str(listed.metadata.resource_version)

    def _run(self, rv: str) -> None:
        while not self._stop.is_set():
            try:
                for ev in self._w.stream(self.core.list_node, label_selector=self.selector, resource_version=rv,
                                         timeout_seconds=5):
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._record(ev["object"])
                    rv = ev["object"].metadata.resource_version or rv
                    if self._stop.is_set():
                        return
            except Exception:  # the watch broke or its resourceVersion expired: carry on from a new list
                if self._stop.is_set():
                    return
                with self._lock:
                    self.relists += 1
                rv = self._list()

    def caught_up(self, node: str, rv: int) -> bool:
        with self._lock:
            return self.rv[node] >= rv

    def of(self, node: str) -> list[str | None]:
        with self._lock:
            return list(self.values[node])

    def stop(self) -> None:
        self._stop.set()
        self._w.stop()
        self._t.join(10)


def _label_and_rv(fleet: Fleet, node: str, key: str) -> tuple[str | None, int]:
    """The label's value on the API server now, and the Node's resourceVersion it was read at."""
    meta = json.loads(fleet.core.read_node(node, _preload_content=False).data)["metadata"]
    return (meta.get("labels") or {}).get(key), int(meta["resourceVersion"])


def _start_all(fleet: Fleet, nodes: list[str], root: Path | dict[str, Path], *args: str) -> None:
    for n in nodes:
        fleet.start(n, root[n] if isinstance(root, dict) else root, *args)
    for n in nodes:
        fleet.wait_ready(fleet.agents[n])


# --------------------------------------------------------------------------------------------------- spec changes
def test_revision_change_on_shared_storage_downloads_once_keeps_open_files_and_is_ready_again(
        fleet: Fleet, hub: HubServer, tmp_path: Path, revisions: dict[str, tuple[Path, int]]) -> None:
    root = _root(tmp_path)
    nodes = [fleet.add_node(s) for s in ("r1", "r2")]
    _start_all(fleet, nodes, root, *SHARED)
    name = f"rev-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    eventually(lambda: all(_label(fleet, n, key) == "Ready" for n in nodes), timeout=90, what="v1 Ready")
    dest = root / REPO
    shard = sorted(p for p in dest.iterdir() if p.suffix == ".safetensors")[0]
    old_bytes = shard.read_bytes()
    held = shard.open("rb")  # a "running server" holding a file of the old revision open throughout
    try:
        # a change that is not the storage identity (labels, annotations) does nothing
        hub.reset_counters()
        fleet.patch_model("clusterbasemodels", name, {"metadata": {"labels": {"team": "x"},
                                                                    "annotations": {"note": "y"}}})
        time.sleep(2.0)
        assert hub.stats()["requests"] == {}, "a metadata-only change must not reach the origin"
        assert all(_label(fleet, n, key) == "Ready" for n in nodes)

        hub.throttle("cdn", bytes_per_s=600 * KiB)  # the download takes a while
        # every label write from here on, from a watch (a poll can miss a short Updating on a loaded machine)
        history = LabelHistory(fleet, nodes, key)
        try:
            fleet.patch_model("clusterbasemodels", name, {"spec": {"storage": {"storageUri": f"hf://{REPO}@v2"}}})

            def v2_ready() -> bool:
                return all(_label(fleet, n, key) == "Ready" and
                           (fleet.entry(n, cm_key) or {}).get("modelherd", {}).get("storageUri") == f"hf://{REPO}@v2"
                           for n in nodes)
            eventually(v2_ready, timeout=120, what="v2 Ready on both nodes")
            # the final state is what the API server says now, not the last thing a sampler happened to see
            final = {n: _label_and_rv(fleet, n, key) for n in nodes}
            # the history is complete up to that read once the watch has delivered the Node's resourceVersion
            eventually(lambda: all(history.caught_up(n, final[n][1]) for n in nodes), timeout=30,
                       what="the label watch caught up with the final read")
        finally:
            history.stop()
        for n in nodes:
            seen = history.of(n)
            assert final[n][0] == "Ready", f"{n} is {final[n][0]} after v2 Ready: {seen}"
            assert seen[0] == "Ready", f"{n} was not Ready before the spec change: {seen}"
            assert "Updating" in seen, f"{n} kept a stale Ready across the spec change: {seen}" + (
                f" (the watch re-listed {history.relists} times)" if history.relists else "")
            assert set(seen) <= {"Ready", "Updating"}, f"{n}'s label left Ready/Updating: {seen}"
        assert hub.stats()["bytes_served"] == revisions["v2"][1], "exactly one download of v2 for both nodes"
        held.seek(0)
        assert held.read() == old_bytes, "an open file of the old revision must stay readable, unchanged"
    finally:
        held.close()
    assert shard.read_bytes() == (revisions["v2"][0] / shard.name).read_bytes()
    assert verify_deep(dest, require_manifest=True) == []
    assert json.loads((dest / MANIFEST_NAME).read_text())["source_uri"] == f"hf://{REPO}@v2"
    assert _staging_of(root, dest) == []


# --------------------------------------------------------------------------------------------------- leaving a node
def test_deselecting_one_node_on_shared_storage_removes_its_label_and_key_but_keeps_the_files(
        fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _root(tmp_path)
    a, b = fleet.add_node("d1", {"gpu": "h200"}), fleet.add_node("d2", {"gpu": "h200"})
    _start_all(fleet, [a, b], root, *SHARED)
    name = f"desel-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}", selector={"gpu": "h200"})
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    eventually(lambda: _label(fleet, a, key) == "Ready" and _label(fleet, b, key) == "Ready", timeout=90,
               what="Ready on both")
    fleet.label_node(b, {"gpu": "a100"})
    eventually(lambda: key not in fleet.labels(b) and fleet.entry(b, cm_key) is None, timeout=30,
               what="label and key gone from the deselected node")
    time.sleep(1.0)
    assert _label(fleet, a, key) == "Ready"
    assert verify_deep(root / REPO, require_manifest=True) == [], "shared files must stay for the other nodes"
    assert _log_states(fleet, "FilesRemoved") == []


def test_local_storage_deselect_and_delete_remove_each_nodes_own_copy(
        fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    a, b = fleet.add_node("l1", {"gpu": "h200"}), fleet.add_node("l2", {"gpu": "h200"})
    roots = {a: _root(tmp_path, "local-a"), b: _root(tmp_path, "local-b")}
    _start_all(fleet, [a, b], roots, *LOCAL)
    name = f"local-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}", selector={"gpu": "h200"})
    key = node_label_key("ClusterBaseModel", "", name)
    eventually(lambda: _label(fleet, a, key) == "Ready" and _label(fleet, b, key) == "Ready", timeout=90,
               what="Ready on both")
    assert (roots[a] / REPO / MANIFEST_NAME).is_file() and (roots[b] / REPO / MANIFEST_NAME).is_file()
    fleet.label_node(b, {"gpu": "a100"})
    eventually(lambda: not (roots[b] / REPO).exists(), timeout=30, what="b's own copy removed after deselect")
    assert key not in fleet.labels(b)
    assert verify_deep(roots[a] / REPO, require_manifest=True) == [], "a's copy is a's"
    fleet.delete_model("clusterbasemodels", name)
    eventually(lambda: not (roots[a] / REPO).exists() and key not in fleet.labels(a), timeout=30,
               what="a's copy and label removed after delete")
    assert not (roots[a] / "org").exists(), "the emptied org/ folder goes too"
    assert roots[a].is_dir() and roots[b].is_dir(), "the models root itself is never removed"


# --------------------------------------------------------------------------------------------------- deletion
def test_deleting_a_model_on_shared_storage_removes_its_files_exactly_once(
        fleet: Fleet, hub: HubServer, tmp_path: Path, api_client: Any) -> None:
    root = _root(tmp_path)
    nodes = [fleet.add_node(s) for s in ("x1", "x2", "x3")]
    _start_all(fleet, nodes, root, *SHARED)
    name = f"del-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    eventually(lambda: all(_label(fleet, n, key) == "Ready" for n in nodes), timeout=90, what="Ready on all")
    fleet.delete_model("clusterbasemodels", name)
    eventually(lambda: all(key not in fleet.labels(n) and fleet.entry(n, cm_key) is None for n in nodes),
               timeout=30, what="labels and keys gone everywhere")
    eventually(lambda: not (root / REPO).exists(), timeout=30, what="files removed")
    # every node decided (one removed, the others found nothing to do); exactly one removal
    eventually(lambda: len(_log_states(fleet, "FilesRemoved")) + len(_log_states(fleet, "FilesKept")) == 3,
               timeout=30, what="every node decided about the files")
    removed = _log_states(fleet, "FilesRemoved")
    assert len(removed) == 1, removed
    kept = [r["reason"] for r in _log_states(fleet, "FilesKept")]
    assert all(r in ("another node already removed the files", "no files to remove") for r in kept), kept
    leases = json.loads(client.CoordinationV1Api(api_client).list_namespaced_lease(
        fleet.namespace, _preload_content=False).data)["items"]
    phases = {it["metadata"]["annotations"].get("modelherd.io/phase") for it in leases
              if it["metadata"]["annotations"].get("modelherd.io/destination") == REPO}
    assert phases == {"Removed"}, phases
    assert _staging_of(root, root / REPO) == []
    time.sleep(2.0)
    assert all(key not in fleet.labels(n) and fleet.entry(n, cm_key) is None for n in nodes), "nothing comes back"


def test_a_second_model_at_the_same_path_keeps_the_files(fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _root(tmp_path)
    nodes = [fleet.add_node(s) for s in ("p1", "p2")]
    _start_all(fleet, nodes, root, *SHARED)
    first, second = f"first-{fleet.tag}", f"second-{fleet.tag}"
    fleet.create_cbm(first, f"hf://{REPO}", path=str(root / "same"))
    fleet.create_bm(second, f"hf://{REPO}", path=str(root / "same"))
    k1 = node_label_key("ClusterBaseModel", "", first)
    k2 = node_label_key("BaseModel", fleet.namespace, second)
    eventually(lambda: all(_label(fleet, n, k) == "Ready" for n in nodes for k in (k1, k2)), timeout=90,
               what="both Ready")
    fleet.delete_model("clusterbasemodels", first)
    eventually(lambda: all(k1 not in fleet.labels(n) for n in nodes), timeout=30, what="first's labels gone")
    eventually(lambda: len(_log_states(fleet, "FilesKept")) == 2, timeout=30, what="both nodes decided")
    assert all("points at" in r["reason"] for r in _log_states(fleet, "FilesKept"))
    assert _log_states(fleet, "FilesRemoved") == []
    assert verify_deep(root / "same", require_manifest=True) == []
    assert all(_label(fleet, n, k2) == "Ready" for n in nodes)


def test_the_reserve_label_keeps_the_files_of_a_deleted_model(fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _root(tmp_path)
    node = fleet.add_node("keep")
    _start_all(fleet, [node], root, *SHARED)
    name = f"reserved-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    fleet.patch_model("clusterbasemodels", name, {"metadata": {"labels": {"models.ome/reserve-model-artifact":
                                                                          "true"}}})
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    def ready_and_reserved() -> bool:
        entry = fleet.entry(node, cm_key) or {}
        return entry.get("status") == "Ready" and entry.get("modelherd", {}).get("reserve") == "true"
    eventually(ready_and_reserved, timeout=90, what="Ready with the reserve label recorded")
    fleet.delete_model("clusterbasemodels", name)
    eventually(lambda: key not in fleet.labels(node) and fleet.entry(node, cm_key) is None, timeout=30,
               what="label and key gone")
    eventually(lambda: _log_states(fleet, "FilesKept"), timeout=30, what="decided")
    assert "reserve-model-artifact" in _log_states(fleet, "FilesKept")[0]["reason"]
    assert verify_deep(root / REPO, require_manifest=True) == []


def test_a_delete_during_a_download_leaves_no_label_key_or_staging(
        fleet: Fleet, hub: HubServer, tmp_path: Path, revisions: dict[str, tuple[Path, int]]) -> None:
    root = _root(tmp_path)
    hub.throttle("cdn", bytes_per_s=200 * KiB)
    nodes = [fleet.add_node(s) for s in ("u1", "u2")]
    _start_all(fleet, nodes, root, *SHARED)
    name = f"mid-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    dest = root / REPO
    eventually(lambda: hub.stats()["bytes_served"] > revisions["v1"][1] // 4 and _staging_of(root, dest),
               timeout=60, what="a quarter downloaded into staging")
    assert all(_label(fleet, n, key) in ("Updating", None) for n in nodes)
    t0 = time.monotonic()
    fleet.delete_model("clusterbasemodels", name)

    def gone() -> bool:
        return all(key not in fleet.labels(n) and fleet.entry(n, cm_key) is None for n in nodes) \
            and _staging_of(root, dest) == [] and not dest.exists()
    eventually(gone, timeout=30, what="no label, key, staging or files left")
    assert time.monotonic() - t0 < 20, "a delete cancels the download at once"
    served = hub.stats()["bytes_served"]
    time.sleep(3.0)
    assert all(key not in fleet.labels(n) and fleet.entry(n, cm_key) is None for n in nodes), "nothing comes back"
    assert _staging_of(root, dest) == [] and not dest.exists()
    assert hub.stats()["bytes_served"] - served < 256 * KiB, "the download stopped"


# --------------------------------------------------------------------------------------------------- staging GC
def test_staging_left_by_a_crash_that_no_one_resumes_is_collected_under_the_lease(
        fleet: Fleet, hub: HubServer, tmp_path: Path, api_client: Any) -> None:
    root = _root(tmp_path)
    staging = root / STAGING_DIRNAME
    staging.mkdir()
    old = time.time() - 2 * 3600

    def planted(dest: Path, writer: str, *, age: float | None) -> Path:
        folder = staging / f"{staging_key(root, dest)}.{writer}.3"
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "part.safetensors").write_bytes(b"x" * 1000)
        if age is not None:
            for p in (folder / "sub" / "part.safetensors", folder / "sub", folder):
                os.utime(p, (age, age))
        return folder

    orphan = planted(root / "org/gone-model", "crashed-node", age=old)   # no model wants it, 2 h old
    fresh = planted(root / "org/someone-pulls", "cli-node", age=None)     # no model wants it, but just written
    wanted_dest = root / "org/wanted"
    wanted = planted(wanted_dest, "crashed-node", age=old)               # a model wants it: stale only after 24 h
    foreign = staging / "not-a-staging-name"
    foreign.mkdir()
    os.utime(foreign, (old, old))
    nodes = [fleet.add_node(s) for s in ("g1", "g2")]
    fleet.env_extra["MODELHERD_STAGING_GC_INTERVAL_S"] = "0.5"
    name = f"wanted-{fleet.tag}"
    # the wanted model's storage points at a repo that does not exist: it stays Failed, never resumes that staging
    fleet.create_cbm(name, "hf://org/does-not-exist", path=str(wanted_dest))
    _start_all(fleet, nodes, root, *SHARED)
    eventually(lambda: not orphan.exists(), timeout=30, what="the orphaned staging collected")
    time.sleep(2.0)
    assert fresh.is_dir(), "staging written just now may have a live writer"
    assert wanted.is_dir(), "staging of a wanted model is kept until the stale bound"
    assert foreign.is_dir(), "names that are not staging names are never touched"
    collected = [line for line in fleet.logs().splitlines() if "removed orphaned staging" in line]
    assert len(collected) == 1, collected
    leases = json.loads(client.CoordinationV1Api(api_client).list_namespaced_lease(
        fleet.namespace, _preload_content=False).data)["items"]
    assert any(it["metadata"]["name"].startswith("mh-modelherd-staging-") for it in leases)
