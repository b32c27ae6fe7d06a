"""Tenants cannot reach the platform's files, Secrets or credentials: every field of a CR is untrusted input.

One chart release (its RBAC: ``rbac.secretNamespaces`` lists the tenant's namespace, so a BaseModel's own Secret
is readable there); three real agents authenticate with the chart's agent ServiceAccount token and share one
models root (``--storage-mode shared``, Kubernetes Leases) against the loopback Hub; the agents hold the platform's
``HF_TOKEN``. The tenant is a ServiceAccount that may only create, read and delete BaseModels and Secrets in its
own namespace; every hostile CR below is created with the tenant's own token.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kconfig
from modelherd.agent.ome.keys import configmap_key, node_label_key

from tests.agent_fleet import MODELHERD, Fleet, eventually
from tests.chart.conftest import ChartTools
from tests.chart.kube import Helm, ensure_namespaces
from tests.hubserver import HubServer
from tests.integration.test_controlplane import install_ome_crds
from tests.k8s_fixtures import KubeCluster, mint_sa_kubeconfig
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

KiB = 1024
PLATFORM = "acme/llama"
PRIVATE = "acme/private-llama"
EVIL = "evil/weights"
PLATFORM_TOKEN = "hf_PlatformToken0123456789abcdefXYZ"
PEM = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
       "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n-----END PRIVATE KEY-----\n")


@dataclass
class Release:
    name: str
    namespace: str  # the agents' ConfigMaps, Leases, and the platform's Secrets
    tenant: str  # the tenant's namespace (in rbac.secretNamespaces: a BaseModel's own Secret is readable)
    agent_sa: str


@pytest.fixture(scope="module")
def release(chart_tools: ChartTools, kube_cluster: KubeCluster, api_client: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    install_ome_crds(kube_cluster, api_client)
    tag = uuid.uuid4().hex[:8]
    rel = Release(name=f"tn{tag}", namespace=f"tn-{tag}", tenant=f"tn-{tag}-team-a", agent_sa=f"tn{tag}-modelherd")
    ensure_namespaces(api_client, [rel.namespace, rel.tenant])
    helm = Helm(chart_tools.helm, kube_cluster, tmp_path_factory.mktemp("helm-home"))
    helm.install(rel.name, rel.namespace, "--set", f"rbac.secretNamespaces={{{rel.tenant}}}",
                 "--set", "storage.mode=shared")
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(rel.tenant, {
        "metadata": {"name": "tenant"},
        "rules": [{"apiGroups": ["ome.io"], "resources": ["basemodels"],
                   "verbs": ["create", "get", "list", "watch", "delete", "patch"]},
                  {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get", "delete"]}]})
    rbac.create_namespaced_role_binding(rel.tenant, {
        "metadata": {"name": "tenant"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                    "name": "tenant"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": rel.tenant}]})
    core = client.CoreV1Api(api_client)
    core.create_namespaced_secret(rel.namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="cluster-hf"),
        data={"token": base64.b64encode(PLATFORM_TOKEN.encode()).decode()}))
    try:
        yield rel
    finally:
        helm.uninstall(rel.name, rel.namespace)
        for ns in (rel.namespace, rel.tenant):
            with contextlib.suppress(client.ApiException):
                core.delete_namespace(ns)


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("src")
    make_sharded_model(base / "llama", n_shards=3, shard_bytes=64 * KiB)
    make_sharded_model(base / "evil", n_shards=2, shard_bytes=64 * KiB, seed=7)
    return base / "llama", base / "evil"


@pytest.fixture
def hub(model_src: tuple[Path, Path]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(PLATFORM, model_src[0])
        server.add_repo(PRIVATE, model_src[0], token=PLATFORM_TOKEN)
        server.add_repo(EVIL, model_src[1])
        yield server


@dataclass
class Cluster:
    fleet: Fleet
    release: Release
    root: Path
    nodes: list[str]
    tenant: client.CustomObjectsApi
    tenant_core: client.CoreV1Api
    hub: HubServer

    def tenant_bm(self, name: str, uri: str, **kw: Any) -> None:
        body = self.fleet.model_body("BaseModel", name, uri, namespace=self.release.tenant, **kw)
        self.tenant.create_namespaced_custom_object("ome.io", "v1beta1", self.release.tenant, "basemodels", body)
        self.fleet.models.append(("basemodels", self.release.tenant, name))

    def entry(self, node: str, kind: str, name: str, ns: str = "") -> dict[str, Any] | None:
        return self.fleet.entry(node, configmap_key(kind, ns, name))  # type: ignore[arg-type]

    def label(self, node: str, kind: str, name: str, ns: str = "") -> str | None:
        return self.fleet.labels(node).get(node_label_key(kind, ns, name))  # type: ignore[arg-type]

    def failed_everywhere(self, name: str) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            entries = [self.entry(n, "BaseModel", name, self.release.tenant) for n in self.nodes]
            return entries if all(e and e["status"] == "Failed" for e in entries) else None  # type: ignore[return-value]
        return eventually(check, timeout=60, what=f"basemodel {name} Failed on every node")

    def events(self, namespace: str) -> list[dict[str, Any]]:
        resp: Any = self.fleet.core.list_namespaced_event(namespace, _preload_content=False)
        return list(json.loads(resp.data)["items"])

    def everything_written(self) -> str:
        """Every Event, ConfigMap, Lease and log line the agents produced, as one text."""
        parts = [json.dumps(self.events(ns)) for ns in (self.release.tenant, "default", self.release.namespace)]
        for node in self.nodes:
            parts.append(json.dumps(self.fleet.configmap(node)))
        resp: Any = client.CoordinationV1Api(self.fleet.api).list_namespaced_lease(
            self.release.namespace, _preload_content=False)
        parts.append(resp.data.decode())
        parts.append(self.fleet.logs())
        for agent in self.fleet.agents.values():
            with contextlib.suppress(OSError):
                parts.append(agent.get("/metrics")[1])
        return "\n".join(parts)


@pytest.fixture
def cluster(release: Release, kube_cluster: KubeCluster, api_client: Any, hub: HubServer,
            tmp_path: Path) -> Iterator[Cluster]:
    kubeconfig = mint_sa_kubeconfig(kube_cluster, release.namespace, release.agent_sa, tmp_path / "agent.kubeconfig")
    tenant_cfg = mint_sa_kubeconfig(kube_cluster, release.tenant, "tenant", tmp_path / "tenant.kubeconfig")
    fleet = Fleet(api_client, kubeconfig, release.namespace, hub.endpoint, tmp_path)
    fleet.env_extra = {"HF_TOKEN": PLATFORM_TOKEN, "MODELHERD_VERIFY_INTERVAL_S": "1"}
    root = tmp_path / "models"
    root.mkdir()
    tenant_api = kconfig.new_client_from_config(str(tenant_cfg))
    try:
        nodes = [fleet.add_node(s) for s in ("a", "b", "c")]
        for node in nodes:
            fleet.start(node, root, "--storage-mode", "shared", "--coordination", "kubernetes")
        for agent in fleet.agents.values():
            fleet.wait_ready(agent)
        yield Cluster(fleet, release, root, nodes, client.CustomObjectsApi(tenant_api), client.CoreV1Api(tenant_api),
                      hub)
    finally:
        fleet.cleanup()
        tenant_api.close()


class LabelSampler:
    """Samples one node label on every node every 0.1 s; ``seen`` is every value observed."""

    def __init__(self, c: Cluster, key: str) -> None:
        self.c, self.key, self.seen = c, key, set[str | None]()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for node in self.c.nodes:
                with contextlib.suppress(Exception):
                    self.seen.add(self.c.fleet.labels(node).get(self.key))

    def __enter__(self) -> LabelSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


def _platform_ready(c: Cluster) -> str:
    name = f"llama-{c.fleet.tag}"
    c.fleet.create_cbm(name, f"hf://{PLATFORM}", path=str(c.root / "acme/llama"))
    eventually(lambda: all(c.label(n, "ClusterBaseModel", name) == "Ready" for n in c.nodes), timeout=90,
               what="the platform's ClusterBaseModel Ready on every node")
    return name


def _manifest_source(folder: Path) -> str:
    return str(json.loads((folder / ".modelherd-manifest.json").read_text())["source_uri"])


def test_a_tenant_cannot_take_over_the_folder_of_a_platform_model(cluster: Cluster) -> None:
    c = cluster
    cbm = _platform_ready(c)
    inode = (c.root / "acme/llama").stat().st_ino
    c.hub.reset_counters()
    with LabelSampler(c, node_label_key("ClusterBaseModel", "", cbm)) as sampler:
        c.tenant_bm("evil", f"hf://{EVIL}", path=str(c.root / "acme/llama"))
        entries = c.failed_everywhere("evil")
        time.sleep(3)  # three verification intervals: nothing swaps the folder back and forth
    message = entries[0]["modelherd"]["message"]
    assert f"belongs to clusterbasemodel/{cbm} (hf://{PLATFORM})" in message, message
    assert "--dest" not in message
    assert sampler.seen == {"Ready"}, f"the platform's label left Ready: {sampler.seen}"
    assert (c.root / "acme/llama").stat().st_ino == inode, "the platform's folder was replaced"
    assert PLATFORM in _manifest_source(c.root / "acme/llama")
    assert c.hub.stats()["bytes_served"] == 0, "nothing of the tenant's model was downloaded"
    reasons = {e["reason"] for e in c.events(c.release.tenant) if e["involvedObject"]["name"] == "evil"}
    assert reasons == {"Failed"}, reasons

    # a tenant's model at a top-level folder above the platform's: refused too, naming the holder
    c.tenant_bm("squat", f"hf://{EVIL}", path=str(c.root / "acme"))
    entries = c.failed_everywhere("squat")
    assert f"which belongs to clusterbasemodel/{cbm}" in entries[0]["modelherd"]["message"]
    assert not (c.root / "acme/.modelherd-manifest.json").exists()


def test_confined_basemodel_paths_keep_tenants_in_their_namespace_folder(
        release: Release, kube_cluster: KubeCluster, api_client: Any, hub: HubServer, tmp_path: Path) -> None:
    kubeconfig = mint_sa_kubeconfig(kube_cluster, release.namespace, release.agent_sa, tmp_path / "agent.kubeconfig")
    fleet = Fleet(api_client, kubeconfig, release.namespace, hub.endpoint, tmp_path)
    fleet.env_extra = {"MODELHERD_BASEMODEL_PATH_PREFIXES": '["{namespace}"]'}
    root = tmp_path / "models"
    root.mkdir()
    try:
        node = fleet.add_node("a")
        fleet.wait_ready(fleet.start(node, root, "--storage-mode", "shared", "--coordination", "kubernetes"))
        fleet.create_bm("outside", f"hf://{EVIL}", namespace=release.tenant, path=str(root / "meta-llama"))
        fleet.create_bm("inside", f"hf://{EVIL}", namespace=release.tenant)
        key_in = configmap_key("BaseModel", release.tenant, "inside")
        key_out = configmap_key("BaseModel", release.tenant, "outside")
        eventually(lambda: (fleet.entry(node, key_in) or {}).get("status") == "Ready", timeout=60,
                   what="the BaseModel in its namespace folder Ready")
        out = eventually(lambda: (e := fleet.entry(node, key_out)) and e["status"] == "Failed" and e, timeout=30,
                         what="the BaseModel outside its folder Failed")
        assert "outside the folders BaseModels of namespace" in out["modelherd"]["message"]
        assert (root / release.tenant / EVIL / ".modelherd-manifest.json").is_file()
        assert not (root / "meta-llama").exists()
        # a platform model below <root>/meta-llama is not blocked by any tenant now
        fleet.create_cbm(f"meta-{fleet.tag}", f"hf://{PLATFORM}", path=str(root / "meta-llama/Llama"))
        eventually(lambda: fleet.labels(node).get(node_label_key("ClusterBaseModel", "", f"meta-{fleet.tag}"))
                   == "Ready", timeout=60, what="the platform model below the folder the tenant wanted")
    finally:
        fleet.cleanup()


def test_a_secret_key_cannot_reach_another_namespace_and_tenants_get_no_platform_token(cluster: Cluster) -> None:
    c = cluster
    ns = c.release.namespace
    c.tenant_bm("steal", f"hf://{PRIVATE}", key=f"../../{ns}/secrets/cluster-hf")
    c.tenant_bm("encoded", f"hf://{PRIVATE}", key="..%2F..%2Fcluster-hf")
    c.tenant_bm("ambient", f"hf://{PRIVATE}")  # no key: the platform's HF_TOKEN must not serve it
    for name in ("steal", "encoded"):
        message = c.failed_everywhere(name)[0]["modelherd"]["message"]
        assert "spec.storage.key must be the name of a Secret in the model's own namespace" in message, message
    message = c.failed_everywhere("ambient")[0]["modelherd"]["message"]
    assert "access denied" in message, message
    assert c.hub.stats()["bytes_served"] == 0
    probes = [r.path for r in c.hub.request_log if "SHA256SUMS" in r.path or r.path.startswith(("/v2", "/x/"))]
    assert probes == [], "a tenant's URL reached a service on the node's loopback"
    tokened = [r for r in c.hub.request_log if PLATFORM_TOKEN in r.headers.get("authorization", "")]
    assert tokened == [], "a tenant's model reached the Hub with the platform's token"

    # the platform's own ClusterBaseModel naming the Secret in the agents' namespace still works
    c.fleet.create_cbm(f"private-{c.fleet.tag}", f"hf://{PRIVATE}", key="cluster-hf")
    eventually(lambda: all(c.label(n, "ClusterBaseModel", f"private-{c.fleet.tag}") == "Ready" for n in c.nodes),
               timeout=60, what="the platform's private ClusterBaseModel Ready")


def test_a_secret_value_never_reaches_events_configmaps_leases_logs_or_metrics(cluster: Cluster) -> None:
    c = cluster
    c.tenant_core.create_namespaced_secret(c.release.tenant, client.V1Secret(
        metadata=client.V1ObjectMeta(name="pem"), data={"token": base64.b64encode(PEM.encode()).decode()}))
    c.tenant_bm("pem", f"hf://{PRIVATE}", key="pem")
    message = c.failed_everywhere("pem")[0]["modelherd"]["message"]
    assert "not one line of printable" in message or "not usable" in message or "token" in message, message
    time.sleep(2)  # a retry or two
    text = c.everything_written()
    for line in PEM.splitlines():
        if len(line) >= 8:
            assert line not in text, f"a line of the Secret leaked: {line[:12]}..."
            assert json.dumps(line)[1:-1] not in text
    assert PLATFORM_TOKEN not in text
    assert c.hub.stats()["requests"] == {} or c.hub.stats()["bytes_served"] == 0


def _collide(namespace: str) -> str:
    """The 8-hex-digit namespace OME's label truncation maps onto ``namespace`` (when it is over 8 bytes)."""
    return hashlib.sha256(namespace.encode()).hexdigest()[:8]


def node_patches(metrics: str) -> int:
    """The agent's ``modelherd_api_requests{verb="patch",resource="nodes"}`` from its /metrics text."""
    for line in metrics.splitlines():
        if line.startswith("modelherd_api_requests{") and 'verb="patch"' in line and 'resource="nodes"' in line:
            return int(float(line.split()[-1]))
    return 0


def test_colliding_label_keys_make_no_patch_storm_and_leave_the_victims_label_alone(cluster: Cluster) -> None:
    c = cluster
    victim_ns = c.release.tenant
    evil_ns = _collide(victim_ns)
    ensure_namespaces(c.fleet.api, [evil_ns])
    name = "llama-3-70b-instruct-awq-int4-long"
    assert node_label_key("BaseModel", victim_ns, name) == node_label_key("BaseModel", evil_ns, name)
    key = node_label_key("BaseModel", victim_ns, name)
    try:
        c.fleet.create_bm(name, f"hf://{PLATFORM}", namespace=victim_ns)
        eventually(lambda: all(c.fleet.labels(n).get(key) == "Ready" for n in c.nodes), timeout=60,
                   what="the victim Ready")
        before = [node_patches(a.get("/metrics")[1]) for a in c.fleet.agents.values()]
        time.sleep(1.1)  # creationTimestamp has 1 s resolution: the victim is senior by time, not by the tie-break
        with LabelSampler(c, key) as sampler:
            c.fleet.create_bm(name, f"hf://{EVIL}", namespace=evil_ns)
            entry = eventually(lambda: (e := c.fleet.entry(c.nodes[0], configmap_key("BaseModel", evil_ns, name)))
                               and e["status"] == "Failed" and e, timeout=30, what="the later model Failed")
            time.sleep(5)
        assert "collides with basemodel/" + victim_ns in entry["modelherd"]["message"], entry
        assert sampler.seen == {"Ready"}, sampler.seen
        after = [node_patches(a.get("/metrics")[1]) for a in c.fleet.agents.values()]
        assert sum(after) - sum(before) <= 3, f"Node patches after the collision: {sum(after) - sum(before)}"
        # the later model goes: the victim's label stays
        c.fleet.delete_model("basemodels", name, evil_ns)
        time.sleep(2)
        assert all(c.fleet.labels(n).get(key) == "Ready" for n in c.nodes)
    finally:
        c.fleet.delete_model("basemodels", name, evil_ns)
        with contextlib.suppress(client.ApiException):
            c.fleet.core.delete_namespace(evil_ns)


def test_local_sources_outside_the_root_and_poisoned_crs_harm_no_other_model(cluster: Cluster) -> None:
    c = cluster
    cbm = _platform_ready(c)
    for i, uri in enumerate(("local:///etc", "local:///proc/self", "local:///")):
        c.tenant_bm(f"local-{i}", uri)
    # a NUL in spec.storage.path (the API server stores it) poisons nothing but its own model
    c.tenant_bm("nul", f"hf://{EVIL}", path=str(c.root / "x\x00y"))
    for i in range(3):
        message = c.failed_everywhere(f"local-{i}")[0]["modelherd"]["message"]
        assert "outside the models root" in message, message
    assert "control character" in c.failed_everywhere("nul")[0]["modelherd"]["message"]
    text = c.everything_written()
    assert "passwd" not in text and "shadow" not in text, "file names of /etc reached an output"

    # deleting another model still removes its files on the node that holds them (no poisoned sweep)
    extra = f"extra-{c.fleet.tag}"
    c.fleet.create_cbm(extra, f"hf://{EVIL}", path=str(c.root / "evil/weights"))
    eventually(lambda: all(c.label(n, "ClusterBaseModel", extra) == "Ready" for n in c.nodes), timeout=60,
               what="the extra model Ready")
    c.fleet.delete_model("clusterbasemodels", extra)
    eventually(lambda: not (c.root / "evil/weights").exists(), timeout=60, what="the deleted model's files removed")
    assert all(c.label(n, "ClusterBaseModel", cbm) == "Ready" for n in c.nodes)
    out = subprocess.run([MODELHERD, "explain", "--node", c.nodes[0], "--kubeconfig", str(c.fleet.kubeconfig),
                          "--namespace", c.release.namespace, "--models-root-dir", str(c.root), "-o", "json"],
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("MODELHERD_", "KUBECONFIG"))})
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_reserve_annotation_keeps_the_files_of_a_deleted_model(cluster: Cluster) -> None:
    c = cluster
    name = f"reserved-{c.fleet.tag}"
    c.fleet.create_cbm(name, f"hf://{PLATFORM}", path=str(c.root / "keep/llama"),
                       annotations={"models.ome/reserve-model-artifact": "true"})
    eventually(lambda: all(c.label(n, "ClusterBaseModel", name) == "Ready" for n in c.nodes), timeout=60,
               what="the reserved model Ready")
    c.fleet.delete_model("clusterbasemodels", name)
    eventually(lambda: all(c.label(n, "ClusterBaseModel", name) is None for n in c.nodes), timeout=60,
               what="the labels removed")
    time.sleep(1)
    assert (c.root / "keep/llama/.modelherd-manifest.json").is_file(), "reserved files were deleted"


def test_a_status_write_the_api_server_forbids_is_named_in_an_event_and_fails_readyz(cluster: Cluster) -> None:
    """RBAC taken away (the agent's Role loses ConfigMap writes): one typed reason naming the verb and resource,
    an Event, /readyz failing on ``status-writes``; RBAC back: the model Ready and /readyz passing again."""
    c = cluster
    rbac = client.RbacAuthorizationV1Api(c.fleet.api)
    role_name = c.release.agent_sa  # the chart names the agent's Role after the release's full name
    role: Any = json.loads(rbac.read_namespaced_role(role_name, c.release.namespace, _preload_content=False).data)
    original = json.loads(json.dumps(role["rules"]))
    reduced = [dict(r, verbs=["get", "list", "watch"]) if "configmaps" in r.get("resources", []) else r
               for r in role["rules"]]
    name = f"forbidden-{c.fleet.tag}"
    rbac.patch_namespaced_role(role_name, c.release.namespace, {"rules": reduced})
    try:
        time.sleep(1)  # the authorizer's cache
        c.fleet.create_cbm(name, f"hf://{PLATFORM}", path=str(c.root / "forbidden/llama"))

        def refused() -> str | None:
            status, body = next(iter(c.fleet.agents.values())).get("/readyz?verbose")
            return body if status != 200 and "[-]status-writes failed" in body else None
        eventually(refused, timeout=60, what="/readyz failing on status-writes")
        assert "may not" in c.fleet.logs() and "configmaps in " + c.release.namespace in c.fleet.logs()

        def forbidden_event() -> dict[str, Any] | None:
            return next((e for e in c.events("default") if e["involvedObject"]["name"] == name
                         and e["reason"] == "Forbidden"), None)
        event = eventually(forbidden_event, timeout=30, what="a Forbidden Event")
        assert "may not" in event["message"] and "configmaps" in event["message"], event["message"]
        logs = c.fleet.logs()
        assert "Traceback" not in logs and "reconcile failed unexpectedly" not in logs, logs[-3000:]
    finally:
        rbac.patch_namespaced_role(role_name, c.release.namespace, {"rules": original})
    eventually(lambda: all(c.label(n, "ClusterBaseModel", name) == "Ready" for n in c.nodes)
               and all((c.entry(n, "ClusterBaseModel", name) or {}).get("status") == "Ready" for n in c.nodes),
               timeout=120, what="Ready once the RBAC is back")
    eventually(lambda: all(a.get("/readyz")[0] == 200 for a in c.fleet.agents.values()), timeout=60,
               what="/readyz passing again")


def _hostile_specs(root: Path, ns: str, outside: Path, node_service: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, storage) pairs: hostile values for every field of spec.storage the agent reads. ``node_service``: the
    ``host:port`` of a service on the nodes' loopback (the Hub here), which a tenant's URL must never reach."""
    long = "a" * 5000
    port = node_service.rpartition(":")[2]
    node_local = [f"http://{node_service}/{PRIVATE}/", f"http://localhost:{port}/x/", f"http://[::1]:{port}/x/",
                  f"oci://{node_service}/{PRIVATE}:main", f"oci://localhost:{port}/x/y:v1",
                  "ocios://n/ns/b/bucket/o/p", f"https://{node_service}/{PRIVATE}/", "oci://127.0.0.1:1/x/y@sha256:"
                  + "0" * 64]
    uris = ["hf://../../etc", "hf://acme/llama@../../x", "local:///etc/../etc", "file:///etc/passwd",
            "hf://" + "a" * 300, "oci://n/../b/x/o/y", "hf://acme/llama?x=1", "http://169.254.169.254/latest",
            f"local://{outside}", f"local://{root}/../{outside.name}", "s3://bucket/x", "hf://acme/llama@main\n",
            "oci://n/ns/b/bucket/o/prefix"]
    paths = ["../../../../" + outside.name, str(outside), f"{root}/../{outside.name}", f"{root}/.modelherd-staging/x",
             f"{root}/acme/llama/sub", f"{root}/acme", " ", long, str(root), f"{root}/", f"{root}/\u202eevil",
             "~root/x", f"{root}/./acme/../acme/llama"]
    keys = ["../x", "a" * 300, "kube-system/x", f"../../{ns}/secrets/cluster-hf", "cluster-hf"]
    params: list[dict[str, str]] = [{"secretKey": "../../x"}, {"token": PEM}, {"auth": "InstancePrincipal"},
                                    {"region": "../x"}, {"token": PLATFORM_TOKEN + "\r\nX-Evil: 1"}]
    out: list[tuple[str, dict[str, Any]]] = []
    out += [(f"uri-{i}", {"storageUri": u}) for i, u in enumerate(uris)]
    out += [(f"local-net-{i}", {"storageUri": u}) for i, u in enumerate(node_local)]
    out += [(f"path-{i}", {"storageUri": f"hf://{EVIL}", "path": p}) for i, p in enumerate(paths)]
    out += [(f"key-{i}", {"storageUri": f"hf://{PRIVATE}", "key": k}) for i, k in enumerate(keys)]
    out += [(f"param-{i}", {"storageUri": "oci://n/ns/b/bucket/o/p" if "auth" in p else f"hf://{PRIVATE}",
                            "parameters": p}) for i, p in enumerate(params)]
    terms = [{"matchExpressions": [{"key": "x", "operator": "Gt", "values": ["abc"]}]},
             {"matchFields": [{"key": "metadata.name", "operator": "In", "values": []}]}]
    affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
    out += [("selector-0", {"storageUri": f"hf://{EVIL}", "nodeAffinity": affinity}),
            ("selector-1", {"storageUri": f"hf://{EVIL}", "nodeSelector": {"a" * 300: long}})]
    out += [("n" * 253, {"storageUri": f"hf://{EVIL}", "path": f"{root}/{ns}/long"})]
    return out


def test_hostile_values_in_every_field_reach_nothing_outside_and_disturb_no_other_model(
        cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    cbm = _platform_ready(c)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("the platform's")
    before_outside = sorted(p.name for p in tmp_path.iterdir())
    inode = (c.root / "acme/llama").stat().st_ino
    c.hub.reset_counters()  # from here on only the tenant's models can make the agents reach the Hub
    c.tenant_core.create_namespaced_secret(c.release.tenant, client.V1Secret(
        metadata=client.V1ObjectMeta(name="cluster-hf"), data={"token": base64.b64encode(PEM.encode()).decode()}))
    created: list[str] = []
    with LabelSampler(c, node_label_key("ClusterBaseModel", "", cbm)) as sampler:
        for name, storage in _hostile_specs(c.root, c.release.namespace, outside, c.hub.endpoint.split("/")[2]):
            body = c.fleet.model_body("BaseModel", name, "x", namespace=c.release.tenant)
            body["spec"]["storage"] = {**storage, **{k: v for k, v in body["spec"]["storage"].items()
                                                    if k == "nodeSelector" and "nodeSelector" not in storage}}
            try:
                c.tenant.create_namespaced_custom_object("ome.io", "v1beta1", c.release.tenant, "basemodels", body)
            except client.ApiException as e:
                assert e.status in (400, 422), e  # the CRD's schema refused it: nothing reaches the agents
                continue
            c.fleet.models.append(("basemodels", c.release.tenant, name))
            created.append(name)

        def settled() -> bool:  # every selected hostile model has a final state on every node
            for node in c.nodes:
                data = (c.fleet.configmap(node) or {}).get("data") or {}
                states = [json.loads(v)["status"] for k, v in data.items() if ".basemodel." in k]
                if any(s == "Updating" for s in states):
                    return False
            return True
        eventually(settled, timeout=120, what="every hostile model settled")
        time.sleep(3)
    assert len(created) >= 20, f"most hostile values reach the agents ({len(created)})"
    assert sampler.seen == {"Ready"}, f"the platform's model left Ready: {sampler.seen}"
    assert (c.root / "acme/llama").stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == before_outside, "something was written outside the root"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert all(a.proc.poll() is None and a.get("/livez")[0] == 200 for a in c.fleet.agents.values())
    text = c.everything_written()
    assert PLATFORM_TOKEN not in text
    for line in PEM.splitlines():
        if len(line) >= 8:
            assert line not in text, f"a line of a Secret leaked: {line[:12]}..."
    assert "passwd" not in text.replace("file:///etc/passwd", ""), "a file name from /etc reached an output"
    probes = [r.path for r in c.hub.request_log if "SHA256SUMS" in r.path or r.path.startswith(("/v2", "/x/"))]
    assert probes == [], "a tenant's URL reached a service on the node's loopback"
    tokened = [r for r in c.hub.request_log if PLATFORM_TOKEN in r.headers.get("authorization", "")]
    assert tokened == [], "a tenant's model reached the Hub with the platform's token"
    assert not list(c.root.glob("**/mh-evil*"))
