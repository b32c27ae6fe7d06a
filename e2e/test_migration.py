"""Migration from OME's model agent on real nodes (issue #17): OME's leftovers on the sshfs root, then ``helm install``.

Before the chart is installed the cluster looks as OME's agent left it: the model's files (no completion manifest)
where the ClusterBaseModel's ``path`` points, every node labelled Ready, a per-node ConfigMap with OME's Ready entry
in the namespace the chart writes status to. Installing the chart must adopt the copy in place: no label ever
leaves Ready (sampled every 0.2 s from before the install), the origin sends no file body, the folder gets
modelherd's manifest and every file keeps its inode (stat on the server side of the shared filesystem).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from modelherd.agent.ome.entry import render_entry
from modelherd.agent.ome.keys import configmap_key, node_label_key

from e2e.conftest import Cluster, wait_for
from tests.modelgen import make_sharded_model

KiB = 1024


def test_installing_the_chart_over_omes_leftovers_keeps_every_label_ready_and_fetches_no_body(
        cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    if cluster.env.get("STORAGE") != "shared":
        pytest.skip("needs a cluster with --storage shared")
    nodes = cluster.nodes()
    assert len(nodes) >= 3
    name = f"mig-{uuid.uuid4().hex[:6]}"
    repo = f"e2e/{name}"
    src = tmp_path / name
    make_sharded_model(src, n_shards=4, shard_bytes=512 * KiB)
    (src / "config.json").write_text(json.dumps({  # a config OME's parser reads whole: the entry's config
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0"}))
    cluster.publish(repo, src)  # the origin serves the same model
    # OME's copy, where the ClusterBaseModel's path points (OME's own layout, not modelherd's default)
    rel = f"ome/{name}"
    dest = f"{cluster.env['MODELS_ROOT']}/{rel}"  # what the nodes see
    export = Path(cluster.env["SHARED_EXPORT"]) / rel  # the same folder on the server side of sshfs
    export.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(src), str(export)], check=True)
    inodes = {p.name: p.stat().st_ino for p in export.iterdir()}
    assert not (export / ".modelherd-manifest.json").exists()

    label = node_label_key("ClusterBaseModel", "", name)
    key = configmap_key("ClusterBaseModel", "", name)
    ome_entry = render_entry(None, name=name, status="Ready", config=None, progress=None)  # OME's, no metadata
    cluster.core.create_namespace({"metadata": {"name": namespace}})  # the chart's status namespace (release's)
    created = False
    try:
        for n in nodes:
            cluster.core.patch_node(n, {"metadata": {"labels": {label: "Ready"}}})
            cluster.core.create_namespaced_config_map(namespace, {
                "metadata": {"name": n, "labels": {"models.ome/basemodel-status": "true", "node": n}},
                "data": {key: ome_entry}})
        cluster.create_cbm(name, f"hf://{repo}", path=dest)
        created = True
        before = cluster.hub_stats()

        seen: list[tuple[float, str, str | None]] = []
        stop = threading.Event()
        sel = cluster.env.get("NODE_SELECTOR", "modelherd.e2e/netns=true")

        def sample() -> None:
            while not stop.wait(0.2):
                with contextlib.suppress(Exception):
                    t = time.monotonic()
                    for node in cluster.core.list_node(label_selector=sel).items:
                        if node.metadata.name in nodes:
                            seen.append((t, node.metadata.name, (node.metadata.labels or {}).get(label)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            cluster.install(namespace, cluster.chart_values())  # shared: sshfs detected

            def entries() -> dict[str, dict[str, object]]:
                out = {}
                for n in nodes:
                    data = cluster.core.read_namespaced_config_map(n, namespace).data or {}
                    out[n] = json.loads(data[key]) if key in data else {}
                return out

            def taken_over() -> bool:
                return all(e.get("status") == "Ready" and "modelherd" in e for e in entries().values())
            wait_for(taken_over, 180, "every node's entry taken over by modelherd (Ready)", interval=0.5)
            took = time.monotonic() - t0
        finally:
            stop.set()
            sampler.join(5)
        after = cluster.hub_stats()
        print(f"\nmigration over OME's leftovers, {len(nodes)} nodes: install -> every entry modelherd's and Ready "
              f"{took:.1f} s; {len(seen)} label samples")
        assert {n for _, n, _ in seen} == set(nodes), f"no label sample of some node: {seen[:10]}"
        left = [(round(t - t0, 1), n, v) for t, n, v in seen if v != "Ready"]
        assert not left, f"a label left Ready during the migration: {left}"
        assert all(cluster.node_labels(n).get(label) == "Ready" for n in nodes)
        assert after["body_bytes"] == before["body_bytes"], "the origin sent file bodies"
        assert (export / ".modelherd-manifest.json").is_file(), "the copy was adopted (published)"
        assert {p.name: p.stat().st_ino for p in export.iterdir() if p.name in inodes} == inodes, "adopted in place"
        for n, entry in entries().items():  # OME's entry taken over: the config re-parsed from the adopted files
            config = entry.get("config")
            assert isinstance(config, dict) and config.get("modelArchitecture") == "LlamaForCausalLM", (n, entry)

        # clean up as a user would: delete the model (labels, entries, files go), then uninstall
        cluster.delete_cbm(name)
        created = False
        wait_for(lambda: all(label not in cluster.node_labels(n) for n in nodes), 60, f"{label} gone from nodes")
        cluster.uninstall(namespace)
    finally:
        if created:
            cluster.delete_cbm(name)
        for n in nodes:  # labels the agents did not remove (a failure before they ran)
            with contextlib.suppress(Exception):
                if label in cluster.node_labels(n):
                    cluster.core.patch_node(n, {"metadata": {"labels": {label: None}}})
        shutil.rmtree(export, ignore_errors=True)
        with contextlib.suppress(OSError):
            export.parent.rmdir()
