"""LocalSource on real folders: listing, reading, symlink containment, and that it never writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from modelherd.storage.errors import ConfigError, SourceNotFoundError, UnsafePathError, VerificationError
from modelherd.storage.manifest import Manifest, ManifestFile, write_manifest
from modelherd.storage.sources import open_source
from modelherd.storage.sources.local import LocalSource
from modelherd.storage.types import RemoteFile
from modelherd.storage.uri import parse_uri

from tests.support import read_all


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under root (links not followed) with size, mtime_ns and mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.relpath(os.path.join(dirpath, n), root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    st = os.lstat(root)
    out["."] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture
def model_dir(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "models" / "llama"
    files = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(50_000), "tok/tokenizer.json": b"{}"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, files


def source(root: Path) -> LocalSource:
    return LocalSource(parse_uri(f"local://{root}"))


def test_lists_files_with_sizes_and_no_checksums_without_manifest(model_dir):
    root, files = model_dir
    listing = source(root).list_files()
    assert {f.path: f.size for f in listing.files} == {k: len(v) for k, v in files.items()}
    assert all(f.checksums == {} for f in listing.files)
    assert listing.revision == "local"


def test_manifest_gives_checksums_and_revision_and_is_not_listed(model_dir):
    root, files = model_dir
    (root / ".modelherd-lock").write_text("internal")
    (root / ".manifest.tmp123").write_text("crash leftover")
    entries = tuple(ManifestFile(rel, len(d), {"sha256": hashlib.sha256(d).hexdigest()}) for rel, d in files.items())
    write_manifest(root, Manifest(source_uri="hf://org/llama", revision="abc123", files=entries, writer="node-1"))
    listing = source(root).list_files()
    assert sorted(f.path for f in listing.files) == sorted(files)
    assert listing.revision == "abc123"
    assert {f.path: f.checksums["sha256"] for f in listing.files} == {
        rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()}


def test_file_whose_size_changed_since_manifest_loses_its_checksum(model_dir):
    root, files = model_dir
    entries = tuple(ManifestFile(rel, len(d), {"sha256": "00" * 32}) for rel, d in files.items())
    write_manifest(root, Manifest(source_uri="x", revision="r", files=entries, writer="n"))
    (root / "config.json").write_bytes(b"changed, longer")
    by_path = {f.path: f for f in source(root).list_files().files}
    assert by_path["config.json"].checksums == {} and by_path["config.json"].size == len(b"changed, longer")
    assert "sha256" in by_path["model.safetensors"].checksums


def test_file_missing_from_the_manifest_set_is_a_verification_error(model_dir):
    root, files = model_dir
    entries = tuple(ManifestFile(rel, len(d), {}) for rel, d in files.items())
    write_manifest(root, Manifest(source_uri="x", revision="r", files=entries, writer="n"))
    (root / "tok" / "tokenizer.json").unlink()
    with pytest.raises(VerificationError) as ei:
        source(root).list_files()
    assert ei.value.problems == ["missing: tok/tokenizer.json"]


def test_reads_whole_files_and_ranges(model_dir):
    root, files = model_dir
    src = source(root)
    by_path = {f.path: f for f in src.list_files().files}
    data = files["model.safetensors"]
    assert read_all(src.open(by_path["model.safetensors"])) == data
    assert read_all(src.open(by_path["model.safetensors"], 1000, 20_000), chunk=777) == data[1000:20_000]
    assert read_all(src.open(by_path["tok/tokenizer.json"])) == b"{}"
    with pytest.raises(ValueError):
        src.open(by_path["config.json"], 0, 10_000)


def test_refuses_a_symlink_that_leaves_the_folder(model_dir, tmp_path):
    root, _ = model_dir
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (root / "weights.bin").symlink_to(secret)
    with pytest.raises(UnsafePathError, match="outside"):
        source(root).list_files()


def test_refuses_a_directory_symlink_that_leaves_the_folder(model_dir, tmp_path):
    root, _ = model_dir
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.bin").write_bytes(b"x")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafePathError):
        source(root).list_files()


def test_open_refuses_a_name_that_escapes(model_dir, tmp_path):
    root, _ = model_dir
    (tmp_path / "outside.bin").write_bytes(b"outside")
    src = source(root)
    with pytest.raises(UnsafePathError):
        src.open(RemoteFile(path="../../outside.bin", size=7, locator="../../outside.bin"))
    (root / "sneaky").symlink_to(tmp_path / "outside.bin")  # planted after listing
    with pytest.raises(UnsafePathError):
        src.open(RemoteFile(path="sneaky", size=7, locator="sneaky"))


def test_symlinks_inside_the_folder_and_loops_are_fine(model_dir):
    root, files = model_dir
    (root / "alias.json").symlink_to(root / "config.json")
    (root / "tok" / "loop").symlink_to(root, target_is_directory=True)
    listing = source(root).list_files()
    paths = {f.path for f in listing.files}
    assert "alias.json" in paths and set(files) <= paths
    assert not any(p.startswith("tok/loop/tok/loop") for p in paths)


def test_never_writes(model_dir):
    root, files = model_dir
    write_manifest(root, Manifest(source_uri="x", revision="r",
                                  files=tuple(ManifestFile(k, len(v), {}) for k, v in files.items()), writer="n"))
    before = snapshot(root)
    src = open_source(parse_uri(f"local://{root}"))
    for f in src.list_files().files:
        read_all(src.open(f))
    src.close()
    assert snapshot(root) == before


def test_missing_folder_and_wrong_scheme_are_clear_errors(tmp_path):
    with pytest.raises(SourceNotFoundError, match="not a folder"):
        source(tmp_path / "nope")
    with pytest.raises(ConfigError):
        LocalSource(parse_uri("hf://org/model"))
