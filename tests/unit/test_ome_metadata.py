"""Model metadata as OME's parser reports it, from real folders: configs, safetensors headers, diffusers pipelines.

Large models are real safetensors files whose data region is a sparse hole (header written, file extended with
truncate): every byte a reader sees is a valid safetensors file, and only the header is ever read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.ome.entry import STATUS_READY, go_json, render_entry
from modelherd.agent.ome.modelconfig import parse_model_config
from modelherd.agent.ome.parameters import format_parameter_count, safetensors_parameter_count
from safetensors import safe_open

from tests.modelgen import make_diffusers_model, make_sharded_model
from tests.unit.test_ome_entry import READY_HF

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}
KEY = "clusterbasemodel.llama-3-1-8b-instruct"
DEST = "/mnt/data/models/llama-3-1-8b-instruct"
SHA = "0e9e39f249a16976918f6564b8830bc894c89659"


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A valid safetensors file for ``tensors`` (name → dtype, shape) whose data is a hole; returns its elements."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = elements = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n * DTYPE_BYTES[dtype]]}
        offset += n * DTYPE_BYTES[dtype]
        elements += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return elements


def _json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
    "rope_scaling": {"factor": 8.0, "rope_type": "llama3", "original_max_position_embeddings": 8192},
}


def make_llama_8b(d: Path, *, n_shards: int = 4) -> int:
    """Llama-3.1-8B's tensor shapes (8,030,261,248 elements) over ``n_shards`` sparse shards with an index."""
    h, inter, kv, vocab = 4096, 14336, 1024, 128256
    tensors: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, h]), ("lm_head.weight", [vocab, h]),
                                            ("model.norm.weight", [h])]
    for i in range(32):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [kv, h]),
                    (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, h]),
                    (p + "mlp.gate_proj.weight", [inter, h]), (p + "mlp.up_proj.weight", [inter, h]),
                    (p + "mlp.down_proj.weight", [h, inter]), (p + "input_layernorm.weight", [h]),
                    (p + "post_attention_layernorm.weight", [h])]
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {t: ("BF16", shape) for t, shape in tensors[s::n_shards]}
        total += write_sparse_safetensors(d / name, part)
        weight_map.update(dict.fromkeys(part, name))
    _json(d / "model.safetensors.index.json", {"metadata": {"total_size": 2 * total}, "weight_map": weight_map})
    _json(d / "config.json", LLAMA_31_8B)
    return total


def test_llama_folder_reproduces_the_contract_ready_entry_byte_for_byte(tmp_path: Path) -> None:
    d = tmp_path / "llama-3-1-8b-instruct"
    assert make_llama_8b(d) == 8_030_261_248
    config = parse_model_config(d, configmap_key=KEY, dest=DEST, sha=SHA)
    assert config is not None
    assert render_entry(None, name="llama-3-1-8b-instruct", status=STATUS_READY, config=config) == READY_HF


def test_parameter_count_is_exact_over_every_shard_without_an_index(tmp_path: Path) -> None:
    d = tmp_path / "m"
    n = write_sparse_safetensors(d / "a.safetensors", {"x": ("F16", [3, 5, 7]), "s": ("F32", [])})
    n += write_sparse_safetensors(d / "b.safetensors", {"y": ("F8_E4M3", [11, 13])})
    d.joinpath("not-weights.bin").write_bytes(b"x" * 100)
    assert n == 3 * 5 * 7 + 1 + 11 * 13
    assert safetensors_parameter_count(d) == 3 * 5 * 7 + 11 * 13  # a scalar (shape []) counts 0, as in OME


def test_parameter_count_of_files_written_by_the_safetensors_library(tmp_path: Path) -> None:
    d = tmp_path / "m"
    make_sharded_model(d, n_shards=3, shard_bytes=40 * 1024)
    expected = 0
    for shard in sorted(d.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            expected += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    assert safetensors_parameter_count(d) == expected > 0


def test_modelgen_llama_config_lacking_required_fields_is_refused_like_omes_loader(tmp_path: Path) -> None:
    # OME's LlamaConfig.Validate needs num_attention_heads, num_key_value_heads, vocab_size, max_position_embeddings.
    d = tmp_path / "m"
    make_sharded_model(d, n_shards=2)
    assert parse_model_config(d, configmap_key="k", dest=str(d), sha=None) is None


def _one(tmp_path: Path, config: dict[str, Any], *, sub: str = "") -> dict[str, Any]:
    d = tmp_path / "m"
    _json(d / sub / "config.json" if sub else d / "config.json", config)
    write_sparse_safetensors((d / sub if sub else d) / "model.safetensors", {"w": ("BF16", [1000, 1500])})
    out = parse_model_config(d, configmap_key="k", dest=str(d), sha=None)
    assert out is not None
    return out


def test_oci_or_local_model_has_omes_empty_artifact(tmp_path: Path) -> None:
    out = _one(tmp_path, {"model_type": "some_new_arch", "architectures": ["NewForCausalLM"],
                          "max_position_embeddings": 4096, "torch_dtype": "float16"})
    assert go_json(out) == (
        '{"modelType":"some_new_arch","modelArchitecture":"NewForCausalLM","modelFramework":{"name":"transformers"},'
        '"modelFormat":{"name":"safetensors","version":"1.0.0"},"modelParameterSize":"1.5M","maxTokens":4096,'
        '"modelCapabilities":["TEXT_TO_TEXT"],"decodedModelConfiguration":{"architecture":"NewForCausalLM",'
        '"context_length":4096,"has_vision":false,"is_embedding":false,"model_size_bytes":3000000,'
        '"model_type":"some_new_arch","parameter_count":"1.5M","torch_dtype":"float16","transformers_version":""},'
        '"artifact":{"sha":"","parentPath":null,"childrenPaths":null}}')


def test_vision_model_reports_image_text_to_text(tmp_path: Path) -> None:
    out = _one(tmp_path, {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
                          "max_position_embeddings": 32768, "vision_config": {"depth": 32}})
    assert out["modelCapabilities"] == ["IMAGE_TEXT_TO_TEXT"]
    assert out["decodedModelConfiguration"]["has_vision"] is True
    assert out["maxTokens"] == 32768


def test_generic_multimodal_reads_nested_text_config(tmp_path: Path) -> None:
    out = _one(tmp_path, {"model_type": "brand_new_vl", "vision_config": {}, "text_config": {
        "max_position_embeddings": 65536, "torch_dtype": "bfloat16", "transformers_version": "4.50.0"}})
    assert out["maxTokens"] == 65536
    assert out["modelFramework"] == {"name": "transformers", "version": "4.50.0"}
    assert out["modelCapabilities"] == ["IMAGE_TEXT_TO_TEXT"]
    assert out["decodedModelConfiguration"]["model_size_bytes"] == 3_000_000.0


@pytest.mark.parametrize("config", [
    {"model_type": "bert", "architectures": ["BertModel"], "max_position_embeddings": 512},
    {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "similarity_fn_name": "cosine",
     "max_position_embeddings": 32768},
    {"model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"]},  # generic; "bert" in the model type
])
def test_embedding_models_report_embedding(tmp_path: Path, config: dict[str, Any]) -> None:
    assert _one(tmp_path, config)["modelCapabilities"] == ["EMBEDDING"]


@pytest.mark.parametrize(("quant", "expected"), [("fp8", "fp8"), ("fbgemm_fp8", "fp8"), ("awq_INT4", "int4"),
                                                  ("gptq", None)])
def test_quantization_as_ome_derives_it(tmp_path: Path, quant: str, expected: str | None) -> None:
    out = _one(tmp_path, {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                          "max_position_embeddings": 40960, "quantization_config": {"quant_method": quant}})
    assert out.get("quantization") == expected


def test_config_in_a_model_subfolder_is_found(tmp_path: Path) -> None:
    out = _one(tmp_path, {"model_type": "qwen2", "seq_length": 8192, "max_position_embeddings": 32768},
               sub="model")
    assert out["maxTokens"] == 8192  # Qwen2: seq_length wins over max_position_embeddings
    assert out["modelParameterSize"] == "1.5M"


def test_diffusers_pipeline(tmp_path: Path) -> None:
    d = tmp_path / "sd"
    make_diffusers_model(d)
    _json(d / "text_encoder" / "config.json", {"_class_name": "CLIPTextModel", "max_position_embeddings": 77})
    expected = sum(safetensors_parameter_count(d / c) for c in ("text_encoder", "unet", "vae"))
    out = parse_model_config(d, configmap_key="ns.basemodel.sd", dest=str(d), sha="abc")
    assert out is not None
    assert out["modelType"] == "diffusers"
    assert out["modelArchitecture"] == "StableDiffusionPipeline"
    assert out["modelFramework"] == out["modelFormat"] == {"name": "diffusers", "version": "0.30.0"}
    assert out["modelCapabilities"] == ["TEXT_TO_IMAGE"]
    assert out["maxTokens"] == 77
    assert out["modelParameterSize"] == format_parameter_count(expected)
    assert out["decodedModelConfiguration"]["model_size_bytes"] == float(expected * 4)  # no torch_dtype: 4 bytes
    assert go_json(out["artifact"]) == '{"sha":"abc","parentPath":{"ns.basemodel.sd":"' + str(d) + '"},' \
        '"childrenPaths":[]}'


def test_model_index_anywhere_wins_over_config_json(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _json(d / "config.json", LLAMA_31_8B)
    _json(d / "pipe" / "model_index.json", {"_class_name": "FluxPipeline", "_diffusers_version": "0.31.0"})
    out = parse_model_config(d, configmap_key="k", dest=str(d), sha=None)
    assert out is not None and out["modelType"] == "diffusers"


def test_symlinked_config_outside_the_folder_is_ignored(tmp_path: Path) -> None:
    outside = _json(tmp_path / "elsewhere" / "config.json", LLAMA_31_8B)
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(outside, d / "config.json")
    assert parse_model_config(d, configmap_key="k", dest=str(d), sha=None) is None


def test_index_naming_a_shard_outside_the_folder_gives_no_count(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_sparse_safetensors(tmp_path / "evil.safetensors", {"w": ("BF16", [10])})
    _json(d / "model.safetensors.index.json", {"weight_map": {"w": "../evil.safetensors"}})
    cfg = dict(LLAMA_31_8B, hidden_size=8192, num_hidden_layers=80)
    _json(d / "config.json", cfg)
    out = parse_model_config(d, configmap_key="k", dest=str(d), sha=None)
    assert out is not None
    assert out["modelParameterSize"] == "70B"  # OME's Llama fallback table, not the outside file's 10


def test_zero_dimension_or_oversized_header_falls_back_like_ome(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_sparse_safetensors(d / "model.safetensors", {"w": ("BF16", [0, 10])})
    _json(d / "config.json", dict(LLAMA_31_8B, hidden_size=2048, num_hidden_layers=16))
    out = parse_model_config(d, configmap_key="k", dest=str(d), sha=None)
    assert out is not None and out["modelParameterSize"] == "1B"
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 11 * 1024 * 1024) + b"{}")
    out = parse_model_config(d, configmap_key="k", dest=str(d), sha=None)
    assert out is not None and out["modelParameterSize"] == "1B"


def test_skip_missing_folder_and_no_config_give_none(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _json(d / "config.json", LLAMA_31_8B)
    assert parse_model_config(d, configmap_key="k", dest=str(d), sha=None, skip=True) is None
    assert parse_model_config(tmp_path / "absent", configmap_key="k", dest="x", sha=None) is None
    empty = tmp_path / "empty"
    (empty / "a" / "b").mkdir(parents=True)
    assert parse_model_config(empty, configmap_key="k", dest="x", sha=None) is None


@pytest.mark.parametrize("body", [
    '{"model_type":"x","a":' + "[" * 50_000 + "]" * 50_000 + "}",  # deep nesting
    '{"model_type":"x","max_position_embeddings":' + "9" * 100_000 + "}",  # 10^5-digit int
    '{"model_type":"llama","max_position_embeddings":4096.0}',  # Go cannot put 4096.0 into an int
    '{"model_type":"llama","hidden_size":Infinity}',  # OME's llama loader does not sanitize
    '{"model_type":"x","max_position_embeddings":"4096"}',
    "\xff\xfe not utf-8",
    "[1, 2, 3]",
    '{"model_type":"x","architectures":"LlamaForCausalLM"}',
])
def test_hostile_config_gives_none_never_an_exception(tmp_path: Path, body: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_bytes(body.encode("utf-8", errors="surrogateescape")
                                    if not body.startswith("\xff") else b"\xff\xfe not utf-8")
    assert parse_model_config(d, configmap_key="k", dest=str(d), sha=None) is None


def test_huge_config_file_is_not_read(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    with open(d / "config.json", "wb") as f:
        f.write(b'{"model_type":"x"}')
        f.truncate(200 * 1024 * 1024)  # sparse: 200 MB by size, nothing on disk
    assert parse_model_config(d, configmap_key="k", dest=str(d), sha=None) is None


def test_generic_config_with_infinity_is_sanitized_like_ome(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"model_type":"nemotron_new","max_position_embeddings":8192,'
                                   '"some_clip":Infinity,"other":NaN}')
    write_sparse_safetensors(d / "model.safetensors", {"w": ("BF16", [7, 1000])})
    out = parse_model_config(d, configmap_key="k", dest=str(d), sha=None)
    assert out is not None and out["maxTokens"] == 8192 and out["modelParameterSize"] == "7K"


@pytest.mark.parametrize(("n", "text"), [
    (0, "0"), (999, "999"), (1000, "1K"), (1500, "1.5K"), (1_500_000, "1.5M"), (1_250_000_000, "1.2B"),
    (1_350_000_000, "1.4B"), (8_030_261_248, "8.03B"), (7_241_732_096, "7.24B"), (685_000_000_000, "685B"),
    (10**12, "1T"), (1_005_000_000_000, "1.00T"), (123_456, "123.46K"),
])
def test_format_parameter_count_like_ome(n: int, text: str) -> None:
    assert format_parameter_count(n) == text
