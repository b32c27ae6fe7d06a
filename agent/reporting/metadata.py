"""The ``config`` of a ConfigMap entry: model metadata as OME's parser reports it (``pkg/modelagent/config_parser.go``
and ``pkg/hfutil/modelconfig``), built from the files of a model folder.

Invariants:
- the result is OME's ``ModelConfig`` as Go marshals it (Go field order, ``omitempty``; ``artifact`` always present),
  with :class:`~.entry.GoMap` for Go's maps, so :func:`~.entry.go_json` writes it byte for byte;
- nothing here writes, and nothing outside ``model_dir`` is read (symlinks that leave it are ignored; shard names from
  an index go through :func:`~modelherd.storage.paths.contained`); only headers of safetensors files are read;
- hostile files never raise: a config above :data:`MAX_CONFIG_BYTES`, deep nesting, huge numbers, wrong types give
  ``None`` (OME's parse error: no metadata) or a count OME's fallback would give, with one warning in the log.

Deliberate deviations from OME (each harmless to consumers): the bounded walk returns the *first* ``config.json`` in
lexical order (OME's ``filepath.Walk`` + ``SkipDir`` on a file keeps walking and ends with the *last*); parameter
counts when no safetensors header can be read use OME's estimators only for ``llama`` and unregistered (generic)
types, other architectures report ``0``; a ``model_index.json`` whose ``model_type`` names a transformers loader is
still read as a diffusers pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelherd.storage.errors import ModelherdError
from modelherd.storage.paths import contained
from modelherd.storage.verify import safetensors_header

from .entry import GoMap

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"
ST_INDEX_NAME = "model.safetensors.index.json"  # the only index name OME's parameter counter looks for
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # config.json, model_index.json, safetensors index
OME_MAX_ST_HEADER = 10 * 1024 * 1024  # OME refuses safetensors headers above 10 MiB
MAX_WALK_DEPTH = 6
MAX_WALK_ENTRIES = 20_000
INT64_MAX = 2**63 - 1

DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0, "half": 2.0,
               "int8": 1.0, "fp8": 1.0, "float8": 1.0, "e4m3": 1.0, "int4": 0.5, "4bit": 0.5}


class _Bad(Exception):
    """OME's loader would fail on this file (its JSON decoder or its Validate): no metadata."""


class _NoCount(Exception):
    """No parameter count from safetensors headers (OME: an error, then its fallback estimate)."""


# ---------------------------------------------------------------------------------------------------------- JSON


_SANITIZE = [(re.compile(r"([:,\[]\s*)-Infinity(\s*[,\]\}])"), r"\g<1>-1e308\g<2>"),
             (re.compile(r"([:,\[]\s*)Infinity(\s*[,\]\}])"), r"\g<1>1e308\g<2>"),
             (re.compile(r"([:,\[]\s*)NaN(\s*[,\]\}])"), r"\g<1>null\g<2>")]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_json(path: Path, *, sanitize: bool) -> Any:
    """A JSON file, bounded in size; ``sanitize`` applies OME's Infinity/NaN rewrite first. Raises :class:`_Bad`."""
    import json

    try:
        size = os.stat(path).st_size
        if size > MAX_CONFIG_BYTES:
            raise _Bad(f"{size} bytes is more than the {MAX_CONFIG_BYTES} bytes a config may have")
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
        if sanitize:
            for pattern, repl in _SANITIZE:
                text = pattern.sub(repl, text)
        return json.loads(text, parse_constant=_reject_constant)
    except _Bad:
        raise
    except (OSError, ValueError, RecursionError) as e:  # ValueError covers bad UTF-8, bad JSON, 4300+ digit ints
        raise _Bad(f"{type(e).__name__}: {str(e)[:200]}") from None


def _obj(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad("not a JSON object")
    return v


# Typed reads with Go's decoding rules: absent or null is the zero value; a wrong JSON type fails the whole decode.

def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise _Bad(f"{key}: {str(v)[:40]!r} is not an int")
    return v


def _float(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad(f"{key}: not a number")
    try:
        return float(v)
    except OverflowError:
        raise _Bad(f"{key}: out of float64 range") from None


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _Bad(f"{key}: not a string")
    return v


def _sub(d: dict[str, Any], key: str) -> dict[str, Any] | None:
    v = d.get(key)
    if v is None:
        return None
    return _obj(v)


def _strings(d: dict[str, Any], key: str) -> list[str]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(x is None or isinstance(x, str) for x in v):
        raise _Bad(f"{key}: not a list of strings")
    return [x or "" for x in v]


# ---------------------------------------------------------------------------------------------- parameter counts


def format_parameter_count(n: int) -> str:
    """OME's ``FormatParamCount``: ``8030261248`` → ``8.03B``; thresholds 1e3/1e6/1e9/1e12 (K, M, B, T); whole
    values without decimals, values with at most two decimals written with one (``1.25B`` → ``1.2B``, Go's
    rounding), others with two. Below 1000 the plain number."""
    for unit, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= unit:
            value = float(n) / float(unit)
            if value == float(int(value)):
                return f"{int(value)}{suffix}"
            if value * 100 == float(int(value * 100)):
                return f"{value:.1f}{suffix}"
            return f"{value:.2f}{suffix}"
    return str(n)


def _shard_params(path: Path) -> int:
    """Elements in one safetensors file, as OME counts them (scalars count 0; a zero dimension is an error)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if len(head) == 8 and struct.unpack("<Q", head)[0] > OME_MAX_ST_HEADER:
            raise _NoCount(f"{path.name}: header above {OME_MAX_ST_HEADER} bytes")
        header, _ = safetensors_header(path)
    except (OSError, ValueError, RecursionError) as e:
        raise _NoCount(f"{path.name}: {str(e)[:200]}") from None
    total = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict):
            raise _NoCount(f"{path.name}: tensor {name[:80]!r} is not an object")
        shape = t.get("shape")
        if shape is None or shape == []:
            continue
        if not isinstance(shape, list):
            raise _NoCount(f"{path.name}: tensor {name[:80]!r} has no shape list")
        count = 1
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise _NoCount(f"{path.name}: tensor {name[:80]!r} has a bad dimension")
            count *= dim
            if count > INT64_MAX:
                raise _NoCount(f"{path.name}: tensor {name[:80]!r} overflows int64")
        total += count
        if total > INT64_MAX:
            raise _NoCount(f"{path.name}: parameter count overflows int64")
    return total


def safetensors_parameter_count(directory: Path) -> int:
    """Exact element count of the safetensors weights in ``directory`` (OME's ``FindAndParseSafetensors``).

    With ``model.safetensors.index.json``: every shard its ``weight_map`` names; otherwise every ``*.safetensors``
    file of the folder. Reads headers only. Raises :class:`_NoCount` where OME returns an error.
    """
    index = directory / ST_INDEX_NAME
    total = 0
    if index.exists():
        try:
            weight_map = _obj(_load_json(index, sanitize=False)).get("weight_map")
        except _Bad as e:
            raise _NoCount(f"{ST_INDEX_NAME}: {e}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise _NoCount(f"{ST_INDEX_NAME}: no weight_map")
        if not all(isinstance(s, str) and s for s in weight_map.values()):
            raise _NoCount(f"{ST_INDEX_NAME}: a shard name is empty or not a string")
        shards: list[Path] = []
        for shard in sorted(set(weight_map.values())):
            try:
                shards.append(contained(directory, shard, what="shard name"))
            except ModelherdError as e:
                raise _NoCount(str(e)) from None
    else:
        try:
            names = sorted(os.listdir(directory))
        except OSError as e:
            raise _NoCount(str(e)) from None
        shards = [directory / n for n in names if n.endswith(".safetensors")]
        if not shards:
            raise _NoCount(f"no .safetensors files in {directory}")
    for shard in shards:
        total += _shard_params(shard)
        if total > INT64_MAX:
            raise _NoCount("parameter count overflows int64")
    return total


def _i64(x: int) -> int:
    """Go's int64 wrap-around (OME's estimators use plain Go ints)."""
    return (x + 2**63) % 2**64 - 2**63


def _estimate_generic(d: dict[str, Any]) -> int:
    h, layers, inter, vocab = d["hidden_size"], d["num_hidden_layers"], d["intermediate_size"], d["vocab_size"]
    if h <= 0 or layers <= 0:
        return 0
    if d["n_routed_experts"] > 0:
        moe = d["moe_intermediate_size"] or inter
        per_layer = (_i64(4 * h * h) + _i64(d["n_shared_experts"] * 2 * h * inter)
                     + _i64(d["n_routed_experts"] * 2 * h * moe) + _i64(h * d["n_routed_experts"]) + _i64(2 * h))
        return _i64(_i64(h * vocab) + _i64(layers * per_layer))
    if inter == 0:
        inter = h * 4
    return _i64(vocab * h + layers * 12 * h * h)


_LLAMA_KNOWN = {(8192, 80): 70_000_000_000, (8192, 82): 70_000_000_000, (16384, 126): 405_000_000_000,
                (3072, 28): 3_000_000_000, (2048, 16): 1_000_000_000}


def _estimate_llama(d: dict[str, Any]) -> int:
    h, layers, inter = _int(d, "hidden_size"), _int(d, "num_hidden_layers"), _int(d, "intermediate_size")
    if (h, layers) in _LLAMA_KNOWN:
        return _LLAMA_KNOWN[(h, layers)]
    if inter == 0:
        inter = h * 8 // 3
    n = _i64(h * 32000 + layers * (3 * h * h + h) + layers * (h * inter * 2 + h + inter) + layers * 2 * h)
    return int(n / 1_000_000_000) * 1_000_000_000 if n >= 0 else -(-n // 1_000_000_000) * 1_000_000_000


# ------------------------------------------------------------------------------------------ per-architecture facts


@dataclass
class _Facts:
    """What OME's ``HuggingFaceModel`` interface answers for one config."""

    model_type: str
    architecture: str
    context: int
    has_vision: bool
    is_embedding: bool
    quant: str
    torch_dtype: str  # GetTorchDtype (reported)
    size_dtype: str  # the dtype GetModelSizeBytes uses
    transformers_version: str
    params: int
    diffusion: tuple[str, str] | None = None  # (class name, diffusers version) for a pipeline


def _mpe(d: dict[str, Any]) -> int:
    return _int(d, "max_position_embeddings")


def _seq_or_mpe(d: dict[str, Any]) -> int:
    return _int(d, "seq_length") or _mpe(d)


def _text_mpe(d: dict[str, Any]) -> int:
    return _mpe(_sub(d, "text_config") or {})


def _quant_method(d: dict[str, Any]) -> str:
    q = _sub(d, "quantization_config")
    return _str(q, "quant_method") if q is not None else ""


def _no(_d: dict[str, Any]) -> Any:
    return False


def _none_str(_d: dict[str, Any]) -> str:
    return ""


def _yes(_d: dict[str, Any]) -> bool:
    return True


def _gemma3_context(d: dict[str, Any]) -> int:
    text = _sub(d, "text_config") or {}
    window = _int(text, "sliding_window")
    rope = _sub(text, "rope_scaling")
    if rope is not None and _float(rope, "factor") > 0 and window > 0:
        return int(float(window) * _float(rope, "factor"))
    return window if window > 0 else 8192


def _deepseek_vl_context(d: dict[str, Any]) -> int:
    lang = _sub(d, "language_config")
    return _mpe(lang) if lang is not None else 4096


def _llama4_quant(d: dict[str, Any]) -> str:
    q = _sub(d, "quantization_config")
    return _str(q, "format") if q is not None else ""


def _llama4_dtype(d: dict[str, Any]) -> str:
    q = _sub(d, "quantization_config")
    if q is not None and _str(q, "format") == "float-quantized":
        group0 = _sub(_sub(q, "config_groups") or {}, "group_0")
        weights = _sub(group0, "weights") if group0 is not None else None
        if weights is not None and _int(weights, "num_bits") == 8 and _str(weights, "type") == "float":
            return "float8"
    return _str(d, "torch_dtype")


_SIX = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "max_position_embeddings")


@dataclass(frozen=True)
class _Arch:
    context: Callable[[dict[str, Any]], int] = _mpe
    vision: Callable[[dict[str, Any]], bool] = _no
    embedding: Callable[[dict[str, Any]], bool] = _no
    quant: Callable[[dict[str, Any]], str] = _none_str
    default_arch: str = ""
    positive: tuple[str, ...] = ()  # Validate(): these must be > 0
    kv_le_heads: bool = False
    dtype: Callable[[dict[str, Any]], str] | None = None  # GetTorchDtype override
    size_dtype_fallback: str | None = None  # a sub-config whose torch_dtype GetModelSizeBytes falls back to
    estimate: Callable[[dict[str, Any]], int] | None = None


_PLAIN = _Arch()
_QWEN = _Arch(context=_seq_or_mpe, quant=_quant_method)
_TEXT_VISION = _Arch(context=_text_mpe, vision=_yes)
_QWEN_VL = _Arch(vision=_yes, quant=_quant_method)
_QWEN3_VL = _Arch(context=_text_mpe, vision=_yes, quant=_quant_method)
_DEEPSEEK = _Arch(quant=_quant_method, positive=(*_SIX, "n_routed_experts", "num_experts_per_tok"))
_GEMMA = _Arch(positive=("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"))
_DEEPSEEK_VL = _Arch(context=_deepseek_vl_context, vision=_yes, size_dtype_fallback="language_config")

# model_type → OME's registered loader (pkg/hfutil/modelconfig, RegisterModelLoader); anything else is generic.
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch(quant=_quant_method, default_arch="LlamaForCausalLM", positive=_SIX, kv_le_heads=True,
                   estimate=_estimate_llama),
    "baichuan": _Arch(context=lambda d: _int(d, "model_max_length") or _mpe(d)),
    "bert": _Arch(embedding=_yes),
    "chatglm": _Arch(context=lambda d: _int(d, "seq_length"), dtype=lambda d: _str(d, "torch_dtype") or "float16"),
    "cohere": _PLAIN, "command-r": _PLAIN,
    "dbrx": _Arch(context=lambda d: _int(d, "max_seq_len"), default_arch="DbrxForCausalLM"),
    "deepseek_v3": _DEEPSEEK, "kimi_k2": _DEEPSEEK,
    "deepseek_vl_v2": _DEEPSEEK_VL, "janus": _DEEPSEEK_VL, "multi_modality": _DEEPSEEK_VL,
    "exaone": _PLAIN,
    "gemma": _GEMMA, "gemma2": _GEMMA, "gemma3_text": _GEMMA,
    "gemma3": _Arch(context=_gemma3_context, vision=_yes),
    "gpt_oss": _Arch(quant=_quant_method, default_arch="GptOssForCausalLM", positive=(*_SIX, "num_local_experts"),
                     kv_le_heads=True),
    "internlm": _PLAIN, "internlm2": _PLAIN,
    "llama4": _Arch(context=_text_mpe, vision=lambda d: d.get("vision_config") is not None, quant=_llama4_quant,
                    default_arch="Llama4ForConditionalGeneration", dtype=_llama4_dtype),
    "llava": _Arch(context=_text_mpe, vision=_yes, size_dtype_fallback="text_config"),
    "mllama": _Arch(context=_text_mpe, vision=_yes, default_arch="MllamaForConditionalGeneration"),
    "minicpm": _PLAIN, "minicpm3": _PLAIN,
    "mistral": _Arch(embedding=_yes, default_arch="MistralModel", positive=_SIX),
    "mixtral": _Arch(default_arch="MixtralForCausalLM", positive=(*_SIX, "num_local_experts", "num_experts_per_tok")),
    "phi": _PLAIN, "phi3": _PLAIN, "phi3small": _PLAIN, "phimoe": _PLAIN,
    "phi3_v": _Arch(vision=lambda d: d.get("img_processor") is not None),
    "qwen": _QWEN, "qwen2": _QWEN, "qwen3_moe": _QWEN,
    "qwen3": _Arch(context=_seq_or_mpe, quant=_quant_method, embedding=lambda d: _str(d, "similarity_fn_name") != ""),
    "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL,
    "qwen3_vl": _QWEN3_VL, "qwen3_vl_moe": _QWEN3_VL, "qwen3_5": _QWEN3_VL, "qwen3_5_moe": _QWEN3_VL,
    "stablelm": _PLAIN, "xverse": _PLAIN,
}


def _registered_facts(arch: _Arch, d: dict[str, Any], config_path: Path) -> _Facts:
    for key in arch.positive:
        if _int(d, key) <= 0:
            raise _Bad(f"{key} must be positive")
    if d.get("model_type") == "gpt_oss" and _int(d, "num_experts_per_tok") <= 0 and _int(d, "experts_per_token") <= 0:
        raise _Bad("either num_experts_per_tok or experts_per_token must be positive")
    if arch.kv_le_heads and _int(d, "num_key_value_heads") > _int(d, "num_attention_heads"):
        raise _Bad("num_key_value_heads cannot be greater than num_attention_heads")
    archs = _strings(d, "architectures")
    dtype = _str(d, "torch_dtype")
    size_dtype = dtype
    if arch.dtype is not None:
        size_dtype = dtype = arch.dtype(d)
    if arch.size_dtype_fallback and not size_dtype:
        size_dtype = _str(_sub(d, arch.size_dtype_fallback) or {}, "torch_dtype")
    try:
        params = safetensors_parameter_count(config_path.parent)
    except _NoCount as e:
        log.info("parameter count of %s: %s", config_path, e)
        params = arch.estimate(d) if arch.estimate else 0
    return _Facts(model_type=_str(d, "model_type"), architecture=archs[0] if archs else arch.default_arch,
                  context=arch.context(d), has_vision=arch.vision(d), is_embedding=arch.embedding(d),
                  quant=arch.quant(d), torch_dtype=dtype, size_dtype=size_dtype,
                  transformers_version=_str(d, "transformers_version"), params=params)


_GENERIC_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "max_sequence_length", "vocab_size", "n_routed_experts",
                 "n_shared_experts", "moe_intermediate_size")


_NESTED_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size", "n_routed_experts", "num_local_experts", "num_experts",
                "n_shared_experts", "moe_intermediate_size")


def _generic_facts(d: dict[str, Any], config_path: Path) -> _Facts:
    g: dict[str, Any] = {k: _int(d, k) for k in _GENERIC_INTS}
    g["transformers_version"] = _str(d, "transformers_version")
    g["torch_dtype"] = _str(d, "torch_dtype")
    for key in ("text_config", "llm_config", "language_config"):  # OME's probeNestedConfig: first that decodes
        if key not in d:
            continue
        try:
            sub = _sub(d, key) or {}
            nested: dict[str, Any] = {k: _int(sub, k) for k in _NESTED_INTS}
            nested["transformers_version"] = _str(sub, "transformers_version")
            nested["torch_dtype"] = _str(sub, "torch_dtype")
        except _Bad:
            continue
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "vocab_size", "transformers_version", "torch_dtype",
                  "n_shared_experts", "moe_intermediate_size"):
            g[k] = g[k] or nested[k]
        if not g["n_routed_experts"]:
            g["n_routed_experts"] = next((nested[k] for k in ("n_routed_experts", "num_local_experts", "num_experts")
                                          if nested[k] > 0), 0)
        break
    if not g["n_routed_experts"]:
        with contextlib.suppress(_Bad):
            top = (_int(d, "num_local_experts"), _int(d, "num_experts"))
            g["n_routed_experts"] = next((v for v in top if v > 0), 0)
    try:
        params = safetensors_parameter_count(config_path.parent)
    except _NoCount as e:
        log.info("parameter count of %s: %s", config_path, e)
        params = 0
    if params <= 0:
        params = _estimate_generic(g)
    archs = _strings(d, "architectures")
    return _Facts(model_type=_str(d, "model_type"), architecture=archs[0] if archs else "",
                  context=g["max_position_embeddings"] or g["max_sequence_length"], has_vision="vision_config" in d,
                  is_embedding=False, quant=_quant_method(d), torch_dtype=g["torch_dtype"], size_dtype=g["torch_dtype"],
                  transformers_version=g["transformers_version"], params=params)


# ------------------------------------------------------------------------------------------------------ diffusers


def _first_string(d: dict[str, Any], *keys: str) -> str:
    for k in keys:
        v = d.get(k)
        if isinstance(v, str) and v:
            return v
    return ""


def _component(v: Any) -> tuple[str, str] | None:
    """(library, type) of one pipeline entry: ``["diffusers", "UNet2DConditionModel"]`` or an object."""
    if isinstance(v, list) and all(x is None or isinstance(x, str) for x in v):
        parts = [x or "" for x in v]
        if not parts:
            return None
        return ("", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if isinstance(v, dict):
        cls = _first_string(v, "_class_name", "class_name", "className", "type")
        lib = _first_string(v, "_library", "library")
        return (lib, cls) if cls or lib else None
    return None


def _diffusion_facts(d: dict[str, Any], index_path: Path) -> _Facts:
    class_name = _first_string(d, "_class_name", "class_name", "className")
    if not _str(d, "model_type") and not class_name:
        raise _Bad("model_type or _class_name is missing")
    known = {"scheduler", "text_encoder", "tokenizer", "transformer", "unet", "vae"}
    components = {k: c for k, v in d.items() if not k.startswith("_") and (c := _component(v)) is not None}
    if not class_name and not components:
        raise _Bad("model_index.json has no diffusion pipeline metadata")
    base = index_path.parent
    transformer = base / "transformer" / CONFIG_NAME
    if not transformer.exists() and (base / "unet" / CONFIG_NAME).exists():
        transformer = base / "unet" / CONFIG_NAME
    params = 0
    try:
        total = 0
        for required in (base / "text_encoder" / CONFIG_NAME, transformer, base / "vae" / CONFIG_NAME):
            if not required.exists():
                raise _NoCount(f"{required} is missing")
            total += safetensors_parameter_count(required.parent)
        for name in sorted(k for k in components if k.lower() not in known):
            try:
                cfg = contained(base, f"{name}/{CONFIG_NAME}", what="component name")
                if cfg.exists():
                    total += safetensors_parameter_count(cfg.parent)
            except (_NoCount, ModelherdError):
                continue  # optional components are skipped, as OME does
        if total > INT64_MAX:
            raise _NoCount("parameter count overflows int64")
        params = total
    except _NoCount as e:
        log.info("parameter count of %s: %s", index_path, e)
    context = 0
    try:
        text = _load_json(base / "text_encoder" / CONFIG_NAME, sanitize=True)
        context = max(_int(_obj(text), "max_position_embeddings"), 0)
    except _Bad:
        pass
    return _Facts(model_type="diffusers", architecture=class_name, context=context, has_vision=True,
                  is_embedding=False, quant="", torch_dtype="", size_dtype="", transformers_version="", params=params,
                  diffusion=(class_name, _first_string(d, "_diffusers_version", "diffusers_version")))


# ------------------------------------------------------------------------------------------------------ discovery


def _inside(model_dir: Path, path: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(model_dir)
    return real.startswith(root + os.sep) and os.path.isfile(real)


def _walk_find(model_dir: Path, filename: str) -> Path | None:
    """First ``filename`` in lexical walk order, at most :data:`MAX_WALK_DEPTH` deep and :data:`MAX_WALK_ENTRIES`
    entries; symlinked folders are not entered."""
    seen = 0
    stack: list[tuple[Path, int]] = [(model_dir, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            seen += 1
            if seen > MAX_WALK_ENTRIES:
                log.warning("stopped looking for %s in %s after %d entries", filename, model_dir, MAX_WALK_ENTRIES)
                return None
            p = Path(e.path)
            if e.name == filename and not e.is_dir(follow_symlinks=False) and _inside(model_dir, p):
                return p
            if e.is_dir(follow_symlinks=False) and depth < MAX_WALK_DEPTH:
                subdirs.append((p, depth + 1))
        stack.extend(reversed(subdirs))
    return None


def find_config(model_dir: Path) -> Path | None:
    """The file OME would parse: ``model_index.json`` (root, then a walk), else ``config.json`` at the root, in
    ``safetensors/``, ``pytorch_model/``, ``model/``, then a walk. ``None`` when there is neither."""
    root_index = model_dir / MODEL_INDEX_NAME
    if _inside(model_dir, root_index):
        return root_index
    found = _walk_find(model_dir, MODEL_INDEX_NAME)
    if found is not None:
        return found
    for sub in ("", "safetensors", "pytorch_model", "model"):
        candidate = model_dir / sub / CONFIG_NAME if sub else model_dir / CONFIG_NAME
        if _inside(model_dir, candidate):
            return candidate
    return _walk_find(model_dir, CONFIG_NAME)


# ----------------------------------------------------------------------------------------------------- the config


def _capabilities(f: _Facts) -> list[str]:
    """OME's ``determineModelCapabilitiesFromHF``, in its order of precedence."""
    arch, mtype = f.architecture.lower(), f.model_type.lower()
    if f.diffusion is not None:
        if any(s in arch for s in ("imageedit", "pix2pix", "img2img", "inpaint")):
            return ["IMAGE_TEXT_TO_IMAGE"]
        if any(s in arch for s in ("image", "pix", "stablediffusion")):
            return ["TEXT_TO_IMAGE"]
        if "texttovideo" in arch or "t2v" in arch:
            return ["TEXT_TO_VIDEO"]
        if "video" in arch:
            return ["IMAGE_TEXT_TO_VIDEO"]
    if "nemotronh_nano" in mtype:
        return ["IMAGE_TEXT_TO_TEXT", "TEXT_TO_TEXT", "AUDIO_TO_TEXT"]
    if f.has_vision:
        return ["IMAGE_TEXT_TO_TEXT"]
    if "omni" in arch:
        return ["TEXT_TO_AUDIO", "IMAGE_TEXT_TO_AUDIO", "VIDEO_TEXT_TO_AUDIO", "AUDIO_TO_TEXT", "AUDIO_TO_AUDIO"]
    if any(s in arch for s in ("whisper", "wav2vec2", "hubert", "fortc", "forspeechtotext")):
        return ["AUDIO_TO_TEXT"]
    if (f.is_embedding or "embedding" in arch or "sentence" in arch or "bert" in mtype
            or ("mistral" in mtype and "mistralmodel" in arch)):
        return ["EMBEDDING"]
    return ["TEXT_TO_TEXT"]


def _quantization(q: str) -> str:
    low = q.lower()
    return "int4" if "int4" in low else "fp8" if "fp8" in low else ""


def _int32(x: int) -> int:
    return (x + 2**31) % 2**32 - 2**31


def _facts(path: Path) -> _Facts:
    is_index = path.name == MODEL_INDEX_NAME
    d = _obj(_load_json(path, sanitize=True))
    arch = ARCHITECTURES.get(_str(d, "model_type"))
    if is_index and arch is None:
        return _diffusion_facts(d, path)
    if arch is None:
        return _generic_facts(d, path)
    # A registered loader reads the file again without OME's Infinity/NaN rewrite.
    return _registered_facts(arch, _obj(_load_json(path, sanitize=False)), path)


def build_config(f: _Facts, artifact: dict[str, Any]) -> dict[str, Any]:
    """OME's ``ModelConfig`` for these facts, as ``ConvertMetadataToModelConfig`` + ``json.Marshal`` shape it."""
    size = int(float(f.params) * DTYPE_BYTES.get(f.size_dtype.lower(), 4.0)) if f.params > 0 else 0
    size = max(min(size, INT64_MAX), -INT64_MAX - 1)
    param_size = format_parameter_count(f.params)
    cfg: dict[str, Any] = {}
    if f.model_type:
        cfg["modelType"] = f.model_type
    if f.architecture:
        cfg["modelArchitecture"] = f.architecture
    if f.diffusion is not None:
        cfg["modelFramework"] = GoMap(name="diffusers", version=f.diffusion[1])
        cfg["modelFormat"] = GoMap(name="diffusers", version=f.diffusion[1])
    else:
        framework = GoMap(name="transformers")
        if f.transformers_version:
            framework["version"] = f.transformers_version
        cfg["modelFramework"] = framework
        cfg["modelFormat"] = GoMap(name="safetensors", version="1.0.0")
    cfg["modelParameterSize"] = param_size
    if max_tokens := _int32(f.context):
        cfg["maxTokens"] = max_tokens
    cfg["modelCapabilities"] = _capabilities(f)
    # Go marshals the parser's struct, then decodes it into map[string]any: numbers come back as float64.
    cfg["decodedModelConfiguration"] = GoMap(
        model_type=f.model_type, architecture=f.architecture, context_length=float(f.context),
        parameter_count=param_size, has_vision=f.has_vision, is_embedding=f.is_embedding,
        transformers_version=f.transformers_version, torch_dtype=f.torch_dtype, model_size_bytes=float(size))
    if quant := _quantization(f.quant):
        cfg["quantization"] = quant
    cfg["artifact"] = artifact
    return cfg


def parse_model_config(model_dir: Path, *, configmap_key: str, dest: str, sha: str | None,
                       skip: bool = False) -> dict[str, Any] | None:
    """The ``config`` of this model's ConfigMap entry, or ``None`` (``skip``; no folder; no config; a config OME
    could not load). Never raises on file contents.

    ``sha`` is the Hugging Face commit: the artifact is then ``{"sha", "parentPath": {configmap_key: dest},
    "childrenPaths": []}`` (a fresh download; the caller carries over existing ``childrenPaths``). ``sha=None``
    (OCI, local) gives OME's empty artifact ``{"sha":"","parentPath":null,"childrenPaths":null}``.
    """
    if skip or not model_dir.is_dir():
        return None
    artifact: dict[str, Any] = (
        {"sha": sha, "parentPath": GoMap({configmap_key: dest}), "childrenPaths": []} if sha is not None
        else {"sha": "", "parentPath": None, "childrenPaths": None})
    path = find_config(model_dir)
    if path is None:
        log.warning("%s: no model_index.json or config.json; no metadata to report", model_dir)
        return None
    try:
        facts = _facts(path)
    except _Bad as e:
        log.warning("%s: cannot read model metadata (%s); no metadata to report", path, e)
        return None
    except RecursionError:
        log.warning("%s: config nested too deeply; no metadata to report", path)
        return None
    return build_config(facts, artifact)
