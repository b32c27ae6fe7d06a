"""``modelherd controller`` end to end: real controller processes against the real kube-apiserver with OME's CRDs.

The per-node ConfigMaps are written by hand here, exactly as agents write them (``StatusConfigMap`` +
``render_entry``), so every transition (create, Ready, Failed, node gone, repair, delete) is under the test's control.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from modelherd.agent.controller.controller import FINALIZERS, LEASE_NAME
from modelherd.agent.ome.entry import EntryStatus, render_entry
from modelherd.agent.ome.keys import configmap_key
from modelherd.agent.reporting.configmap import StatusConfigMap

from tests.agent_fleet import GROUP, MODELHERD, VERSION, Fleet, eventually, free_port
from tests.hubserver import HubServer
from tests.integration.test_agent import REPO, hub, model_src  # noqa: F401  (fixtures)
from tests.integration.test_controlplane import install_ome_crds
from tests.k8s_fixtures import KubeCluster

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess, pytest.mark.slow]

BM_FINALIZER = FINALIZERS["BaseModel"]
CBM_FINALIZER = FINALIZERS["ClusterBaseModel"]


@dataclass
class Controller:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def metric(self, name: str) -> float | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def leading(self) -> bool:
        return self.metric("modelherd_controller_is_leader") == 1.0


@dataclass
class Env:
    fleet: Fleet
    kubeconfig: Path
    base: Path
    controllers: list[Controller]

    @property
    def namespace(self) -> str:
        return self.fleet.namespace

    def start(self, *extra: str) -> Controller:
        port = free_port()
        log = self.base / f"controller-{len(self.controllers)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELHERD_", "KUBECONFIG", "POD_"))}
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            [MODELHERD, "controller", "--namespace", self.namespace, "--kubeconfig", str(self.kubeconfig),
             "--port", str(port), "--bind-address", "127.0.0.1", "--log-level", "DEBUG", *extra],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True, env=env)
        c = Controller(proc, port, log)
        self.controllers.append(c)
        return c

    def logs(self) -> str:
        return "\n".join(c.log.read_text() for c in self.controllers if c.log.exists())

    def cm(self, node: str) -> StatusConfigMap:
        return StatusConfigMap(self.fleet.api, self.namespace, node)

    def put(self, node: str, key: str, name: str, status: EntryStatus) -> None:
        self.cm(node).update(key, lambda prev: render_entry(prev, name=name, status=status))

    def put_raw(self, node: str, key: str, value: str) -> None:
        self.cm(node).update(key, lambda _prev: value)

    def drop(self, node: str, key: str) -> None:
        self.cm(node).remove(key)

    def get(self, plural: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        objs = self.fleet.objs
        try:
            if namespace:
                got: dict[str, Any] = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            else:
                got = objs.get_cluster_custom_object(GROUP, VERSION, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return got

    def lease(self) -> dict[str, Any] | None:
        try:
            raw = client.CoordinationV1Api(self.fleet.api).read_namespaced_lease(
                LEASE_NAME, self.namespace, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        got: dict[str, Any] = json.loads(raw.data)
        return got


def status_of(obj: dict[str, Any] | None) -> tuple[str | None, list[str], list[str]]:
    st = (obj or {}).get("status") or {}
    return st.get("state"), list(st.get("nodesReady") or []), list(st.get("nodesFailed") or [])


@pytest.fixture
def env(kube_cluster: KubeCluster, api_client: Any, kube_namespace: str, tmp_path: Path) -> Iterator[Env]:
    install_ome_crds(kube_cluster, api_client)
    fleet = Fleet(api_client, kube_cluster.kubeconfig, kube_namespace, "", tmp_path)
    e = Env(fleet, kube_cluster.kubeconfig, tmp_path, [])
    try:
        yield e
    finally:
        for c in e.controllers:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(10)
        for plural, ns, name in fleet.models:  # no controller left to release them: strip our finalizers
            with contextlib.suppress(ApiException):
                fleet.patch_model(plural, name, {"metadata": {"finalizers": None}}, ns)
        fleet.cleanup()


def _wait_status(env: Env, plural: str, name: str, want: tuple[str, list[str], list[str]], namespace: str = "",
                 timeout: float = 30.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = env.get(plural, name, namespace)
        return obj if status_of(obj) == want else None
    try:
        return eventually(check, timeout=timeout, what=f"{plural}/{name} status {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}; now {status_of(env.get(plural, name, namespace))}\n{env.logs()[-4000:]}") from None


def test_status_lists_follow_the_configmaps_through_create_failure_repair_and_delete(env: Env) -> None:
    f = env.fleet
    a, b, c = f.add_node("a"), f.add_node("b"), f.add_node("c")
    made = f.create_bm("llama", "hf://org/llama")
    f.create_cbm(f"cbm-{f.tag}", "hf://org/cbm")
    cbm = f"cbm-{f.tag}"
    key = configmap_key("BaseModel", env.namespace, "llama")
    ckey = configmap_key("ClusterBaseModel", "", cbm)
    ctl = env.start("--no-leader-elect")

    # create: the finalizer goes on, the state is In_Transit with no node in either list
    obj = _wait_status(env, "basemodels", "llama", ("In_Transit", [], []), env.namespace)
    assert obj["metadata"]["finalizers"] == [BM_FINALIZER]
    cobj = _wait_status(env, "clusterbasemodels", cbm, ("In_Transit", [], []))
    assert cobj["metadata"]["finalizers"] == [CBM_FINALIZER]
    assert obj["spec"] == made["spec"], "the controller must not write the spec"

    env.put(a, key, "llama", "Updating")
    env.put(a, ckey, cbm, "Ready")
    _wait_status(env, "clusterbasemodels", cbm, ("Ready", [a], []))
    assert status_of(env.get("basemodels", "llama", env.namespace)) == ("In_Transit", [], [])

    # Ready on one node, Failed on another (both sorted lists), Ready wins the state
    env.put(a, key, "llama", "Ready")
    _wait_status(env, "basemodels", "llama", ("Ready", [a], []), env.namespace)
    env.put(b, key, "llama", "Failed")
    env.put(c, key, "llama", "Failed")
    _wait_status(env, "basemodels", "llama", ("Ready", [a], sorted([b, c])), env.namespace)

    # a key removed (not changed): OME never re-enqueues on a removal; the lists must follow it
    env.drop(a, key)
    _wait_status(env, "basemodels", "llama", ("Failed", [], sorted([b, c])), env.namespace)

    # a node's Node object deleted: its ConfigMap no longer counts
    f.core.delete_node(c)
    _wait_status(env, "basemodels", "llama", ("Failed", [], [b]), env.namespace)

    # repair: Failed -> Ready on b
    env.put(b, key, "llama", "Ready")
    _wait_status(env, "basemodels", "llama", ("Ready", [b], []), env.namespace)

    # delete: the finalizer holds while an existing node has the key (unparseable counts as holding; c's node is
    # gone, so its stale entry does not); status keeps following during the deletion
    env.put(a, key, "llama", "Updating")
    f.delete_model("basemodels", "llama", env.namespace)
    env.drop(b, key)
    _wait_status(env, "basemodels", "llama", ("In_Transit", [], []), env.namespace)
    env.put_raw(a, key, "{not json")
    time.sleep(2.0)
    held = env.get("basemodels", "llama", env.namespace)
    assert held is not None and held["metadata"].get("deletionTimestamp"), "the finalizer let go too early"
    assert held["metadata"]["finalizers"] == [BM_FINALIZER]
    env.put_raw(a, key, json.dumps({"name": "llama", "status": "Deleted"}))  # OME's Deleted no longer holds
    eventually(lambda: env.get("basemodels", "llama", env.namespace) is None, timeout=30,
               what="the BaseModel gone once no node holds it")
    assert (f.configmap(c) or {}).get("data", {}).get(key), "the gone node's entry stays (it was only ignored)"

    # the ClusterBaseModel: its finalizer lets go once the last entry is removed
    f.delete_model("clusterbasemodels", cbm)
    time.sleep(1.0)
    assert env.get("clusterbasemodels", cbm) is not None
    env.drop(a, ckey)
    eventually(lambda: env.get("clusterbasemodels", cbm) is None, timeout=30, what="the ClusterBaseModel gone")
    assert ctl.proc.poll() is None
    ctl.proc.send_signal(signal.SIGTERM)
    assert ctl.proc.wait(20) == 0
    assert "Traceback" not in env.logs()


def _leaders(controllers: list[Controller]) -> list[Controller]:
    return [c for c in controllers if c.leading()]


def test_two_controllers_elect_one_leader_and_sigterm_hands_over_within_the_lease_duration(env: Env) -> None:
    f = env.fleet
    a = f.add_node("a")
    f.create_bm("m", "hf://org/m")
    key = configmap_key("BaseModel", env.namespace, "m")
    first, second = env.start(), env.start()
    leader = eventually(lambda: _leaders([first, second]) or None, timeout=30, what="a leader")[0]
    other = second if leader is first else first
    eventually(lambda: other.metric("modelherd_controller_is_leader") is not None, timeout=30, what="standby up")
    _wait_status(env, "basemodels", "m", ("In_Transit", [], []), env.namespace)
    for _ in range(10):  # exactly one leader, steadily (the standby is up and answering)
        assert _leaders([first, second]) == [leader]
        assert other.metric("modelherd_controller_is_leader") == 0.0
        time.sleep(0.3)
    lease = env.lease()
    assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 15
    holder = lease["spec"]["holderIdentity"]
    assert holder and holder in leader.log.read_text()

    env.put(a, key, "m", "Ready")
    _wait_status(env, "basemodels", "m", ("Ready", [a], []), env.namespace)

    sent = time.monotonic()
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.proc.wait(20) == 0
    eventually(other.leading, timeout=15, interval=0.1, what="the standby taking over")
    took = time.monotonic() - sent
    assert took < 15, f"take-over took {took:.1f}s, beyond the lease duration"
    new_holder = (env.lease() or {})["spec"]["holderIdentity"]
    assert new_holder and new_holder != holder
    assert (env.lease() or {})["spec"]["leaseTransitions"] >= 1
    env.put(a, key, "m", "Failed")  # the new leader reconciles
    _wait_status(env, "basemodels", "m", ("Failed", [], [a]), env.namespace)
    print(f"SIGTERM hand-over: {took:.2f}s")


def test_a_killed_leader_is_replaced_after_its_lease_expires(env: Env) -> None:
    f = env.fleet
    f.create_bm("m", "hf://org/m")
    timings = ("--leader-elect-lease-duration", "3s", "--leader-elect-renew-deadline", "2s",
               "--leader-elect-retry-period", "0.5s")
    first, second = env.start(*timings), env.start(*timings)
    leader = eventually(lambda: _leaders([first, second]) or None, timeout=30, what="a leader")[0]
    other = second if leader is first else first
    eventually(lambda: other.metric("modelherd_controller_is_leader") is not None, timeout=30, what="standby up")
    _wait_status(env, "basemodels", "m", ("In_Transit", [], []), env.namespace)
    time.sleep(2.0)  # several renewals: the standby must not take over a live leader
    assert _leaders([first, second]) == [leader]
    killed = time.monotonic()
    leader.proc.kill()  # no release: the standby must wait out the lease
    leader.proc.wait(10)
    eventually(other.leading, timeout=15, interval=0.1, what="the standby taking over")
    took = time.monotonic() - killed
    assert 2.0 <= took < 3 + 2 * 0.5 * 2.2 + 1.5, f"take-over after {took:.1f}s"
    print(f"SIGKILL take-over: {took:.2f}s")


def test_with_a_real_agent_the_model_goes_ready_and_its_deletion_waits_for_the_agent(
        env: Env, hub: HubServer, tmp_path: Path) -> None:  # noqa: F811
    f = env.fleet
    f.hub_endpoint = hub.endpoint
    node = f.add_node("a")
    f.add_node("b")  # a node without an agent: no ConfigMap, no say
    agent = f.start(node, tmp_path / "models", "--storage-mode", "local", "--coordination", "none")
    f.wait_ready(agent)
    ctl = env.start("--no-leader-elect")
    name = f"llama-{f.tag}"
    f.create_cbm(name, f"hf://{REPO}")
    _wait_status(env, "clusterbasemodels", name, ("Ready", [node], []), timeout=90)
    f.delete_model("clusterbasemodels", name)
    eventually(lambda: env.get("clusterbasemodels", name) is None, timeout=60,
               what="the CR gone once the agent removed its entry")
    assert f.entry(node, configmap_key("ClusterBaseModel", "", name)) is None
    assert ctl.proc.poll() is None and "Traceback" not in env.logs() + f.logs()
