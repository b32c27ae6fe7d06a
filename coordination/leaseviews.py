"""A printable view of modelherd leases (``modelherd leases``), for either backend."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import LeaseRecord

__all__ = ["LeaseView", "format_leases", "view_of"]


@dataclass(frozen=True)
class LeaseView:
    """Who downloads what, and how far it got. ``holder`` is empty once released."""

    name: str
    holder: str
    phase: str
    bytes_done: int
    bytes_total: int
    transitions: int
    source: str
    dest: str
    updated: str
    message: str = ""
    filesystem: str = ""

    @property
    def percent(self) -> float | None:
        return 100.0 * self.bytes_done / self.bytes_total if self.bytes_total > 0 else None


def view_of(record: LeaseRecord) -> LeaseView:
    return LeaseView(name=record.name, holder=record.holder, phase=record.phase,
                     bytes_done=record.status.bytes_done, bytes_total=record.status.bytes_total,
                     transitions=record.transitions, source=record.source, dest=record.dest,
                     updated=record.updated or record.renew_time, message=record.status.message,
                     filesystem=record.filesystem)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def format_leases(rows: list[LeaseView]) -> str:
    """A fixed-column table, one lease per line; ``(none)`` when empty."""
    if not rows:
        return "no modelherd leases"
    header = ("NAME", "HOLDER", "PHASE", "PROGRESS", "TRANSITIONS", "UPDATED", "SOURCE", "DEST", "FILESYSTEM")
    table = [header]
    for r in rows:
        pct = r.percent
        progress = (f"{_size(r.bytes_done)}/{_size(r.bytes_total)}" + (f" {pct:.0f}%" if pct is not None else "")
                    if r.bytes_total else "-")
        table.append((r.name, r.holder or "-", r.phase or "-", progress, str(r.transitions), r.updated or "-",
                      r.source, r.dest, r.filesystem[:8] or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)
