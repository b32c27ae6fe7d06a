"""What OME's Hugging Face config loaders (``pkg/hfutil/modelconfig``) answer for one model: its type,
architecture, context length, capabilities, dtype and parameter count, per ``model_type``.

Invariants:
- :data:`ARCHITECTURES` is OME's ``RegisterModelLoader`` table: a ``model_type`` it names is read by that loader's
  rules (its ``Validate``, its context and dtype fields); any other type by OME's generic loader, and a
  ``model_index.json`` of an unregistered type as a diffusers pipeline;
- a file OME's loader would refuse raises :class:`~.godecode.BadConfig` (no metadata); a missing or unreadable
  parameter count falls back as OME does, with one line in the log, and never raises.

Deliberate deviations from OME (each harmless to consumers): when no safetensors header can be read, OME's
estimators are used only for ``llama`` and unregistered (generic) types, other architectures report ``0``; a
``model_index.json`` whose ``model_type`` names a transformers loader is still read by that loader.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...storage.errors import ModelherdError
from ...storage.paths import contained
from .godecode import INT64_MAX, BadConfig, get_float, get_int, get_str, get_strings, get_sub, load_config, obj
from .parameters import NoParameterCount, estimate_generic, estimate_llama, safetensors_parameter_count

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_INDEX_NAME = "model_index.json"


@dataclass
class ModelFacts:
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
    return get_int(d, "max_position_embeddings")


def _seq_or_mpe(d: dict[str, Any]) -> int:
    return get_int(d, "seq_length") or _mpe(d)


def _text_mpe(d: dict[str, Any]) -> int:
    return _mpe(get_sub(d, "text_config") or {})


def _quant_method(d: dict[str, Any]) -> str:
    q = get_sub(d, "quantization_config")
    return get_str(q, "quant_method") if q is not None else ""


def _no(_d: dict[str, Any]) -> Any:
    return False


def _none_str(_d: dict[str, Any]) -> str:
    return ""


def _yes(_d: dict[str, Any]) -> bool:
    return True


def _gemma3_context(d: dict[str, Any]) -> int:
    text = get_sub(d, "text_config") or {}
    window = get_int(text, "sliding_window")
    rope = get_sub(text, "rope_scaling")
    if rope is not None and get_float(rope, "factor") > 0 and window > 0:
        return int(float(window) * get_float(rope, "factor"))
    return window if window > 0 else 8192


def _deepseek_vl_context(d: dict[str, Any]) -> int:
    lang = get_sub(d, "language_config")
    return _mpe(lang) if lang is not None else 4096


def _llama4_quant(d: dict[str, Any]) -> str:
    q = get_sub(d, "quantization_config")
    return get_str(q, "format") if q is not None else ""


def _llama4_dtype(d: dict[str, Any]) -> str:
    q = get_sub(d, "quantization_config")
    if q is not None and get_str(q, "format") == "float-quantized":
        group0 = get_sub(get_sub(q, "config_groups") or {}, "group_0")
        weights = get_sub(group0, "weights") if group0 is not None else None
        if weights is not None and get_int(weights, "num_bits") == 8 and get_str(weights, "type") == "float":
            return "float8"
    return get_str(d, "torch_dtype")


_SIX = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "max_position_embeddings")


@dataclass(frozen=True)
class Loader:
    """How OME's registered loader for one ``model_type`` answers differently from the defaults."""

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


_PLAIN = Loader()
_QWEN = Loader(context=_seq_or_mpe, quant=_quant_method)
_QWEN_VL = Loader(vision=_yes, quant=_quant_method)
_QWEN3_VL = Loader(context=_text_mpe, vision=_yes, quant=_quant_method)
_DEEPSEEK = Loader(quant=_quant_method, positive=(*_SIX, "n_routed_experts", "num_experts_per_tok"))
_GEMMA = Loader(positive=("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"))
_DEEPSEEK_VL = Loader(context=_deepseek_vl_context, vision=_yes, size_dtype_fallback="language_config")

# model_type → OME's registered loader (pkg/hfutil/modelconfig, RegisterModelLoader); anything else is generic.
ARCHITECTURES: dict[str, Loader] = {
    "llama": Loader(quant=_quant_method, default_arch="LlamaForCausalLM", positive=_SIX, kv_le_heads=True,
                   estimate=estimate_llama),
    "baichuan": Loader(context=lambda d: get_int(d, "model_max_length") or _mpe(d)),
    "bert": Loader(embedding=_yes),
    "chatglm": Loader(context=lambda d: get_int(d, "seq_length"),
                      dtype=lambda d: get_str(d, "torch_dtype") or "float16"),
    "cohere": _PLAIN, "command-r": _PLAIN,
    "dbrx": Loader(context=lambda d: get_int(d, "max_seq_len"), default_arch="DbrxForCausalLM"),
    "deepseek_v3": _DEEPSEEK, "kimi_k2": _DEEPSEEK,
    "deepseek_vl_v2": _DEEPSEEK_VL, "janus": _DEEPSEEK_VL, "multi_modality": _DEEPSEEK_VL,
    "exaone": _PLAIN,
    "gemma": _GEMMA, "gemma2": _GEMMA, "gemma3_text": _GEMMA,
    "gemma3": Loader(context=_gemma3_context, vision=_yes),
    "gpt_oss": Loader(quant=_quant_method, default_arch="GptOssForCausalLM", positive=(*_SIX, "num_local_experts"),
                     kv_le_heads=True),
    "internlm": _PLAIN, "internlm2": _PLAIN,
    "llama4": Loader(context=_text_mpe, vision=lambda d: d.get("vision_config") is not None, quant=_llama4_quant,
                    default_arch="Llama4ForConditionalGeneration", dtype=_llama4_dtype),
    "llava": Loader(context=_text_mpe, vision=_yes, size_dtype_fallback="text_config"),
    "mllama": Loader(context=_text_mpe, vision=_yes, default_arch="MllamaForConditionalGeneration"),
    "minicpm": _PLAIN, "minicpm3": _PLAIN,
    "mistral": Loader(embedding=_yes, default_arch="MistralModel", positive=_SIX),
    "mixtral": Loader(default_arch="MixtralForCausalLM", positive=(*_SIX, "num_local_experts", "num_experts_per_tok")),
    "phi": _PLAIN, "phi3": _PLAIN, "phi3small": _PLAIN, "phimoe": _PLAIN,
    "phi3_v": Loader(vision=lambda d: d.get("img_processor") is not None),
    "qwen": _QWEN, "qwen2": _QWEN, "qwen3_moe": _QWEN,
    "qwen3": Loader(context=_seq_or_mpe, quant=_quant_method,
                    embedding=lambda d: get_str(d, "similarity_fn_name") != ""),
    "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL,
    "qwen3_vl": _QWEN3_VL, "qwen3_vl_moe": _QWEN3_VL, "qwen3_5": _QWEN3_VL, "qwen3_5_moe": _QWEN3_VL,
    "stablelm": _PLAIN, "xverse": _PLAIN,
}


def _registered_facts(arch: Loader, d: dict[str, Any], config_path: Path) -> ModelFacts:
    for key in arch.positive:
        if get_int(d, key) <= 0:
            raise BadConfig(f"{key} must be positive")
    if (d.get("model_type") == "gpt_oss" and get_int(d, "num_experts_per_tok") <= 0
            and get_int(d, "experts_per_token") <= 0):
        raise BadConfig("either num_experts_per_tok or experts_per_token must be positive")
    if arch.kv_le_heads and get_int(d, "num_key_value_heads") > get_int(d, "num_attention_heads"):
        raise BadConfig("num_key_value_heads cannot be greater than num_attention_heads")
    archs = get_strings(d, "architectures")
    dtype = get_str(d, "torch_dtype")
    size_dtype = dtype
    if arch.dtype is not None:
        size_dtype = dtype = arch.dtype(d)
    if arch.size_dtype_fallback and not size_dtype:
        size_dtype = get_str(get_sub(d, arch.size_dtype_fallback) or {}, "torch_dtype")
    try:
        params = safetensors_parameter_count(config_path.parent)
    except NoParameterCount as e:
        log.info("parameter count of %s: %s", config_path, e)
        params = arch.estimate(d) if arch.estimate else 0
    return ModelFacts(model_type=get_str(d, "model_type"), architecture=archs[0] if archs else arch.default_arch,
                      context=arch.context(d), has_vision=arch.vision(d), is_embedding=arch.embedding(d),
                      quant=arch.quant(d), torch_dtype=dtype, size_dtype=size_dtype,
                      transformers_version=get_str(d, "transformers_version"), params=params)


_GENERIC_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "max_sequence_length", "vocab_size", "n_routed_experts",
                 "n_shared_experts", "moe_intermediate_size")


_NESTED_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size", "n_routed_experts", "num_local_experts", "num_experts",
                "n_shared_experts", "moe_intermediate_size")


def _generic_facts(d: dict[str, Any], config_path: Path) -> ModelFacts:
    g: dict[str, Any] = {k: get_int(d, k) for k in _GENERIC_INTS}
    g["transformers_version"] = get_str(d, "transformers_version")
    g["torch_dtype"] = get_str(d, "torch_dtype")
    for key in ("text_config", "llm_config", "language_config"):  # OME's probeNestedConfig: first that decodes
        if key not in d:
            continue
        try:
            sub = get_sub(d, key) or {}
            nested: dict[str, Any] = {k: get_int(sub, k) for k in _NESTED_INTS}
            nested["transformers_version"] = get_str(sub, "transformers_version")
            nested["torch_dtype"] = get_str(sub, "torch_dtype")
        except BadConfig:
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
        with contextlib.suppress(BadConfig):
            top = (get_int(d, "num_local_experts"), get_int(d, "num_experts"))
            g["n_routed_experts"] = next((v for v in top if v > 0), 0)
    try:
        params = safetensors_parameter_count(config_path.parent)
    except NoParameterCount as e:
        log.info("parameter count of %s: %s", config_path, e)
        params = 0
    if params <= 0:
        params = estimate_generic(g)
    archs = get_strings(d, "architectures")
    return ModelFacts(model_type=get_str(d, "model_type"), architecture=archs[0] if archs else "",
                      context=g["max_position_embeddings"] or g["max_sequence_length"],
                      has_vision="vision_config" in d, is_embedding=False, quant=_quant_method(d),
                      torch_dtype=g["torch_dtype"], size_dtype=g["torch_dtype"],
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


def _diffusion_facts(d: dict[str, Any], index_path: Path) -> ModelFacts:
    class_name = _first_string(d, "_class_name", "class_name", "className")
    if not get_str(d, "model_type") and not class_name:
        raise BadConfig("model_type or _class_name is missing")
    known = {"scheduler", "text_encoder", "tokenizer", "transformer", "unet", "vae"}
    components = {k: c for k, v in d.items() if not k.startswith("_") and (c := _component(v)) is not None}
    if not class_name and not components:
        raise BadConfig("model_index.json has no diffusion pipeline metadata")
    base = index_path.parent
    transformer = base / "transformer" / CONFIG_NAME
    if not transformer.exists() and (base / "unet" / CONFIG_NAME).exists():
        transformer = base / "unet" / CONFIG_NAME
    params = 0
    try:
        total = 0
        for required in (base / "text_encoder" / CONFIG_NAME, transformer, base / "vae" / CONFIG_NAME):
            if not required.exists():
                raise NoParameterCount(f"{required} is missing")
            total += safetensors_parameter_count(required.parent)
        for name in sorted(k for k in components if k.lower() not in known):
            try:
                cfg = contained(base, f"{name}/{CONFIG_NAME}", what="component name")
                if cfg.exists():
                    total += safetensors_parameter_count(cfg.parent)
            except (NoParameterCount, ModelherdError):
                continue  # optional components are skipped, as OME does
        if total > INT64_MAX:
            raise NoParameterCount("parameter count overflows int64")
        params = total
    except NoParameterCount as e:
        log.info("parameter count of %s: %s", index_path, e)
    context = 0
    try:
        text = load_config(base / "text_encoder" / CONFIG_NAME, sanitize=True)
        context = max(get_int(obj(text), "max_position_embeddings"), 0)
    except BadConfig:
        pass
    version = _first_string(d, "_diffusers_version", "diffusers_version")
    return ModelFacts(model_type="diffusers", architecture=class_name, context=context, has_vision=True,
                      is_embedding=False, quant="", torch_dtype="", size_dtype="", transformers_version="",
                      params=params, diffusion=(class_name, version))


def model_facts(path: Path) -> ModelFacts:
    """The facts of the config at ``path`` (a ``model_index.json`` or ``config.json``), read by the loader OME
    would pick. Raises :class:`~.godecode.BadConfig` where OME cannot load it."""
    is_index = path.name == MODEL_INDEX_NAME
    d = obj(load_config(path, sanitize=True))
    arch = ARCHITECTURES.get(get_str(d, "model_type"))
    if is_index and arch is None:
        return _diffusion_facts(d, path)
    if arch is None:
        return _generic_facts(d, path)
    # A registered loader reads the file again without OME's Infinity/NaN rewrite.
    return _registered_facts(arch, obj(load_config(path, sanitize=False)), path)
