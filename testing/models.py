"""Generated models in the Hugging Face transformers layout, written without numpy (runtime dependencies only).

Invariants:
- every ``.safetensors`` file written here is in the exact safetensors format (8-byte little-endian header
  length, JSON header padded with spaces to a multiple of 8, tensor data in offset order without holes), so it
  loads with ``safetensors.safe_open`` and passes ``modelherd verify --deep`` once published;
- the ``*.safetensors.index.json`` names every tensor once and its ``total_size`` is the sum of the tensor bytes;
- bytes are seeded pseudo-random (:class:`random.Random`), so the same arguments always write the same files;
- memory stays bounded by :data:`STREAM_CHUNK` whatever the model size.

Public helpers: :func:`make_llama_model` (the demo's model), :func:`write_safetensors`, :func:`safetensors_header`,
:func:`random_chunks`, :func:`shard_name`.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DTYPE_BYTES", "STREAM_CHUNK", "GeneratedModel", "Tensor", "make_llama_model", "random_chunks",
           "safetensors_header", "shard_name", "write_safetensors"]

KiB = 1024
MiB = 1024 * KiB
STREAM_CHUNK = 16 * MiB
# Bytes per element of the dtypes this writer emits (the safetensors names).
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I64": 8}


@dataclass(frozen=True)
class Tensor:
    """One tensor to write: its name, safetensors dtype and shape (the data is generated)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class GeneratedModel:
    """What :func:`make_llama_model` wrote: every file, the bytes of tensor data and of all files."""

    directory: Path
    files: tuple[Path, ...]
    tensor_bytes: int
    total_bytes: int
    hidden_size: int


def random_chunks(size: int, *, seed: object = 0, chunk: int = STREAM_CHUNK) -> Iterator[bytes]:
    """``size`` seeded pseudo-random bytes in pieces of at most ``chunk`` bytes.

    ``seed`` is any value with a stable ``repr`` (an int, a string, a tuple of them): the same seed always yields
    the same bytes, on every machine and Python version that keeps :class:`random.Random`'s string seeding.
    """
    rng = random.Random(repr(seed))
    left = size
    while left > 0:
        n = min(left, chunk)
        yield rng.randbytes(n)
        left -= n


def safetensors_header(tensors: Sequence[tuple[str, str, Sequence[int], int]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors prefix for ``tensors`` given as (name, dtype, shape, byte length), laid out in order.

    Returns the 8-byte length plus the JSON header padded with spaces to a multiple of 8, exactly as
    ``safetensors.serialize`` writes it; the data of tensor ``i`` starts where tensor ``i - 1`` ended.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: Sequence[Tensor], *, seed: object = 0,
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` with seeded random data as one safetensors file; returns the file size.

    Memory use is one :data:`STREAM_CHUNK`. The file is written to ``path`` directly (parents created).
    """
    prefix = safetensors_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors],
                                {"format": "pt"} if metadata is None else metadata)
    data = sum(t.nbytes for t in tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(prefix)
        for block in random_chunks(data, seed=seed):
            f.write(block)
    return len(prefix) + data


def shard_name(i: int, n: int, stem: str = "model") -> str:
    """Hugging Face shard naming: ``model-00001-of-00003.safetensors`` (1-based)."""
    return f"{stem}-{i:05d}-of-{n:05d}.safetensors"


def _layer_tensors(layer: int, shard_bytes: int, hidden: int) -> list[Tensor]:
    """Attention projections ``[hidden, hidden]`` of one layer, plus an MLP matrix filling the rest of the shard."""
    prefix = f"model.layers.{layer}"
    out = [Tensor(f"{prefix}.self_attn.{p}_proj.weight", "BF16", (hidden, hidden)) for p in "qkvo"]
    rows = (shard_bytes - sum(t.nbytes for t in out)) // (2 * hidden)
    if rows > 0:
        out.append(Tensor(f"{prefix}.mlp.down_proj.weight", "BF16", (hidden, rows)))
    return out


def make_llama_model(directory: Path, *, total_bytes: int = 64 * MiB, shards: int = 8, seed: int = 0) -> GeneratedModel:
    """A Llama-shaped transformers model of about ``total_bytes`` of BF16 weights in ``shards`` shards.

    Writes ``model-0000i-of-0000n.safetensors`` (layer ``i - 1`` each: q/k/v/o projections of
    ``hidden_size x hidden_size`` and an MLP matrix taking up the rest), ``model.safetensors.index.json``,
    ``config.json`` and ``generation_config.json``. ``hidden_size`` is the largest multiple of 8 whose four
    projections fit a shard; the tensor data is within ``2 * hidden_size`` bytes per shard of the request.
    """
    if shards < 1:
        raise ValueError("shards must be >= 1")
    shard_bytes = total_bytes // shards
    hidden = max(8, math.isqrt(max(shard_bytes, 0) // 8) // 8 * 8)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    tensor_bytes = 0
    for i in range(1, shards + 1):
        name = shard_name(i, shards)
        tensors = _layer_tensors(i - 1, shard_bytes, hidden)
        write_safetensors(directory / name, tensors, seed=(seed, i))
        for t in tensors:
            weight_map[t.name] = name
        tensor_bytes += sum(t.nbytes for t in tensors)
        written.append(directory / name)
    heads = max(1, hidden // 64)
    documents: dict[str, object] = {
        "model.safetensors.index.json": {"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map},
        "config.json": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
                        "intermediate_size": hidden, "num_hidden_layers": shards, "num_attention_heads": heads,
                        "num_key_value_heads": heads, "vocab_size": 32000, "max_position_embeddings": 4096,
                        "torch_dtype": "bfloat16"},
        "generation_config.json": {"do_sample": True, "temperature": 0.6},
    }
    for fname, doc in documents.items():
        p = directory / fname
        p.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        written.append(p)
    return GeneratedModel(directory=directory, files=tuple(written), tensor_bytes=tensor_bytes,
                          total_bytes=sum(p.stat().st_size for p in written), hidden_size=hidden)
