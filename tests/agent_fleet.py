"""Several real ``modelherd agent`` processes, each its own node name, against the real control plane.

Also a pytest plugin (registered in ``tests/conftest.py``): the ``fleet`` fixture installs OME's CRDs and yields a
:class:`Fleet` on the test's namespace and the module's ``hub`` fixture (each test module serves its own models),
cleaned up afterwards.

:class:`Fleet` creates Node objects (labelled with a per-test tag so a test's models select only its own nodes),
OME BaseModels/ClusterBaseModels, and agent processes; it reads labels and ConfigMap entries back through the API
server, and cleans up everything it created (cluster-scoped objects outlive a test namespace here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

MODELHERD = str(Path(sys.executable).parent / "modelherd")
GROUP, VERSION = "ome.io", "v1beta1"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(fn: Callable[[], T | None], *, timeout: float = 60.0, interval: float = 0.1,
               what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except (AssertionError, ApiException, OSError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s" + (f": {last}" if last else ""))


def in_mount_namespace(path: Path, mounts: str, real: str) -> str:
    """Write at ``path`` a stand-in for the ``modelherd`` binary ``real`` that runs it in a private mount namespace
    (``unshare -m``) after the shell commands ``mounts`` (absolute paths, ``&&``-joined); returns ``path``. For
    agents that must see another filesystem at the models root than this process does (needs root)."""
    path.write_text("#!/bin/sh\n"
                    f"exec unshare -m --propagation private sh -c '{mounts} && exec \"$@\"' sh {real} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def can_unshare_mounts() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


@dataclass
class Agent:
    node: str
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@dataclass
class Fleet:
    api: Any
    kubeconfig: Path
    namespace: str
    hub_endpoint: str
    base: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    agents: dict[str, Agent] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    models: list[tuple[str, str, str]] = field(default_factory=list)  # (plural, namespace, name)
    env_extra: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------- objects
    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def objs(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def node_name(self, short: str) -> str:
        return f"{short}-{self.tag}"

    def add_node(self, short: str, labels: dict[str, str] | None = None) -> str:
        name = self.node_name(short)
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"mh-test": self.tag, "kubernetes.io/hostname": name,
                                                      **(labels or {})}}}
        self.core.create_node(body)
        self.nodes.append(name)
        return name

    def label_node(self, node: str, labels: dict[str, str | None]) -> None:
        self.core.patch_node(node, {"metadata": {"labels": labels}})

    def model_body(self, kind: str, name: str, uri: str, *, namespace: str | None = None,
                   selector: dict[str, str] | None = None, affinity: dict[str, Any] | None = None,
                   path: str | None = None, key: str | None = None, parameters: dict[str, str] | None = None,
                   model_format: str = "safetensors", annotations: dict[str, str] | None = None) -> dict[str, Any]:
        storage: dict[str, Any] = {"storageUri": uri, "nodeSelector": {"mh-test": self.tag, **(selector or {})}}
        if affinity is not None:
            storage["nodeAffinity"] = affinity
        if path is not None:
            storage["path"] = path
        if key is not None:
            storage["key"] = key
        if parameters is not None:
            storage["parameters"] = parameters
        meta: dict[str, Any] = {"name": name}
        if namespace:
            meta["namespace"] = namespace
        if annotations:
            meta["annotations"] = annotations
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": meta,
                "spec": {"modelFormat": {"name": model_format}, "storage": storage}}

    def create_cbm(self, name: str, uri: str, **kw: Any) -> dict[str, Any]:
        body = self.model_body("ClusterBaseModel", name, uri, **kw)
        made: dict[str, Any] = self.objs.create_cluster_custom_object(GROUP, VERSION, "clusterbasemodels", body)
        self.models.append(("clusterbasemodels", "", name))
        return made

    def create_bm(self, name: str, uri: str, **kw: Any) -> dict[str, Any]:
        ns = kw.pop("namespace", self.namespace)
        body = self.model_body("BaseModel", name, uri, namespace=ns, **kw)
        made: dict[str, Any] = self.objs.create_namespaced_custom_object(GROUP, VERSION, ns, "basemodels", body)
        self.models.append(("basemodels", ns, name))
        return made

    def patch_model(self, plural: str, name: str, patch: dict[str, Any], namespace: str = "") -> None:
        if namespace:
            self.objs.patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, patch)
        else:
            self.objs.patch_cluster_custom_object(GROUP, VERSION, plural, name, patch)

    def delete_model(self, plural: str, name: str, namespace: str = "") -> None:
        with contextlib.suppress(ApiException):
            if namespace:
                self.objs.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            else:
                self.objs.delete_cluster_custom_object(GROUP, VERSION, plural, name)

    # ---------------------------------------------------------------------------------------- reading back
    def labels(self, node: str) -> dict[str, str]:
        raw = json.loads(self.core.read_node(node, _preload_content=False).data)
        return dict(raw["metadata"].get("labels") or {})

    def configmap(self, node: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.core.read_namespaced_config_map(node, self.namespace, _preload_content=False).data)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def entry(self, node: str, key: str) -> dict[str, Any] | None:
        cm = self.configmap(node) or {}
        value = (cm.get("data") or {}).get(key)
        return json.loads(value) if value else None

    # ---------------------------------------------------------------------------------------- processes
    def start(self, short_or_node: str, root: Path, *extra: str, env: dict[str, str] | None = None) -> Agent:
        node = short_or_node if short_or_node in self.nodes else self.node_name(short_or_node)
        port = free_port()
        args = [MODELHERD, "agent", "--node-name", node, "--namespace", self.namespace, "--kubeconfig",
                str(self.kubeconfig), "--models-root-dir", str(root), "--port", str(port), "--bind-address",
                "127.0.0.1", "--startup-jitter", "0", "--lease-duration", "3", "--renew-period", "1",
                "--log-format", "json", *extra]
        penv = {k: v for k, v in os.environ.items() if not k.startswith(("MODELHERD_", "HF_", "KUBECONFIG", "NODE_"))}
        penv.update({"HF_ENDPOINT": self.hub_endpoint, "MODELHERD_POLL_INTERVAL_S": "1", "MODELHERD_WAIT_JITTER_S":
                     "0.2", "MODELHERD_WATCH_TIMEOUT_S": "60", "MODELHERD_MODEL_RETRY_BASE_S": "0.5",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **self.env_extra, **(env or {})})
        log = self.base / f"agent-{node}-{len(self.agents)}.log"
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True, env=penv)
        agent = Agent(node, proc, port, log)
        self.agents[node] = agent
        return agent

    def wait_ready(self, agent: Agent, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if agent.proc.poll() is not None:
                raise AssertionError(f"agent {agent.node} exited {agent.proc.returncode}: "
                                     f"{agent.log.read_text()[-3000:]}")
            try:
                return agent.get("/readyz")[0] == 200
            except OSError:
                return False
        eventually(ready, timeout=timeout, what=f"agent {agent.node} /readyz")

    def stop(self, node: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        agent = self.agents[node]
        if agent.proc.poll() is None:
            agent.proc.send_signal(sig)
        return agent.proc.wait(timeout)

    def cleanup(self) -> None:
        for agent in self.agents.values():
            if agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait(10)
        for plural, ns, name in self.models:
            self.delete_model(plural, name, ns)
        for node in self.nodes:
            with contextlib.suppress(ApiException):
                self.core.delete_node(node)

    def logs(self) -> str:
        return "\n".join(a.log.read_text() for a in self.agents.values() if a.log.exists())


@pytest.fixture
def fleet(kube_cluster: Any, api_client: Any, kube_namespace: str, hub: Any, tmp_path: Path) -> Iterator[Fleet]:
    from tests.integration.test_controlplane import install_ome_crds

    install_ome_crds(kube_cluster, api_client)
    f = Fleet(api_client, kube_cluster.kubeconfig, kube_namespace, hub.endpoint, tmp_path)
    try:
        yield f
    finally:
        f.cleanup()
