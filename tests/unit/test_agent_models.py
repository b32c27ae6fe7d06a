"""Reading BaseModel/ClusterBaseModel CRs: a malformed CR is a problem on that model, never an exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.basemodels import ModelRef, model_spec


def _cr(storage: Any = None, *, kind: str = "ClusterBaseModel", **meta: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelFormat": {"name": "safetensors"}}
    if storage is not None:
        spec["storage"] = storage
    md = {"name": "m", "uid": "u1", **meta}
    if kind == "BaseModel":
        md.setdefault("namespace", "team")
    return {"kind": kind, "metadata": md, "spec": spec}


def test_default_destination_is_org_model_under_the_root(tmp_path: Path) -> None:
    spec = model_spec(_cr({"storageUri": "hf://org/model@main"}), tmp_path)
    assert spec.problem == ""
    assert spec.dest == tmp_path.resolve() / "org" / "model"
    assert spec.uri is not None and spec.uri.revision == "main"


def test_explicit_path_inside_the_root_is_the_destination(tmp_path: Path) -> None:
    spec = model_spec(_cr({"storageUri": "hf://org/model", "path": str(tmp_path / "x" / "y")}), tmp_path)
    assert spec.dest == tmp_path.resolve() / "x" / "y" and not spec.problem


@pytest.mark.parametrize("path", ["/etc/passwd-dir", "../escape", "{root}", "{root}/a/../../b"])
def test_paths_outside_the_root_are_a_problem(tmp_path: Path, path: str) -> None:
    spec = model_spec(_cr({"storageUri": "hf://org/model", "path": path.format(root=tmp_path)}), tmp_path)
    assert "not inside the models root" in spec.problem


@pytest.mark.parametrize("uri", ["s3://bucket/m", "gs://b/m", "pvc://claim/m", "vendor://x", "github://o/r", "nope"])
def test_unsupported_schemes_are_a_problem_naming_the_supported_ones(tmp_path: Path, uri: str) -> None:
    spec = model_spec(_cr({"storageUri": uri}), tmp_path)
    assert "not supported" in spec.problem and "hf://" in spec.problem


@pytest.mark.parametrize("storage", [None, "a string", {"path": "/x"}, {"storageUri": ""}, {"storageUri": 5}])
def test_missing_or_malformed_storage_is_a_problem_not_a_crash(tmp_path: Path, storage: Any) -> None:
    spec = model_spec(_cr(storage), tmp_path)
    assert spec.problem


def test_bad_hf_uri_reports_the_accepted_forms(tmp_path: Path) -> None:
    spec = model_spec(_cr({"storageUri": "hf://a/b/c/d"}), tmp_path)
    assert "invalid model URI" in spec.problem


def test_credentials_and_flags_are_read_from_the_cr(tmp_path: Path) -> None:
    spec = model_spec(_cr({"storageUri": "hf://org/m", "key": "hf-secret",
                           "parameters": {"secretKey": "tok", "token": "inline"}},
                          kind="BaseModel", annotations={"ome.oracle.com/skip-config-parsing": "TRUE"},
                          labels={"models.ome/reserve-model-artifact": "true"}), tmp_path)
    assert (spec.secret_name, spec.secret_key, spec.inline_token) == ("hf-secret", "tok", "inline")
    assert spec.skip_config and spec.reserve
    assert spec.ref == ModelRef("BaseModel", "team", "m")
    assert "inline" not in repr(spec), "the inline token must not show in reprs (logs)"


def test_model_refs_name_ome_keys() -> None:
    assert ModelRef("ClusterBaseModel", "", "llama").cm_key == "clusterbasemodel.llama"
    assert ModelRef("BaseModel", "default", "llama-3-1-8b").label_key == "models.ome.io/default.basemodel.llama-3-1-8b"
    assert ModelRef("ClusterBaseModel", "", "x").event_namespace == "default"
