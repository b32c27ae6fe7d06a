"""verify_quick / verify_deep on real model folders written with the real safetensors library."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from modelherd.storage.errors import VerificationError
from modelherd.storage.manifest import MANIFEST_NAME
from modelherd.storage.verify import Problem, check_safetensors, verify_deep, verify_or_raise, verify_quick
from safetensors import safe_open

from tests.modelgen import (
    SAVE_FILE_LIMIT,
    make_diffusers_model,
    make_sharded_model,
    make_trtllm_model,
    write_test_manifest,
)


def _paths(problems: list[Problem]) -> set[str]:
    return {p.path for p in problems}


def _text(problems: list[Problem]) -> str:
    return "\n".join(map(str, problems))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    make_sharded_model(d, n_shards=3, shard_bytes=32 * 1024)
    write_test_manifest(d)
    return d


# ---- generators -------------------------------------------------------------------------------------------

def test_generated_shards_load_with_safetensors_and_match_index(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, n_shards=2, shard_bytes=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    seen = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                seen[k] = shard.name
                assert f.get_tensor(k).nbytes > 0
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == 2 * 4096


def test_streamed_large_shard_is_valid_safetensors(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, n_shards=1, shard_bytes=SAVE_FILE_LIMIT + 1000, with_index=False)
    p = tmp_path / "model.safetensors"
    with safe_open(str(p), "np") as f:
        total = sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118
    assert total == SAVE_FILE_LIMIT + 1000
    assert check_safetensors(p) == []


def test_same_seed_writes_same_bytes(tmp_path: Path) -> None:
    make_sharded_model(tmp_path / "a", 1, 2048, seed=7)
    make_sharded_model(tmp_path / "b", 1, 2048, seed=7)
    name = "model-00001-of-00001.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ---- quick ------------------------------------------------------------------------------------------------

def test_whole_model_has_no_problems(model: Path) -> None:
    assert verify_quick(model, require_manifest=True) == []
    assert verify_deep(model, require_manifest=True) == []
    verify_or_raise(model, deep=True)


def test_quick_works_without_manifest_unless_required(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 2, 1024)
    assert verify_quick(tmp_path) == []
    assert _paths(verify_quick(tmp_path, require_manifest=True)) == {MANIFEST_NAME}


def test_missing_dir_is_a_problem(tmp_path: Path) -> None:
    assert "not a directory" in _text(verify_quick(tmp_path / "nope"))


def test_truncated_shard_found_without_manifest(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 2, 4096)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    problems = verify_quick(tmp_path)
    assert _paths(problems) == {"model-00002-of-00002.safetensors"}
    assert "truncated" in _text(problems)


def test_truncated_inside_header_is_reported_not_raised(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 1, 4096)
    shard = tmp_path / "model-00001-of-00001.safetensors"
    os.truncate(shard, 20)
    assert "truncated inside the header" in _text(verify_quick(tmp_path))
    os.truncate(shard, 3)
    assert "8-byte header length" in _text(verify_quick(tmp_path))


def test_trailing_bytes_after_tensors_are_reported(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 1, 4096)
    with open(tmp_path / "model-00001-of-00001.safetensors", "ab") as f:
        f.write(b"junk")
    assert "4 unexpected bytes" in _text(verify_quick(tmp_path))


def _write_raw(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(("header", "data", "needle"), [
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "F32 x [3] needs 12"),
    ({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
    ({"t": {"dtype": "U8", "shape": [2], "data_offsets": [4, 2]}}, b"\0" * 4, "bad data_offsets"),
    ({"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", "bad shape"),
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
      "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"\0" * 6, "gap or overlap"),
    ({"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0", "truncated"),
])
def test_inconsistent_safetensors_header_is_reported(tmp_path: Path, header: dict[str, object], data: bytes,
                                                     needle: str) -> None:
    p = tmp_path / "x.safetensors"
    _write_raw(p, header, data)
    assert needle in "\n".join(check_safetensors(p))


def test_non_json_and_huge_header_length_are_reported(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    assert "not JSON" in "\n".join(check_safetensors(p))
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    assert "implausible" in "\n".join(check_safetensors(p))


def test_sub_byte_dtype_must_fill_whole_bytes_like_safetensors_says(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    _write_raw(p, {"t": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0")
    assert check_safetensors(p) == []
    _write_raw(p, {"t": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\0" * 3)
    assert check_safetensors(p) == []
    # 3 x 4 bits = 12 bits: safetensors refuses a tensor that does not end on a byte boundary
    _write_raw(p, {"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0")
    assert "byte boundary" in "\n".join(check_safetensors(p))


def test_index_naming_a_missing_shard_is_a_problem(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 3, 1024)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    problems = verify_quick(tmp_path)
    assert _paths(problems) == {"model.safetensors.index.json"}
    assert "model-00003-of-00003.safetensors" in _text(problems)


def test_index_tensor_missing_from_its_shard_is_a_problem(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 2, 1024)
    ip = tmp_path / "model.safetensors.index.json"
    index = json.loads(ip.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    ip.write_text(json.dumps(index))
    assert "lacks 1 tensor" in _text(verify_quick(tmp_path))


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": {"a": 3}}', '{"metadata": {}}'])
def test_malformed_index_is_a_problem_not_a_crash(tmp_path: Path, text: str) -> None:
    make_sharded_model(tmp_path, 1, 1024)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    assert "malformed shard index" in _text(verify_quick(tmp_path))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors"])
def test_index_entry_escaping_the_folder_is_a_problem(tmp_path: Path, entry: str) -> None:
    d = tmp_path / "m"
    make_sharded_model(d, 1, 1024)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"t": entry}}))
    problems = verify_quick(d)
    assert "model.safetensors.index.json" in _paths(problems)
    assert "unsafe index entry" in _text(problems)


def test_symlink_leaving_the_folder_is_a_problem(tmp_path: Path) -> None:
    d = tmp_path / "m"
    make_sharded_model(d, 1, 1024)
    (tmp_path / "secret").write_text("s")
    (d / "link.json").symlink_to(tmp_path / "secret")
    (d / "linkdir").symlink_to(tmp_path)
    problems = verify_quick(d, allow_extra=True)
    assert {"link.json", "linkdir"} <= _paths(problems)
    assert "outside the model folder" in _text(problems)


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 1, 1024)
    (tmp_path / "alias.json").symlink_to(tmp_path / "config.json")
    assert verify_quick(tmp_path) == []


def test_index_entry_through_outward_symlink_is_a_problem(tmp_path: Path) -> None:
    d = tmp_path / "m"
    make_sharded_model(d, 1, 1024)
    (tmp_path / "real.safetensors").write_bytes((d / "model-00001-of-00001.safetensors").read_bytes())
    (d / "model-00001-of-00001.safetensors").unlink()
    (d / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "real.safetensors")
    problems = verify_quick(d)
    assert "model.safetensors.index.json" in _paths(problems)
    assert "model-00001-of-00001.safetensors" in _paths(problems)


# ---- manifest ---------------------------------------------------------------------------------------------

def test_manifest_missing_file_and_wrong_size_and_extra_file(model: Path) -> None:
    (model / "tokenizer.json").unlink()
    (model / "config.json").write_text("{}")
    (model / "stray.bin").write_bytes(b"x")
    problems = verify_quick(model)
    by = {p.path: p.message for p in problems}
    assert "missing" in by["tokenizer.json"]
    assert "size" in by["config.json"]
    assert "not listed" in by["stray.bin"]
    assert "stray.bin" not in _paths(verify_quick(model, allow_extra=True))


def test_manifest_entry_escaping_is_a_problem(model: Path) -> None:
    mp = model / MANIFEST_NAME
    doc = json.loads(mp.read_text())
    doc["files"].append({"path": "../evil", "size": 1, "checksums": {}})
    mp.write_text(json.dumps(doc))
    problems = verify_quick(model)
    assert _paths(problems) == {MANIFEST_NAME}
    assert "unsafe manifest entry" in _text(problems)


def test_malformed_manifest_is_a_problem(model: Path) -> None:
    (model / MANIFEST_NAME).write_text("{")
    problems = verify_quick(model, require_manifest=True)
    assert [p.path for p in problems] == [MANIFEST_NAME]
    assert "malformed completion manifest" in problems[0].message


# ---- deep -------------------------------------------------------------------------------------------------

def test_deep_catches_same_size_corruption_quick_does_not(model: Path) -> None:
    shard = model / "model-00002-of-00003.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size - 10)
        f.write(b"\xaa" * 10)
    assert verify_quick(model) == []
    problems = verify_deep(model)
    assert _paths(problems) == {"model-00002-of-00003.safetensors"}
    assert "sha256 mismatch" in problems[0].message


@pytest.mark.parametrize("algo", ["md5", "git-sha1", "crc32c"])
def test_deep_uses_whatever_checksum_the_manifest_has(tmp_path: Path, algo: str) -> None:
    make_sharded_model(tmp_path, 2, 2048)
    write_test_manifest(tmp_path, algo=algo)
    assert verify_deep(tmp_path) == []
    with open(tmp_path / "config.json", "r+b") as f:
        f.write(b"[")
    assert f"{algo} mismatch" in _text(verify_deep(tmp_path))


def test_deep_does_not_rehash_a_file_already_failing(model: Path) -> None:
    os.truncate(model / "config.json", 1)
    problems = [p for p in verify_deep(model) if p.path == "config.json"]
    assert len(problems) == 1 and "size" in problems[0].message


def test_verify_or_raise_carries_problems(model: Path) -> None:
    (model / "config.json").unlink()
    with pytest.raises(VerificationError) as ei:
        verify_or_raise(model)
    assert any("config.json" in p for p in ei.value.problems)
    assert ei.value.exit_code == 5 and ei.value.hint


# ---- other layouts ----------------------------------------------------------------------------------------

def test_diffusers_model_checks_components(tmp_path: Path) -> None:
    make_diffusers_model(tmp_path)
    write_test_manifest(tmp_path)
    assert verify_deep(tmp_path) == []
    for p in sorted((tmp_path / "vae").iterdir()):
        p.unlink()
    (tmp_path / "vae").rmdir()
    problems = verify_quick(tmp_path, allow_extra=True)
    assert any(p.path == "model_index.json" and "'vae'" in p.message for p in problems)


def test_diffusers_component_subfolder_index_is_checked(tmp_path: Path) -> None:
    make_diffusers_model(tmp_path)
    make_sharded_model(tmp_path / "transformer", 2, 1024, stem="diffusion_pytorch_model", config=False,
                       tokenizer=False)
    assert verify_quick(tmp_path) == []
    (tmp_path / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
    assert _paths(verify_quick(tmp_path)) == {"transformer/diffusion_pytorch_model.safetensors.index.json"}


def test_trtllm_model_verifies(tmp_path: Path) -> None:
    make_trtllm_model(tmp_path)
    write_test_manifest(tmp_path)
    assert verify_deep(tmp_path, require_manifest=True) == []


def test_quick_reads_headers_only(tmp_path: Path) -> None:
    """A 64 GiB sparse shard verifies in well under a second: quick verify never reads tensor data."""
    import time

    n = 64 * 1024**3
    _write_raw(tmp_path / "big.safetensors", {"t": {"dtype": "BF16", "shape": [n // 2], "data_offsets": [0, n]}},
               b"")
    with open(tmp_path / "big.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) + n)
    t0 = time.perf_counter()
    assert verify_quick(tmp_path) == []
    assert time.perf_counter() - t0 < 1.0
