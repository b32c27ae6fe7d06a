"""ConfigMap entry values (OME's ``ModelEntry``) and a serializer that writes JSON as Go's ``json.Marshal`` does.

Invariants:
- :func:`go_json` output is what ``encoding/json.Marshal`` produces for the same Go value: compact; object keys in
  the order given for a plain ``dict`` (a Go struct, or an object read back from JSON, whose order is already the
  stored one), sorted for a :class:`GoMap` (a Go ``map``); ``<``, ``>``, ``&``, U+2028, U+2029 escaped; other
  non-ASCII kept as UTF-8; ``float`` formatted as Go formats a float64, ``int`` as an integer of any size;
- :func:`render_entry` never drops a field it does not own: unknown fields of the previous value (later OME
  versions add ``modelUID`` and others) survive, in their previous order, after OME's own fields;
- ``progress`` is never present on a ``Ready`` or ``Failed`` entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, Final, Literal

from .states import ModelStatus

EntryStatus = Literal[ModelStatus.READY, ModelStatus.UPDATING, ModelStatus.FAILED]
"""The ``status`` an entry is written with (OME's agent never writes ``Deleted``: it removes the key)."""
STATUS_READY: Final[EntryStatus] = ModelStatus.READY
STATUS_UPDATING: Final[EntryStatus] = ModelStatus.UPDATING
STATUS_FAILED: Final[EntryStatus] = ModelStatus.FAILED

# OME's ModelEntry fields, in Go struct order; every other top-level field is preserved or set through ``extra``.
OME_FIELDS: Final = ("name", "status", "config", "progress")
# Where the agent records its own data in an entry (a name OME's decoder ignores and will not reuse).
MODELHERD_FIELD: Final = "modelherd"

UINT64_MAX: Final = 2**64 - 1
UINT32_MAX: Final = 2**32 - 1


class GoMap(dict[str, Any]):
    """A JSON object that Go holds as a ``map``: :func:`go_json` writes its keys sorted (Go sorts map keys)."""


class _Keep(Enum):
    KEEP = "keep"


KEEP: Final = _Keep.KEEP
"""Default of :func:`render_entry`'s ``config`` and ``progress``: keep what the previous value had."""

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_string(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate is not valid UTF-8: Go writes U+FFFD
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_float(f: float) -> str:
    """``f`` as Go's ``encoding/json`` writes a float64: shortest round-trip digits, no exponent for
    1e-6 <= |f| < 1e21, else Go's ``e`` form with the ``e-07`` → ``e-7`` clean-up. NaN and ±Inf raise ``ValueError``
    (Go's ``UnsupportedValueError``)."""
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"json: unsupported value: {f!r}")
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    sign, digits, exp = Decimal(repr(f)).as_tuple()
    assert isinstance(exp, int)
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    exp += len("".join(map(str, digits))) - len(ds)  # value = ds * 10**exp
    neg = "-" if sign else ""
    if 1e-6 <= abs(f) < 1e21:
        if exp >= 0:
            return f"{neg}{ds}{'0' * exp}"
        point = len(ds) + exp
        if point > 0:
            return f"{neg}{ds[:point]}.{ds[point:]}"
        return f"{neg}0.{'0' * -point}{ds}"
    sci = exp + len(ds) - 1
    mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
    # Go writes at least two exponent digits, then trims the zero of e-0X; positive exponents here are >= 21.
    return f"{neg}{mant}e-{-sci}" if sci < 0 else f"{neg}{mant}e+{sci:02d}"


def go_json(obj: Any) -> str:
    """Serialize ``obj`` as Go's ``json.Marshal`` would the corresponding Go value (see the module docstring).

    ``None`` → ``null``, ``bool``, ``int`` (exact, any size), ``float`` (:func:`go_float`), ``str``, ``list``/``tuple``,
    ``dict`` (given order: a struct), :class:`GoMap` (sorted keys: a map). Anything else raises ``TypeError``.
    """
    parts: list[str] = []
    _encode(obj, parts)
    return "".join(parts)


def _encode(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        out.append(go_float(obj))
    elif isinstance(obj, str):
        out.append(_go_string(obj))
    elif isinstance(obj, dict):
        items = sorted(obj.items()) if isinstance(obj, GoMap) else obj.items()
        out.append("{")
        for i, (k, v) in enumerate(items):
            if not isinstance(k, str):
                raise TypeError(f"json object keys must be str, not {type(k).__name__}")
            if i:
                out.append(",")
            out.append(_go_string(k))
            out.append(":")
            _encode(v, out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(",")
            _encode(v, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as Go JSON")


def rfc3339_utc(when: datetime | float) -> str:
    """``2026-05-06T10:15:30Z``: whole seconds, UTC, as Go's ``time.Now().Format(time.RFC3339)`` on a UTC clock."""
    dt = datetime.fromtimestamp(when, UTC) if isinstance(when, int | float) else when.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DownloadProgress:
    """OME's ``DownloadProgress``; byte counts are uint64, file counts uint32 (checked), speed a float64."""

    phase: str  # "scanning" | "downloading" | "finalizing"
    total_bytes: int
    completed_bytes: int
    total_files: int
    completed_files: int
    speed_bytes_per_sec: float
    last_updated: str  # RFC 3339 UTC, see rfc3339_utc

    def __post_init__(self) -> None:
        for field, top in (("total_bytes", UINT64_MAX), ("completed_bytes", UINT64_MAX),
                           ("total_files", UINT32_MAX), ("completed_files", UINT32_MAX)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                raise ValueError(f"DownloadProgress.{field} must be an integer in [0, {top}], got {v!r}")
        if not math.isfinite(self.speed_bytes_per_sec):
            raise ValueError("DownloadProgress.speed_bytes_per_sec must be finite")

    def to_go(self) -> dict[str, Any]:
        """The Go struct as a dict: Go's JSON names, Go's field order, integers as ``int``, speed as ``float``."""
        return {"phase": self.phase, "totalBytes": self.total_bytes, "completedBytes": self.completed_bytes,
                "totalFiles": self.total_files, "completedFiles": self.completed_files,
                "speedBytesPerSec": float(self.speed_bytes_per_sec), "lastUpdated": self.last_updated}


def parse_entry(value: str) -> dict[str, Any] | None:
    """The entry as a dict (key order as stored), or ``None`` when ``value`` is not a JSON object.

    Hostile values (deep nesting, numbers of thousands of digits, NaN) give ``None``, never an exception.
    """
    try:
        obj = json.loads(value, parse_constant=_reject_constant)
    except (ValueError, RecursionError, TypeError):
        return None
    return obj if isinstance(obj, dict) else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def render_entry(previous: str | None, *, name: str, status: EntryStatus,
                 config: dict[str, Any] | _Keep | None = KEEP,
                 progress: DownloadProgress | _Keep | None = KEEP,
                 extra: Mapping[str, Any] | None = None) -> str:
    """The new value of one ConfigMap key, merged over ``previous`` (its current value; ``None`` or invalid → fresh).

    - ``name`` and ``status`` are always set; ``config``: a dict replaces it, ``None`` removes it, :data:`KEEP` keeps
      the previous one (dropped if it was not an object, as Go could not decode it);
    - ``progress``: removed on Ready/Failed whatever is passed; otherwise set, removed (``None``) or kept (KEEP);
    - ``extra`` sets further top-level fields (the agent's own go under :data:`MODELHERD_FIELD`); it may not name
      one of OME's fields;
    - order: ``name, status, config, progress`` (Go's), then the other fields in their previous order, then new ones.
    """
    prev = parse_entry(previous) if previous is not None else None
    prev = prev or {}
    out: dict[str, Any] = {"name": name, "status": status}
    if config is KEEP:
        kept = prev.get("config")
        if isinstance(kept, dict):
            out["config"] = kept
    elif config is not None:
        out["config"] = config
    if status == STATUS_UPDATING:
        if progress is KEEP:
            kept = prev.get("progress")
            if isinstance(kept, dict):
                out["progress"] = kept
        elif isinstance(progress, DownloadProgress):
            out["progress"] = progress.to_go()
    for k, v in prev.items():
        if k not in OME_FIELDS:
            out[k] = v
    for k, v in (extra or {}).items():
        if k in OME_FIELDS:
            raise ValueError(f"extra may not set OME's field {k!r}")
        out[k] = v
    return go_json(out)
