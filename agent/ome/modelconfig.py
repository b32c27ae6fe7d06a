"""The ``config`` of a ConfigMap entry: model metadata as OME's parser reports it (``pkg/modelagent/config_parser.go``
and ``pkg/hfutil/modelconfig``), built from the files of a model folder.

Invariants:
- the result is OME's ``ModelConfig`` as Go marshals it (Go field order, ``omitempty``; ``artifact`` always present),
  with :class:`~.entry.GoMap` for Go's maps, so :func:`~.entry.go_json` writes it byte for byte;
- nothing here writes; the config is found by a bounded walk (:data:`MAX_WALK_DEPTH`, :data:`MAX_WALK_ENTRIES`)
  that enters no symlinked folder and takes no file resolving outside ``model_dir``; shard names read from an
  index stay inside the folder (:mod:`.parameters`); of safetensors files only headers are read;
- hostile files never raise: a config OME could not load (:class:`~.godecode.BadConfig`, or nesting too deep for
  the interpreter) gives ``None`` (OME's parse error: no metadata), with one warning in the log.

Deliberate deviation from OME (harmless to consumers): the bounded walk returns the *first* ``config.json`` in
lexical order (OME's ``filepath.Walk`` + ``SkipDir`` on a file keeps walking and ends with the *last*).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .architectures import CONFIG_NAME, MODEL_INDEX_NAME, ModelFacts, model_facts
from .entry import GoMap
from .godecode import INT64_MAX, BadConfig
from .parameters import format_parameter_count

log = logging.getLogger(__name__)

MAX_WALK_DEPTH = 6
MAX_WALK_ENTRIES = 20_000

DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0, "half": 2.0,
               "int8": 1.0, "fp8": 1.0, "float8": 1.0, "e4m3": 1.0, "int4": 0.5, "4bit": 0.5}


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


def _capabilities(f: ModelFacts) -> list[str]:
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


def build_config(f: ModelFacts, artifact: dict[str, Any]) -> dict[str, Any]:
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
        facts = model_facts(path)
    except BadConfig as e:
        log.warning("%s: cannot read model metadata (%s); no metadata to report", path, e)
        return None
    except RecursionError:
        log.warning("%s: config nested too deeply; no metadata to report", path)
        return None
    return build_config(facts, artifact)
