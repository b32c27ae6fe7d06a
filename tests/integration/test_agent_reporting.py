"""The status ConfigMap and node-label writers against the real API server: no lost updates, other keys and
unknown fields kept, one label per patch."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from kubernetes import client
from modelherd.agent.reporting.configmap import STATUS_LABEL, StatusConfigMap
from modelherd.agent.reporting.labels import NodeLabels

pytestmark = [pytest.mark.k8s]


def test_two_writers_of_one_configmap_lose_no_entry(api_client: Any, kube_namespace: str) -> None:
    node = f"writers-{uuid.uuid4().hex[:6]}"
    writers = [StatusConfigMap(api_client, kube_namespace, node, attempts=200) for _ in range(2)]
    n_keys, rounds = 12, 3
    errors: list[BaseException] = []

    def write(w: StatusConfigMap, mine: range) -> None:
        try:
            for r in range(rounds):
                for k in mine:
                    w.update(f"clusterbasemodel.m{k}",
                             lambda _old, k=k, r=r: json.dumps({"name": f"m{k}", "status": "Ready", "round": r}))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(writers[0], range(0, n_keys, 2))),
               threading.Thread(target=write, args=(writers[1], range(1, n_keys, 2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    cm = client.CoreV1Api(api_client).read_namespaced_config_map(node, kube_namespace)
    assert cm.metadata.labels[STATUS_LABEL] == "true" and cm.metadata.labels["node"] == node
    assert cm.metadata.annotations["models.ome.io/node-name"] == node
    got = {k: json.loads(v) for k, v in cm.data.items()}
    assert set(got) == {f"clusterbasemodel.m{k}" for k in range(n_keys)}
    assert all(v["round"] == rounds - 1 for v in got.values())


def test_an_update_keeps_other_keys_and_unknown_fields(api_client: Any, kube_namespace: str) -> None:
    node = f"keep-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    core.create_namespaced_config_map(kube_namespace, {
        "metadata": {"name": node},  # made by someone else, without our labels
        "data": {"other.basemodel.x": '{"name":"x","status":"Ready"}',
                 "clusterbasemodel.m": '{"name":"m","status":"Updating","modelUID":"u-1"}'}})
    cm = StatusConfigMap(api_client, kube_namespace, node)

    def ready(old: str | None) -> str:
        entry = json.loads(old or "{}")
        entry["status"] = "Ready"
        return json.dumps(entry)

    cm.update("clusterbasemodel.m", ready)
    got = core.read_namespaced_config_map(node, kube_namespace)
    assert got.data["other.basemodel.x"] == '{"name":"x","status":"Ready"}'
    assert json.loads(got.data["clusterbasemodel.m"]) == {"name": "m", "status": "Ready", "modelUID": "u-1"}
    assert got.metadata.labels[STATUS_LABEL] == "true", "our labels are added to a ConfigMap that lacked them"
    cm.remove("clusterbasemodel.m")
    assert "clusterbasemodel.m" not in (core.read_namespaced_config_map(node, kube_namespace).data or {})


def test_a_label_write_touches_only_its_own_label(api_client: Any) -> None:
    core = client.CoreV1Api(api_client)
    node = f"lbl-{uuid.uuid4().hex[:6]}"
    core.create_node({"metadata": {"name": node, "labels": {"keep": "me"}}})
    try:
        seen: dict[str, Any] = {}
        labels = NodeLabels(api_client, node, cache=lambda: seen or None)
        assert labels.set("models.ome.io/clusterbasemodel.a", "Updating")
        core.patch_node(node, {"metadata": {"labels": {"other": "writer"}}})
        assert labels.set("models.ome.io/clusterbasemodel.a", "Ready")
        assert not labels.set("models.ome.io/clusterbasemodel.a", "Ready"), "an unchanged value is not re-sent"
        got = core.read_node(node).metadata.labels
        assert got["keep"] == "me" and got["other"] == "writer"
        assert got["models.ome.io/clusterbasemodel.a"] == "Ready"
        assert labels.set("models.ome.io/clusterbasemodel.a", None)
        assert "models.ome.io/clusterbasemodel.a" not in core.read_node(node).metadata.labels
    finally:
        core.delete_node(node)
