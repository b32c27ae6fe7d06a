"""Every field of a CR is untrusted input: what ``model_spec`` accepts, refuses and confines (no API server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.basemodels import SpecPolicy, model_spec
from modelherd.agent.lifecycle.claims import ClaimKind, Claims


def cr(kind: str, name: str, uri: str, *, ns: str = "", path: str | None = None, key: Any = None,
       params: dict[str, str] | None = None, created: str = "2026-01-01T00:00:00Z",
       labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
       deleting: bool = False) -> dict[str, Any]:
    storage: dict[str, Any] = {"storageUri": uri}
    if path is not None:
        storage["path"] = path
    if key is not None:
        storage["key"] = key
    if params is not None:
        storage["parameters"] = params
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "creationTimestamp": created,
                            "resourceVersion": "1"}
    if ns:
        meta["namespace"] = ns
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    return {"kind": kind, "metadata": meta, "spec": {"storage": storage}}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    return r


@pytest.mark.parametrize("key", ["../../mh/secrets/cluster-hf", "a/b", "%2e%2e", "UPPER", "a..b/c", "x" * 254,
                                 "", " spaced", "ns/name"])
def test_a_secret_key_that_is_not_a_secret_name_is_an_invalid_spec(root: Path, key: str) -> None:
    spec = model_spec(cr("BaseModel", "m", "hf://org/m", ns="team-a", key=key), root)
    if key == "":
        assert spec.problem == "" and spec.secret_name == ""
    else:
        assert "spec.storage.key must be the name of a Secret" in spec.problem
        assert key not in spec.problem or key == ""


def test_a_secret_data_key_must_be_a_data_key(root: Path) -> None:
    spec = model_spec(cr("BaseModel", "m", "hf://org/m", ns="a", key="hf", params={"secretKey": "../x"}), root)
    assert "secretKey" in spec.problem
    ok = model_spec(cr("BaseModel", "m", "hf://org/m", ns="a", key="hf.token-1", params={"secretKey": "tok_en"}), root)
    assert ok.problem == "" and ok.secret_name == "hf.token-1" and ok.secret_key == "tok_en"


@pytest.mark.parametrize("path", ["/x\x00y", "a\x00", "with\nnewline"])
def test_a_control_character_in_the_path_is_that_models_problem_and_never_raises(root: Path, path: str) -> None:
    spec = model_spec(cr("ClusterBaseModel", "m", "hf://org/m", path=path), root)
    assert "control character" in spec.problem and spec.dest is None


@pytest.mark.parametrize("obj", [
    {"kind": "BaseModel", "metadata": {"name": "m", "namespace": "a"}, "spec": {"storage": {"storageUri": 5}}},
    {"kind": "BaseModel", "metadata": {"name": "m", "namespace": "a"}, "spec": {"storage": {"storageUri": "hf://o/m",
                                                                                         "path": ["a"]}}},
    {"kind": "BaseModel", "metadata": {"name": "m", "namespace": "a", "generation": "x"}, "spec": []},
    {"kind": "BaseModel", "metadata": {"name": "m", "namespace": "a"},
     "spec": {"storage": {"storageUri": "hf://o/m", "parameters": "notamap"}}},
])
def test_malformed_crs_never_raise(root: Path, obj: dict[str, Any]) -> None:
    spec = model_spec(obj, root)
    assert spec.problem or spec.dest is not None


def test_reserve_is_honoured_as_a_label_and_as_an_annotation(root: Path) -> None:
    reserve = {"models.ome/reserve-model-artifact": "true"}
    assert model_spec(cr("ClusterBaseModel", "m", "hf://o/m", labels=reserve), root).reserve
    assert model_spec(cr("ClusterBaseModel", "m", "hf://o/m", annotations=reserve), root).reserve
    assert not model_spec(cr("ClusterBaseModel", "m", "hf://o/m"), root).reserve


def test_basemodel_paths_are_confined_to_their_namespace_folder_when_the_operator_says_so(root: Path) -> None:
    policy = SpecPolicy(basemodel_path_prefixes=("{namespace}",))
    escaped = model_spec(cr("BaseModel", "m", "hf://evil/w", ns="team-a", path=str(root / "acme/llama")), root, policy)
    assert "outside the folders BaseModels of namespace team-a may use" in escaped.problem
    inside = model_spec(cr("BaseModel", "m", "hf://o/m", ns="team-a", path=str(root / "team-a/m")), root, policy)
    assert inside.problem == "" and inside.dest == root.resolve() / "team-a/m"
    default = model_spec(cr("BaseModel", "m", "hf://org/model", ns="team-a"), root, policy)
    assert default.dest == root.resolve() / "team-a/org/model"
    cluster = model_spec(cr("ClusterBaseModel", "m", "hf://org/model", path=str(root / "acme/llama")), root, policy)
    assert cluster.problem == ""
    # the namespace folder itself is not a model folder
    top = model_spec(cr("BaseModel", "m", "hf://o/m", ns="team-a", path=str(root / "team-a")), root, policy)
    assert top.problem


def test_without_a_policy_every_path_in_the_root_works_as_in_ome(root: Path) -> None:
    spec = model_spec(cr("BaseModel", "m", "hf://o/m", ns="team-a", path=str(root / "acme/llama")), root)
    assert spec.problem == ""


@pytest.mark.parametrize("uri", ["local:///etc", "local:///proc/self", "local:///", "local://../../etc"])
def test_local_outside_the_allowed_folders_is_refused_from_the_text_alone(root: Path, uri: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    touched: list[str] = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: touched.append(str(p)) or real(p, *a, **k))
    spec = model_spec(cr("ClusterBaseModel", "m", uri), root)
    assert spec.dest is None and spec.problem
    assert not any(t.startswith(("/etc", "/proc")) or t == "/" for t in touched)


def test_local_inside_the_root_or_a_listed_folder_is_accepted_and_a_symlink_cannot_lead_out(
        root: Path, tmp_path: Path) -> None:
    (root / "m").mkdir()
    assert model_spec(cr("ClusterBaseModel", "m", f"local://{root}/m"), root).problem == ""
    extra = tmp_path / "nvme"
    extra.mkdir()
    policy = SpecPolicy(local_roots=(extra,))
    assert model_spec(cr("ClusterBaseModel", "m", f"local://{extra}/x"), root, policy).problem == ""
    assert model_spec(cr("ClusterBaseModel", "m", f"local://{extra}/x"), root).problem
    (root / "link").symlink_to("/etc")
    assert "resolves outside" in model_spec(cr("ClusterBaseModel", "m", f"local://{root}/link"), root).problem


def test_ambient_credentials_serve_cluster_models_and_opted_in_namespaces_only(root: Path) -> None:
    policy = SpecPolicy(ambient_namespaces=frozenset({"ml-platform"}))
    assert model_spec(cr("ClusterBaseModel", "m", "hf://o/m"), root, policy).ambient
    assert model_spec(cr("BaseModel", "m", "hf://o/m", ns="ml-platform"), root, policy).ambient
    assert not model_spec(cr("BaseModel", "m", "hf://o/m", ns="team-a"), root, policy).ambient
    everyone = SpecPolicy(ambient_namespaces=frozenset({"*"}))
    assert model_spec(cr("BaseModel", "m", "hf://o/m", ns="x"), root, everyone).ambient


# ------------------------------------------------------------------------------------------------ claims
def claims_of(root: Path, *objs: dict[str, Any]) -> Claims:
    return Claims(root, SpecPolicy(), lambda: list(objs))


def test_a_later_model_of_other_content_at_a_held_folder_is_refused_naming_the_holder(root: Path) -> None:
    platform = cr("ClusterBaseModel", "llama", "hf://acme/llama", path=str(root / "acme/llama"))
    tenant = cr("BaseModel", "x", "hf://evil/weights", ns="team-a", path=str(root / "acme/llama"),
                created="2026-02-01T00:00:00Z")
    claims = claims_of(root, platform, tenant)
    conflict = claims.path_conflict(model_spec(tenant, root))
    assert conflict is not None and conflict.kind is ClaimKind.PATH
    assert "belongs to clusterbasemodel/llama (hf://acme/llama)" in conflict.message
    assert "--dest" not in conflict.message
    assert claims.path_conflict(model_spec(platform, root)) is None


def test_the_same_model_at_the_same_folder_is_shared_not_a_conflict(root: Path) -> None:
    a = cr("ClusterBaseModel", "a", "hf://acme/llama", path=str(root / "acme/llama"))
    b = cr("BaseModel", "b", "hf://acme/llama", ns="t", path=str(root / "acme/llama"), created="2026-03-01T00:00:00Z")
    assert claims_of(root, a, b).path_conflict(model_spec(b, root)) is None


def test_a_folder_inside_or_around_a_held_one_is_refused(root: Path) -> None:
    top = cr("BaseModel", "top", "hf://x/y", ns="t", path=str(root / "meta-llama"))
    below = cr("ClusterBaseModel", "below", "hf://meta-llama/Llama", path=str(root / "meta-llama/Llama"),
               created="2026-05-01T00:00:00Z")
    conflict = claims_of(root, top, below).path_conflict(model_spec(below, root))
    assert conflict is not None and "inside" in conflict.message and "basemodel/t/top" in conflict.message
    # the holder goes (deleted): the later one may have it
    gone = {**top, "metadata": {**top["metadata"], "deletionTimestamp": "2026-06-01T00:00:00Z"}}
    assert claims_of(root, gone, below).path_conflict(model_spec(below, root)) is None


def test_two_admins_crs_with_one_path_and_different_revisions_let_the_senior_win_on_every_node(root: Path) -> None:
    a = cr("ClusterBaseModel", "a", "hf://acme/llama@v1", path=str(root / "l"), created="2026-01-01T00:00:00Z")
    b = cr("ClusterBaseModel", "b", "hf://acme/llama@v2", path=str(root / "l"), created="2026-01-01T00:00:00Z")
    for order in ((a, b), (b, a)):
        claims = claims_of(root, *order)
        assert claims.path_conflict(model_spec(a, root)) is None
        assert claims.path_conflict(model_spec(b, root)) is not None


def test_colliding_label_keys_are_held_by_the_senior_model_only(root: Path) -> None:
    # OME's truncation: a namespace literally named d61c7e60 collides with ml-platform-research
    victim = cr("BaseModel", "llama-3-70b-instruct-awq-int4", "hf://o/m", ns="ml-platform-research")
    evil = cr("BaseModel", "llama-3-70b-instruct-awq-int4", "hf://o/m", ns="d61c7e60",
              created="2026-09-01T00:00:00Z")
    sv, se = model_spec(victim, root), model_spec(evil, root)
    assert sv.ref.label_key == se.ref.label_key, "precondition: OME's keys collide"
    claims = claims_of(root, victim, evil)
    label, cm = claims.key_conflict(se)
    assert label is not None and "collides with basemodel/ml-platform-research/" in label.message
    assert cm is None  # the ConfigMap key is longer and still distinct
    assert claims.key_conflict(sv) == (None, None)
    assert claims.shares_keys(se.ref, se) == (True, False)
    assert claims.shares_keys(sv.ref, sv) == (False, False)
