"""Helpers of the chart tests that need the API server: helm against it, prometheus-operator's CRDs, namespaces."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.chart.support import CHART, PROM_CRDS, manifests, run
from tests.k8s_fixtures import KubeCluster

T = TypeVar("T")
PROM_CRD_NAMES = ("podmonitors.monitoring.coreos.com", "servicemonitors.monitoring.coreos.com",
                  "prometheusrules.monitoring.coreos.com")
OME_CRD_NAMES = ("basemodels.ome.io", "clusterbasemodels.ome.io")


def eventually(fn: Callable[[], T], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Retry ``fn`` until it returns without raising (RBAC and CRD changes reach the API server's caches)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (AssertionError, ApiException) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {timeout}s: {exc}") from exc
            time.sleep(0.2)


class Helm:
    """helm with the cluster's kubeconfig and its own cache/config folders."""

    def __init__(self, helm: Path, cluster: KubeCluster, home: Path) -> None:
        self.helm = helm
        self.cluster = cluster
        self.env = cluster.env()
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
            (home / sub).mkdir(parents=True, exist_ok=True)
            self.env[var] = str(home / sub)

    def __call__(self, *args: str | Path, check: bool = True, timeout: float = 180) -> str:
        proc = run([self.helm, *args], env=self.env, check=check, timeout=timeout)
        return proc.stdout + (proc.stderr if proc.returncode else "")

    def install(self, release: str, namespace: str, *args: str | Path) -> None:
        # no kubelets here: nothing ever becomes ready, so never wait; the objects just have to be accepted
        self("install", release, CHART, "--namespace", namespace, "--wait=false", "--timeout", "2m", *args)

    def manifest(self, release: str, namespace: str) -> list[dict[str, Any]]:
        return manifests(self("get", "manifest", release, "--namespace", namespace))

    def uninstall(self, release: str, namespace: str) -> str:
        return self("uninstall", release, "--namespace", namespace, "--timeout", "2m")


def crd_established(api: Any, name: str) -> None:
    status = client.ApiextensionsV1Api(api).read_custom_resource_definition(name).status
    conditions = {c.type: c.status for c in ((status.conditions if status else None) or [])}
    assert conditions.get("Established") == "True", f"{name}: {conditions}"


def install_prometheus_crds(cluster: KubeCluster, api: Any) -> None:
    """prometheus-operator's PodMonitor/ServiceMonitor/PrometheusRule CRDs (test data), Established.

    Server-side apply: the CRDs are too large for client-side apply's last-applied annotation to be sensible.
    """
    out = cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager", "modelherd-tests",
                          "-f", str(PROM_CRDS), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in PROM_CRD_NAMES:
        eventually(functools.partial(crd_established, api, name), what=f"CRD {name} Established")


def ensure_namespaces(api: Any, names: Sequence[str]) -> None:
    core = client.CoreV1Api(api)
    for name in names:
        with contextlib.suppress(ApiException):
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))


def crd_metadata(api: Any, name: str) -> dict[str, dict[str, str]] | None:
    """A CRD's labels and annotations, or None when it does not exist."""
    try:
        resp: Any = client.ApiextensionsV1Api(api).read_custom_resource_definition(name, _preload_content=False)
        raw = json.loads(resp.data)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    meta = raw["metadata"]
    return {"labels": dict(meta.get("labels") or {}), "annotations": dict(meta.get("annotations") or {})}


def restore_crd_metadata(api: Any, name: str, before: dict[str, dict[str, str]] | None) -> None:
    """Put a CRD's labels and annotations back as ``before`` (a release that took it over leaves its own)."""
    now = crd_metadata(api, name)
    if now is None:
        return
    base = before or {"labels": {}, "annotations": {}}
    patch: dict[str, Any] = {"metadata": {}}
    for field in ("labels", "annotations"):
        diff: dict[str, str | None] = {k: None for k in now[field] if k not in base[field]}
        diff.update({k: v for k, v in base[field].items() if now[field].get(k) != v})
        if diff:
            patch["metadata"][field] = diff
    if patch["metadata"]:
        client.ApiextensionsV1Api(api).patch_custom_resource_definition(name, patch)

