"""A real Prometheus (Debian's ``prometheus``) scraping real ``modelherd agent`` processes with the chart's alert
rules (rendered with short test thresholds): each injected fault makes its alert fire, and every query of the
chart's Grafana dashboard returns data.

Scrape and rule evaluation every second; targets come from a file_sd file each test rewrites, labelled with
``node`` the way the chart's PodMonitor relabels ``__meta_kubernetes_pod_node_name``, with ``honor_labels``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from modelherd.agent.ome.keys import node_label_key

from monitoring import render_rules
from tests.agent_fleet import Fleet, eventually, free_port
from tests.hubserver import HubServer
from tests.integration.test_controlplane import install_ome_crds
from tests.k8s_fixtures import KubeCluster
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

KiB = 1024
REPO = "org/tiny-llama"
FORBIDDEN = "org/forbidden-llama"
DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "modelherd" / "files" / "dashboard.json"
# the chart's values for a test: short windows and `for:` so each alert fires within seconds
TEST_THRESHOLDS = {
    "agentDownFor": "2s", "modelFailedFor": "2s", "downloadFailingWindow": "1m", "downloadFailingThreshold": "2",
    "downloadFailingFor": "0s", "verificationFailedWindow": "1m", "verificationFailedFor": "0s",
    "leaseHolderStuckSeconds": "3", "leaseHolderStuckFor": "1s", "downloadStalledSeconds": "3",
    "downloadStalledFor": "1s",
}


@dataclass
class Prometheus:
    url: str
    targets: Path
    proc: subprocess.Popen[bytes]

    def scrape(self, agents: dict[str, int]) -> None:
        """Make ``agents`` (node -> port) the only targets (file_sd: an atomic rename, picked up at once)."""
        groups = [{"targets": [f"127.0.0.1:{port}"], "labels": {"node": node}} for node, port in agents.items()]
        tmp = self.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.targets)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self, alertname: str, /, **labels: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == alertname
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def wait_firing(self, alertname: str, /, timeout: float = 60.0, **labels: str) -> dict[str, Any]:
        def firing() -> dict[str, Any] | None:
            return next((a for a in self.alerts(alertname, **labels) if a["state"] == "firing"), None)
        return eventually(firing, timeout=timeout, interval=0.5, what=f"{alertname} {labels} firing")

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not installed (Debian package prometheus; scripts/test.sh installs it)")
    base = tmp_path_factory.mktemp("prometheus")
    rules = base / "rules.yaml"
    rules.write_text(render_rules.render(render_rules.TEMPLATE.read_text(), TEST_THRESHOLDS))
    targets = base / "targets.json"
    targets.write_text("[]")
    config = base / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "modelherd", "honor_labels": True,
                            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}],
    }))
    port = free_port()
    log = (base / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={base / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", targets, proc)

    def ready() -> bool:
        assert proc.poll() is None, (base / "prometheus.log").read_text()
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    try:
        eventually(ready, timeout=30, what="prometheus ready")
        groups = prom.api("rules")["groups"]
        assert sum(len(g["rules"]) for g in groups) >= 11, groups
        yield prom
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    make_sharded_model(folder, n_shards=8, shard_bytes=256 * KiB)
    with HubServer() as server:
        server.add_repo(REPO, folder)
        server.add_repo(FORBIDDEN, folder)
        server.fail("any", 403, times=None, path=FORBIDDEN)
        yield server


@pytest.fixture
def fleet(kube_cluster: KubeCluster, api_client: Any, kube_namespace: str, hub: HubServer,
          tmp_path: Path, prometheus: Prometheus) -> Iterator[Fleet]:
    install_ome_crds(kube_cluster, api_client)
    f = Fleet(api_client, kube_cluster.kubeconfig, kube_namespace, hub.endpoint, tmp_path)
    try:
        yield f
    finally:
        prometheus.scrape({})
        for agent in f.agents.values():  # a SIGSTOPped agent must be resumed to be killed and reaped cleanly
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGCONT)
        f.cleanup()


def _start(fleet: Fleet, prom: Prometheus, shorts: list[str], *args: str) -> list[str]:
    root = fleet.base / "models"
    root.mkdir(exist_ok=True)
    nodes = [fleet.add_node(s) for s in shorts]
    for n in nodes:
        fleet.start(n, root, *args)
    for n in nodes:
        fleet.wait_ready(fleet.agents[n])
    prom.scrape({n: a.port for n, a in fleet.agents.items()})
    for n in nodes:
        eventually(lambda n=n: prom.api("query", query=f'up{{node="{n}"}} == 1')["result"], timeout=30,
                   what=f"{n} scraped")
    return nodes


SHARED = ("--storage-mode", "shared", "--coordination", "kubernetes", "--lease-duration", "60",
          "--renew-period", "1", "--concurrency", "1", "--multipart-concurrency", "1")
LOCAL = ("--storage-mode", "local", "--coordination", "none")


def test_origin_answering_403_fires_model_failed_and_download_failing(
        fleet: Fleet, prometheus: Prometheus) -> None:
    (node,) = _start(fleet, prometheus, ["forbidden"], *LOCAL)
    name = f"forbidden-{fleet.tag}"
    good = f"good-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{FORBIDDEN}")
    fleet.create_cbm(good, f"hf://{REPO}")
    failed = prometheus.wait_firing("ModelherdModelFailed", node=node, name=name)
    assert failed["labels"]["severity"] == "warning"
    assert failed["annotations"]["runbook_url"].endswith("#modelherdmodelfailed")
    assert f"ClusterBaseModel {name} has been Failed on node {node}" in failed["annotations"]["description"]
    prometheus.wait_firing("ModelherdDownloadFailing", node=node, name=name)
    # the model the origin serves is Ready on the same node: no alert about it
    eventually(lambda: fleet.labels(node).get(node_label_key("ClusterBaseModel", "", good)) == "Ready",
               timeout=60, what="the good model Ready")
    time.sleep(3)
    assert prometheus.alerts("ModelherdModelFailed", name=good) == []
    assert prometheus.alerts("ModelherdDownloadFailing", name=good) == []


def test_corrupt_shard_of_a_local_model_fires_verification_failed(
        fleet: Fleet, prometheus: Prometheus, tmp_path: Path) -> None:
    fleet.env_extra["MODELHERD_LOCAL_SOURCE_ROOTS"] = str(tmp_path / "local")  # local:// outside the models root
    (node,) = _start(fleet, prometheus, ["verify"], *LOCAL)
    intact, corrupt = tmp_path / "local/intact", tmp_path / "local/corrupt"
    make_sharded_model(intact, n_shards=2, shard_bytes=64 * KiB)
    shards = make_sharded_model(corrupt, n_shards=2, shard_bytes=64 * KiB)
    shard = next(p for p in shards if p.name.endswith(".safetensors"))
    with shard.open("r+b") as f:  # a shard cut short: its header no longer ends where the file does
        f.truncate(shard.stat().st_size - 1000)
    fleet.create_cbm(f"intact-{fleet.tag}", f"local://{intact}")
    fleet.create_cbm(f"corrupt-{fleet.tag}", f"local://{corrupt}")
    alert = prometheus.wait_firing("ModelherdVerificationFailed", node=node, name=f"corrupt-{fleet.tag}")
    assert alert["labels"]["severity"] == "critical"
    assert prometheus.alerts("ModelherdVerificationFailed", name=f"intact-{fleet.tag}") == []


def test_sigstopped_holder_fires_lease_holder_stuck_on_the_follower_and_agent_down_on_the_holder(
        fleet: Fleet, prometheus: Prometheus, hub: HubServer, api_client: Any) -> None:
    hub.throttle("cdn", bytes_per_s=160 * KiB)  # 2 MiB: ~13 s, long enough to stop the holder half way
    a, b = _start(fleet, prometheus, ["holder", "follower"], *SHARED)
    name = f"stuck-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    coord = client.CoordinationV1Api(api_client)

    def holder() -> str | None:
        items = json.loads(coord.list_namespaced_lease(fleet.namespace, _preload_content=False).data)["items"]
        held = [it["spec"].get("holderIdentity") for it in items if it["spec"].get("holderIdentity")]
        return held[0] if held else None

    held_by = eventually(holder, timeout=60, what="a holder")
    waiting = b if held_by == a else a
    # the follower watches the holder's progress; while bytes move, no alert (its threshold is 3 s)
    eventually(lambda: prometheus.api("query", query=f'modelherd_lease_holder_progress_timestamp_seconds'
                                                     f'{{node="{waiting}"}}')["result"], timeout=30,
               what="the follower reporting the holder's progress")
    time.sleep(5)
    assert prometheus.alerts("ModelherdLeaseHolderStuck", node=waiting) == []
    fleet.agents[held_by].proc.send_signal(signal.SIGSTOP)
    stuck = prometheus.wait_firing("ModelherdLeaseHolderStuck", node=waiting, name=name, timeout=40)
    assert stuck["annotations"]["runbook_url"].endswith("#modelherdleaseholderstuck")
    assert f"Node {waiting} waits for the Lease of ClusterBaseModel {name}" in stuck["annotations"]["description"]
    prometheus.wait_firing("ModelherdAgentDown", node=held_by, timeout=30)
    assert prometheus.alerts("ModelherdAgentDown", node=waiting) == []


def test_every_dashboard_query_returns_data_from_that_prometheus(
        fleet: Fleet, prometheus: Prometheus, hub: HubServer) -> None:
    hub.throttle("cdn", bytes_per_s=512 * KiB)  # a few seconds of download: progress and following are scraped
    started = time.time()
    nodes = _start(fleet, prometheus, ["dash-a", "dash-b"], *SHARED)
    name = f"dash-{fleet.tag}"
    fleet.create_cbm(name, f"hf://{REPO}")
    fleet.create_cbm(f"dash-forbidden-{fleet.tag}", f"hf://{FORBIDDEN}")
    key = node_label_key("ClusterBaseModel", "", name)
    eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in nodes), timeout=90, what="Ready on both")
    time.sleep(3)  # the last scrapes after Ready (lease roles, verified bytes)
    dashboard = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "node"} <= names
    node_re = "|".join(nodes)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            expr = var["query"]["query"].replace("$job", "modelherd")
            inner = expr.removeprefix("label_values(").rsplit(",", 1)[0]
            assert prometheus.query_range(inner, started, time.time()), f"variable {var['name']}: {inner}"
    empty = []
    queries = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", "5s").replace("$job", "modelherd")
                    .replace("$node", node_re))
            queries += 1
            if not prometheus.query_range(expr, started, time.time()):
                empty.append(f"{panel['title']}: {expr}")
    assert queries >= 15
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)
