"""Shared storage, real nodes: one ClusterBaseModel becomes Ready on every node after one download."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.reporting.keys import configmap_key, node_label_key

from e2e.conftest import Cluster
from tests.modelgen import make_sharded_model

KiB = 1024


def _wait(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


@pytest.fixture
def model(tmp_path: Path, cluster: Cluster) -> tuple[str, int]:
    if cluster.env.get("STORAGE") != "shared":
        pytest.skip("needs a cluster with --storage shared")
    repo = f"e2e/tiny-{uuid.uuid4().hex[:6]}"
    src = tmp_path / "model"
    make_sharded_model(src, n_shards=4, shard_bytes=512 * KiB)
    cluster.publish(repo, src)
    return repo, sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


def test_one_cluster_base_model_is_ready_on_every_node_after_one_download(
        cluster: Cluster, agents: str, model: tuple[str, int]) -> None:
    repo, size = model
    nodes = [n.metadata.name for n in cluster.core.list_node(label_selector="modelherd.e2e/netns=true").items]
    assert len(nodes) >= 2
    before = cluster.hub_stats()["body_bytes"]
    name = repo.split("/")[1]
    body = {"apiVersion": "ome.io/v1beta1", "kind": "ClusterBaseModel", "metadata": {"name": name},
            "spec": {"modelFormat": {"name": "safetensors"},
                     "storage": {"storageUri": f"hf://{repo}", "nodeSelector": {"modelherd.e2e/netns": "true"}}}}
    t0 = time.monotonic()
    client_objs = __import__("kubernetes").client.CustomObjectsApi(cluster.api)
    client_objs.create_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", body)
    try:
        key = node_label_key("ClusterBaseModel", "", name)

        def all_ready() -> bool:
            return all((cluster.core.read_node(n).metadata.labels or {}).get(key) == "Ready" for n in nodes)
        _wait(all_ready, 180, f"{key}=Ready on {nodes}")
        print(f"\nCR -> last node Ready: {time.monotonic() - t0:.1f}s on {len(nodes)} nodes")
        assert cluster.hub_stats()["body_bytes"] - before == size, "origin bytes must be exactly one model"
        for n in nodes:
            cm = cluster.core.read_namespaced_config_map(n, agents)
            assert cm.metadata.labels["models.ome/basemodel-status"] == "true"
            entry = json.loads(cm.data[configmap_key("ClusterBaseModel", "", name)])
            assert entry["status"] == "Ready", entry

        # a serving pod scheduled by the Ready label reads the model through its hostPath
        root = cluster.env["MODELS_ROOT"]
        count = f"find {root} -path '*{name}*' -name '*.safetensors' | wc -l"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"serve-{name}"},
               "spec": {"restartPolicy": "Never", "nodeSelector": {key: "Ready"},
                        "containers": [{"name": "c", "image": "localhost/modelherd-e2e/busybox:1",
                                        "imagePullPolicy": "Never",
                                        "command": ["sh", "-c", count],
                                        "volumeMounts": [{"name": "m", "mountPath": root, "readOnly": True}]}],
                        "volumes": [{"name": "m", "hostPath": {"path": root}}]}}
        cluster.core.create_namespaced_pod(agents, pod)
        _wait(lambda: cluster.core.read_namespaced_pod(f"serve-{name}", agents).status.phase == "Succeeded",
              90, "serving pod Succeeded")
        assert cluster.kubectl("logs", "-n", agents, f"serve-{name}").strip() == "4"
    finally:
        client_objs.delete_cluster_custom_object("ome.io", "v1beta1", "clusterbasemodels", name)
