"""agent/kube/request.py: every request is counted by RBAC's verb and resource, the way the API server's
``apiserver_request_total`` counts it, so an agent's request budget can be read per verb and resource."""

from __future__ import annotations

import pytest
from modelherd.agent.kube.request import _Counts, action_of, verb_of


@pytest.mark.parametrize(
    ("method", "path", "query", "verb"),
    [("GET", "/api/v1/namespaces/ome/configmaps/node-1", None, "get"),
     ("GET", "/api/v1/namespaces/ome/configmaps", [("fieldSelector", "metadata.name=n")], "list"),
     ("GET", "/api/v1/namespaces/ome/configmaps", [("watch", "1")], "watch"),
     ("GET", "/api/v1/nodes/node-1", None, "get"),
     ("GET", "/api/v1/nodes", [("watch", "true")], "watch"),
     ("GET", "/apis/ome.io/v1beta1/clusterbasemodels", None, "list"),
     ("GET", "/apis/ome.io/v1beta1/namespaces/t/basemodels/m", None, "get"),
     ("GET", "/apis/coordination.k8s.io/v1/namespaces/ome/leases/x", None, "get"),
     ("PUT", "/api/v1/namespaces/ome/configmaps/node-1", None, "update"),
     ("PATCH", "/api/v1/nodes/node-1", None, "patch"),
     ("POST", "/api/v1/namespaces/ome/events", None, "create"),
     ("DELETE", "/apis/coordination.k8s.io/v1/namespaces/ome/leases/x", None, "delete")],
)
def test_the_verb_is_rbacs(method: str, path: str, query: list[tuple[str, str]] | None, verb: str) -> None:
    assert verb_of(method, path, query) == verb


def test_requests_are_counted_by_verb_and_resource() -> None:
    counts = _Counts()
    counts.add("PUT", "/api/v1/namespaces/ome/configmaps/node-1")
    counts.add("PUT", "/api/v1/namespaces/ome/configmaps/node-1")
    counts.add("PATCH", "/api/v1/nodes/node-1")
    counts.add("GET", "/api/v1/nodes", [("watch", "1")])
    counts.add("PATCH", "/api/v1/nodes/node-1/status")
    assert counts.snapshot() == {("update", "configmaps"): 2, ("patch", "nodes"): 1, ("watch", "nodes"): 1,
                                 ("patch", "nodes/status"): 1}
    assert counts.total == 5


def test_the_action_names_the_namespace() -> None:
    assert action_of("PUT", "/api/v1/namespaces/ome/configmaps/n") == "update configmaps in ome"
    assert action_of("PATCH", "/api/v1/nodes/n") == "patch nodes"
