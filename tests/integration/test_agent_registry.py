"""The node agent pulling OCI registry artifacts and plain HTTP folders: real ``modelherd agent`` processes against the
real kube-apiserver, Debian's ``docker-registry`` with htpasswd auth (artifacts pushed with the real ``oras``), a
``kubernetes.io/dockerconfigjson`` Secret, and a static file server with a ``SHA256SUMS``.
"""

from __future__ import annotations

import base64
import functools
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from modelherd.agent.ome.keys import configmap_key, node_label_key
from modelherd.storage.verify import verify_deep

from tests.agent_fleet import MODELHERD, Fleet, eventually
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model
from tests.registry_fixtures import Registry, RegistryProxy

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

USER = "puller"
PASSWORD = "s3cret-Basic-pw"  # basic_registry's
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """The fleet fixture wants a Hub; these models never ask it."""
    with HubServer() as server:
        yield server


def docker_config(host: str) -> dict[str, Any]:
    return {"auths": {host: {"auth": BASIC}}}


def pushed_model(reg: Registry, tmp_path: Path, ref: str) -> dict[str, bytes]:
    folder = tmp_path / "artifact"
    make_sharded_model(folder, n_shards=4, shard_bytes=64 * 1024)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    reg.push_files(ref, folder, list(files), user=USER)
    return files


def assert_model(dest: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (dest / name).read_bytes() == data, name
    assert verify_deep(dest, require_manifest=True) == []


def leaked_into(fleet: Fleet, api_client: Any, agents: list[Any], secrets: tuple[str, ...]) -> list[str]:
    """Where any of ``secrets`` shows up: ConfigMaps, Events, Leases, node labels, logs, metrics."""
    texts = {"configmaps": json.dumps([fleet.configmap(n) for n in fleet.nodes]),
             "events": fleet.core.list_namespaced_event(fleet.namespace, _preload_content=False).data.decode(),
             "default-events": fleet.core.list_namespaced_event("default", _preload_content=False).data.decode(),
             "leases": client.CoordinationV1Api(api_client).list_namespaced_lease(
                 fleet.namespace, _preload_content=False).data.decode(),
             "labels": json.dumps([fleet.labels(n) for n in fleet.nodes]),
             "logs": fleet.logs(),
             "metrics": "\n".join(a.get("/metrics")[1] for a in agents)}
    return [where for where, text in texts.items() if any(s in text for s in secrets)]


def test_cluster_model_from_an_authenticated_registry_is_ready_on_three_agents_after_one_download(
        fleet: Fleet, basic_registry: Registry, tmp_path: Path, api_client: Any) -> None:
    files = pushed_model(basic_registry, tmp_path, "org/model:v1")
    root = tmp_path / "shared-models"
    root.mkdir()
    with RegistryProxy(basic_registry, "count") as proxy:  # forwards everything, counts blob GETs
        fleet.core.create_namespaced_secret(fleet.namespace, {
            "metadata": {"name": "regcred"}, "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(docker_config(proxy.host)).encode()).decode()}})
        nodes = [fleet.add_node(s) for s in ("a", "b", "c")]
        agents = [fleet.start(n, root, "--storage-mode", "shared", "--coordination", "kubernetes",
                              "--insecure-registry", proxy.host) for n in nodes]
        for ag in agents:
            fleet.wait_ready(ag)
        name = f"reg-{fleet.tag}"
        uri = f"oci://{proxy.host}/org/model:v1"
        fleet.create_cbm(name, uri, key="regcred")
        key = node_label_key("ClusterBaseModel", "", name)
        eventually(lambda: all(fleet.labels(n).get(key) == "Ready" for n in nodes), timeout=120,
                   what="Ready on a, b and c")
        assert proxy.blob_requests == len(files), "one download: each layer's blob fetched exactly once"
    assert_model(root / "org" / "model", files)
    for node in nodes:
        entry = eventually(lambda node=node: (e := fleet.entry(node, configmap_key("ClusterBaseModel", "", name)))
                           and e.get("status") == "Ready" and e, timeout=15,
                           what="the entry Ready after the label (OME's order)")
        assert entry["status"] == "Ready"
    assert leaked_into(fleet, api_client, agents, (PASSWORD, BASIC)) == []

    common = ["--kubeconfig", str(fleet.kubeconfig), "--namespace", fleet.namespace, "-o", "json"]
    for args in (["explain", "--node", nodes[0], "--models-root-dir", str(root)], ["status"]):
        out = subprocess.run([MODELHERD, *args, *common], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        rows = {r["name"]: r for r in map(json.loads, filter(str.strip, out.stdout.splitlines()))}
        assert rows[name]["storageUri"] == uri, rows[name]
        if args[0] == "status":
            assert sorted(rows[name]["Ready"]) == sorted(nodes)


def test_registry_credentials_of_the_agent_serve_cluster_models_but_not_a_tenants_base_model(
        fleet: Fleet, basic_registry: Registry, tmp_path: Path, api_client: Any) -> None:
    files = pushed_model(basic_registry, tmp_path, "org/model:v1")
    auth_file = tmp_path / "agent-docker" / "config.json"
    auth_file.parent.mkdir()
    auth_file.write_text(json.dumps(docker_config(basic_registry.host)))
    root = tmp_path / "models"
    root.mkdir()
    node = fleet.add_node("solo")
    agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none",
                        "--insecure-registry", basic_registry.host, env={"REGISTRY_AUTH_FILE": str(auth_file)})
    fleet.wait_ready(agent)
    uri = f"oci://{basic_registry.host}/org/model:v1"

    cluster = f"platform-{fleet.tag}"
    fleet.create_cbm(cluster, uri, path=str(root / "platform"))
    tenant = f"tenant-{fleet.tag}"
    fleet.create_bm(tenant, uri, path=str(root / "tenant"))
    ckey = node_label_key("ClusterBaseModel", "", cluster)
    tkey = node_label_key("BaseModel", fleet.namespace, tenant)
    eventually(lambda: fleet.labels(node).get(ckey) == "Ready", timeout=60, what="cluster model Ready")
    eventually(lambda: fleet.labels(node).get(tkey) == "Failed", timeout=60, what="tenant model Failed")
    assert_model(root / "platform", files)
    entry = eventually(lambda: (e := fleet.entry(node, configmap_key("BaseModel", fleet.namespace, tenant)))
                       and e.get("status") == "Failed" and e, timeout=15,
                       what="the entry Failed after the label (OME's order)")
    assert entry["status"] == "Failed"
    message = entry["modelherd"]["message"]
    assert "ambient_credential_namespaces" in message and "user and password" in message, message
    assert not (root / "tenant").exists()
    assert leaked_into(fleet, api_client, [agent], (PASSWORD, BASIC)) == []


def test_a_plain_http_folder_is_ready_when_listed_and_a_tenants_loopback_url_reaches_nothing(
        fleet: Fleet, tmp_path: Path) -> None:
    """The operator lists the model server (``--http-insecure-host 127.0.0.1:PORT``): its ClusterBaseModel is Ready.
    A tenant's BaseModel naming another service on the node's loopback (kubelet's read-only port, an exporter) is
    Failed saying it is not listed, and that service sees no request."""
    www = tmp_path / "www"
    src = www / "models" / "x"
    make_sharded_model(src, n_shards=3, shard_bytes=64 * 1024)
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    sums = subprocess.run(["sha256sum", *names], cwd=src, check=True, capture_output=True).stdout
    (src / "SHA256SUMS").write_bytes(sums)
    (tmp_path / "node-service" / "x").mkdir(parents=True)
    (tmp_path / "node-service" / "x" / "SHA256SUMS").write_text("not\na sums file: the node's private data\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    node_service = ThreadingHTTPServer(("127.0.0.1", 0),
                                       functools.partial(_Counted, directory=str(tmp_path / "node-service")))
    _Counted.seen = []
    for srv in (server, node_service):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "models"
        root.mkdir()
        node = fleet.add_node("web")
        agent = fleet.start(node, root, "--storage-mode", "local", "--coordination", "none",
                            "--http-insecure-host", f"127.0.0.1:{server.server_address[1]}")
        fleet.wait_ready(agent)
        name = f"web-{fleet.tag}"
        fleet.create_cbm(name, f"http://127.0.0.1:{server.server_address[1]}/models/x/")
        tenant = f"probe-{fleet.tag}"
        fleet.create_bm(tenant, f"http://127.0.0.1:{node_service.server_address[1]}/x/")
        key = node_label_key("ClusterBaseModel", "", name)
        tkey = node_label_key("BaseModel", fleet.namespace, tenant)
        eventually(lambda: fleet.labels(node).get(key) == "Ready", timeout=60, what="http model Ready")
        eventually(lambda: fleet.labels(node).get(tkey) == "Failed", timeout=60, what="the tenant's model Failed")
        entry = eventually(lambda: (e := fleet.entry(node, configmap_key("BaseModel", fleet.namespace, tenant)))
                           and e.get("status") == "Failed" and e, timeout=15,
                           what="the entry Failed after the label (OME's order)")
        assert entry["status"] == "Failed"
        message = entry["modelherd"]["message"]
        assert "not listed" in message and "private data" not in message, message
        assert _Counted.seen == [], "the node's own service got a request"
    finally:
        for srv in (server, node_service):
            srv.shutdown()
            srv.server_close()
    dest = root / "127.0.0.1" / "models" / "x"
    assert_model(dest, {n: (src / n).read_bytes() for n in names})
    assert not (dest / "SHA256SUMS").exists()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


class _Counted(SimpleHTTPRequestHandler):
    seen: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:
        _Counted.seen.append(self.path)
