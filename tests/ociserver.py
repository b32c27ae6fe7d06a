"""Moved to :mod:`modelherd.testing.ociserver` (a loopback OCI Object Storage users can run too); this shim keeps
``from tests.ociserver import ...`` and ``python -m tests.ociserver`` working."""

from modelherd.testing.ociserver import *  # noqa: F403
from modelherd.testing.ociserver import CHUNK, Faults, OCIObjectServer, StoredObject, main

__all__ = ["CHUNK", "Faults", "OCIObjectServer", "StoredObject", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
