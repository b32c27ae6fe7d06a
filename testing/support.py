"""Small helpers shared by the loopback servers."""

from __future__ import annotations

__all__ = ["parse_range"]


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` as ``[start, end)``; ``None`` when unsatisfiable.

    Invariant: a returned ``(start, end)`` always satisfies ``0 <= start < end <= size``; a multi-range, another
    unit or anything unparsable is ``None`` (the caller answers 416).
    """
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    a, _, b = spec.strip().partition("-")
    try:
        if a == "":
            n = int(b)
            return (max(0, size - n), size) if n > 0 and size > 0 else None
        start = int(a)
        end = int(b) + 1 if b else size
    except ValueError:
        return None
    end = min(end, size)
    if start >= size or start >= end:
        return None
    return start, end
