"""Which lease belongs to which model: names, labels and annotation keys.

Invariant: the lease name is a valid DNS-1123 label (``[a-z0-9-]``, at most 63 characters, alphanumeric at
both ends) and a pure function of the model's identity (source URI + revision + destination + the filesystem's
id from :mod:`modelherd.storage.fsid`), so every node that wants the same model into the same folder of the same
filesystem computes the same name, whatever characters the URI holds, and two filesystems mounted at one path get
one lease (one download, one removal, one repair) each.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "modelherd"
MODEL_KEY_LABEL = "modelherd.io/model-key"
FILESYSTEM_LABEL = "modelherd.io/filesystem"

ANNOTATION_PREFIX = "modelherd.io/"
A_SOURCE = ANNOTATION_PREFIX + "source"
A_DEST = ANNOTATION_PREFIX + "destination"
A_PHASE = ANNOTATION_PREFIX + "phase"
A_BYTES_DONE = ANNOTATION_PREFIX + "bytes-done"
A_BYTES_TOTAL = ANNOTATION_PREFIX + "bytes-total"
A_UPDATED = ANNOTATION_PREFIX + "updated"
A_STAGING = ANNOTATION_PREFIX + "staging"
A_MESSAGE = ANNOTATION_PREFIX + "message"
A_FILESYSTEM = ANNOTATION_PREFIX + "filesystem"

_MAX_NAME = 63
_HASH_LEN = 12
_NOT_DNS = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two pulls "the same download": the source, its revision, the destination folder and the
    filesystem holding it (``""``: unknown, a read-only root nobody has named yet)."""

    source_uri: str
    revision: str
    dest: str
    filesystem: str = ""

    @property
    def key(self) -> str:
        """A short stable hash of the identity (also a valid label value)."""
        parts = (self.source_uri, self.revision, self.dest) + ((self.filesystem,) if self.filesystem else ())
        blob = "\x00".join(parts).encode()
        return hashlib.sha256(blob).hexdigest()[:_HASH_LEN * 2]

    @property
    def lease_name(self) -> str:
        """``mh-<readable tail>-<hash>``: DNS-1123, at most 63 characters."""
        tail = self.source_uri.split("://", 1)[-1].split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        slug = _NOT_DNS.sub("-", tail.lower()).strip("-")
        budget = _MAX_NAME - len("mh-") - 1 - _HASH_LEN
        slug = slug[:budget].strip("-") or "model"
        return f"mh-{slug}-{self.key[:_HASH_LEN]}"

    def labels(self) -> dict[str, str]:
        labels = {MANAGED_BY_LABEL: MANAGED_BY, MODEL_KEY_LABEL: self.key}
        if self.filesystem:
            labels[FILESYSTEM_LABEL] = self.filesystem
        return labels
