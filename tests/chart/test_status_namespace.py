"""``statusNamespace``: installed next to OME, the agents write where OME's BaseModel controller reads.

OME's controller reads the per-node status ConfigMaps only in its own namespace (``ome`` by default), so a release in
a namespace of its own must write them there, and its Roles must be there too (and nowhere else). One release with
``statusNamespace`` naming an ``ome``-style namespace (unique here, created first: the chart does not create it) and
``controller.enabled``; two real ``modelherd agent`` processes and one ``modelherd controller``, each on its chart
ServiceAccount's token (TokenRequest) and with the ``--namespace`` the rendered DaemonSet/Deployment pass, share one
models root against the loopback Hub. The ClusterBaseModel is Ready on both nodes, its ConfigMap entries and Lease
are in the OME namespace, nothing of theirs in the release namespace, and no request was refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from modelherd.agent.controller.controller import LEASE_NAME
from modelherd.agent.ome.keys import configmap_key, node_label_key
from modelherd.agent.reporting.configmap import STATUS_LABEL
from modelherd.coordination.identity import A_PHASE, MANAGED_BY, MANAGED_BY_LABEL

from tests.agent_fleet import MODELHERD, Fleet, eventually, free_port
from tests.chart.conftest import ChartTools
from tests.chart.kube import Helm, ensure_namespaces
from tests.hubserver import HubServer
from tests.integration.test_controlplane import install_ome_crds
from tests.k8s_fixtures import KubeCluster, mint_sa_kubeconfig
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

KiB = 1024
REPO = "org/ome-llama"
INSTANCE = "app.kubernetes.io/instance"


@dataclass
class Release:
    name: str
    namespace: str  # the release's: the pods and ServiceAccounts only
    ome: str  # statusNamespace: OME's namespace
    agent_sa: str
    controller_sa: str
    objs: list[dict[str, Any]]  # helm get manifest

    def args(self, kind: str) -> list[str]:
        (obj,) = [o for o in self.objs if o["kind"] == kind]
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        return list(container["args"])

    def namespace_flag(self, kind: str) -> str:
        """The ``--namespace`` the rendered DaemonSet (or Deployment) passes."""
        (value,) = [a.removeprefix("--namespace=") for a in self.args(kind) if a.startswith("--namespace=")]
        return value


@pytest.fixture(scope="module")
def release(chart_tools: ChartTools, kube_cluster: KubeCluster, api_client: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    install_ome_crds(kube_cluster, api_client)
    tag = uuid.uuid4().hex[:8]
    name, namespace, ome = f"sn{tag}", f"sn-{tag}", f"ome-{tag}"
    ensure_namespaces(api_client, [namespace, ome])  # OME's install creates its namespace; the chart does not
    helm = Helm(chart_tools.helm, kube_cluster, tmp_path_factory.mktemp("helm-home"))
    helm.install(name, namespace, "--set", f"statusNamespace={ome}", "--set", "controller.enabled=true",
                 "--set", "storage.mode=shared")
    try:
        yield Release(name=name, namespace=namespace, ome=ome, agent_sa=f"{name}-modelherd",
                      controller_sa=f"{name}-modelherd-controller", objs=helm.manifest(name, namespace))
    finally:
        helm.uninstall(name, namespace)
        core = client.CoreV1Api(api_client)
        for ns in (namespace, ome):
            with contextlib.suppress(ApiException):  # best effort: no namespace controller here
                core.delete_namespace(ns)


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("src") / "llama"
    make_sharded_model(folder, n_shards=3, shard_bytes=128 * KiB)
    return folder, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hub(model_src: tuple[Path, int]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, model_src[0])
        yield server


def _rbac_namespaces(objs: list[dict[str, Any]]) -> dict[str, set[str]]:
    return {kind: {o["metadata"]["namespace"] for o in objs if o["kind"] == kind} for kind in ("Role", "RoleBinding")}


def test_the_release_renders_every_status_flag_and_role_in_the_ome_namespace(release: Release,
                                                                             api_client: Any) -> None:
    assert release.namespace_flag("DaemonSet") == release.ome
    assert release.namespace_flag("Deployment") == release.ome
    assert _rbac_namespaces(release.objs) == {"Role": {release.ome}, "RoleBinding": {release.ome}}
    for obj in release.objs:
        if obj["kind"] in ("DaemonSet", "Deployment", "ServiceAccount"):
            assert obj["metadata"]["namespace"] == release.namespace, obj["metadata"]
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert {s["namespace"] for s in obj["subjects"]} == {release.namespace}, obj

    # what the API server holds: both Roles and bindings in OME's namespace, none in the release's
    rbac: Any = client.RbacAuthorizationV1Api(api_client)
    selector = f"{INSTANCE}={release.name}"
    for lister in (rbac.list_namespaced_role, rbac.list_namespaced_role_binding):
        names = {o.metadata.name for o in lister(release.ome, label_selector=selector).items}
        assert names == {release.agent_sa, release.controller_sa}, (lister.__name__, names)
        assert lister(release.namespace, label_selector=selector).items == [], lister.__name__


# (service account, verb, group, resource, namespace: "ome" | "release", allowed)
ACCESS = [
    ("agent", "create", "", "configmaps", "ome", True), ("agent", "update", "", "configmaps", "ome", True),
    ("agent", "create", "coordination.k8s.io", "leases", "ome", True), ("agent", "get", "", "secrets", "ome", True),
    ("agent", "create", "", "configmaps", "release", False), ("agent", "list", "", "configmaps", "release", False),
    ("agent", "create", "coordination.k8s.io", "leases", "release", False),
    ("agent", "get", "", "secrets", "release", False), ("agent", "list", "", "secrets", "ome", False),
    ("controller", "list", "", "configmaps", "ome", True), ("controller", "watch", "", "configmaps", "ome", True),
    ("controller", "create", "coordination.k8s.io", "leases", "ome", True),
    ("controller", "update", "coordination.k8s.io", "leases", "ome", True),
    ("controller", "list", "", "configmaps", "release", False),
    ("controller", "create", "coordination.k8s.io", "leases", "release", False),
    ("controller", "create", "", "configmaps", "ome", False), ("controller", "get", "", "secrets", "ome", False),
]


@pytest.mark.parametrize("access", ACCESS, ids=["-".join(str(x) for x in a) for a in ACCESS])
def test_the_service_accounts_are_granted_only_in_the_ome_namespace(
        api_client: Any, release: Release, access: tuple[str, str, str, str, str, bool]) -> None:
    who, verb, group, resource, where, want = access
    sa = release.agent_sa if who == "agent" else release.controller_sa
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{release.namespace}:{sa}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{release.namespace}", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource,
            namespace=release.ome if where == "ome" else release.namespace)))
    status = client.AuthorizationV1Api(api_client).create_subject_access_review(review).status
    assert status is not None
    assert bool(status.allowed) is want, f"{who} {verb} {resource} in {where}: {status.reason}"


@dataclass
class Controller:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def leading(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the controller exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return False
        m = re.search(r"^modelherd_controller_is_leader (\S+)$", text, re.M)
        return m is not None and float(m.group(1)) == 1.0


def _start_controller(kubeconfig: Path, namespace: str, base: Path) -> Controller:
    port = free_port()
    log = base / "controller.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELHERD_", "KUBECONFIG", "POD_"))}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [MODELHERD, "controller", "--namespace", namespace, "--kubeconfig", str(kubeconfig), "--port", str(port),
         "--bind-address", "127.0.0.1", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True, env=env)
    return Controller(proc, port, log)


def _labelled(api: Any, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    if kind == "configmaps":
        resp: Any = client.CoreV1Api(api).list_namespaced_config_map(namespace, label_selector=selector,
                                                                     _preload_content=False)
    else:
        resp = client.CoordinationV1Api(api).list_namespaced_lease(namespace, label_selector=selector,
                                                                   _preload_content=False)
    items: list[dict[str, Any]] = json.loads(resp.data)["items"]
    return items


def _refused(text: str) -> list[str]:
    return [line for line in text.splitlines() if "forbidden" in line.lower() or " 403" in line]


def test_agents_and_controller_write_and_read_status_in_the_ome_namespace(
        release: Release, kube_cluster: KubeCluster, api_client: Any, hub: HubServer, tmp_path: Path,
        model_src: tuple[Path, int]) -> None:
    status_ns = release.namespace_flag("DaemonSet")  # as the pods get it
    assert status_ns == release.ome != release.namespace
    agent_kc = mint_sa_kubeconfig(kube_cluster, release.namespace, release.agent_sa, tmp_path / "agent.kubeconfig")
    ctl_kc = mint_sa_kubeconfig(kube_cluster, release.namespace, release.controller_sa, tmp_path / "ctl.kubeconfig")
    fleet = Fleet(api_client, agent_kc, status_ns, hub.endpoint, tmp_path)  # Fleet.start passes --namespace
    ctl: Controller | None = None
    try:
        root = tmp_path / "shared-models"
        root.mkdir()
        nodes = [fleet.add_node("a"), fleet.add_node("b")]
        agents = [fleet.start(n, root, "--storage-mode", "shared", "--coordination", "kubernetes") for n in nodes]
        ctl = _start_controller(ctl_kc, release.namespace_flag("Deployment"), tmp_path)
        for agent in agents:
            fleet.wait_ready(agent)
        eventually(ctl.leading, timeout=60, what="the controller leading")

        cbm = f"ome-{fleet.tag}"
        fleet.create_cbm(cbm, f"hf://{REPO}")
        label = node_label_key("ClusterBaseModel", "", cbm)
        eventually(lambda: all(fleet.labels(n).get(label) == "Ready" for n in nodes), timeout=120,
                   what="the ClusterBaseModel Ready on both nodes")
        assert hub.stats()["bytes_served"] == model_src[1], "shared storage: exactly one download"

        # the per-node ConfigMaps: in OME's namespace, with OME's label and a Ready entry each
        selector = f"{STATUS_LABEL}=true"
        cms = {cm["metadata"]["name"]: cm for cm in _labelled(api_client, "configmaps", release.ome, selector)}
        assert set(nodes) <= set(cms), sorted(cms)
        for node in nodes:
            entry = json.loads(cms[node]["data"][configmap_key("ClusterBaseModel", "", cbm)])
            assert entry["status"] == "Ready", (node, entry)
        assert _labelled(api_client, "configmaps", release.namespace, selector) == []

        # the model's Lease: in OME's namespace, Complete; none in the release namespace
        managed = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        leases = [ls for ls in _labelled(api_client, "leases", release.ome, managed)
                  if A_PHASE in (ls["metadata"].get("annotations") or {})]
        assert [ls["metadata"]["annotations"][A_PHASE] for ls in leases] == ["Complete"], leases
        assert _labelled(api_client, "leases", release.namespace, managed) == []

        # the controller read those ConfigMaps there: the model's status, and its election Lease there too
        def cbm_ready() -> bool:
            obj: Any = fleet.objs.get_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", cbm)
            status = obj.get("status") or {}
            return status.get("state") == "Ready" and sorted(status.get("nodesReady") or []) == sorted(nodes)
        eventually(cbm_ready, timeout=60, what="status Ready with both nodes, written by the controller")
        coord: Any = client.CoordinationV1Api(api_client)
        assert coord.read_namespaced_lease(LEASE_NAME, release.ome).spec.holder_identity
        with pytest.raises(ApiException) as missing:
            coord.read_namespaced_lease(LEASE_NAME, release.namespace)
        assert missing.value.status == 404

        # nothing was refused
        logs = fleet.logs() + "\n" + ctl.log.read_text()
        assert not _refused(logs), "\n".join(_refused(logs)[:20])
        assert all(a.proc.poll() is None for a in agents), fleet.logs()[-3000:]
        assert ctl.proc.poll() is None, ctl.log.read_text()[-3000:]
    finally:
        if ctl is not None and ctl.proc.poll() is None:
            ctl.proc.kill()
            ctl.proc.wait(10)
        for plural, ns, name in fleet.models:  # no controller left to release them: strip its finalizers
            with contextlib.suppress(ApiException):
                fleet.patch_model(plural, name, {"metadata": {"finalizers": None}}, ns)
        fleet.cleanup()
