"""GPU shape detection (NVML, recorded reading, instance-type map) and the TensorRT-LLM file filter."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from modelherd.storage.errors import ConfigError
from modelherd.storage.gpu import (
    GpuShape,
    NvmlReplay,
    detect_gpu_shape,
    is_trtllm_layout,
    load_instance_type_map,
    normalize_gpu_model,
    parse_shape,
    shape_from_instance_type,
    trtllm_filter,
)
from modelherd.storage.types import RemoteFile

from tests.modelgen import make_trtllm_model
from tests.support import nvml_available

# a real NVML reading of an 8 x H200 node, kept in the repository as tests/data/nvml-h200.json
FIXTURE = Path(__file__).parents[1] / "data" / "nvml-h200.json"


@pytest.fixture
def reading() -> dict[str, Any]:
    if not FIXTURE.is_file():
        pytest.fail(f"fixture {FIXTURE} missing")
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


# ---- names -------------------------------------------------------------------------------------------

def test_every_known_nvml_name_in_the_fixture_normalises(reading: dict[str, Any]) -> None:
    expected = {"H100 SXM5": "H100", "H100 PCIe": "H100-PCIe", "H100 NVL": "H100-NVL", "A100 SXM4 80GB": "A100",
                "A100 PCIe 80GB": "A100-PCIe", "L40S": "L40S", "B200": "B200"}
    names = {k: v for k, v in reading["other_known_names"].items() if not k.startswith("_")}
    assert {k: normalize_gpu_model(v) for k, v in names.items()} == expected
    assert normalize_gpu_model(reading["devices"][0]["name"]) == "H200"


@pytest.mark.parametrize(("raw", "model"), [
    (b"NVIDIA A10G", "A10G"), ("Tesla T4", "T4"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-PCIE-40GB", "A100-PCIe"), ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "H100"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada-Generation"),
])
def test_nvml_name_normalisation(raw: str | bytes, model: str) -> None:
    assert normalize_gpu_model(raw) == model


@pytest.mark.parametrize(("folder", "name"), [
    ("H100x8", "H100x8"), ("h100_8", "H100x8"), ("h100-x8", "H100x8"), ("8xH100", "H100x8"),
    ("8x_h100", "H100x8"), ("H100-PCIe-x8", "H100-PCIex8"), ("h100_pcie_8", "H100-PCIex8"),
    ("A100-80G", "A100"), ("a100_80gb_x4", "A100x4"), ("l40sx4", "L40Sx4"), ("GB200x72", "GB200x72"),
    ("H200", "H200"), ("A100-SXM4-80GB", "A100"),
])
def test_folder_spellings_parse(folder: str, name: str) -> None:
    shape = parse_shape(folder)
    assert shape is not None and shape.name == name


@pytest.mark.parametrize("folder", ["engines", "rank0", "v1_2", "layer12", "tp8", "x8", "1", "model.layers",
                                    "h100x999", "checkpoints"])
def test_ordinary_folders_are_not_shapes(folder: str) -> None:
    assert parse_shape(folder) is None


def test_unknown_count_matches_any_count_of_the_model() -> None:
    assert GpuShape("H100", 0).matches(GpuShape("H100", 8))
    assert GpuShape("H100", 8).matches(GpuShape("h100", 8))
    assert not GpuShape("H100", 4).matches(GpuShape("H100", 8))
    assert not GpuShape("H100-PCIe", 8).matches(GpuShape("H100", 8))


# ---- NVML ---------------------------------------------------------------------------------------------

def test_recorded_h200_reading_gives_h200x1(reading: dict[str, Any]) -> None:
    nvml = NvmlReplay(reading)
    assert detect_gpu_shape(nvml=nvml, instance_type="BM.GPU.A10.4", instance_type_map={"BM.GPU.A10.4": "A10"}) \
        == GpuShape("H200", reading["device_count"])
    assert not nvml.initialised  # nvmlShutdown was called


def test_eight_gpus_give_x8(reading: dict[str, Any]) -> None:
    r = copy.deepcopy(reading)
    r["devices"] = r["devices"] * 8
    assert detect_gpu_shape(nvml=NvmlReplay(r)) == GpuShape("H200", 8)


def test_mixed_models_are_a_config_error(reading: dict[str, Any]) -> None:
    r = copy.deepcopy(reading)
    r["devices"] = r["devices"] * 3 + [{"name": "NVIDIA L40S", "mig_mode": [0, 0]}]
    with pytest.raises(ConfigError) as ei:
        detect_gpu_shape(nvml=NvmlReplay(r))
    assert "L40S" in str(ei.value) and "H200" in str(ei.value)


def test_mig_enabled_gpu_counts_whole_and_warns(reading: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    r = copy.deepcopy(reading)
    r["devices"][0]["mig_mode"] = [1, 1]
    with caplog.at_level(logging.WARNING, logger="modelherd.storage.gpu"):
        assert detect_gpu_shape(nvml=NvmlReplay(r)) == GpuShape("H200", 1)
    assert "MIG" in caplog.text


def test_no_gpus_falls_back_to_instance_type() -> None:
    shape = detect_gpu_shape(nvml=NvmlReplay({"devices": []}), instance_type="BM.GPU.H100.8",
                             instance_type_map={"BM.GPU.H100.8": "H100"})
    assert shape == GpuShape("H100", 8)


class _BrokenNvml(NvmlReplay):
    def nvmlInit(self) -> None:
        raise self.NVMLError("Driver Not Loaded")


def test_nvml_error_falls_back_to_instance_type() -> None:
    shape = detect_gpu_shape(nvml=_BrokenNvml({}), instance_type="gd-8xh200ib-i128",
                             instance_type_map={"gd-8xh200ib-i128": "H200"})
    assert shape == GpuShape("H200", 8)


def test_nothing_known_gives_none() -> None:
    assert detect_gpu_shape(nvml=_BrokenNvml({}), instance_type="m5.large", instance_type_map={}) is None


def test_real_pynvml_without_gpu_falls_back() -> None:
    if nvml_available():
        pytest.skip("this machine has a working NVML")
    shape = detect_gpu_shape(instance_type="BM.GPU.H200.8", instance_type_map={"BM.GPU.H200.8": "H200"})
    assert shape == GpuShape("H200", 8)


@pytest.mark.skipif(not nvml_available(), reason="no GPU / NVML on this machine")
def test_real_nvml_reads_a_shape() -> None:
    import pynvml

    shape = detect_gpu_shape(nvml=pynvml)
    assert shape is not None and shape.count >= 1 and shape.model != "UNKNOWN"


# ---- instance-type map ------------------------------------------------------------------------------

@pytest.mark.parametrize(("itype", "value", "name"), [
    ("BM.GPU.H100.8", "H100", "H100x8"), ("BM.GPU.A100-v2.8", "A100-80G", "A100x8"),
    ("a3-highgpu-8g", "H100", "H100x8"), ("gd-8xl40-i128", "L40", "L40x8"),
    ("p5.48xlarge", "H100", "H100"), ("p5.48xlarge", "H100x8", "H100x8"), ("gpu-l40s", "L40S", "L40S"),
    ("custom", "NVIDIA H100 NVL", "H100-NVL"),
])
def test_instance_type_map_values(itype: str, value: str, name: str) -> None:
    shape = shape_from_instance_type(itype, {itype: value})
    assert shape is not None and shape.name == name


def test_load_instance_type_map(tmp_path: Path) -> None:
    p = tmp_path / "map.json"
    p.write_text('{"BM.GPU.H100.8": "H100"}')
    assert load_instance_type_map(p) == {"BM.GPU.H100.8": "H100"}
    p.write_text("")
    assert load_instance_type_map(p) == {}


@pytest.mark.parametrize("text", ["{", "[]", '{"a": 1}'])
def test_bad_instance_type_map_is_a_config_error(tmp_path: Path, text: str) -> None:
    p = tmp_path / "map.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_instance_type_map(p)
    assert ei.value.hint


def test_missing_instance_type_map_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_instance_type_map(tmp_path / "nope.json")


# ---- TensorRT-LLM filter ----------------------------------------------------------------------------

def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_filter_keeps_matching_shape_and_agnostic_files(tmp_path: Path) -> None:
    make_trtllm_model(tmp_path)
    files = _files(tmp_path)
    assert is_trtllm_layout(files)
    kept = trtllm_filter(files, GpuShape("H100", 8))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(kept)
    assert all(not f.startswith("engines/") or f.startswith("engines/H100x8/") for f in kept)
    assert sum(f.startswith("engines/H100x8/") for f in kept) == 9  # 8 ranks + config.json


def test_filter_accepts_other_spellings_and_remote_files(tmp_path: Path) -> None:
    make_trtllm_model(tmp_path, shapes=["h100_8", "a100_4"])
    remote = [RemoteFile(path=f, size=1) for f in _files(tmp_path)]
    kept = trtllm_filter(remote, GpuShape("H100", 8))
    assert all(isinstance(f, RemoteFile) for f in kept)
    assert {f.path for f in kept if f.path.startswith("engines/")} == {
        *(f"engines/h100_8/rank{r}.engine" for r in range(8)), "engines/h100_8/config.json"}


def test_filter_without_match_lists_available_shapes(tmp_path: Path) -> None:
    make_trtllm_model(tmp_path)
    with pytest.raises(ConfigError) as ei:
        trtllm_filter(_files(tmp_path), GpuShape("L40S", 4))
    assert "A100x4" in str(ei.value) and "H200x8" in str(ei.value) and "L40Sx4" in str(ei.value)
    with pytest.raises(ConfigError):
        trtllm_filter(_files(tmp_path), None)


def test_filter_is_identity_for_a_model_without_shape_folders() -> None:
    files = ["config.json", "model-00001-of-00002.safetensors", "sub/tokenizer.json"]
    assert trtllm_filter(files, None) == files
    assert not is_trtllm_layout(files)


def test_shape_named_folder_without_engines_is_not_a_trtllm_layout() -> None:
    assert not is_trtllm_layout(["benchmarks/H100/results.json", "model.safetensors"])


def test_instance_type_map_may_be_the_json_object_itself_as_omes_chart_passes_it() -> None:
    from modelherd.storage.gpu import load_instance_type_map

    assert load_instance_type_map('{"BM.GPU.H200.8": "H200"}') == {"BM.GPU.H200.8": "H200"}
