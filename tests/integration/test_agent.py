"""The node agent end to end: real ``modelherd agent`` processes (one per simulated node), the real
kube-apiserver with OME's CRDs, Node objects, a shared models folder, and the loopback Hub counting origin bytes.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from modelherd.agent.ome.keys import configmap_key, node_label_key, parse_configmap_key
from modelherd.storage.verify import verify_deep

from tests.agent_fleet import Fleet, eventually
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

KiB = 1024
REPO = "org/tiny-llama"
TOKEN = "hf_AgentSecretTokenNeverLogged0123456789"


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    make_sharded_model(folder, n_shards=8, shard_bytes=256 * KiB)
    # a config OME's Llama loader accepts, so the entry carries the model's metadata
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0"}))
    return folder, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hub(model_src: tuple[Path, int]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, model_src[0])
        yield server



def _shared_root(tmp_path: Path) -> Path:
    root = tmp_path / "shared-models"
    root.mkdir(exist_ok=True)
    return root


def _label(fleet: Fleet, node: str, key: str) -> str | None:
    return fleet.labels(node).get(key)


def _all_ready(fleet: Fleet, nodes: list[str], key: str) -> bool:
    return all(_label(fleet, n, key) == "Ready" for n in nodes)


def test_cluster_model_selecting_two_of_three_nodes_is_ready_on_exactly_those_with_one_download(
        fleet: Fleet, hub: HubServer, tmp_path: Path, model_src: tuple[Path, int]) -> None:
    root = _shared_root(tmp_path)
    a, b, c = (fleet.add_node(s, {"gpu": "h200" if s != "c" else "a100"}) for s in ("a", "b", "c"))
    agents = [fleet.start(n, root, "--storage-mode", "shared", "--coordination", "kubernetes") for n in (a, b, c)]
    for ag in agents:
        fleet.wait_ready(ag)
    name = f"llama-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}", selector={"gpu": "h200"})
    key = node_label_key("ClusterBaseModel", "", name)
    eventually(lambda: _all_ready(fleet, [a, b], key), timeout=90, what="label Ready on a and b")

    assert hub.stats()["bytes_served"] == model_src[1], "origin bytes must be exactly one model"
    cm_key = configmap_key("ClusterBaseModel", "", name)
    for node in (a, b):
        entry = fleet.entry(node, cm_key)
        assert entry is not None and entry["status"] == "Ready" and entry["name"] == name
        assert "progress" not in entry
        assert entry["config"]["modelArchitecture"] == "LlamaForCausalLM"
        cm = fleet.configmap(node)
        assert cm is not None and cm["metadata"]["labels"]["models.ome/basemodel-status"] == "true"
        assert cm["metadata"]["labels"]["node"] == node
    time.sleep(1.0)
    assert key not in fleet.labels(c)
    assert fleet.entry(c, cm_key) is None
    assert verify_deep(root / REPO, require_manifest=True) == []
    # each pull logged where its time went: the holder's marks in order, a follower's wake-up before its check
    timelines = {}
    for ag in agents[:2]:
        for line in ag.log.read_text().splitlines():
            rec = json.loads(line)
            if "timeline" in rec and name in rec["model"]:
                timelines[rec["role"]] = list(rec["timeline"].items())
    holder = timelines["holder"]
    assert [m for m, _ in holder] == ["checked", "updating", "lease", "downloading", "staged", "published", "released",
                                      "pulled", "reported"]
    assert [t for _, t in holder] == sorted(t for _, t in holder) and holder[-1][1] > 0
    if "follower" in timelines:  # unless it first looked after the holder was done (then it was Ready at once)
        marks = dict(timelines["follower"])
        assert marks["lease"] <= marks["complete"] <= marks["pulled"] <= marks["reported"]


def test_base_model_token_from_a_secret_reaches_the_hub_and_nowhere_else(
        fleet: Fleet, hub: HubServer, tmp_path: Path, model_src: tuple[Path, int], api_client: Any) -> None:
    private = "org/private-llama"
    hub.add_repo(private, model_src[0], token=TOKEN)
    root = _shared_root(tmp_path)
    node = fleet.add_node("solo")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    fleet.core.create_namespaced_secret(fleet.namespace, {
        "metadata": {"name": "hf-secret"}, "data": {"hf-token": base64.b64encode(TOKEN.encode()).decode()}})
    name = f"private-{fleet.tag}"
    fleet.create_bm(name, f"hf://{private}", key="hf-secret", parameters={"secretKey": "hf-token"})
    key = node_label_key("BaseModel", fleet.namespace, name)
    eventually(lambda: _label(fleet, node, key) == "Ready", timeout=60, what="private model Ready")
    assert verify_deep(root / private, require_manifest=True) == []

    # the token is in none of: ConfigMaps, Events, Leases, node labels, logs, metrics
    cm_text = json.dumps(fleet.configmap(node))
    events = json.loads(fleet.core.list_namespaced_event(fleet.namespace, _preload_content=False).data)
    leases = json.loads(client.CoordinationV1Api(api_client).list_namespaced_lease(
        fleet.namespace, _preload_content=False).data)
    status, metrics = agent.get("/metrics")
    assert status == 200
    for where, text in (("configmap", cm_text), ("events", json.dumps(events)), ("leases", json.dumps(leases)),
                        ("labels", json.dumps(fleet.labels(node))), ("metrics", metrics), ("logs", fleet.logs())):
        assert TOKEN not in text, f"token leaked into {where}"
    reasons = {e["reason"] for e in events["items"] if e["involvedObject"]["name"] == name}
    assert "Ready" in reasons


def test_node_label_change_adds_and_removes_a_model(fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _shared_root(tmp_path)
    node = fleet.add_node("n1", {"zone": "b"})
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    name = f"zoned-{fleet.tag}"
    affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}
    fleet.create_cbm(name, f"hf://{REPO}", affinity=affinity)
    key = node_label_key("ClusterBaseModel", "", name)
    time.sleep(2.0)
    assert key not in fleet.labels(node), "zone=b must not be selected by zone In [a]"
    fleet.label_node(node, {"zone": "a"})
    eventually(lambda: _label(fleet, node, key) == "Ready", timeout=60, what="selected after relabel")
    fleet.label_node(node, {"zone": "c"})
    eventually(lambda: key not in fleet.labels(node), timeout=30, what="label removed after relabel")
    # the label goes first, then the entry (one more request): read the entry once that request had its time
    eventually(lambda: fleet.entry(node, configmap_key("ClusterBaseModel", "", name)) is None, timeout=10,
               what="entry removed after the label")


def test_restarting_every_agent_keeps_labels_ready_and_sends_no_origin_request(
        fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _shared_root(tmp_path)
    nodes = [fleet.add_node(s) for s in ("r1", "r2", "r3")]
    for n in nodes:
        fleet.start(n, root, "--storage-mode", "shared", "--coordination", "kubernetes")
    for n in nodes:
        fleet.wait_ready(fleet.agents[n])
    names = [f"m{i}-{fleet.tag}" for i in range(3)]
    for i, name in enumerate(names):
        fleet.create_cbm(name, f"hf://{REPO}", path=str(root / f"copy{i}"))
    keys = [node_label_key("ClusterBaseModel", "", n) for n in names]
    eventually(lambda: all(_all_ready(fleet, nodes, k) for k in keys), timeout=120, what="all Ready")

    hub.reset_counters()
    flaps: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for n in nodes:
                labels = fleet.labels(n)
                flaps.extend(f"{n}:{k}={labels.get(k)}" for k in keys if labels.get(k) != "Ready")
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for n in nodes:
            assert fleet.stop(n) == 0
        started = time.monotonic()
        for n in nodes:
            fleet.start(n, root, "--storage-mode", "shared", "--coordination", "kubernetes")
        for n in nodes:
            fleet.wait_ready(fleet.agents[n])
        time.sleep(3.0)  # long enough for every worker to have reconciled every model
    finally:
        stop.set()
        sampler.join(5)
    assert flaps == []
    assert hub.stats()["requests"] == {}, "a restart must not ask the origin anything"
    assert time.monotonic() - started < 60


def test_deleted_configmap_comes_back_with_its_labels(fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _shared_root(tmp_path)
    node = fleet.add_node("cm")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    name = f"keep-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    cm_key = configmap_key("ClusterBaseModel", "", name)
    eventually(lambda: (fleet.entry(node, cm_key) or {}).get("status") == "Ready", timeout=60, what="Ready entry")
    before = fleet.entry(node, cm_key)
    fleet.core.delete_namespaced_config_map(node, fleet.namespace)

    def restored() -> bool:
        cm = fleet.configmap(node)
        return cm is not None and cm["metadata"].get("labels", {}).get("models.ome/basemodel-status") == "true" \
            and json.loads(cm["data"][cm_key]) == before
    eventually(restored, timeout=30, what="ConfigMap restored with labels and entry")


def test_a_restart_keeps_the_entry_of_a_live_model_whose_configmap_key_is_truncated(
        fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    """A 250-character name gets a truncated key (OME's ``<hash>-<suffix>``), which parses into a name no CR has:
    the orphan sweep at start-up compares keys, so it keeps the live model's entry and removes only orphans."""
    root = _shared_root(tmp_path)
    node = fleet.add_node("trunc")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    live, gone, short = (f"{what}-{fleet.tag}-" for what in ("live", "gone", "short"))
    live, gone = (prefix + "a" * (250 - len(prefix)) for prefix in (live, gone))
    short = short + "m"
    keys = {n: configmap_key("ClusterBaseModel", "", n) for n in (live, gone, short)}
    for n in (live, gone):
        assert len(keys[n]) == 253 and parse_configmap_key(keys[n]) != ("ClusterBaseModel", "", n)
    for i, n in enumerate((live, gone, short)):
        fleet.create_cbm(n, f"hf://{REPO}", path=str(root / f"copy{i}"))
    eventually(lambda: all((fleet.entry(node, k) or {}).get("status") == "Ready" for k in keys.values()),
               timeout=90, what="three Ready entries")
    label = node_label_key("ClusterBaseModel", "", live)
    before = fleet.entry(node, keys[live])

    assert fleet.stop(node) == 0
    fleet.delete_model("clusterbasemodels", gone)  # deleted while the agent is down: orphans at the restart
    fleet.delete_model("clusterbasemodels", short)
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    eventually(lambda: fleet.entry(node, keys[gone]) is None and fleet.entry(node, keys[short]) is None,
               timeout=30, what="the orphans' entries removed by the sweep")
    time.sleep(3.0)  # every worker has had its turn at what the sweep enqueued
    assert fleet.entry(node, keys[live]) == before
    assert fleet.labels(node).get(label) == "Ready"
    assert (root / "copy0").is_dir()


def test_bad_models_fail_with_their_reason_and_the_agent_keeps_serving_others(
        fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _shared_root(tmp_path)
    node = fleet.add_node("bad")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    bad = {
        f"s3-{fleet.tag}": ("s3://bucket/model", None, "not supported"),
        f"outside-{fleet.tag}": (f"hf://{REPO}", "/etc/modelherd-escape", "not inside the models root"),
        f"nofile-{fleet.tag}": ("hf://org/does-not-exist", None, "not"),
    }
    for name, (uri, path, _) in bad.items():
        fleet.create_cbm(name, uri, path=path)
    good = f"good-{fleet.tag}"
    fleet.create_cbm(good, f"hf://{REPO}")
    eventually(lambda: _label(fleet, node, node_label_key("ClusterBaseModel", "", good)) == "Ready", timeout=60,
               what="the good model Ready")
    for name, (_, _, why) in bad.items():
        key = node_label_key("ClusterBaseModel", "", name)
        eventually(lambda key=key: _label(fleet, node, key) == "Failed", timeout=30, what=f"{name} Failed")
        entry = fleet.entry(node, configmap_key("ClusterBaseModel", "", name))
        assert entry is not None and entry["status"] == "Failed"
        assert why in entry["modelherd"]["message"], entry
    assert not Path("/etc/modelherd-escape").exists()
    assert agent.proc.poll() is None


def test_sigterm_of_a_holder_mid_download_releases_its_lease_and_another_node_takes_over(
        fleet: Fleet, hub: HubServer, tmp_path: Path, model_src: tuple[Path, int], api_client: Any) -> None:
    root = _shared_root(tmp_path)
    hub.throttle("cdn", bytes_per_s=400 * KiB)
    a, b = fleet.add_node("h1"), fleet.add_node("h2")
    # one file at a time: a stopped holder leaves at most one partial file, the rest is resumed
    long_lease = ("--storage-mode", "shared", "--coordination", "kubernetes", "--lease-duration", "60",
                  "--renew-period", "5", "--concurrency", "1", "--multipart-concurrency", "1")
    fleet.start(a, root, *long_lease)
    fleet.wait_ready(fleet.agents[a])
    name = f"slow-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    coord = client.CoordinationV1Api(api_client)

    def holder() -> str | None:
        items = json.loads(coord.list_namespaced_lease(fleet.namespace, _preload_content=False).data)["items"]
        held = [it for it in items if it["spec"].get("holderIdentity")]
        return held[0]["spec"]["holderIdentity"] if held else None

    eventually(lambda: holder() == a and hub.stats()["bytes_served"] > model_src[1] // 2, timeout=60,
               what="a half way through the download")
    fleet.start(b, root, *long_lease)
    fleet.wait_ready(fleet.agents[b])
    stopped = time.monotonic()
    assert fleet.stop(a, timeout=15) == 0  # still throttled: a cannot finish the download before its SIGTERM lands
    assert time.monotonic() - stopped < 10, "SIGTERM must end the agent within seconds"
    hub.clear_faults()
    key = node_label_key("ClusterBaseModel", "", name)
    eventually(lambda: _label(fleet, b, key) == "Ready", timeout=40, what="b took over")
    took = time.monotonic() - stopped
    assert took < 30, f"takeover took {took:.1f}s; the 60 s lease must have been released, not expired"
    # b resumed from a's staging: only a's one partial shard (256 KiB) is fetched twice
    assert hub.stats()["bytes_served"] <= model_src[1] + 300 * KiB, fleet.logs()
    assert "adopting" in fleet.agents[b].log.read_text()


def test_health_endpoints_and_metrics_pass_promtool(fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _shared_root(tmp_path)
    node = fleet.add_node("hm")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    fleet.create_cbm(f"metrics-{fleet.tag}", f"hf://{REPO}")
    eventually(lambda: "modelherd_model_state{" in agent.get("/metrics")[1] and
               'state="Ready"} 1.0' in agent.get("/metrics")[1], timeout=60, what="Ready in the metrics")
    assert agent.get("/healthz") == (200, "ok")
    assert agent.get("/livez") == (200, "ok")
    assert agent.get("/readyz") == (200, "ok")
    assert agent.get("/healthz/models-root")[0] == 200
    status, text = agent.get("/metrics")
    assert status == 200
    for name in ("model_agent_downloads_success_total", "model_agent_download_duration_seconds_bucket",
                 "modelherd_models_root_free_bytes", "modelherd_queue_depth", "modelherd_storage_mode",
                 "modelherd_origin_bytes_total", "modelherd_lease_role"):
        assert name in text, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not installed (Debian package prometheus; scripts/test.sh installs it)")
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    shutil.rmtree(root)  # the models root gone: /healthz turns red (OME's check), /livez stays green
    assert agent.get("/healthz")[0] == 500
    assert agent.get("/livez") == (200, "ok")


def test_agent_without_a_node_name_fails_clearly(tmp_path: Path) -> None:
    from tests.agent_fleet import MODELHERD

    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([MODELHERD, "agent", "--models-root-dir", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "no node name" in out.stderr and "NODE_NAME" in out.stderr
    assert "Traceback" not in out.stderr


def test_sigterm_exits_zero_within_seconds(fleet: Fleet, tmp_path: Path) -> None:
    node = fleet.add_node("term")
    agent = fleet.start(node, _shared_root(tmp_path), "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    t0 = time.monotonic()
    assert fleet.stop(node, signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5


def test_explain_and_status_tell_why_a_node_is_not_selected_and_who_is_ready(
        fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    from tests.agent_fleet import MODELHERD

    root = _shared_root(tmp_path)
    yes, no = fleet.add_node("ex1", {"gpu": "h200"}), fleet.add_node("ex2", {"gpu": "a100"})
    agent = fleet.start(yes, root, "--storage-mode", "local", "--coordination", "none")
    fleet.wait_ready(agent)
    name = f"explained-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}", selector={"gpu": "h200"})
    eventually(lambda: _label(fleet, yes, node_label_key("ClusterBaseModel", "", name)) == "Ready", timeout=60,
               what="Ready on the selected node")
    common = ["--kubeconfig", str(fleet.kubeconfig), "--namespace", fleet.namespace, "-o", "json"]

    def run(*args: str) -> list[dict[str, Any]]:
        out = subprocess.run([MODELHERD, *args, *common], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    rows = {r["name"]: r for r in run("explain", "--node", no, "--models-root-dir", str(root))}
    row = rows[name]
    assert row["selected"] is False
    assert "gpu" in row["reason"] and "a100" in row["reason"]
    assert row["dest"] == str(root.resolve() / REPO) and row["status"] is None
    rows = {r["name"]: r for r in run("explain", "--node", yes, "--models-root-dir", str(root))}
    assert rows[name]["selected"] is True and rows[name]["status"] == "Ready" and rows[name]["label"] == "Ready"

    status = {r["name"]: r for r in run("status")}
    assert status[name]["Ready"] == [yes] and status[name]["Failed"] == [] and status[name]["Updating"] == []


def test_local_tensorrt_llm_model_keeps_only_this_nodes_engines(fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    from tests.modelgen import make_trtllm_model

    src = tmp_path / "trt-src"
    make_trtllm_model(src, ("H200x8", "H100x8", "A100x4"))
    hub.add_repo("org/trt", src)
    node = fleet.add_node("trt", {"node.kubernetes.io/instance-type": "BM.GPU.H200.8"})
    root = _shared_root(tmp_path)
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none",
                        env={"INSTANCE_TYPE_MAP": '{"BM.GPU.H200.8": "H200"}'})
    fleet.wait_ready(agent)
    name = f"trt-{fleet.tag}"
    fleet.create_cbm(name, "hf://org/trt", model_format="tensorrtllm")
    eventually(lambda: _label(fleet, node, node_label_key("ClusterBaseModel", "", name)) == "Ready", timeout=60,
               what="TRT-LLM model Ready")
    engines = sorted(p.parent.name for p in (root / "org" / "trt" / "engines").glob("*/rank0.engine"))
    assert engines == ["H200x8"]
    assert (root / "org" / "trt" / "tokenizer.json").is_file()
    other_shapes = [p for p in hub.stats()["bytes_served_by_path"] if "H100x8" in p or "A100x4" in p]
    assert other_shapes == [], "the origin must not send engines of other GPU shapes"


def test_after_a_restart_the_agent_owns_every_entry_it_found_ready_and_restores_a_deleted_or_edited_configmap(
        fleet: Fleet, hub: HubServer, tmp_path: Path) -> None:
    root = _shared_root(tmp_path)
    node = fleet.add_node("a")
    agent = fleet.start(node, root, "--storage-mode", "shared", "--coordination", "none")
    fleet.wait_ready(agent)
    name = f"owned-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    key = node_label_key("ClusterBaseModel", "", name)
    cm_key = configmap_key("ClusterBaseModel", "", name)
    eventually(lambda: _label(fleet, node, key) == "Ready", timeout=60, what="Ready")
    # the label is written first, the entry right after (OME's order): read the entry once it says Ready too
    entry = eventually(lambda: (e := fleet.entry(node, cm_key)) and e.get("status") == "Ready" and e, timeout=15,
                       what="the entry Ready")
    assert fleet.stop(node) == 0
    agent = fleet.start(node, root, "--storage-mode", "shared", "--coordination", "none")
    fleet.wait_ready(agent)
    time.sleep(1)  # the restarted agent found the model Ready on disk and wrote nothing
    assert fleet.entry(node, cm_key) == entry

    fleet.core.delete_namespaced_config_map(node, fleet.namespace)
    restored = eventually(lambda: fleet.configmap(node), timeout=15, what="the ConfigMap re-created")
    eventually(lambda: fleet.entry(node, cm_key) == entry, timeout=15, what="the entry restored")
    restored = fleet.configmap(node) or {}
    assert restored["metadata"]["labels"].get("models.ome/basemodel-status") == "true"

    edited = dict(entry or {}, status="Failed")
    fleet.core.patch_namespaced_config_map(node, fleet.namespace, {"data": {cm_key: json.dumps(edited)}})
    eventually(lambda: (fleet.entry(node, cm_key) or {}).get("status") == "Ready", timeout=15,
               what="a hand-edited entry written back")
    assert _label(fleet, node, key) == "Ready"
