"""A model's parameter count as OME reports it: exact from safetensors headers, else OME's estimate from the config,
and OME's short form of it (``8.03B``).

Invariants:
- only the *headers* of safetensors files are read, each bounded by OME's own limit
  (:data:`OME_MAX_ST_HEADER`) and parsed by :func:`~modelherd.storage.verify.safetensors_header`; nothing outside
  the folder is read: shard names from an index go through :func:`~modelherd.storage.paths.contained`;
- where OME's counter returns an error, :func:`safetensors_parameter_count` raises :class:`NoParameterCount`
  (the caller then takes OME's fallback estimate), never another exception; counts stay within int64;
- the estimators compute with Go's int64 wrap-around, as OME's plain Go ints do.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ...storage.errors import ModelherdError
from ...storage.paths import contained
from ...storage.verify import safetensors_header
from .godecode import INT64_MAX, BadConfig, get_int, load_config, obj

ST_INDEX_NAME = "model.safetensors.index.json"  # the only index name OME's parameter counter looks for
OME_MAX_ST_HEADER = 10 * 1024 * 1024  # OME refuses safetensors headers above 10 MiB


class NoParameterCount(Exception):
    """No parameter count from safetensors headers (OME: an error, then its fallback estimate)."""


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
            raise NoParameterCount(f"{path.name}: header above {OME_MAX_ST_HEADER} bytes")
        header, _ = safetensors_header(path)
    except (OSError, ValueError, RecursionError) as e:
        raise NoParameterCount(f"{path.name}: {str(e)[:200]}") from None
    total = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict):
            raise NoParameterCount(f"{path.name}: tensor {name[:80]!r} is not an object")
        shape = t.get("shape")
        if shape is None or shape == []:
            continue
        if not isinstance(shape, list):
            raise NoParameterCount(f"{path.name}: tensor {name[:80]!r} has no shape list")
        count = 1
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise NoParameterCount(f"{path.name}: tensor {name[:80]!r} has a bad dimension")
            count *= dim
            if count > INT64_MAX:
                raise NoParameterCount(f"{path.name}: tensor {name[:80]!r} overflows int64")
        total += count
        if total > INT64_MAX:
            raise NoParameterCount(f"{path.name}: parameter count overflows int64")
    return total


def safetensors_parameter_count(directory: Path) -> int:
    """Exact element count of the safetensors weights in ``directory`` (OME's ``FindAndParseSafetensors``).

    With ``model.safetensors.index.json``: every shard its ``weight_map`` names; otherwise every ``*.safetensors``
    file of the folder. Reads headers only. Raises :class:`NoParameterCount` where OME returns an error.
    """
    index = directory / ST_INDEX_NAME
    total = 0
    if index.exists():
        try:
            weight_map = obj(load_config(index, sanitize=False)).get("weight_map")
        except BadConfig as e:
            raise NoParameterCount(f"{ST_INDEX_NAME}: {e}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise NoParameterCount(f"{ST_INDEX_NAME}: no weight_map")
        if not all(isinstance(s, str) and s for s in weight_map.values()):
            raise NoParameterCount(f"{ST_INDEX_NAME}: a shard name is empty or not a string")
        shards: list[Path] = []
        for shard in sorted(set(weight_map.values())):
            try:
                shards.append(contained(directory, shard, what="shard name"))
            except ModelherdError as e:
                raise NoParameterCount(str(e)) from None
    else:
        try:
            names = sorted(os.listdir(directory))
        except OSError as e:
            raise NoParameterCount(str(e)) from None
        shards = [directory / n for n in names if n.endswith(".safetensors")]
        if not shards:
            raise NoParameterCount(f"no .safetensors files in {directory}")
    for shard in shards:
        total += _shard_params(shard)
        if total > INT64_MAX:
            raise NoParameterCount("parameter count overflows int64")
    return total


def _i64(x: int) -> int:
    """Go's int64 wrap-around (OME's estimators use plain Go ints)."""
    return (x + 2**63) % 2**64 - 2**63


def estimate_generic(d: dict[str, Any]) -> int:
    """OME's generic estimate from the integers its generic loader read (``d``: field name → value)."""
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


def estimate_llama(d: dict[str, Any]) -> int:
    """OME's llama loader's estimate from a ``config.json`` (known sizes by shape, else a formula)."""
    h, layers, inter = get_int(d, "hidden_size"), get_int(d, "num_hidden_layers"), get_int(d, "intermediate_size")
    if (h, layers) in _LLAMA_KNOWN:
        return _LLAMA_KNOWN[(h, layers)]
    if inter == 0:
        inter = h * 8 // 3
    n = _i64(h * 32000 + layers * (3 * h * h + h) + layers * (h * inter * 2 + h + inter) + layers * 2 * h)
    return int(n / 1_000_000_000) * 1_000_000_000 if n >= 0 else -(-n // 1_000_000_000) * 1_000_000_000
