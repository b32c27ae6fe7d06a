"""Durations as OME and Go write them (``30s``, ``10m``, ``1h30m``, ``500ms``, ``1.5h``), in seconds.

``parse_duration`` accepts Go's ``time.ParseDuration`` grammar — one or more ``<decimal><unit>`` parts,
units ``ns``, ``us`` (or ``µs``/``μs``), ``ms``, ``s``, ``m``, ``h``, case-sensitive, an optional leading
``+`` — and, unlike Go, plain numbers and numeric strings, which are seconds (``"90"``, ``2.5``). Zero is
allowed; negative values, an empty string, unknown units (``1d``: Go has no days), a NaN or infinite
number and anything longer than Go's limit (2**63 - 1 ns, about 292 years) raise ``ValueError`` naming the
value. Each ``<decimal><unit>`` part is truncated to whole nanoseconds and the parts are summed, as Go
does; a plain number is rounded to the nearest nanosecond (so ``0.3`` is 300 ms, not 299.999999 ms).

``format_duration`` writes the short form of Go's ``Duration.String``: zero parts are left out
(``10m`` rather than Go's ``10m0s``, ``1h30m`` rather than ``1h30m0s``), under a second it is ``ms``,
``µs`` or ``ns`` (``500ms``), and fractions are trimmed (``1.5s``). Its output parses back to the same
nanosecond, with this parser and with Go's.

``Duration`` is the pydantic field type: ``Annotated[float, BeforeValidator(parse_duration)]``, so a
settings field accepts ``"10m"`` from a flag or the environment and holds seconds. This module imports
pydantic (about 40 ms); ``cli.py`` imports it only where it needs it.

Not ``durationpy`` (installed with ``kubernetes``): it accepts units Go refuses (``d``, ``w``, ``y``, and
``mm`` for months) and writes ``us``, so values it accepts would not be portable to OME.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["Duration", "format_duration", "parse_duration"]

_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_NS_PER_S = 1_000_000_000
_MAX_NS = 2**63 - 1
_MAX_S = _MAX_NS / _NS_PER_S
_UNITS = "|".join(sorted(_NS_PER_UNIT, key=len, reverse=True))
# A decimal needs a digit on one side of the point: "1", "1.", ".5", "1.5" (Go's rule); "." alone is not.
_DECIMAL = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_PART_RE = re.compile(rf"({_DECIMAL})({_UNITS})")
_GO_DURATION_RE = re.compile(rf"(?:{_DECIMAL}(?:{_UNITS}))+")
_NUMBER_RE = re.compile(rf"\+?{_DECIMAL}")

_HINT = "a duration like 30s, 10m, 1h30m, 500ms, or a number of seconds"


def _seconds_from_ns(ns: int, shown: object) -> float:
    """``ns`` in seconds; the limit is compared as a float, so that every result formats and parses back."""
    seconds = ns / _NS_PER_S
    if seconds > _MAX_S:
        raise ValueError(f"duration {shown!r} is too long (at most about 292 years)")
    return seconds


def parse_duration(value: str | int | float) -> float:
    """Seconds for ``value`` (see the module docstring for what is accepted).

    Invariant: the result is finite, ``>= 0``, the float nearest a whole number of nanoseconds, and at most
    Go's largest Duration (compared as floats); anything else raises ``ValueError`` whose message quotes
    ``value``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"duration {value!r} is not understood (expected {_HINT})")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"duration {value!r} is not finite")
        if value < 0:
            raise ValueError(f"duration {value!r} is negative (expected {_HINT})")
        return _seconds_from_ns(round(Fraction(value) * _NS_PER_S), value)
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"duration {value!r} is negative (expected {_HINT})")
    if _NUMBER_RE.fullmatch(text):
        return _seconds_from_ns(round(Fraction(text.lstrip("+")) * _NS_PER_S), value)
    body = text[1:] if text.startswith("+") else text
    if not body or not _GO_DURATION_RE.fullmatch(body):
        raise ValueError(f"duration {value!r} is not understood (expected {_HINT}; units ns, us, ms, s, m, h)")
    # Go truncates each part to whole nanoseconds before it sums them (1.5ns + 1.5ns is 2ns).
    total = sum(math.floor(Fraction(number) * _NS_PER_UNIT[unit]) for number, unit in _PART_RE.findall(body))
    return _seconds_from_ns(total, value)


def _trim(whole: int, frac: int, digits: int) -> str:
    """``whole.frac`` with ``frac`` zero-padded to ``digits`` digits, trailing zeros (and a bare point) dropped."""
    if not frac:
        return str(whole)
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


def format_duration(seconds: float) -> str:
    """The short Go form of ``seconds``, rounded to the nanosecond: ``0s``, ``750ms``, ``1.5s``, ``10m``, ``1h30m``.

    Invariant: ``parse_duration(format_duration(s)) == s`` for every ``s`` that ``parse_duration`` can return.
    A negative value is written with a leading ``-`` (for display; ``parse_duration`` refuses it).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"cannot format duration {seconds!r}: a finite number of seconds is needed")
    ns = round(Fraction(seconds) * _NS_PER_S)
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns // 1_000, ns % 1_000, 3)}µs"
    if ns < _NS_PER_S:
        return f"{sign}{_trim(ns // 1_000_000, ns % 1_000_000, 6)}ms"
    hours, rest = divmod(ns, _NS_PER_UNIT["h"])
    minutes, rest = divmod(rest, _NS_PER_UNIT["m"])
    out = sign
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if rest:
        out += f"{_trim(rest // _NS_PER_S, rest % _NS_PER_S, 9)}s"
    return out


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A settings field in seconds that also accepts ``"10m"``, ``"1h30m"``, ``"90"``; see ``parse_duration``."""
