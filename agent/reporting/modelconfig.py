"""The ``config`` object of a Ready model's ConfigMap entry (OME's ``ModelConfig``), read once per published copy.

Invariants: a model's files are parsed once per (model, destination, publish) — a republish (new revision or
completion time) reads them again, an unchanged copy never; reading the metadata is best effort: a failure is
logged and reported as no config, never as a failure of the model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ...storage.manifest import Manifest
from ..basemodels import ModelRef, ModelSpec
from ..ome.modelconfig import parse_model_config

log = logging.getLogger("modelherd.agent")


class ModelConfigs:
    """A cache of parsed model metadata, keyed by model, destination and publish."""

    def __init__(self) -> None:
        self._cache: dict[tuple[ModelRef, str, str], dict[str, Any] | None] = {}
        self._lock = threading.Lock()

    def config(self, ref: ModelRef, spec: ModelSpec, manifest: Manifest | None) -> dict[str, Any] | None:
        """The ``config`` for ``spec`` published with ``manifest`` (``None``: ``local://``, verified in place)."""
        assert spec.dest is not None and spec.uri is not None
        stamp = (manifest.revision + manifest.completed_at) if manifest else "local"
        key = (ref, str(spec.dest), stamp)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        sha = manifest.revision if (manifest is not None and spec.uri.scheme == "hf") else None
        try:
            config = parse_model_config(spec.dest, configmap_key=ref.cm_key, dest=str(spec.dest), sha=sha,
                                        skip=spec.skip_config)
        except Exception:  # metadata is best effort; it never fails a Ready model
            log.warning("%s: reading the model's metadata failed", ref.display, exc_info=True)
            config = None
        with self._lock:
            self._cache[key] = config
        return config

    def forget(self, ref: ModelRef) -> None:
        """``ref`` left the node: its cached metadata goes too."""
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != ref}
