"""A coordinated pull on a running agent opens no new connection pool to the API server (issue #18).

The agent loads its credentials once and holds one :class:`KubeClient` (one urllib3 pool); a coordinated pull
reaches its Lease through that client (:class:`KubeLeases`). Before, every pull built a fresh ``kubernetes``
``ApiClient``: credentials re-read and a new ``urllib3.PoolManager`` per pull. The count below wraps
``urllib3.PoolManager.__init__`` (every pool manager, the ``kubernetes`` client's included, runs it), and the
control at the end shows that the old way would be counted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import config
from modelherd.agent.kube import REQUESTS, load
from modelherd.agent.kube.leases import KubeLeases
from modelherd.coordination import coordinated_pull
from modelherd.storage.options import EngineOptions
from modelherd.storage.uri import parse_uri

from tests.k8s_fixtures import KubeCluster
from tests.rangeserver import RangeServer, RangeSource, make_model

pytestmark = pytest.mark.k8s

URI = "hf://org/pooled"


@contextmanager
def counting_pools() -> Iterator[list[int]]:
    """Count ``urllib3.PoolManager`` constructions (any thread) while the block runs."""
    made = [0]
    lock = threading.Lock()
    original = urllib3.PoolManager.__init__

    def counted(self: urllib3.PoolManager, *args: Any, **kwargs: Any) -> None:
        with lock:
            made[0] += 1
        original(self, *args, **kwargs)

    urllib3.PoolManager.__init__ = counted  # type: ignore[method-assign]
    try:
        yield made
    finally:
        urllib3.PoolManager.__init__ = original  # type: ignore[method-assign]


def test_a_coordinated_pull_through_the_agents_client_opens_no_connection_pool(
        kube_cluster: KubeCluster, kube_namespace: str, tmp_path: Path) -> None:
    client = load(kube_cluster.kubeconfig)  # what the agent holds from its start
    files = make_model(tmp_path / "origin", {"config.json": 200, "model.safetensors": 300_000}, seed=3)
    root = tmp_path / "models"
    root.mkdir()
    with RangeServer(tmp_path / "origin") as server:
        source = RangeSource(server.url, files, uri=URI)  # the origin's pool: made before the pull, as a source is
        before = REQUESTS.total
        with counting_pools() as made:
            result = coordinated_pull(
                backend="kubernetes", uri=parse_uri(URI), source=source, listing_fn=source.list_files,
                dest=root / "org" / "pooled", models_root=root, options=EngineOptions(), node_name="node-a",
                namespace=kube_namespace, lease_api=KubeLeases(client), lease_duration_s=10, renew_period_s=2,
                jitter_s=0.1, poll_interval_s=0.5)
        source.close()
    assert result.role == "holder" and result.manifest.total_bytes == 300_200
    assert result.lease_requests >= 2  # the Lease was read and written ...
    assert REQUESTS.total - before >= result.lease_requests  # ... through the agent's request layer
    assert made[0] == 0, f"{made[0]} new connection pool(s) during one coordinated pull"

    # The control: the old path (a fresh kubernetes ApiClient per pull) constructs a pool, and would be counted.
    with counting_pools() as made:
        config.new_client_from_config(config_file=str(kube_cluster.kubeconfig), persist_config=False)
    assert made[0] >= 1
