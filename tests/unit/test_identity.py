"""A model's identity in its manifest: the file selection, and the origin's own quick-verification findings."""

from __future__ import annotations

import json
from pathlib import Path

from modelherd.storage.manifest import MANIFEST_NAME, Manifest, ManifestFile, read_manifest, write_manifest
from modelherd.storage.ready import damage, published_model
from modelherd.storage.types import ALL_FILES, Selection

COMMIT = "a" * 40


def _manifest(**kw: object) -> Manifest:
    files = kw.pop("files", (ManifestFile("config.json", 2, {}),))
    return Manifest(source_uri="hf://org/m", revision=COMMIT, files=files, writer="t", **kw)  # type: ignore[arg-type]


def test_selections_are_compared_in_normal_form() -> None:
    assert Selection.of(["b", "a", "a"], []) == Selection.of(["a", "b"], None) == Selection(allow=("a", "b"))
    assert Selection.of(None, None) == ALL_FILES and not ALL_FILES.filtered
    assert Selection.of([], None) != ALL_FILES and Selection.of([], None).filtered  # an empty --allow selects none
    assert Selection.of(None, ["*.bin"]).describe() == "--ignore '*.bin'"


def test_a_manifest_written_before_selections_reads_as_all_files_without_origin_problems(tmp_path: Path) -> None:
    old = {"source_uri": "hf://org/m", "revision": COMMIT, "writer": "t", "completed_at": "2026-01-01T00:00:00+00:00",
           "version": 1, "files": [{"path": "config.json", "size": 2, "checksums": {}}]}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    m = read_manifest(tmp_path)
    assert m is not None and m.selection == ALL_FILES and m.origin_problems == ()


def test_selection_and_origin_problems_survive_a_round_trip(tmp_path: Path) -> None:
    m = _manifest(selection=Selection.of(["*.json"], ["x/*"]),
                  origin_problems=(("model.safetensors", "shorter than the 8-byte header length"),))
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m


def test_a_published_copy_of_another_selection_or_of_no_file_is_not_ready(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path, _manifest(selection=Selection.of(["*.json"], None)))
    assert published_model(tmp_path, "hf://org/m", None, Selection.of(["*.json"], None)) is not None
    assert published_model(tmp_path, "hf://org/m", None) is None
    assert published_model(tmp_path, "hf://org/m", None, Selection.of(["*.json", "*.bin"], None)) is None

    (tmp_path / "config.json").unlink()
    write_manifest(tmp_path, _manifest(files=()))
    assert published_model(tmp_path, "hf://org/m", None) is None


def test_only_findings_the_origin_did_not_have_count_as_damage(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")  # as the origin serves it: not a safetensors file
    finding = ("model.safetensors", "shorter than the 8-byte header length")
    files = (ManifestFile("config.json", 2, {}), ManifestFile("model.safetensors", 3, {}))
    write_manifest(tmp_path, _manifest(files=files, origin_problems=(finding,)))
    manifest = read_manifest(tmp_path)
    assert manifest is not None and damage(tmp_path, manifest) == []
    (tmp_path / "model.safetensors").write_bytes(b"abcd")  # now it is also not the size that was published
    assert [p.path for p in damage(tmp_path, manifest)] == ["model.safetensors"]
