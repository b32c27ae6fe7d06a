"""The test control plane is a real Kubernetes API server.

These tests pin down the server behaviour the node agent depends on -- Lease optimistic
concurrency, MicroTime parsing, RBAC for ServiceAccount tokens, OME's CRDs, persistence across
restarts -- against the kube-apiserver + etcd started by ``e2e/controlplane/up``.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from modelherd.coordination.microtime import format_microtime, parse_microtime

from tests.k8s_fixtures import CRD_DIR, KubeCluster, admin_api_client, mint_sa_kubeconfig
from tests.kube_microtime import MicroTimeApiClient

pytestmark = pytest.mark.k8s

T = TypeVar("T")

OME_GROUP = "ome.io"
OME_VERSION = "v1beta1"


def _reason(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("reason", ""))
    except (TypeError, ValueError):
        return ""


def _lease(name: str, holder: str, **spec: Any) -> client.V1Lease:
    return client.V1Lease(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=15, **spec),
    )


def _lease_body(name: str, holder: str, renew_time: str | None = None) -> dict[str, Any]:
    """A Lease as a plain dict (the plain client still validates it into ``V1Lease``)."""
    spec: dict[str, Any] = {"holderIdentity": holder, "leaseDurationSeconds": 15}
    if renew_time is not None:
        spec["renewTime"] = renew_time
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": spec}


def _eventually(fn: Callable[[], T], timeout: float = 15.0) -> T:
    """Retry ``fn`` until it stops raising (RBAC and CRD changes propagate via informers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def coordination(api_client: Any) -> client.CoordinationV1Api:
    """The plain kubernetes client: serializes datetimes with ``isoformat()``."""
    return client.CoordinationV1Api(api_client)


@pytest.fixture
def micro_coordination(api_client: Any) -> client.CoordinationV1Api:
    """Same credentials, datetimes serialized by ``format_microtime``."""
    return client.CoordinationV1Api(MicroTimeApiClient(configuration=api_client.configuration))


# --------------------------------------------------------------------------- Leases


def test_creating_a_lease_that_exists_is_409_already_exists(
    coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    coordination.create_namespaced_lease(kube_namespace, _lease("model-a", "node-1"))
    with pytest.raises(ApiException) as err:
        coordination.create_namespaced_lease(kube_namespace, _lease("model-a", "node-2"))
    assert err.value.status == 409
    assert _reason(err.value) == "AlreadyExists"
    assert coordination.read_namespaced_lease("model-a", kube_namespace).spec.holder_identity == "node-1"


def test_replacing_a_lease_with_a_stale_resource_version_is_409_conflict(
    coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    created = coordination.create_namespaced_lease(kube_namespace, _lease("model-a", "node-1"))
    stale_rv = created.metadata.resource_version

    created.spec.holder_identity = "node-2"
    won = coordination.replace_namespaced_lease("model-a", kube_namespace, created)
    assert won.metadata.resource_version != stale_rv

    loser = _lease("model-a", "node-3")
    loser.metadata.resource_version = stale_rv
    with pytest.raises(ApiException) as err:
        coordination.replace_namespaced_lease("model-a", kube_namespace, loser)
    assert err.value.status == 409
    assert _reason(err.value) == "Conflict"
    assert coordination.read_namespaced_lease("model-a", kube_namespace).spec.holder_identity == "node-2"


def test_replacing_a_lease_without_resource_version_is_rejected_422(
    coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    """Lease does not allow unconditional updates: a PUT without ``metadata.resourceVersion`` is
    422 Invalid ("metadata.resourceVersion: must be specified for an update"), not an overwrite.
    (Some kinds, e.g. ConfigMap, accept such a PUT as an unconditional update; Lease does not.)
    """
    coordination.create_namespaced_lease(kube_namespace, _lease("model-a", "node-1"))
    blind = _lease("model-a", "node-2")
    assert blind.metadata.resource_version is None
    with pytest.raises(ApiException) as err:
        coordination.replace_namespaced_lease("model-a", kube_namespace, blind)
    assert err.value.status == 422
    assert _reason(err.value) == "Invalid"
    assert "resourceVersion" in str(err.value.body)
    assert coordination.read_namespaced_lease("model-a", kube_namespace).spec.holder_identity == "node-1"


def test_renew_time_without_fractional_seconds_is_rejected_by_the_server(
    coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    """MicroTime is parsed with ``2006-01-02T15:04:05.000000Z07:00``: six digits are mandatory.

    The Python client serializes datetimes with ``isoformat()``, which drops the fraction when
    ``microsecond == 0`` (``...T12:00:00+00:00``) -- the server answers 400 BadRequest.
    """
    whole_second = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    with pytest.raises(ApiException) as err:
        coordination.create_namespaced_lease(kube_namespace, _lease("model-a", "node-1", renew_time=whole_second))
    assert err.value.status == 400
    assert "cannot parse" in str(err.value.body)


def test_renew_time_from_a_naive_datetime_is_rejected_by_the_server(
    coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    """A naive datetime serializes without an offset (``...T12:00:00.123456``) -> 400."""
    naive = datetime(2024, 5, 1, 12, 0, 0, 123456)
    with pytest.raises(ApiException) as err:
        coordination.create_namespaced_lease(kube_namespace, _lease("model-a", "node-1", renew_time=naive))
    assert err.value.status == 400


def test_plain_client_reformats_even_a_correct_microtime_string(
    coordination: client.CoordinationV1Api, micro_coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    """The kubernetes 37 client validates bodies into pydantic models: a ``renewTime`` string --
    even inside a plain dict -- becomes a ``datetime`` and is serialized with ``isoformat()``
    again, so ``format_microtime``'s output is lost and a whole-second timestamp is rejected.
    The same bites read-modify-write: a Lease stored with ``renewTime: ...:00.000000Z`` cannot
    be PUT back through the plain client. ``MicroTimeApiClient`` is the fix.
    """
    as_string = _lease_body("model-a", "node-1", renew_time="2024-05-01T12:00:00.000000Z")
    with pytest.raises(ApiException) as err:
        coordination.create_namespaced_lease(kube_namespace, as_string)
    assert err.value.status == 400

    micro_coordination.create_namespaced_lease(
        kube_namespace, _lease("model-a", "node-1", renew_time=datetime(2024, 5, 1, 12, tzinfo=UTC))
    )
    typed = coordination.read_namespaced_lease("model-a", kube_namespace)
    typed.spec.holder_identity = "node-2"
    with pytest.raises(ApiException) as err:
        coordination.replace_namespaced_lease("model-a", kube_namespace, typed)
    assert err.value.status == 400
    # ... while the MicroTime-aware client writes the very same object back fine.
    assert micro_coordination.replace_namespaced_lease("model-a", kube_namespace, typed).spec.holder_identity == (
        "node-2"
    )


def test_microtime_client_is_accepted_and_round_trips(
    coordination: client.CoordinationV1Api, micro_coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    whole_second = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    precise = datetime(2024, 5, 1, 12, 0, 0, 654321, tzinfo=UTC)
    micro_coordination.create_namespaced_lease(
        kube_namespace, _lease("model-a", "node-1", acquire_time=whole_second, renew_time=precise)
    )
    # Read the raw JSON, not the client's parsed model, to see the server's wire format.
    raw = coordination.read_namespaced_lease("model-a", kube_namespace, _preload_content=False).json()
    assert raw["spec"]["acquireTime"] == format_microtime(whole_second) == "2024-05-01T12:00:00.000000Z"
    assert raw["spec"]["renewTime"] == format_microtime(precise) == "2024-05-01T12:00:00.654321Z"
    assert parse_microtime(raw["spec"]["renewTime"]) == precise
    assert parse_microtime(raw["spec"]["acquireTime"]) == whole_second

    # Read-modify-write through the typed model.
    lease = micro_coordination.read_namespaced_lease("model-a", kube_namespace)
    lease.spec.holder_identity = "node-2"
    lease.spec.renew_time = datetime(2024, 5, 1, 12, 0, 15, tzinfo=UTC)
    micro_coordination.replace_namespaced_lease("model-a", kube_namespace, lease)
    again = coordination.read_namespaced_lease("model-a", kube_namespace, _preload_content=False).json()
    assert again["spec"]["renewTime"] == "2024-05-01T12:00:15.000000Z"
    assert again["spec"]["holderIdentity"] == "node-2"


def test_microtime_client_refuses_naive_datetimes_before_sending(
    micro_coordination: client.CoordinationV1Api, kube_namespace: str
) -> None:
    with pytest.raises(ValueError, match="naive"):
        micro_coordination.create_namespaced_lease(
            kube_namespace, _lease("model-a", "node-1", renew_time=datetime(2024, 5, 1, 12))
        )


# --------------------------------------------------------------------------- RBAC


def _sa_client(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig), persist_config=False)


def test_service_account_without_a_role_is_forbidden_on_leases(
    kube_cluster: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    kubeconfig = mint_sa_kubeconfig(kube_cluster, kube_namespace, "agent", tmp_path / "sa.kubeconfig")
    with _sa_client(kubeconfig) as sa:
        leases = client.CoordinationV1Api(sa)
        for call in (
            lambda: leases.list_namespaced_lease(kube_namespace),
            lambda: leases.read_namespaced_lease("model-a", kube_namespace),
            lambda: leases.create_namespaced_lease(kube_namespace, _lease("model-a", "node-1")),
        ):
            with pytest.raises(ApiException) as err:
                call()
            assert err.value.status == 403


def test_service_account_with_a_lease_role_can_get_create_and_update(
    kube_cluster: KubeCluster, kube_namespace: str, api_client: Any, tmp_path: Path
) -> None:
    rbac = client.RbacAuthorizationV1Api(api_client)
    rbac.create_namespaced_role(
        kube_namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="leases"),
            rules=[
                client.V1PolicyRule(
                    api_groups=["coordination.k8s.io"],
                    resources=["leases"],
                    verbs=["get", "list", "watch", "create", "update", "patch"],
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        kube_namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="agent-leases"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="leases"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="agent", namespace=kube_namespace)],
        ),
    )
    kubeconfig = mint_sa_kubeconfig(kube_cluster, kube_namespace, "agent", tmp_path / "sa.kubeconfig")
    with _sa_client(kubeconfig) as sa:
        leases = client.CoordinationV1Api(MicroTimeApiClient(configuration=sa.configuration))
        _eventually(lambda: leases.list_namespaced_lease(kube_namespace))
        with pytest.raises(ApiException) as missing:
            leases.read_namespaced_lease("model-a", kube_namespace)
        assert missing.value.status == 404  # allowed to look, nothing there
        created = leases.create_namespaced_lease(
            kube_namespace, _lease("model-a", "node-1", renew_time=datetime.now(UTC))
        )
        got = leases.read_namespaced_lease("model-a", kube_namespace)
        assert got.metadata.uid == created.metadata.uid
        got.spec.holder_identity = "node-2"
        got.spec.renew_time = datetime.now(UTC)
        updated = leases.replace_namespaced_lease("model-a", kube_namespace, got)
        assert updated.spec.holder_identity == "node-2"
        # The Role is namespaced: other namespaces stay forbidden.
        with pytest.raises(ApiException) as other:
            leases.list_namespaced_lease("default")
        assert other.value.status == 403
        # And nothing beyond leases was granted.
        with pytest.raises(ApiException) as cms:
            client.CoreV1Api(sa).list_namespaced_config_map(kube_namespace)
        assert cms.value.status == 403


# --------------------------------------------------------------------------- OME CRDs


def install_ome_crds(cluster: KubeCluster, api_client: Any) -> None:
    """``kubectl apply`` OME's CRDs from ``charts/modelherd/files/crds`` and wait until they are Established."""
    out = cluster.kubectl("apply", "-f", str(CRD_DIR), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    ext = client.ApiextensionsV1Api(api_client)

    def established(name: str) -> None:
        crd = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in (crd.status.conditions or [])}
        assert conditions.get("Established") == "True", conditions

    for name in ("basemodels.ome.io", "clusterbasemodels.ome.io"):
        _eventually(lambda name=name: established(name), timeout=30)


def _base_model(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": f"{OME_GROUP}/{OME_VERSION}",
        "kind": kind,
        "metadata": metadata,
        "spec": {
            "modelFormat": {"name": "safetensors", "version": "1"},
            "storage": {
                "storageUri": "hf://meta-llama/Llama-3.1-8B-Instruct",
                "path": "/models/llama-3.1-8b",
                "key": "hf-token",
                "parameters": {"revision": "main"},
                "nodeSelector": {"gpu": "h100"},
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                        ]
                    }
                },
            },
        },
    }


@pytest.fixture
def ome_crds(kube_cluster: KubeCluster, api_client: Any) -> None:
    install_ome_crds(kube_cluster, api_client)


def _watch_until_added(list_fn: Callable[..., Any], name: str, *args: Any, resource_version: str) -> str:
    w = watch.Watch()
    try:
        for event in w.stream(list_fn, *args, resource_version=resource_version, timeout_seconds=20):
            if event["type"] == "ADDED" and event["object"]["metadata"]["name"] == name:
                return str(event["object"]["spec"]["storage"]["storageUri"])
    finally:
        w.stop()
    raise AssertionError(f"no ADDED event for {name}")


@pytest.mark.usefixtures("ome_crds")
def test_ome_base_model_is_created_and_watched(api_client: Any, kube_namespace: str) -> None:
    objs = client.CustomObjectsApi(api_client)
    args = (OME_GROUP, OME_VERSION, kube_namespace, "basemodels")
    rv = _eventually(lambda: objs.list_namespaced_custom_object(*args))["metadata"]["resourceVersion"]
    created = objs.create_namespaced_custom_object(*args, _base_model("BaseModel", "llama", kube_namespace))
    spec = created["spec"]
    assert spec["storage"]["nodeSelector"] == {"gpu": "h100"}
    assert spec["storage"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert spec["modelFormat"] == {"name": "safetensors", "version": "1", "operator": "Equal", "weight": 1}
    uri = _watch_until_added(objs.list_namespaced_custom_object, "llama", *args, resource_version=rv)
    assert uri == "hf://meta-llama/Llama-3.1-8B-Instruct"

    # status is a subresource: written separately, free-form.
    created["status"] = {"state": "Ready", "nodesReady": ["node-1"]}
    objs.patch_namespaced_custom_object_status(*args, "llama", {"status": created["status"]})
    assert objs.get_namespaced_custom_object(*args, "llama")["status"]["state"] == "Ready"


@pytest.mark.usefixtures("ome_crds")
def test_ome_cluster_base_model_is_created_and_watched(api_client: Any) -> None:
    objs = client.CustomObjectsApi(api_client)
    args = (OME_GROUP, OME_VERSION, "clusterbasemodels")
    name = f"llama-{uuid.uuid4().hex[:8]}"
    rv = _eventually(lambda: objs.list_cluster_custom_object(*args))["metadata"]["resourceVersion"]
    objs.create_cluster_custom_object(*args, _base_model("ClusterBaseModel", name))
    try:
        uri = _watch_until_added(objs.list_cluster_custom_object, name, *args, resource_version=rv)
        assert uri == "hf://meta-llama/Llama-3.1-8B-Instruct"
    finally:
        objs.delete_cluster_custom_object(*args, name)


@pytest.mark.usefixtures("ome_crds")
def test_ome_crd_schema_is_enforced(api_client: Any, kube_namespace: str) -> None:
    objs = client.CustomObjectsApi(api_client)
    args = (OME_GROUP, OME_VERSION, kube_namespace, "basemodels")
    no_storage = _base_model("BaseModel", "bad", kube_namespace)
    del no_storage["spec"]["storage"]
    with pytest.raises(ApiException) as err:
        objs.create_namespaced_custom_object(*args, no_storage)
    assert err.value.status == 422
    bad_params = _base_model("BaseModel", "bad", kube_namespace)
    bad_params["spec"]["storage"]["parameters"] = {"retries": 3}  # map of *string*
    with pytest.raises(ApiException) as err:
        objs.create_namespaced_custom_object(*args, bad_params)
    assert err.value.status == 422


# --------------------------------------------------------------------------- tools


def test_kubectl_and_helm_from_the_bin_dir_reach_the_cluster(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    out = kube_cluster.kubectl("get", "namespace", kube_namespace, "-o", "jsonpath={.metadata.name}")
    assert out.stdout == kube_namespace
    version = kube_cluster.kubectl("version", "-o", "json", check=False)
    assert '"serverVersion"' in version.stdout, version.stderr
    helm = subprocess.run(
        [str(kube_cluster.bin_dir / "helm"), "list", "-n", kube_namespace, "-o", "json"],
        env=kube_cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert helm.returncode == 0, helm.stderr
    assert helm.stdout.strip() == "[]"


# --------------------------------------------------------------------------- restart


@pytest.fixture
def restartable(kube_cluster: KubeCluster) -> Iterator[KubeCluster]:
    if not kube_cluster.managed:
        pytest.skip("needs the control plane started by this test session (not an existing cluster)")
    yield kube_cluster


def test_objects_survive_an_api_server_restart(restartable: KubeCluster, api_client: Any, kube_namespace: str) -> None:
    install_ome_crds(restartable, api_client)
    micro = MicroTimeApiClient(configuration=api_client.configuration)
    lease = client.CoordinationV1Api(micro).create_namespaced_lease(
        kube_namespace, _lease("model-a", "node-1", renew_time=datetime.now(UTC))
    )
    objs = client.CustomObjectsApi(api_client)
    args = (OME_GROUP, OME_VERSION, kube_namespace, "basemodels")
    model = _eventually(
        lambda: objs.create_namespaced_custom_object(*args, _base_model("BaseModel", "llama", kube_namespace))
    )

    restartable.restart()

    fresh = admin_api_client(restartable)
    try:
        got = client.CoordinationV1Api(fresh).read_namespaced_lease("model-a", kube_namespace)
        assert got.metadata.uid == lease.metadata.uid
        assert got.spec.renew_time == lease.spec.renew_time
        got_model = _eventually(lambda: client.CustomObjectsApi(fresh).get_namespaced_custom_object(*args, "llama"))
        assert got_model["metadata"]["uid"] == model["metadata"]["uid"]
    finally:
        fresh.close()
