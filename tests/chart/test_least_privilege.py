"""The chart's RBAC is enough, and no more: real ``modelherd agent`` processes running with the chart's own
ServiceAccount token (TokenRequest) do their whole job, and SubjectAccessReviews show what that account (and the
controller's) cannot do.

One release (defaults, plus ``rbac.secretNamespaces`` naming one namespace and the controller on) in a namespace of
its own; three agents, each its own Node, share one models root (``--storage-mode shared``) against the loopback Hub.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from modelherd.agent.ome.keys import configmap_key, node_label_key
from modelherd.coordination.identity import A_PHASE, MANAGED_BY, MANAGED_BY_LABEL

from tests.agent_fleet import Fleet, eventually
from tests.chart.conftest import ChartTools
from tests.chart.kube import Helm, ensure_namespaces
from tests.hubserver import HubServer
from tests.integration.test_controlplane import install_ome_crds
from tests.k8s_fixtures import KubeCluster, mint_sa_kubeconfig
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

KiB = 1024
PUBLIC = "org/public-llama"
PRIVATE = "org/private-llama"
TOKEN = "hf_LeastPrivilegeToken0123456789abcdef"


@dataclass
class Release:
    name: str
    namespace: str  # the release's: the agents' ConfigMaps and Leases
    allowed: str  # listed in rbac.secretNamespaces
    denied: str  # not listed
    agent_sa: str
    controller_sa: str


@pytest.fixture(scope="module")
def release(chart_tools: ChartTools, kube_cluster: KubeCluster, api_client: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    install_ome_crds(kube_cluster, api_client)
    tag = uuid.uuid4().hex[:8]
    rel = Release(name=f"lp{tag}", namespace=f"lp-{tag}", allowed=f"lp-{tag}-team-a", denied=f"lp-{tag}-team-b",
                  agent_sa=f"lp{tag}-modelherd", controller_sa=f"lp{tag}-modelherd-controller")
    ensure_namespaces(api_client, [rel.namespace, rel.allowed, rel.denied])
    helm = Helm(chart_tools.helm, kube_cluster, tmp_path_factory.mktemp("helm-home"))
    helm.install(rel.name, rel.namespace, "--set", f"rbac.secretNamespaces={{{rel.allowed}}}",
                 "--set", "controller.enabled=true", "--set", "storage.mode=shared")
    try:
        yield rel
    finally:
        helm.uninstall(rel.name, rel.namespace)
        core = client.CoreV1Api(api_client)
        for ns in (rel.namespace, rel.allowed, rel.denied):
            with contextlib.suppress(client.ApiException):  # best effort: no namespace controller here
                core.delete_namespace(ns)


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("src") / "llama"
    make_sharded_model(folder, n_shards=4, shard_bytes=128 * KiB)
    return folder, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hub(model_src: tuple[Path, int]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(PUBLIC, model_src[0])
        server.add_repo(PRIVATE, model_src[0], token=TOKEN)
        yield server


@pytest.fixture
def sa_fleet(release: Release, kube_cluster: KubeCluster, api_client: Any, hub: HubServer,
             tmp_path: Path) -> Iterator[Fleet]:
    """A Fleet whose agents authenticate as the chart's agent ServiceAccount (set-up and reads are admin's)."""
    kubeconfig = mint_sa_kubeconfig(kube_cluster, release.namespace, release.agent_sa, tmp_path / "agent.kubeconfig")
    fleet = Fleet(api_client, kubeconfig, release.namespace, hub.endpoint, tmp_path)
    try:
        yield fleet
    finally:
        fleet.cleanup()


def _secret(api: Any, namespace: str, name: str) -> None:
    client.CoreV1Api(api).create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=name), data={"token": base64.b64encode(TOKEN.encode()).decode()}))


def test_agents_with_the_charts_service_account_do_their_whole_job(
        sa_fleet: Fleet, release: Release, hub: HubServer, api_client: Any, tmp_path: Path,
        model_src: tuple[Path, int]) -> None:
    fleet = sa_fleet
    root = tmp_path / "shared-models"
    root.mkdir()
    nodes = [fleet.add_node("a", {"role": "secrets"}), fleet.add_node("b"), fleet.add_node("c")]
    agents = [fleet.start(n, root, "--storage-mode", "shared", "--coordination", "kubernetes") for n in nodes]
    for agent in agents:
        fleet.wait_ready(agent)  # listed and watches Nodes, BaseModels and ClusterBaseModels

    # a ClusterBaseModel: Ready on every node, one download under a Lease, labels, ConfigMap entries, Events
    cbm = f"public-{fleet.tag}"
    fleet.create_cbm(cbm, f"hf://{PUBLIC}")
    key = node_label_key("ClusterBaseModel", "", cbm)
    eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in nodes), timeout=120,
               what="the ClusterBaseModel Ready on every node")
    assert hub.stats()["bytes_served"] == model_src[1], "shared storage: exactly one download"
    for node in nodes:
        entry = fleet.entry(node, configmap_key("ClusterBaseModel", "", cbm))
        assert entry is not None and entry["status"] == "Ready", (node, entry)
    resp: Any = client.CoordinationV1Api(api_client).list_namespaced_lease(
        release.namespace, label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}", _preload_content=False)
    leases = json.loads(resp.data)["items"]
    assert [ls["metadata"]["annotations"].get(A_PHASE) for ls in leases] == ["Complete"], leases
    assert not leases[0]["spec"].get("holderIdentity"), "the Lease is released after the download"

    def ready_events_by_node() -> set[str]:
        resp: Any = client.CoreV1Api(api_client).list_namespaced_event("default", _preload_content=False)
        events = json.loads(resp.data)["items"]
        return {e["source"]["host"] for e in events if e["involvedObject"]["name"] == cbm and e["reason"] == "Ready"}
    eventually(lambda: ready_events_by_node() == set(nodes), timeout=30, what="a Ready Event from every node")

    # BaseModels naming a token Secret: readable in a namespace of rbac.secretNamespaces, forbidden elsewhere
    for ns in (release.allowed, release.denied):
        _secret(api_client, ns, "hf-token")
    allowed, denied = f"allowed-{fleet.tag}", f"denied-{fleet.tag}"
    fleet.create_bm(allowed, f"hf://{PRIVATE}", namespace=release.allowed, key="hf-token",
                    parameters={"secretKey": "token"}, selector={"role": "secrets"})
    fleet.create_bm(denied, f"hf://{PRIVATE}", namespace=release.denied, key="hf-token",
                    parameters={"secretKey": "token"}, selector={"role": "secrets"})
    ok_key = node_label_key("BaseModel", release.allowed, allowed)
    bad_key = node_label_key("BaseModel", release.denied, denied)
    eventually(lambda: fleet.labels(nodes[0]).get(ok_key) == "Ready", timeout=90,
               what="the BaseModel with a Secret in a listed namespace Ready")
    eventually(lambda: fleet.labels(nodes[0]).get(bad_key) == "Failed", timeout=60,
               what="the BaseModel with a Secret in an unlisted namespace Failed")
    entry = fleet.entry(nodes[0], configmap_key("BaseModel", release.denied, denied))
    assert entry is not None and entry["status"] == "Failed", entry
    message = entry["modelherd"]["message"]
    assert f"reading Secret {release.denied}/hf-token is forbidden" in message, entry
    assert bad_key not in fleet.labels(nodes[1]) and ok_key not in fleet.labels(nodes[1])

    # nothing else was refused: every 403 in the agents' logs is about that one Secret
    refused = [line for line in fleet.logs().splitlines()
               if ("forbidden" in line.lower() or " 403" in line) and f"{release.denied}/hf-token" not in line]
    assert not refused, "\n".join(refused[:20])
    assert all(a.proc.poll() is None for a in agents), fleet.logs()[-3000:]


# ------------------------------------------------------------------------------------------------ access reviews
# (verb, API group, resource, subresource, namespace) with namespace one of: "" (cluster-wide / cluster-scoped),
# "release", "allowed" (in rbac.secretNamespaces), "denied" (not), or a literal namespace.
Access = tuple[str, str, str, str, str]

AGENT_CANNOT: list[Access] = [
    ("get", "", "secrets", "", ""), ("list", "", "secrets", "", ""), ("watch", "", "secrets", "", ""),
    ("get", "", "secrets", "", "denied"), ("get", "", "secrets", "", "kube-system"),
    ("list", "", "secrets", "", "allowed"), ("list", "", "secrets", "", "release"),
    ("delete", "", "nodes", "", ""), ("create", "", "nodes", "", ""), ("update", "", "nodes", "", ""),
    ("patch", "", "nodes", "status", ""),
    ("create", "", "configmaps", "", "denied"), ("update", "", "configmaps", "", "denied"),
    ("get", "", "configmaps", "", "kube-system"), ("list", "", "configmaps", "", ""),
    ("create", "coordination.k8s.io", "leases", "", "denied"),
    ("update", "coordination.k8s.io", "leases", "", "kube-node-lease"),
    ("update", "ome.io", "basemodels", "", "allowed"), ("patch", "ome.io", "basemodels", "", "release"),
    ("delete", "ome.io", "clusterbasemodels", "", ""), ("create", "ome.io", "clusterbasemodels", "", ""),
    ("patch", "ome.io", "basemodels", "status", "allowed"), ("update", "ome.io", "clusterbasemodels", "status", ""),
    ("delete", "", "pods", "", "release"), ("create", "", "pods", "", "release"),
    ("create", "", "pods", "exec", "release"), ("get", "", "pods", "exec", "release"),
    ("patch", "apiextensions.k8s.io", "customresourcedefinitions", "", ""),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions", "", ""),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles", "", ""),
    ("bind", "rbac.authorization.k8s.io", "clusterroles", "", ""),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", "", ""),
    ("create", "rbac.authorization.k8s.io", "rolebindings", "", "release"),
    ("update", "rbac.authorization.k8s.io", "roles", "", "release"),
    ("impersonate", "", "serviceaccounts", "", "release"),
    ("create", "", "serviceaccounts", "token", "release"),
    ("*", "*", "*", "", ""),
]
AGENT_CAN: list[Access] = [
    ("get", "", "nodes", "", ""), ("list", "", "nodes", "", ""), ("watch", "", "nodes", "", ""),
    ("patch", "", "nodes", "", ""),
    ("list", "ome.io", "basemodels", "", ""), ("watch", "ome.io", "basemodels", "", ""),
    ("get", "ome.io", "basemodels", "", "denied"),
    ("list", "ome.io", "clusterbasemodels", "", ""), ("watch", "ome.io", "clusterbasemodels", "", ""),
    ("create", "", "events", "", "default"), ("create", "", "events", "", "denied"),
    ("patch", "", "events", "", "release"),
    *[(verb, "", "configmaps", "", "release") for verb in ("get", "list", "watch", "create", "update", "patch")],
    *[(verb, "coordination.k8s.io", "leases", "", "release")
      for verb in ("get", "list", "watch", "create", "update", "patch", "delete")],
    ("get", "", "secrets", "", "release"), ("get", "", "secrets", "", "allowed"),
]
CONTROLLER_CANNOT: list[Access] = [
    ("get", "", "secrets", "", "release"), ("get", "", "secrets", "", "allowed"), ("list", "", "secrets", "", ""),
    ("patch", "", "nodes", "", ""), ("delete", "", "nodes", "", ""),
    ("create", "", "configmaps", "", "release"), ("update", "", "configmaps", "", "release"),
    ("delete", "", "configmaps", "", "release"),
    ("delete", "coordination.k8s.io", "leases", "", "release"),
    ("create", "coordination.k8s.io", "leases", "", "denied"),
    ("delete", "ome.io", "basemodels", "", "allowed"), ("create", "ome.io", "clusterbasemodels", "", ""),
    ("update", "ome.io", "basemodels", "", "allowed"),
    ("create", "", "pods", "exec", "release"), ("delete", "", "pods", "", "release"),
    ("patch", "apiextensions.k8s.io", "customresourcedefinitions", "", ""),
    ("escalate", "rbac.authorization.k8s.io", "roles", "", "release"),
    ("bind", "rbac.authorization.k8s.io", "clusterroles", "", ""),
    ("*", "*", "*", "", ""),
]
CONTROLLER_CAN: list[Access] = [
    *[(verb, "ome.io", plural, "", "") for verb in ("get", "list", "watch", "patch")
      for plural in ("basemodels", "clusterbasemodels")],
    ("patch", "ome.io", "basemodels", "status", "denied"), ("patch", "ome.io", "clusterbasemodels", "status", ""),
    ("get", "", "nodes", "", ""), ("list", "", "nodes", "", ""), ("watch", "", "nodes", "", ""),
    ("get", "", "configmaps", "", "release"), ("list", "", "configmaps", "", "release"),
    ("watch", "", "configmaps", "", "release"),
    ("get", "coordination.k8s.io", "leases", "", "release"), ("create", "coordination.k8s.io", "leases", "", "release"),
    ("update", "coordination.k8s.io", "leases", "", "release"),
]


def _id(access: Access) -> str:
    verb, group, resource, sub, ns = access
    return f"{verb}-{resource}{'/' + sub if sub else ''}{'.' + group if group else ''}@{ns or 'cluster'}"


def _allowed(api: Any, rel: Release, sa: str, access: Access) -> tuple[bool, str]:
    verb, group, resource, sub, ns = access
    namespace = {"release": rel.namespace, "allowed": rel.allowed, "denied": rel.denied}.get(ns, ns)
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{rel.namespace}:{sa}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{rel.namespace}", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=sub or None, namespace=namespace or None)))
    status = client.AuthorizationV1Api(api).create_subject_access_review(review).status
    assert status is not None
    return bool(status.allowed), str(status.reason or status.evaluation_error or "")


@pytest.mark.parametrize("access", AGENT_CANNOT, ids=[_id(a) for a in AGENT_CANNOT])
def test_the_agent_service_account_cannot(api_client: Any, release: Release, access: Access) -> None:
    allowed, reason = _allowed(api_client, release, release.agent_sa, access)
    assert not allowed, f"the agent may {_id(access)}: {reason}"


@pytest.mark.parametrize("access", AGENT_CAN, ids=[_id(a) for a in AGENT_CAN])
def test_the_agent_service_account_can(api_client: Any, release: Release, access: Access) -> None:
    allowed, reason = _allowed(api_client, release, release.agent_sa, access)
    assert allowed, f"the agent may not {_id(access)}: {reason}"


@pytest.mark.parametrize("access", CONTROLLER_CANNOT, ids=[_id(a) for a in CONTROLLER_CANNOT])
def test_the_controller_service_account_cannot(api_client: Any, release: Release, access: Access) -> None:
    allowed, reason = _allowed(api_client, release, release.controller_sa, access)
    assert not allowed, f"the controller may {_id(access)}: {reason}"


@pytest.mark.parametrize("access", CONTROLLER_CAN, ids=[_id(a) for a in CONTROLLER_CAN])
def test_the_controller_service_account_can(api_client: Any, release: Release, access: Access) -> None:
    allowed, reason = _allowed(api_client, release, release.controller_sa, access)
    assert allowed, f"the controller may not {_id(access)}: {reason}"
