"""The restart fast path serves a published model only for the revision that was asked for."""

from __future__ import annotations

from pathlib import Path

from modelherd.storage.manifest import Manifest, ManifestFile, write_manifest
from modelherd.storage.ready import published_model, same_model

COMMIT = "a" * 40
OTHER = "b" * 40


def manifest(uri: str, revision: str = COMMIT) -> Manifest:
    return Manifest(source_uri=uri, revision=revision, files=(), writer="t")


def test_same_source_and_branch_is_the_same_model() -> None:
    assert same_model(manifest("hf://org/m"), "hf://org/m", None)
    assert same_model(manifest("hf://org/m@main"), "hf://org/m@main", "main")


def test_another_tag_or_branch_is_not_served_from_the_old_copy() -> None:
    assert not same_model(manifest("hf://org/m@v1"), "hf://org/m@v2", "v2")
    assert not same_model(manifest("hf://org/m@v1"), "hf://org/m", None)
    assert not same_model(manifest("hf://org/m"), "hf://org/m@v1", "v1")


def test_pinned_commit_must_match_the_resolved_revision() -> None:
    assert same_model(manifest("hf://org/m"), f"hf://org/m@{COMMIT}", COMMIT)
    assert not same_model(manifest("hf://org/m"), f"hf://org/m@{OTHER}", OTHER)


def test_another_source_is_not_the_same_model() -> None:
    assert not same_model(manifest("hf://org/m"), "hf://org/m2", None)
    assert not same_model(manifest("hf://org/m"), "oci://n/ns/b/bk/o/org/m", None)


def test_published_model_needs_files_that_pass_quick_verification(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path, Manifest(source_uri="hf://org/m", revision=COMMIT,
                                      files=(ManifestFile("config.json", 2, {}),), writer="t"))
    assert published_model(tmp_path, "hf://org/m", None) is not None
    (tmp_path / "config.json").write_text("{ }")  # size changed
    assert published_model(tmp_path, "hf://org/m", None) is None
    assert published_model(tmp_path / "absent", "hf://org/m", None) is None
