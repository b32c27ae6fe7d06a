"""Moved to :mod:`modelherd.testing.hubserver` (a loopback Hugging Face Hub users can run too); this shim keeps
``from tests.hubserver import ...`` and ``python -m tests.hubserver`` working."""

from modelherd.testing.hubserver import *  # noqa: F403
from modelherd.testing.hubserver import (
    CHUNK,
    DEFAULT_LFS_MIN_SIZE,
    Endpoint,
    Fault,
    GeneratedTree,
    HubFile,
    HubRepo,
    HubServer,
    RequestRecord,
    git_blob_sha1,
    lfs_pointer,
    main,
)

__all__ = ["CHUNK", "DEFAULT_LFS_MIN_SIZE", "Endpoint", "Fault", "GeneratedTree", "HubFile", "HubRepo", "HubServer",
           "RequestRecord", "git_blob_sha1", "lfs_pointer", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
