"""Issue #17, adoption without the engine: what a folder modelherd did not publish looks like to the quick check the
agent uses for migration, what adoption would keep as not the model's, what it refuses, and how verification of an
adopted model ignores what is kept beside it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from modelherd.storage.adopt import check_adoptable, foreign_entries, looks_adoptable
from modelherd.storage.errors import DestinationError, VerificationError
from modelherd.storage.manifest import Manifest, ManifestFile, read_manifest, write_manifest
from modelherd.storage.types import Listing, RemoteFile
from modelherd.storage.verify import ignored_names, verify_deep, verify_quick

from tests.modelgen import make_sharded_model


def listing_of(folder: Path) -> Listing:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            files.append(RemoteFile(p.relative_to(folder).as_posix(), p.stat().st_size,
                                    {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()}))
    return Listing("hf://org/m", "c" * 40, tuple(files))


@pytest.fixture
def copy(tmp_path: Path) -> tuple[Path, Listing]:
    folder = tmp_path / "m"
    make_sharded_model(folder, 2, 50_000)
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.bin").write_bytes(b"e" * 100)
    return folder, listing_of(folder)


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_whole_copy_looks_adoptable_without_reading_tensor_data(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    assert looks_adoptable(folder, listing)
    shard = folder / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, same header: only hashing can tell, and the quick check does not hash
    shard.write_bytes(bytes(data))
    assert looks_adoptable(folder, listing)


def test_a_missing_file_a_wrong_size_or_a_broken_header_is_named(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    (folder / "sub" / "extra.bin").unlink()
    got = looks_adoptable(folder, listing)
    assert not got and "sub/extra.bin" in got.reason and "missing" in got.reason
    (folder / "sub" / "extra.bin").write_bytes(b"e" * 99)
    got = looks_adoptable(folder, listing)
    assert not got and "99 bytes" in got.reason
    (folder / "sub" / "extra.bin").write_bytes(b"e" * 100)
    shard = folder / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"not json"
    shard.write_bytes(bytes(data))
    got = looks_adoptable(folder, listing)
    assert not got and "model-00002-of-00002.safetensors" in got.reason


def test_a_published_folder_is_not_an_adoption(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    write_manifest(folder, Manifest(listing.uri, listing.revision, tuple(ManifestFile(f.path, f.size, f.checksums)
                                                                         for f in listing.files), writer="t"))
    got = looks_adoptable(folder, listing)
    assert not got and "completion manifest" in got.reason


def test_foreign_entries_are_whole_subtrees_beside_the_model(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    (folder / "NOTES.md").write_text("mine")
    (folder / "sub" / "mine.txt").write_text("mine")
    (folder / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("x")
    (folder / "runs" / "a").mkdir(parents=True)
    (folder / "runs" / "a" / "log").write_text("x")
    assert foreign_entries(folder, [f.path for f in listing.files]) == [".cache", "NOTES.md", "runs", "sub/mine.txt"]


def test_a_folder_of_something_else_is_refused_and_left_as_it_was(tmp_path: Path, copy: tuple[Path, Listing]) -> None:
    _, listing = copy
    other = tmp_path / "data"  # someone's data: none of the model's names
    (other / "run-1").mkdir(parents=True)
    (other / "run-1" / "weights.bin").write_bytes(b"w" * 1000)
    (other / "results.csv").write_text("1,2,3")
    before = _tree(other)
    with pytest.raises(DestinationError, match="none of") as info:
        check_adoptable(other, listing)
    assert info.value.exit_code == 4
    assert _tree(other) == before


def test_a_folder_where_the_model_has_a_file_is_refused(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    (folder / "config.json" / "kept.txt").write_text("mine")
    with pytest.raises(DestinationError, match=r"config\.json"):
        check_adoptable(folder, listing)
    assert (folder / "config.json" / "kept.txt").read_text() == "mine"


def test_the_survey_names_what_is_there_what_is_not_and_what_is_kept(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    (folder / "sub" / "extra.bin").unlink()
    (folder / "NOTES.md").write_text("mine")
    survey = check_adoptable(folder, listing)
    assert "sub/extra.bin" in survey.absent and "sub/extra.bin" not in survey.present
    assert len(survey.present) == len(listing.files) - 1 and survey.foreign == ("NOTES.md",)


# --------------------------------------------------------------------------- verification of an adopted model
def _adopted(folder: Path, listing: Listing, foreign: tuple[str, ...]) -> Manifest:
    m = Manifest(listing.uri, listing.revision, tuple(ManifestFile(f.path, f.size, f.checksums)
                                                      for f in listing.files), writer="t", foreign=foreign)
    write_manifest(folder, m)
    return m


def test_verification_ignores_what_the_manifest_records_as_foreign_and_tool_metadata(
        copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    (folder / "NOTES.md").write_text("mine")
    (folder / "adapters").mkdir()
    (folder / "adapters" / "broken.safetensors").write_bytes(b"\xff" * 64)  # never read: not the model's
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / ".gitignore").write_text("*")
    _adopted(folder, listing, ("NOTES.md", "adapters"))
    assert verify_quick(folder, require_manifest=True) == []
    assert verify_deep(folder, require_manifest=True) == []
    (folder / "stray.bin").write_bytes(b"x")  # added later, recorded nowhere: still reported
    assert [p.path for p in verify_quick(folder, require_manifest=True)] == ["stray.bin"]


def test_a_foreign_name_never_hides_a_file_of_the_model(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    m = _adopted(folder, listing, ("sub", "config.json"))
    assert ignored_names(m) == {".cache/huggingface"}
    os.truncate(folder / "sub" / "extra.bin", 10)
    assert [p.path for p in verify_quick(folder, require_manifest=True)] == ["sub/extra.bin"]


def test_the_manifest_keeps_its_foreign_entries_and_older_manifests_have_none(copy: tuple[Path, Listing]) -> None:
    folder, listing = copy
    _adopted(folder, listing, ("NOTES.md", ".cache"))
    got = read_manifest(folder)
    assert got is not None and got.foreign == ("NOTES.md", ".cache")
    text = (folder / ".modelherd-manifest.json").read_text().replace('"foreign": [\n  "NOTES.md",\n  ".cache"\n ],', "")
    assert "foreign" not in text
    (folder / ".modelherd-manifest.json").write_text(text)
    older = read_manifest(folder)
    assert older is not None and older.foreign == ()
    (folder / ".modelherd-manifest.json").write_text(text.replace('"files":', '"foreign": ["../up"], "files":'))
    with pytest.raises(VerificationError, match="foreign"):
        read_manifest(folder)
