"""Moved to :mod:`modelherd.testing.rangeserver`; this shim keeps ``from tests.rangeserver import ...`` and
``python -m tests.rangeserver pull SPEC.json`` working."""

from modelherd.testing.rangeserver import *  # noqa: F403
from modelherd.testing.rangeserver import Fault, RangeServer, RangeSource, files_to_json, main, make_model

__all__ = ["Fault", "RangeServer", "RangeSource", "files_to_json", "main", "make_model"]

if __name__ == "__main__":
    raise SystemExit(main())
