"""Start-up of the one-shot CLI: Python's cyclic garbage collector is paused while modules load.

Importing pydantic, huggingface_hub and the sources allocates hundreds of thousands of long-lived objects;
with the collector on, CPython 3.11 walks them again and again during the imports (about 0.1 s of a pull that
the user waits for before the first byte). Nothing of that is garbage, so the collector is paused from
:func:`pause` until :func:`resume`, which freezes what was loaded (later collections skip it) and turns the
collector back on. Invariant: :func:`resume` turns the collector on only if :func:`pause` turned it off.
"""

from __future__ import annotations

import gc

__all__ = ["pause", "resume"]

_paused = False


def pause() -> None:
    """Turn the collector off if it is on (idempotent)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """End the start-up: freeze the objects loaded so far and turn the collector back on (idempotent)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
