"""Test models on disk, in the layouts real repositories use, written with the real ``safetensors`` library.

Invariants:
- every ``.safetensors`` file written here loads with ``safetensors.safe_open``;
- small shards go through ``safetensors.numpy.save_file``; large ones are streamed in the exact safetensors
  format (8-byte little-endian header length, JSON header padded to 8 bytes, tensor data) so memory stays
  bounded by :data:`STREAM_CHUNK` whatever the shard size;
- bytes are random (``numpy.random.Generator.bytes``, SFC64), seeded, so two calls with the same seed write the
  same files.

The header encoder and shard naming are :mod:`modelherd.testing.models`' (the numpy-free writer the demo uses).

Public helpers: :func:`make_sharded_model`, :func:`make_diffusers_model`, :func:`make_trtllm_model`,
:func:`write_safetensors_stream`, :func:`shard_name`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from modelherd.testing.models import safetensors_header, shard_name
from safetensors.numpy import save_file

KiB = 1024
MiB = 1024 * KiB
STREAM_CHUNK = 16 * MiB
# Shards at or below this size are written with safetensors' own save_file (whole tensors in memory).
SAVE_FILE_LIMIT = 8 * MiB
TENSORS_PER_SHARD = 4


def _rng(seed: int) -> np.random.Generator:
    # SFC64 makes random bytes ~1.6x faster than the default PCG64; quality is irrelevant here.
    return np.random.Generator(np.random.SFC64(seed))


def _json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def write_safetensors_stream(path: Path, tensors: list[tuple[str, int]], *, rng: np.random.Generator,
                             metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (name, byte length; dtype ``U8``, 1-D) as a safetensors file, streaming the data.

    Returns the file size. Memory use is one chunk of :data:`STREAM_CHUNK` bytes.
    """
    prefix = safetensors_header([(name, "U8", [nbytes], nbytes) for name, nbytes in tensors], metadata)
    offset = sum(nbytes for _, nbytes in tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(prefix)
        left = offset
        while left:
            n = min(left, STREAM_CHUNK)
            f.write(rng.bytes(n))
            left -= n
    return len(prefix) + offset


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _write_shard(path: Path, names: list[str], shard_bytes: int, rng: np.random.Generator) -> list[str]:
    """One shard holding ``shard_bytes`` of tensor data spread over ``names``; returns the names written."""
    sizes = _split(shard_bytes, len(names))
    pairs = [(n, s) for n, s in zip(names, sizes, strict=True) if s > 0]
    if shard_bytes <= SAVE_FILE_LIMIT:
        arrays: dict[str, np.ndarray] = {}
        for name, size in pairs:
            if size % 2 == 0:  # vary dtypes so verifiers check dtype x shape, not just bytes
                arrays[name] = np.frombuffer(rng.bytes(size), dtype=np.float16).reshape(2, size // 4) \
                    if size % 4 == 0 else np.frombuffer(rng.bytes(size), dtype=np.float16)
            else:
                arrays[name] = np.frombuffer(rng.bytes(size), dtype=np.uint8)
        save_file(arrays, str(path), metadata={"format": "pt"})
    else:
        write_safetensors_stream(path, pairs, rng=rng, metadata={"format": "pt"})
    return [n for n, _ in pairs]


def make_sharded_model(directory: Path, n_shards: int = 3, shard_bytes: int = 64 * KiB, *, with_index: bool = True,
                       config: bool = True, tokenizer: bool = True, seed: int = 0, stem: str = "model") -> list[Path]:
    """A Hugging Face transformers layout: shards + ``<stem>.safetensors.index.json`` + config/tokenizer.

    ``n_shards == 1`` without an index writes ``<stem>.safetensors``. Returns every file written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    single = n_shards == 1 and not with_index
    for i in range(1, n_shards + 1):
        fname = f"{stem}.safetensors" if single else shard_name(i, n_shards, stem)
        names = [f"model.layers.{i - 1}.w{j}.weight" for j in range(TENSORS_PER_SHARD)]
        p = directory / fname
        for name in _write_shard(p, names, shard_bytes, rng):
            weight_map[name] = fname
        total += shard_bytes
        written.append(p)
    if with_index:
        written.append(_json(directory / f"{stem}.safetensors.index.json",
                             {"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config:
        written.append(_json(directory / "config.json", {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                          "hidden_size": 64, "num_hidden_layers": n_shards}))
        written.append(_json(directory / "generation_config.json", {"do_sample": True, "temperature": 0.6}))
    if tokenizer:
        written.append(_json(directory / "tokenizer.json", {"version": "1.0", "model": {"type": "BPE", "vocab": {
            "a": 0, "b": 1}, "merges": []}}))
        written.append(_json(directory / "tokenizer_config.json", {"model_max_length": 4096}))
    return written


DIFFUSERS_COMPONENTS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
}


def make_diffusers_model(directory: Path, *, component_bytes: int = 32 * KiB, seed: int = 0) -> list[Path]:
    """A diffusers pipeline: ``model_index.json`` naming components, each a subfolder with config + weights.

    ``safety_checker`` is listed as ``[null, null]`` (absent on purpose, as real pipelines do).
    """
    directory = Path(directory)
    rng = _rng(seed)
    written = [_json(directory / "model_index.json", {"_class_name": "StableDiffusionPipeline",
                                                       "_diffusers_version": "0.30.0",
                                                       "safety_checker": [None, None], **DIFFUSERS_COMPONENTS})]
    for comp in DIFFUSERS_COMPONENTS:
        sub = directory / comp
        if comp == "scheduler":
            written.append(_json(sub / "scheduler_config.json", {"_class_name": "PNDMScheduler"}))
        elif comp == "tokenizer":
            written.append(_json(sub / "vocab.json", {"a": 0}))
            written.append(_json(sub / "tokenizer_config.json", {"model_max_length": 77}))
        else:
            written.append(_json(sub / "config.json", {"_class_name": DIFFUSERS_COMPONENTS[comp][1]}))
            stem = "model" if comp == "text_encoder" else "diffusion_pytorch_model"
            p = sub / f"{stem}.safetensors"
            _write_shard(p, [f"{comp}.t{j}" for j in range(2)], component_bytes, rng)
            written.append(p)
    return written


DEFAULT_TRT_SHAPES = ("H200x8", "H100x8", "A100x4")


def make_trtllm_model(directory: Path, shapes: list[str] | tuple[str, ...] = DEFAULT_TRT_SHAPES, *,
                      engine_bytes: int = 16 * KiB, seed: int = 0) -> list[Path]:
    """A TensorRT-LLM layout: ``engines/<shape>/rank<N>.engine`` + ``config.json`` per shape, plus
    shape-agnostic ``config.json`` / tokenizer files at the top. The rank count follows the shape's ``xN``.
    """
    directory = Path(directory)
    rng = _rng(seed)
    written = [_json(directory / "config.json", {"architecture": "LlamaForCausalLM"}),
               _json(directory / "tokenizer.json", {"version": "1.0"}),
               _json(directory / "tokenizer_config.json", {"model_max_length": 4096})]
    for shape in shapes:
        m = re.search(r"[x_-](\d+)$", shape.lower())
        count = int(m.group(1)) if m else 1
        sub = directory / "engines" / shape
        written.append(_json(sub / "config.json", {"build_config": {"max_batch_size": 8},
                                                    "pretrained_config": {"mapping": {"world_size": count}}}))
        for r in range(count):
            p = sub / f"rank{r}.engine"
            p.write_bytes(rng.bytes(engine_bytes))
            written.append(p)
    return written


def write_test_manifest(directory: Path, *, algo: str = "sha256", source_uri: str = "local:///test",
                        writer: str = "test") -> Path:
    """Write a completion manifest listing every file under ``directory`` with size and ``algo`` digest,
    as the engine's ``publish`` would."""
    from modelherd.storage.hashing import hash_file
    from modelherd.storage.manifest import MANIFEST_NAME, Manifest, ManifestFile, write_manifest

    directory = Path(directory)
    files = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            size = p.stat().st_size
            files.append(ManifestFile(path=p.relative_to(directory).as_posix(), size=size,
                                      checksums=hash_file(str(p), [algo], size) if algo else {}))
    return write_manifest(directory, Manifest(source_uri=source_uri, revision="main", files=tuple(files),
                                              writer=writer))
