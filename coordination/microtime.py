"""Kubernetes ``MicroTime`` (e.g. ``Lease.spec.renewTime``) as the API server accepts it.

The API server parses MicroTime with Go's layout ``2006-01-02T15:04:05.000000Z07:00``: the
six fractional digits are mandatory. Python's ``datetime.isoformat()`` -- which the
``kubernetes`` client uses when serializing -- drops the fraction when ``microsecond == 0``
and drops the offset for naive datetimes, and the server rejects both with 400 BadRequest
(see ``tests/integration/test_controlplane.py``). Always serialize through
:func:`format_microtime`.

The ``kubernetes`` client (v37, pydantic models) coerces strings and dicts into its typed models
before serializing, so passing ``format_microtime(...)`` as ``renew_time`` -- even inside a plain
dict body -- gets re-parsed and re-``isoformat``-ed. modelherd therefore never writes a Lease through
it: the Lease backends send raw JSON bodies (:mod:`~modelherd.coordination.leaseapi`), whose
MicroTime strings reach the server as :func:`format_microtime` wrote them. This module imports
nothing of ``kubernetes``.

Naive datetimes are **rejected** with :class:`ValueError` rather than guessed to be UTC or
local time: a lease timestamp in the wrong zone silently breaks expiry arithmetic, so the
caller must say which instant it means (``datetime.now(timezone.utc)``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["format_microtime", "now_microtime", "parse_microtime"]

_MICROTIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

# RFC 3339 date-time: fraction optional (any number of digits), offset Z or +hh:mm.
_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt](?P<time>\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<frac>\d+))?"
    r"(?P<tz>[Zz]|[+-]\d{2}:\d{2})$"
)


def format_microtime(dt: datetime) -> str:
    """Return ``dt`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC (always six fractional digits).

    Raises :class:`ValueError` for naive datetimes (no ``tzinfo``).
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt!r}: MicroTime needs an aware datetime (e.g. tz=UTC)")
    return dt.astimezone(UTC).strftime(_MICROTIME_FORMAT)


def now_microtime() -> str:
    """The current time, formatted by :func:`format_microtime`."""
    return format_microtime(datetime.now(UTC))


def parse_microtime(s: str) -> datetime:
    """Parse an RFC 3339 timestamp (as the API server returns MicroTime/Time) to an aware UTC datetime.

    Accepts any number of fractional digits (truncated to microseconds) and ``Z`` or a numeric
    offset. Raises :class:`ValueError` for anything else, including timestamps without an offset.
    """
    m = _RFC3339.match(s.strip())
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp with a UTC offset: {s!r}")
    frac = (m.group("frac") or "")[:6].ljust(6, "0")
    tz = m.group("tz")
    tz = "+00:00" if tz in ("Z", "z") else tz
    parsed = datetime.fromisoformat(f"{m.group('date')}T{m.group('time')}.{frac}{tz}")
    return parsed.astimezone(UTC)
