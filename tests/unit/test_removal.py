"""What the Remover does with a model's files on local storage, as a typed outcome (no Lease, no API server)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.basemodels import RESERVE_LABEL, ModelRef
from modelherd.agent.lifecycle.removal import RemovalOutcome, RemovalTarget, Remover, target_from_entry
from modelherd.agent.settings import Settings
from modelherd.storage.manifest import MANIFEST_NAME
from modelherd.storage.uri import parse_uri

from tests.modelgen import make_sharded_model, write_test_manifest

REF = ModelRef("BaseModel", "team", "tiny")
URI = "hf://org/tiny"


def remover(root: Path, models: list[Mapping[str, Any]] | None = None, *, storage_kind: str = "local") -> Remover:
    return Remover(Settings().leases, kubeconfig=None, lease_api=None, models_root=root, storage_kind=storage_kind,
                   node_name="node-a", namespace="ome", list_models=lambda: list(models or []),
                   shutdown=threading.Event())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    return r


def published(root: Path) -> Path:
    dest = root / "org" / "tiny"
    make_sharded_model(dest, n_shards=2, shard_bytes=4096)
    write_test_manifest(dest, source_uri=URI)
    return dest


def test_a_published_copy_on_local_storage_is_removed(root: Path) -> None:
    dest = published(root)
    got = remover(root).remove(REF, RemovalTarget(parse_uri(URI), dest), deleted=True)
    assert (got.outcome, got.message, got.removed) == (RemovalOutcome.REMOVED, "files removed", True)
    assert not dest.exists()


def test_nothing_there_is_absent_not_removed(root: Path) -> None:
    got = remover(root).remove(REF, RemovalTarget(parse_uri(URI), root / "org" / "tiny"), deleted=True)
    assert (got.outcome, got.message, got.removed) == (RemovalOutcome.ABSENT, "no files to remove", False)


@pytest.mark.parametrize("case", ["reserved", "local", "wanted", "shared-deselected"])
def test_files_are_kept_with_the_reason(root: Path, case: str) -> None:
    dest = published(root)
    other = {"kind": "BaseModel", "metadata": {"name": "other", "namespace": "team"},
             "spec": {"storage": {"storageUri": URI, "path": "org/tiny"}}}
    target = RemovalTarget(parse_uri(URI), dest, reserve=case == "reserved")
    if case == "local":
        target = RemovalTarget(parse_uri(f"local://{dest}"), dest)
    r = remover(root, [other] if case == "wanted" else [], storage_kind="shared" if case == "shared-deselected"
                else "local")
    got = r.remove(REF, target, deleted=case != "shared-deselected")
    assert got.outcome is RemovalOutcome.KEPT and not got.removed
    expected = {"reserved": RESERVE_LABEL, "local": "local:// files are never modified",
                "wanted": f"team/other points at {dest}", "shared-deselected": "files kept for the other nodes"}[case]
    assert expected in got.message
    assert (dest / MANIFEST_NAME).is_file()  # the published copy is still there


def test_an_entry_names_the_files_only_inside_the_models_root(root: Path) -> None:
    inside = target_from_entry(REF, {"storageUri": URI, "path": str(root / "org/tiny"), "reserve": "true"}, root)
    assert inside == RemovalTarget(parse_uri(URI), root / "org/tiny", reserve=True)
    assert target_from_entry(REF, {"storageUri": URI, "path": "/etc"}, root) is None
