"""Node-local storage on real nodes: every node downloads its own copy and keeps only its GPU shape's engines."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from modelherd.agent.ome.keys import node_label_key

from e2e.conftest import Cluster, wait_for
from tests.modelgen import make_trtllm_model

KiB = 1024
INSTANCE_LABEL = "node.kubernetes.io/instance-type"
# three instance types, three GPU shapes: what NVML would say on those machines
TYPES = {"BM.GPU.H200.8": "H200x8", "BM.GPU.H100.8": "H100x8", "BM.GPU.A100.4": "A100x4"}


def test_three_nodes_on_local_storage_each_download_their_own_copy_with_only_their_engines(
        cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    nodes = cluster.nodes()[:3]
    assert len(nodes) == 3
    types = dict(zip(nodes, TYPES, strict=True))
    for node, itype in types.items():
        cluster.core.patch_node(node, {"metadata": {"labels": {INSTANCE_LABEL: itype}}})
    name = f"trt-{uuid.uuid4().hex[:6]}"
    repo = f"e2e/{name}"
    src = tmp_path / name
    files = make_trtllm_model(src, shapes=tuple(TYPES.values()), engine_bytes=256 * KiB)
    cluster.publish(repo, src)
    size = {str(p.relative_to(src)): p.stat().st_size for p in files}
    common = sum(v for k, v in size.items() if not k.startswith("engines/"))

    def own(shape: str) -> dict[str, int]:
        return {k: v for k, v in size.items() if not k.startswith("engines/") or k.startswith(f"engines/{shape}/")}

    # storage.mode stays auto: each node's root is a bind of its own folder, so detection must say local
    cluster.install(namespace, cluster.chart_values(
        storage={"mode": "auto", "modelsRoot": cluster.env["LOCAL_ROOT"], "instanceTypeMap": TYPES},
        agent={"extraArgs": ["--startup-jitter", "1"]}))
    before = cluster.hub_stats()["body_bytes"]
    label = node_label_key("ClusterBaseModel", "", name)
    cluster.create_cbm(name, f"hf://{repo}", model_format="tensorrtllm")
    try:
        wait_for(lambda: all(cluster.node_labels(n).get(label) == "Ready" for n in nodes), 180,
                 f"{label}=Ready on {nodes}")
        sent = cluster.hub_stats()["body_bytes"] - before
        want = sum(sum(own(TYPES[t]).values()) for t in types.values())
        assert sent == want, f"each node fetched its own files once: {sent} != {want}"
        assert want > 3 * common
        for node, itype in types.items():
            folder = cluster.local_folder(node) / repo
            got = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and not p.name.startswith(".modelherd")}
            assert got == set(own(TYPES[itype])), (node, sorted(got))
        pod = cluster.agent_pods(namespace)[nodes[0]]
        detected = json.loads(cluster.kubectl("exec", "-n", namespace, pod, "--", "modelherd", "detect",
                                              cluster.env["LOCAL_ROOT"]))
        assert detected["storage"] == "local", detected
    finally:
        cluster.delete_cbm(name)
        wait_for(lambda: all(label not in cluster.node_labels(n) for n in nodes), 60, "labels gone")
        for node in nodes:
            folder = cluster.local_folder(node) / repo
            wait_for(lambda f=folder: not f.exists(), 60, f"{node}'s own copy removed")
        for node in nodes:
            cluster.core.patch_node(node, {"metadata": {"labels": {INSTANCE_LABEL: None}}})
