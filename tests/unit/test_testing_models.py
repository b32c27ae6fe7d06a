"""modelherd.testing.models: numpy-free, deterministic, real safetensors models; the package imports no test deps."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from modelherd.storage.verify import verify_deep, verify_quick
from modelherd.testing.models import MiB, make_llama_model, random_chunks, safetensors_header, shard_name
from safetensors import safe_open

from tests.modelgen import write_test_manifest


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_every_shard_loads_with_safetensors_and_the_index_names_each_tensor_once(tmp_path: Path) -> None:
    model = make_llama_model(tmp_path / "m", total_bytes=2 * MiB, shards=4)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    data = 0
    for i in range(1, 5):
        name = shard_name(i, 4)
        with safe_open(str(tmp_path / "m" / name), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                t = f.get_slice(key)
                assert t.get_dtype() == "BF16"
                shape = t.get_shape()
                data += 2 * shape[0] * shape[1]
                seen[key] = name
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == data == model.tensor_bytes
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_size"] == model.hidden_size == 256
    assert model.total_bytes == sum(p.stat().st_size for p in model.files)


def test_the_tensor_data_is_within_two_rows_per_shard_of_the_requested_size(tmp_path: Path) -> None:
    for total, shards in ((64 * MiB, 8), (3 * MiB + 12345, 3), (100_000, 2)):
        model = make_llama_model(tmp_path / f"m{total}", total_bytes=total, shards=shards)
        assert total - shards * 2 * model.hidden_size <= model.tensor_bytes <= total


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    a = make_llama_model(tmp_path / "a", total_bytes=1 * MiB, shards=2, seed=7)
    b = make_llama_model(tmp_path / "b", total_bytes=1 * MiB, shards=2, seed=7)
    c = make_llama_model(tmp_path / "c", total_bytes=1 * MiB, shards=2, seed=8)
    assert _digests(a.directory) == _digests(b.directory)
    shards_a = {k: v for k, v in _digests(a.directory).items() if k.endswith(".safetensors")}
    shards_c = {k: v for k, v in _digests(c.directory).items() if k.endswith(".safetensors")}
    assert shards_a.keys() == shards_c.keys() and not set(shards_a.values()) & set(shards_c.values())


def test_random_chunks_are_bounded_and_independent_of_the_chunk_size() -> None:
    small = list(random_chunks(100_000, seed=("x", 1), chunk=4096))
    assert max(len(c) for c in small) == 4096 and sum(len(c) for c in small) == 100_000
    assert b"".join(small)[:4096] == next(random_chunks(100_000, seed=("x", 1), chunk=4096))
    assert b"".join(random_chunks(0, seed=1)) == b""


def test_the_header_is_padded_to_eight_bytes_and_offsets_are_contiguous() -> None:
    prefix = safetensors_header([("a", "U8", [3], 3), ("b", "F16", [2, 2], 8)])
    n = int.from_bytes(prefix[:8], "little")
    assert len(prefix) == 8 + n and n % 8 == 0
    header = json.loads(prefix[8:])
    assert header["a"]["data_offsets"] == [0, 3] and header["b"]["data_offsets"] == [3, 11]


def test_a_generated_model_passes_quick_and_deep_verification(tmp_path: Path) -> None:
    model = make_llama_model(tmp_path / "m", total_bytes=1 * MiB, shards=2)
    assert verify_quick(model.directory) == []
    write_test_manifest(model.directory)
    assert verify_deep(model.directory, require_manifest=True) == []


def test_the_testing_package_and_the_demo_import_neither_pytest_nor_numpy() -> None:
    """Users get ``modelherd.testing`` with ``pip install .`` (runtime dependencies only)."""
    code = ("import json, sys; import modelherd.testing.hubserver, modelherd.testing.ociserver, "
            "modelherd.testing.rangeserver, modelherd.testing.models, modelherd.testing.support, "
            "modelherd.agent.demo; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', 'numpy', 'tests'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
