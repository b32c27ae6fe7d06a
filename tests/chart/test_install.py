"""Each ci values file installed into the real API server (``helm install --wait=false``; no kubelets, so no pod
ever runs): every object of the release is accepted and exists, and ``helm uninstall`` leaves none behind, found
both by the release's ``app.kubernetes.io/instance`` label and by name, cluster-scoped objects included.

CRDs: prometheus-operator's are test data applied first. OME's are installed with ``install_ome_crds`` (as the
other k8s tests do), except for a ci file with ``crds.install``: there the release installs them itself, taking
over the ones the session may already have (``--take-ownership``); ``crds.keep`` keeps them, and every model in
them, through ``helm uninstall``, and the test puts their metadata back so that later tests see them as before.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.chart.conftest import ChartTools
from tests.chart.kube import (
    OME_CRD_NAMES,
    Helm,
    crd_established,
    crd_metadata,
    ensure_namespaces,
    eventually,
    install_prometheus_crds,
    restore_crd_metadata,
)
from tests.chart.support import CI_VALUES, ci_id
from tests.integration.test_controlplane import install_ome_crds
from tests.k8s_fixtures import KubeCluster

pytestmark = [pytest.mark.k8s]

INSTANCE = "app.kubernetes.io/instance"
# every kind the chart can render, where it lives, and how kubectl names it
NAMESPACED = {"DaemonSet": "daemonsets.apps", "Deployment": "deployments.apps", "ServiceAccount": "serviceaccounts",
              "Role": "roles.rbac.authorization.k8s.io", "RoleBinding": "rolebindings.rbac.authorization.k8s.io",
              "Service": "services", "ConfigMap": "configmaps", "PodMonitor": "podmonitors.monitoring.coreos.com",
              "ServiceMonitor": "servicemonitors.monitoring.coreos.com",
              "PrometheusRule": "prometheusrules.monitoring.coreos.com"}
CLUSTER_SCOPED = {"ClusterRole": "clusterroles.rbac.authorization.k8s.io",
                  "ClusterRoleBinding": "clusterrolebindings.rbac.authorization.k8s.io",
                  "CustomResourceDefinition": "customresourcedefinitions.apiextensions.k8s.io",
                  "FlowSchema": "flowschemas.flowcontrol.apiserver.k8s.io",
                  "PriorityLevelConfiguration": "prioritylevelconfigurations.flowcontrol.apiserver.k8s.io"}


@pytest.fixture(scope="module")
def helm(chart_tools: ChartTools, kube_cluster: KubeCluster, api_client: Any,
         tmp_path_factory: pytest.TempPathFactory) -> Helm:
    install_prometheus_crds(kube_cluster, api_client)
    return Helm(chart_tools.helm, kube_cluster, tmp_path_factory.mktemp("helm-home"))


def _values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _ref(obj: dict[str, Any]) -> str:
    kind = obj["kind"]
    ns = obj["metadata"].get("namespace")
    return f"{NAMESPACED.get(kind) or CLUSTER_SCOPED[kind]}/{obj['metadata']['name']}" + (f" -n {ns}" if ns else "")


def _get(cluster: KubeCluster, obj: dict[str, Any]) -> dict[str, Any] | None:
    kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")
    args = ["get", NAMESPACED.get(kind) or CLUSTER_SCOPED[kind], name, "-o", "json"]
    if ns:
        args += ["--namespace", ns]
    out = cluster.kubectl(*args, check=False)
    if out.returncode != 0:
        assert "NotFound" in out.stderr, out.stderr
        return None
    got: dict[str, Any] = json.loads(out.stdout)
    return got


def _by_label(cluster: KubeCluster, release: str, kinds: dict[str, str], *, all_namespaces: bool) -> list[str]:
    args = ["get", ",".join(kinds.values()), "-l", f"{INSTANCE}={release}", "-o", "name"]
    if all_namespaces:
        args.append("--all-namespaces")
    out = cluster.kubectl(*args)
    return out.stdout.split()


@pytest.fixture
def release() -> str:
    return f"mh{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ome_crds_before(api_client: Any) -> Iterator[dict[str, dict[str, dict[str, str]] | None]]:
    """OME's CRDs' metadata before the test, put back after it."""
    before = {name: crd_metadata(api_client, name) for name in OME_CRD_NAMES}
    yield before
    for name, meta in before.items():
        restore_crd_metadata(api_client, name, meta)


@pytest.mark.parametrize("values", CI_VALUES, ids=[ci_id(p) for p in CI_VALUES])
def test_install_is_accepted_and_uninstall_leaves_nothing_behind(
        helm: Helm, kube_cluster: KubeCluster, api_client: Any, kube_namespace: str, release: str,
        values: Path, ome_crds_before: dict[str, dict[str, dict[str, str]] | None]) -> None:
    spec = _values(values)
    ensure_namespaces(api_client, (spec.get("rbac") or {}).get("secretNamespaces") or [])
    if spec.get("statusNamespace"):  # OME's namespace: its install creates it, the chart does not
        ensure_namespaces(api_client, [spec["statusNamespace"]])
    crds = spec.get("crds") or {}
    installs_crds = bool(crds.get("install"))
    extra: list[str] = []
    if installs_crds:
        assert crds.get("keep", True), "a ci file with crds.install must keep them: other tests use the CRDs"
        if any(meta is not None for meta in ome_crds_before.values()):
            extra.append("--take-ownership")  # the session's CRDs (kubectl-applied by other tests): adopt them
    else:
        install_ome_crds(kube_cluster, api_client)

    helm.install(release, kube_namespace, "--values", values, *extra)
    objs = helm.manifest(release, kube_namespace)
    kinds = {o["kind"] for o in objs}
    assert kinds <= set(NAMESPACED) | set(CLUSTER_SCOPED), f"kinds this test does not check: {kinds}"
    assert {"DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} <= kinds

    for obj in objs:
        got = _get(kube_cluster, obj)
        assert got is not None, f"{_ref(obj)} of the release does not exist"
        assert got["metadata"]["labels"][INSTANCE] == release, _ref(obj)
        assert got["metadata"]["annotations"]["meta.helm.sh/release-name"] == release, _ref(obj)
        if obj["kind"] in NAMESPACED and obj["metadata"].get("namespace") is None:
            pytest.fail(f"{_ref(obj)}: a namespaced object rendered without its namespace")
    if installs_crds:
        for name in OME_CRD_NAMES:
            eventually(functools.partial(crd_established, api_client, name), what=f"{name} Established")
        model = _cluster_base_model(api_client, f"kept-{release}")

    helm.uninstall(release, kube_namespace)

    kept = {o["metadata"]["name"] for o in objs if o["kind"] == "CustomResourceDefinition"}
    left = [o for o in objs if o["metadata"]["name"] not in kept and _get(kube_cluster, o) is not None]
    assert not left, f"left behind by name: {[_ref(o) for o in left]}"
    by_label = (_by_label(kube_cluster, release, NAMESPACED, all_namespaces=True)
                + _by_label(kube_cluster, release, CLUSTER_SCOPED, all_namespaces=False))
    kept_refs = {f"customresourcedefinition.apiextensions.k8s.io/{n}" for n in kept}
    assert set(by_label) <= kept_refs, f"left behind by label {INSTANCE}={release}: {by_label}"
    releases = client.CoreV1Api(api_client).list_namespaced_secret(
        kube_namespace, label_selector=f"owner=helm,name={release}").items
    assert releases == [], "helm's release record is still there"
    if installs_crds:
        assert kept == set(OME_CRD_NAMES), kept
        for name in OME_CRD_NAMES:
            crd_established(api_client, name)  # crds.keep: the CRDs stay...
        objects = client.CustomObjectsApi(api_client)
        kept_model: Any = objects.get_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", model)
        assert kept_model["metadata"]["name"] == model  # ...and so does every model in them
        objects.delete_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", model)
    else:
        assert not kept


def _cluster_base_model(api: Any, name: str) -> str:
    body = {"apiVersion": "ome.io/v1beta1", "kind": "ClusterBaseModel", "metadata": {"name": name},
            "spec": {"modelFormat": {"name": "safetensors"}, "storage": {"storageUri": "hf://org/kept"}}}
    objects = client.CustomObjectsApi(api)

    def create() -> None:
        try:
            objects.create_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    eventually(create, what="a ClusterBaseModel created")
    return name


def test_crds_install_takes_over_the_crds_already_there_and_keeps_them_and_their_models(
        helm: Helm, kube_cluster: KubeCluster, api_client: Any, kube_namespace: str, release: str,
        ome_crds_before: dict[str, dict[str, dict[str, str]] | None]) -> None:
    install_ome_crds(kube_cluster, api_client)  # as OME (or an earlier test) left them
    before = {name: crd_metadata(api_client, name) for name in OME_CRD_NAMES}
    model = _cluster_base_model(api_client, f"before-{release}")
    try:
        helm.install(release, kube_namespace, "--set", "crds.install=true", "--take-ownership")
        for name in OME_CRD_NAMES:
            meta = crd_metadata(api_client, name)
            assert meta is not None
            assert meta["annotations"]["meta.helm.sh/release-name"] == release
            assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
            assert meta["labels"][INSTANCE] == release
        helm.uninstall(release, kube_namespace)
        for name in OME_CRD_NAMES:
            crd_established(api_client, name)
        got: Any = client.CustomObjectsApi(api_client).get_cluster_custom_object(
            "ome.io", "v1beta1", "clusterbasemodels", model)
        assert got["metadata"]["name"] == model, "a model in the kept CRDs went with the release"
        for name in OME_CRD_NAMES:
            restore_crd_metadata(api_client, name, before[name])
            assert crd_metadata(api_client, name) == before[name]
    finally:
        client.CustomObjectsApi(api_client).delete_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels",
                                                                          model)
