"""The e2e suite's cluster: read from ``DIR/env`` written by ``e2e/cluster/up`` (or ``e2e/kind/run``).

Set ``MODELHERD_E2E_ENV=DIR/env``; without it every ``e2e`` test is skipped (the unit/integration run never
needs a cluster). Each test installs the agent with ``helm install`` into its own namespace and uninstalls it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.path).startswith(str(HERE)):
            item.add_marker(pytest.mark.e2e)
            if not os.environ.get("MODELHERD_E2E_ENV"):
                item.add_marker(pytest.mark.skip(reason="no cluster: set MODELHERD_E2E_ENV=DIR/env "
                                                        "(e2e/cluster/up DIR, or e2e/kind/run)"))


@dataclass
class Cluster:
    """The cluster of ``DIR/env``, driven the way a user drives one: the API, ``kubectl`` and ``helm``."""

    env: dict[str, str]
    api: Any

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def objs(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    def sh(self, *args: str, timeout: float = 180) -> str:
        e = {**os.environ, "KUBECONFIG": self.env["KUBECONFIG"]}
        proc = subprocess.run(args, capture_output=True, text=True, env=e, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def kubectl(self, *args: str, timeout: float = 180) -> str:
        return self.sh(self.env["KUBECTL"], *args, timeout=timeout)

    def helm(self, *args: str, timeout: float = 300) -> str:
        return self.sh(self.env["HELM"], *args, timeout=timeout)

    def nodes(self) -> list[str]:
        """The suite's nodes (the ones the agent's nodeSelector picks)."""
        sel = self.env.get("NODE_SELECTOR", "modelherd.e2e/netns=true")
        return sorted(n.metadata.name for n in self.core.list_node(label_selector=sel).items)

    def node_labels(self, node: str) -> dict[str, str]:
        return dict(self.core.read_node(node).metadata.labels or {})

    def hub_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.env["HUB_STATS_URL"], timeout=5) as r:
            stats: dict[str, Any] = json.loads(r.read())
        return stats

    def hub_throttle(self, bytes_per_s: float) -> None:
        """Every file body the Hub sends from now on at most ``bytes_per_s`` per response (0: full speed)."""
        want = {"throttle_bytes_per_s": bytes_per_s} if bytes_per_s else {}
        root = Path(self.env["HUB_ROOT"])
        tmp = root / f"._control.{uuid.uuid4().hex[:6]}"
        tmp.write_text(json.dumps(want))
        tmp.rename(root / "_control.json")
        wait_for(lambda: self.hub_stats().get("control") == want, 10, f"the Hub applying {want}")

    def publish(self, repo: str, src: Path) -> None:
        """Put a model folder under the Hub's root (rename, so it is never served half-written); wait until served."""
        org, name = repo.split("/")
        dest = Path(self.env["HUB_ROOT"]) / org / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{name}.{uuid.uuid4().hex[:6]}"
        subprocess.run(["cp", "-a", str(src), str(tmp)], check=True)
        tmp.rename(dest)

        def served() -> bool:
            try:
                with urllib.request.urlopen(f"{self.env['HUB_URL']}/api/models/{repo}", timeout=5) as r:
                    return bool(r.status == 200)
            except OSError:
                return False
        wait_for(served, 60, f"the Hub serving {repo}")

    # ---- the chart
    def chart_values(self, **overrides: Any) -> dict[str, Any]:
        """The chart's values for this cluster: the image built from this checkout (already on every node), the
        models root, the Hub, the suite's nodes; ``overrides`` merged in (nested dicts merge)."""
        repo, _, tag = self.env["IMAGE"].rpartition(":")
        values: dict[str, Any] = {
            "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
            # auto: the agent detects the root itself; kind sets STORAGE_MODE=shared (its shared folder is a bind
            # mount of one host folder, which detection rightly calls local)
            "storage": {"mode": self.env.get("STORAGE_MODE", "auto"), "modelsRoot": self.env["MODELS_ROOT"]},
            # a port of its own per release: with hostNetwork, an agent of an earlier release still terminating (or
            # stuck) on a node never blocks this one's bind
            "agent": {"hubUrl": self.env["HUB_URL"], "logFormat": "json", "port": random.randint(20000, 29999)},
            # nodes here have no pod network to the host: the agent uses the node's (its veth, no default route)
            "hostNetwork": True,
            "nodeSelector": dict([self.env.get("NODE_SELECTOR", "modelherd.e2e/netns=true").split("=", 1)]),
            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
        }
        return _merge(values, overrides)

    def install(self, namespace: str, values: dict[str, Any], *, release: str = "modelherd",
                upgrade: bool = False, timeout_s: int = 240) -> None:
        """``helm install`` (or ``upgrade``) charts/modelherd with ``values`` and wait until every agent is Ready."""
        path = Path(self.env.get("CLUSTER_DIR", "/tmp")) / f"values-{namespace}-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(values))
        verb = ["upgrade"] if upgrade else ["install", "--create-namespace"]
        try:
            self.helm(*verb, release, str(CHART), "-n", namespace, "-f", str(path), "--wait",
                      "--timeout", f"{timeout_s}s", timeout=timeout_s + 60)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.why_not_ready(namespace)}") from None

    def why_not_ready(self, namespace: str) -> str:
        """What a failed ``--wait`` needs to be understood: the nodes, the pods of ``namespace`` and of every other
        namespace still holding pods on the suite's nodes (hostNetwork: a port held by a terminating agent), the
        namespace's Events, and the last log lines of each of its pods."""
        out: list[str] = []

        def add(title: str, *args: str) -> None:
            try:
                text = self.kubectl(*args, timeout=30)
            except (AssertionError, subprocess.TimeoutExpired) as e:
                text = f"({e})"
            out.append(f"--- {title}\n{text[-4000:]}")

        add("nodes", "get", "nodes", "-o", "wide")
        add("pods (all namespaces)", "get", "pods", "-A", "-o", "wide")
        add(f"events of {namespace}", "get", "events", "-n", namespace, "--sort-by=.lastTimestamp")
        try:
            pods = [p.metadata.name for p in self.core.list_namespaced_pod(namespace).items]
        except client.ApiException:
            pods = []
        for pod in pods:
            add(f"logs of {pod}", "logs", "-n", namespace, pod, "--tail", "30", "--all-containers")
        # a process stuck in the kernel (D state) on this machine: a hung shared mount stops every agent's start
        ps = subprocess.run(["ps", "-eo", "pid,stat,wchan:24,args"], capture_output=True, text=True).stdout
        stuck = [line for line in ps.splitlines()[1:] if line.split()[1].startswith("D")]
        out.append("--- processes in D state\n" + ("\n".join(stuck) or "(none)"))
        return "\n".join(out)

    def uninstall(self, namespace: str, release: str = "modelherd") -> None:
        """``helm uninstall --wait``, then wait until the release's pods are gone too (helm waits for the DaemonSet
        object, not its pods): the next test's release never overlaps this one's agents on a node."""
        self.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")

        def gone() -> bool:
            pods = self.core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/name=modelherd").items
            return not pods
        try:
            wait_for(gone, 120, f"the pods of release {release} in {namespace} gone")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.why_not_ready(namespace)}") from None

    def agent_pods(self, namespace: str) -> dict[str, str]:
        """node -> name of the agent pod running there."""
        pods = self.core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=agent").items
        return {p.spec.node_name: p.metadata.name for p in pods
                if p.metadata.deletion_timestamp is None and p.spec.node_name}

    def agent_logs(self, namespace: str) -> list[dict[str, Any]]:
        """Every JSON log record of every agent pod of ``namespace`` (current containers)."""
        out: list[dict[str, Any]] = []
        for pod in self.agent_pods(namespace).values():
            for line in self.kubectl("logs", "-n", namespace, pod).splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    # ---- models
    def create_cbm(self, name: str, uri: str, model_format: str = "safetensors", **storage: Any) -> None:
        sel = dict([self.env.get("NODE_SELECTOR", "modelherd.e2e/netns=true").split("=", 1)])
        body = {"apiVersion": "ome.io/v1beta1", "kind": "ClusterBaseModel", "metadata": {"name": name},
                "spec": {"modelFormat": {"name": model_format},
                         "storage": {"storageUri": uri, "nodeSelector": sel, **storage}}}
        self.objs.create_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", body)

    def delete_cbm(self, name: str) -> None:
        try:
            self.objs.delete_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", name)
        except client.ApiException as e:
            if e.status != 404:
                raise

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A cluster script (e2e/cluster/<args[0]>) on this cluster's DIR, e.g. ``run("node", "stop", "node-2")``."""
        script = Path(self.env.get("SCRIPTS", str(HERE / "cluster"))) / args[0]
        return subprocess.run([str(script), self.env["CLUSTER_DIR"], *args[1:]], check=True,
                              capture_output=True, text=True, timeout=300)

    @property
    def busybox(self) -> str:
        return self.env.get("BUSYBOX_IMAGE", "localhost/modelherd-e2e/busybox:1")

    def local_folder(self, node: str) -> Path:
        """Where node ``node``'s LOCAL_ROOT is on this machine."""
        return Path(self.env["CLUSTER_DIR"]) / "nodes" / node / "local-models"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """``fn()`` until it is truthy (returned), or fail after ``timeout`` seconds saying ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f}s (last: {last!r})")
        time.sleep(interval)


CHART = ROOT / "charts" / "modelherd"


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    env_file = Path(os.environ["MODELHERD_E2E_ENV"])
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    api = config.new_client_from_config(config_file=env["KUBECONFIG"])
    cl = Cluster(env, api)
    cl.kubectl("apply", "-f", str(CHART / "files" / "crds"))
    return cl


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one release; deleted afterwards (the release in it uninstalled first)."""
    ns = f"mh-{uuid.uuid4().hex[:6]}"
    yield ns
    try:
        if "modelherd" in cluster.helm("list", "-n", ns, "-q").split():
            cluster.uninstall(ns)
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


@pytest.fixture
def agents(cluster: Cluster, namespace: str) -> str:
    """The chart installed with this cluster's values (shared models root); yields the namespace."""
    cluster.install(namespace, cluster.chart_values())
    return namespace
