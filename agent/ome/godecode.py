"""Reading a model's JSON files (``config.json``, ``model_index.json``, a safetensors index) as OME's Go decoder
reads them into its structs.

Invariants:
- :func:`load_config` reads through :func:`~modelherd.storage.untrusted.read_limited` and
  :func:`~modelherd.storage.untrusted.load_json` (the one parser of untrusted JSON): at most
  :data:`MAX_CONFIG_BYTES`, regular files only, bounded nesting and integer length; every failure, whatever the
  file holds, is one :class:`BadConfig` (OME's parse error: no metadata), never another exception;
- the typed reads follow Go's decoding rules: an absent or ``null`` field is the zero value, a field of the wrong
  JSON type (a string for an int, ``4096.0`` for an int, an int beyond int64) fails the whole decode.

Deliberate deviation from OME (harmless to consumers): a document nested more than
:data:`~modelherd.storage.untrusted.MAX_DEPTH` levels deep or holding an integer of more than
:data:`~modelherd.storage.untrusted.MAX_INT_DIGITS` digits is refused as a whole, where Go would skip the fields
its struct does not name; no model configuration holds either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...storage.untrusted import UntrustedInputError, load_json, read_limited

MAX_CONFIG_BYTES = 16 * 1024 * 1024  # config.json, model_index.json, safetensors index
INT64_MAX = 2**63 - 1

# OME's rewrite of Python's non-JSON constants before its generic loader decodes a config (Go's regexp ``\s`` is
# ASCII whitespace, as a bytes pattern's is).
_SANITIZE = [(re.compile(rb"([:,\[]\s*)-Infinity(\s*[,\]\}])"), rb"\g<1>-1e308\g<2>"),
             (re.compile(rb"([:,\[]\s*)Infinity(\s*[,\]\}])"), rb"\g<1>1e308\g<2>"),
             (re.compile(rb"([:,\[]\s*)NaN(\s*[,\]\}])"), rb"\g<1>null\g<2>")]


class BadConfig(Exception):
    """OME's loader would fail on this file (its JSON decoder or its ``Validate``): no metadata."""


def load_config(path: Path, *, sanitize: bool) -> Any:
    """The JSON document at ``path``; ``sanitize`` applies OME's Infinity/NaN rewrite first. Raises
    :class:`BadConfig`."""
    try:
        raw = read_limited(path, max_bytes=MAX_CONFIG_BYTES)
        if sanitize:
            for pattern, repl in _SANITIZE:
                raw = pattern.sub(repl, raw)
        return load_json(raw, max_bytes=MAX_CONFIG_BYTES)
    except (OSError, UntrustedInputError) as e:
        raise BadConfig(f"{type(e).__name__}: {str(e)[:200]}") from None


def obj(v: Any) -> dict[str, Any]:
    """``v`` as a JSON object, or :class:`BadConfig`."""
    if not isinstance(v, dict):
        raise BadConfig("not a JSON object")
    return v


def get_int(d: dict[str, Any], key: str) -> int:
    """A Go ``int`` field (int64)."""
    v = d.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise BadConfig(f"{key}: {str(v)[:40]!r} is not an int")
    return v


def get_float(d: dict[str, Any], key: str) -> float:
    """A Go ``float64`` field."""
    v = d.get(key)
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadConfig(f"{key}: not a number")
    try:
        return float(v)
    except OverflowError:
        raise BadConfig(f"{key}: out of float64 range") from None


def get_str(d: dict[str, Any], key: str) -> str:
    """A Go ``string`` field."""
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise BadConfig(f"{key}: not a string")
    return v


def get_sub(d: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A pointer-to-struct field: ``None`` when absent or ``null``."""
    v = d.get(key)
    if v is None:
        return None
    return obj(v)


def get_strings(d: dict[str, Any], key: str) -> list[str]:
    """A Go ``[]string`` field (a ``null`` item is ``""``)."""
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(x is None or isinstance(x, str) for x in v):
        raise BadConfig(f"{key}: not a list of strings")
    return [x or "" for x in v]
