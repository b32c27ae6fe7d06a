"""The agent's list+watch informers against the real kube-apiserver + etcd (``e2e/controlplane``).

Each test drives the API server with the admin client and watches what an :class:`Informer` reports:
events (with the previous object), the store, request counts, restarts, and stop().
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from modelherd.agent.watching.informer import EventType, Informer

from tests.k8s_fixtures import CRD_DIR, KubeCluster, admin_api_client
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.k8s

T = TypeVar("T")
GROUP, VERSION = "ome.io", "v1beta1"
BASEMODELS = f"/apis/{GROUP}/{VERSION}/basemodels"
CLUSTERBASEMODELS = f"/apis/{GROUP}/{VERSION}/clusterbasemodels"

Event = tuple[EventType, str, dict[str, Any], dict[str, Any] | None]


def _eventually(fn: Callable[[], T], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (ApiException, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


class Recorder:
    """The handler: records ``(type, key, object, previous)``; tests wait for the events they expect."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, etype: EventType, obj: dict[str, Any], prev: dict[str, Any] | None) -> None:
        with self._cond:
            self.events.append((etype, _key(obj), obj, prev))
            self._cond.notify_all()

    def of(self, key: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e[1] == key]

    def wait_for(self, etype: EventType, key: str, timeout: float = 15.0,
                 where: Callable[[dict[str, Any]], bool] = lambda o: True) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e[0] == etype and e[1] == key and where(e[2]):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {etype} for {key}; got {[(e[0], e[1]) for e in self.events]}")
                self._cond.wait(left)


@pytest.fixture(scope="module")
def ome_crds(kube_cluster: KubeCluster, api_client: Any) -> None:
    """OME's CRDs applied and served (list answers) before any informer of this module starts."""
    out = kube_cluster.kubectl("apply", "-f", str(CRD_DIR), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    objs = client.CustomObjectsApi(api_client)
    _eventually(lambda: objs.list_cluster_custom_object(GROUP, VERSION, "basemodels"))
    _eventually(lambda: objs.list_cluster_custom_object(GROUP, VERSION, "clusterbasemodels"))


@pytest.fixture
def start_informer(api_client: Any) -> Iterator[Callable[..., tuple[Informer, Recorder]]]:
    """``start_informer(path, **kwargs) -> (informer, recorder)``, started; all stopped at teardown."""
    started: list[Informer] = []

    def start(path: str, *, api: Any = None, **kwargs: Any) -> tuple[Informer, Recorder]:
        rec = Recorder()
        kwargs.setdefault("name", path.rsplit("/", 1)[-1])
        inf = Informer(api or api_client, path, handler=rec, **kwargs)
        started.append(inf)
        inf.start()
        return inf, rec

    yield start
    for inf in started:
        inf.stop()


def _model(kind: str, name: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": meta,
        "spec": {"modelFormat": {"name": "safetensors"},
                 "storage": {"storageUri": f"hf://org/{name}", "path": f"/models/{name}"}},
    }


def _create_bm(api: Any, ns: str, name: str, **labels: str) -> dict[str, Any]:
    objs = client.CustomObjectsApi(api)
    created: dict[str, Any] = _eventually(lambda: objs.create_namespaced_custom_object(
        GROUP, VERSION, ns, "basemodels", _model("BaseModel", name, ns, labels)))
    return created


def _second_namespace(api: Any) -> Iterator[str]:
    core = client.CoreV1Api(api)
    name = f"mh2-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def other_namespace(api_client: Any) -> Iterator[str]:
    yield from _second_namespace(api_client)


# --------------------------------------------------------------------------- list, events, store


@pytest.mark.usefixtures("ome_crds")
def test_initial_list_fires_added_for_existing_objects_and_syncs(
    api_client: Any, kube_namespace: str, other_namespace: str, start_informer: Callable[..., Any]
) -> None:
    a = _create_bm(api_client, kube_namespace, "llama")
    b = _create_bm(api_client, other_namespace, "qwen")

    inf, rec = start_informer(BASEMODELS, name="basemodels")

    assert inf.wait_synced(15)
    assert inf.has_synced()
    keys = {f"{kube_namespace}/llama", f"{other_namespace}/qwen"}
    added = {e[1]: e for e in rec.events if e[1] in keys}
    assert set(added) == keys  # delivered before has_synced() turned true
    assert all(e[0] == "ADDED" and e[3] is None for e in added.values())
    got = inf.get(f"{kube_namespace}/llama")
    assert got is not None and got["metadata"]["uid"] == a["metadata"]["uid"]
    assert got["kind"] == "BaseModel" and got["apiVersion"] == f"{GROUP}/{VERSION}"
    assert b["metadata"]["uid"] in {o["metadata"]["uid"] for o in inf.list()}
    assert inf.resource_version.isdigit()
    assert inf.requests == 2 or inf.requests == 1  # one list page, then (maybe already) the watch
    assert inf.restarts == 0
    assert inf.healthy(max_age_s=60)


@pytest.mark.usefixtures("ome_crds")
def test_base_model_changes_in_two_namespaces_fire_events_with_the_previous_object(
    api_client: Any, kube_namespace: str, other_namespace: str, start_informer: Callable[..., Any]
) -> None:
    objs = client.CustomObjectsApi(api_client)
    inf, rec = start_informer(BASEMODELS)
    assert inf.wait_synced(15)

    for ns in (kube_namespace, other_namespace):
        key = f"{ns}/m"
        created = _create_bm(api_client, ns, "m", stage="one")
        _, _, obj, prev = rec.wait_for("ADDED", key)
        assert prev is None and obj["metadata"]["uid"] == created["metadata"]["uid"]

        objs.patch_namespaced_custom_object(GROUP, VERSION, ns, "basemodels", "m",
                                            {"metadata": {"labels": {"stage": "two"}}})
        _, _, obj, prev = rec.wait_for("MODIFIED", key)
        assert obj["metadata"]["labels"]["stage"] == "two"
        assert prev is not None and prev["metadata"]["labels"]["stage"] == "one"
        assert inf.get(key) is obj  # the store changed before the handler ran

        objs.delete_namespaced_custom_object(GROUP, VERSION, ns, "basemodels", "m")
        _, _, obj, prev = rec.wait_for("DELETED", key)
        assert prev is not None and prev["metadata"]["labels"]["stage"] == "two"
        assert inf.get(key) is None
        assert [e[0] for e in rec.of(key)] == ["ADDED", "MODIFIED", "DELETED"]
    assert inf.restarts == 0


@pytest.mark.usefixtures("ome_crds")
def test_cluster_base_model_changes_fire_events_with_the_previous_object(
    api_client: Any, start_informer: Callable[..., Any]
) -> None:
    objs = client.CustomObjectsApi(api_client)
    name = f"cbm-{uuid.uuid4().hex[:8]}"
    inf, rec = start_informer(CLUSTERBASEMODELS)
    assert inf.wait_synced(15)

    objs.create_cluster_custom_object(GROUP, VERSION, "clusterbasemodels",
                                      _model("ClusterBaseModel", name, labels={"v": "1"}))
    assert rec.wait_for("ADDED", name)[3] is None
    objs.patch_cluster_custom_object(GROUP, VERSION, "clusterbasemodels", name, {"metadata": {"labels": {"v": "2"}}})
    _, _, obj, prev = rec.wait_for("MODIFIED", name)
    assert (prev or {})["metadata"]["labels"]["v"] == "1" and obj["metadata"]["labels"]["v"] == "2"
    objs.delete_cluster_custom_object(GROUP, VERSION, "clusterbasemodels", name)
    _, _, obj, prev = rec.wait_for("DELETED", name)
    assert prev is not None and prev["metadata"]["uid"] == obj["metadata"]["uid"]
    assert inf.get(name) is None


def _node(name: str, labels: dict[str, str]) -> client.V1Node:
    return client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels))


def test_node_label_change_fires_modified_on_a_field_selected_node_informer(
    api_client: Any, start_informer: Callable[..., Any]
) -> None:
    core = client.CoreV1Api(api_client)
    me, other = f"node-{uuid.uuid4().hex[:8]}", f"node-{uuid.uuid4().hex[:8]}"
    core.create_node(_node(me, {"gpu": "h100"}))
    core.create_node(_node(other, {"gpu": "h100"}))
    try:
        inf, rec = start_informer("/api/v1/nodes", name="node", field_selector=f"metadata.name={me}")
        assert inf.wait_synced(15)
        assert [o["metadata"]["name"] for o in inf.list()] == [me]
        assert inf.get(me) is not None and inf.get(me)["kind"] == "Node"  # filled in from NodeList
        assert rec.wait_for("ADDED", me)[3] is None

        core.patch_node(other, {"metadata": {"labels": {"gpu": "a100"}}})
        core.patch_node(me, {"metadata": {"labels": {"gpu": "a100"}}})
        _, _, obj, prev = rec.wait_for("MODIFIED", me)
        assert obj["metadata"]["labels"]["gpu"] == "a100"
        assert prev is not None and prev["metadata"]["labels"]["gpu"] == "h100"
        time.sleep(0.5)
        assert rec.of(other) == []  # the selector kept the other node out of list and watch
    finally:
        for n in (me, other):
            core.delete_node(n)


def test_a_handler_exception_is_logged_and_later_events_still_arrive(
    api_client: Any, kube_namespace: str, start_informer: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    core = client.CoreV1Api(api_client)
    seen: list[tuple[str, str]] = []
    failed = threading.Event()

    def handler(etype: EventType, obj: dict[str, Any], prev: dict[str, Any] | None) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("handler bug")
        seen.append((etype, obj["metadata"]["name"]))

    cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="node-a"), data={"k": "v"})
    core.create_namespaced_config_map(kube_namespace, cm)
    inf = Informer(api_client, f"/api/v1/namespaces/{kube_namespace}/configmaps", handler=handler,
                   name="configmap", field_selector="metadata.name=node-a")
    inf.start()
    try:
        assert inf.wait_synced(15)
        assert failed.is_set()  # the ADDED of the initial list raised
        core.delete_namespaced_config_map("node-a", kube_namespace)
        core.create_namespaced_config_map(kube_namespace, cm)
        _eventually(lambda: _assert(seen == [("DELETED", "node-a"), ("ADDED", "node-a")]), timeout=15)
        assert inf.get(f"{kube_namespace}/node-a") is not None
        assert "handler failed on ADDED" in caplog.text
    finally:
        inf.stop()


def _assert(cond: bool) -> None:
    assert cond


# --------------------------------------------------------------------------- timeouts, requests, stop


def _wait_requests(inf: Informer, above: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while inf.requests <= above:
        assert time.monotonic() < deadline, f"requests stayed at {inf.requests}"
        time.sleep(0.02)
    return inf.requests


@pytest.mark.usefixtures("ome_crds")
def test_a_watch_that_times_out_is_reopened_from_the_last_resource_version_without_a_relist(
    api_client: Any, kube_namespace: str, start_informer: Callable[..., Any]
) -> None:
    # watch_timeout_s=1: timeoutSeconds is drawn from [1, 2) and the server takes whole seconds -> 1 s.
    inf, rec = start_informer(BASEMODELS, watch_timeout_s=1)
    assert inf.wait_synced(15)
    _wait_requests(inf, 1, 5)  # the first watch is open
    _create_bm(api_client, kube_namespace, "during")
    rec.wait_for("ADDED", f"{kube_namespace}/during")
    rv_after_event = inf.resource_version
    for _ in range(3):
        before = inf.requests
        now = _wait_requests(inf, before, 5)
        time.sleep(0.3)  # a relist would add its watch right after the list
        assert inf.requests == before + 1 == now
    # Re-watches started at the event's resourceVersion or later (a bookmark): the create was not replayed.
    assert [e[0] for e in rec.of(f"{kube_namespace}/during")] == ["ADDED"]
    assert int(inf.resource_version) >= int(rv_after_event)
    assert inf.restarts == 0


def _request_rises(inf: Informer, n: int, timeout_each: float) -> list[tuple[float, float, int]]:
    """Watch ``inf.requests`` until it has gone up ``n`` times; for each rise ``(after, by, count)``: the request
    was counted after monotonic time ``after`` and by ``by`` (a bracket measured by the polls either side of it,
    however late a loaded machine runs them), and ``count`` is what the poll that saw it read."""
    rises: list[tuple[float, float, int]] = []
    after = time.monotonic()
    last = inf.requests
    deadline = after + timeout_each
    while len(rises) < n:
        before_read = time.monotonic()
        now = inf.requests
        read_by = time.monotonic()
        if now == last:
            after = before_read  # not counted yet when this poll read it
            assert read_by < deadline, f"requests stayed at {now} for {timeout_each} s (rises so far: {rises})"
        else:
            rises.append((after, read_by, now))
            last, after, deadline = now, read_by, read_by + timeout_each
        time.sleep(0.005)
    return rises


@pytest.mark.usefixtures("ome_crds")
def test_idle_informer_makes_one_request_per_watch_timeout_not_a_loop(start_informer: Callable[..., Any]) -> None:
    inf, _ = start_informer(CLUSTERBASEMODELS, watch_timeout_s=2)  # timeoutSeconds in {2, 3}
    assert inf.wait_synced(15)
    start = _wait_requests(inf, 1, 5)  # the list, then the first watch
    # Each re-watch is timed, not assumed: a fixed 9 s window cut the third 3 s watch short once in ~ten runs.
    rises = _request_rises(inf, 4, timeout_each=3 + 10)
    assert [c for _, _, c in rises] == list(range(start + 1, start + 5)), f"one request per rise: {rises}"
    for (a0, b0, _), (a1, b1, _) in itertools.pairwise(rises):
        shortest, longest = a1 - b0, b1 - a0  # the true gap between two re-watches lies within these
        # the API server ends a watch no sooner than its timeoutSeconds (>= 2): a shorter gap is a loop
        assert longest >= 2.0, f"re-watched after at most {longest:.3f} s: {rises}"
        # and at most a re-connect (1.5 s, generous on a loaded machine) after the longest timeoutSeconds (3):
        # the informer re-watches when the server ends the watch, it does not wait for a read timeout or back off
        assert shortest <= 3.0 + 1.5, f"re-watched only after at least {shortest:.3f} s: {rises}"
    assert inf.requests == start + 4
    assert inf.restarts == 0
    assert inf.healthy(max_age_s=1)  # a quiet open watch is healthy


@pytest.mark.usefixtures("ome_crds")
def test_stop_returns_promptly_while_a_watch_is_open(start_informer: Callable[..., Any]) -> None:
    inf, _ = start_informer(CLUSTERBASEMODELS, watch_timeout_s=300)
    assert inf.wait_synced(15)
    _wait_requests(inf, 1, 5)
    time.sleep(0.3)  # blocked reading the watch stream
    t0 = time.monotonic()
    inf.stop()
    assert time.monotonic() - t0 < 1.0
    assert not inf.healthy(max_age_s=3600)
    assert inf.requests == 2 and inf.restarts == 0


# --------------------------------------------------------------------------- failures, 410, restart


@pytest.fixture
def restartable(kube_cluster: KubeCluster) -> Iterator[KubeCluster]:
    if not kube_cluster.managed:
        pytest.skip("needs the control plane started by this test session (not an existing cluster)")
    yield kube_cluster


def _hostport(server: str) -> tuple[str, int]:
    parts = urlsplit(server)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


@pytest.mark.slow
@pytest.mark.usefixtures("ome_crds")
def test_partition_and_api_server_restart_relist_on_410_and_synthesize_the_missed_delete(
    restartable: KubeCluster, api_client: Any, kube_namespace: str, start_informer: Callable[..., Any]
) -> None:
    keep, gone = f"{kube_namespace}/keep", f"{kube_namespace}/gone"
    _create_bm(api_client, kube_namespace, "keep")
    _create_bm(api_client, kube_namespace, "gone")
    host, port = _hostport(restartable.server)
    reasons: list[str] = []
    with TcpProxy(host, port) as proxy:
        via_proxy = admin_api_client(restartable)
        via_proxy.configuration.host = f"https://127.0.0.1:{proxy.port}"
        inf, rec = start_informer(BASEMODELS, api=via_proxy, backoff_max_s=1.0, on_restart=reasons.append)
        assert inf.wait_synced(15)
        rec.wait_for("ADDED", gone)
        _wait_requests(inf, 1, 5)

        proxy.cut()  # the informer can no longer see the API server
        _eventually(lambda: _assert(inf.restarts >= 1), timeout=10)
        assert "connection" in reasons
        objs = client.CustomObjectsApi(api_client)
        objs.delete_namespaced_custom_object(GROUP, VERSION, kube_namespace, "basemodels", "gone")
        _create_bm(api_client, kube_namespace, "new")
        restartable.restart()  # the new API server's watch cache starts after the informer's resourceVersion
        assert _hostport(restartable.server) == (host, port)
        time.sleep(1.5)
        assert rec.of(gone)[-1][0] == "ADDED"  # nothing seen while partitioned

        proxy.heal()
        _, _, obj, prev = rec.wait_for("DELETED", gone, timeout=30)
        assert prev is obj  # synthesized by the relist: the last state the store held
        rec.wait_for("ADDED", f"{kube_namespace}/new", timeout=10)
        assert "gone" in reasons  # 410 -> relist
        assert inf.get(gone) is None and inf.get(keep) is not None
        assert [e[0] for e in rec.of(keep)] == ["ADDED"]  # unchanged objects are not re-reported
        assert inf.restarts == len(reasons) >= 2
        assert inf.healthy(max_age_s=30)
        inf.stop()
        via_proxy.close()
