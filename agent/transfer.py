"""Transfer settings -> the storage layer: engine options, the retry policy, a model's source, the GPU shape.

The CLI's ``pull`` and the node agent's reconciler move bytes the same way; this module is the one place that
turns :class:`~.settings.TransferSettings` into what ``storage/`` takes, so the two never drift apart.

Invariants:
- every function takes the transfer group only (never the whole :class:`~.settings.Settings`);
- ``direct_io=auto`` is resolved by the one rule in :func:`storage.directio.resolve_direct_io`, from the storage
  mode in force (the operator's ``--storage-mode`` included);
- the GPU shape is a fact of the process: NVML is initialised and the instance-type map parsed at most once per
  (shape setting, instance type, map) — :func:`gpu_shape` caches the answer, not the error.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..storage import gpu
from ..storage.directio import resolve_direct_io
from ..storage.errors import ConfigError
from ..storage.options import EngineOptions
from ..storage.retry import RetryPolicy
from ..storage.sources import open_source
from ..storage.types import Listing, Source
from ..storage.uri import ModelURI
from .settings import TransferSettings

__all__ = ["engine_options", "filter_for_shape", "gpu_shape", "open_model_source", "retry_policy"]

log = logging.getLogger("modelherd.pull")


def retry_policy(transfer: TransferSettings) -> RetryPolicy:
    """Retries, back-off and the cap on a server's ``Retry-After`` of every request of a pull."""
    return RetryPolicy(retries=transfer.download_retry, backoff_s=transfer.retry_backoff_s,
                       backoff_max_s=transfer.retry_backoff_max_s, retry_after_max_s=transfer.retry_after_max_s)


def engine_options(transfer: TransferSettings, storage_kind: str) -> EngineOptions:
    """The engine's knobs for a pull into storage of ``storage_kind`` (``local`` or ``shared``, the mode in
    force)."""
    return EngineOptions(
        concurrency=transfer.concurrency,
        multipart_concurrency=transfer.multipart_concurrency,
        multipart_threshold=transfer.multipart_threshold,
        part_size=transfer.part_size,
        retry=retry_policy(transfer),
        fsync=transfer.fsync,
        direct_io="on" if resolve_direct_io(transfer.direct_io, storage_kind) else "off",
    )


def open_model_source(uri: ModelURI, transfer: TransferSettings, *, hf_token: str | None, trust_loopback: bool,
                      oci_auth: str | None = None, oci_region: str | None = None,
                      registry_auth: Mapping[str, Any] | None = None, http_token: str | None = None,
                      allow: list[str] | None = None, ignore: list[str] | None = None,
                      cancel: threading.Event | None = None) -> Source:
    """The source of ``uri``. ``hf_token``, ``registry_auth`` (a parsed docker config) and ``http_token`` are what
    the caller resolved through the one chain (agent/lifecycle/credentials.py), never read here;
    ``oci_auth``/``oci_region`` override the transfer settings' when given (a CR's own). Plain HTTP, registry
    mirrors: the transfer settings'. ``trust_loopback``: plain HTTP may go to this machine's loopback without the
    operator listing it — the CLI's pull (whoever runs it owns the machine), never a CR's (a tenant's URI must not
    reach the node's own services). ``cancel`` ends the source's own back-offs (the listing's) at once."""
    return open_source(
        uri,
        hf_token=hf_token,
        hf_endpoint=transfer.hf_endpoint,
        allow_patterns=allow,
        ignore_patterns=ignore,
        oci_auth=oci_auth or transfer.oci_auth,
        oci_config_file=str(transfer.oci_config_file),
        oci_profile=transfer.oci_profile,
        oci_region=oci_region or transfer.oci_region,
        oci_endpoint=transfer.oci_endpoint,
        registry_auth=registry_auth,
        insecure_registries=transfer.insecure_registries,
        registry_mirrors=dict(transfer.registry_mirrors),
        http_token=http_token,
        http_insecure_hosts=transfer.http_insecure_hosts,
        trust_loopback=trust_loopback,
        retry=retry_policy(transfer),
        pool_maxsize=max(32, transfer.concurrency * transfer.multipart_concurrency),
        cancel=cancel,
    )


def gpu_shape(transfer: TransferSettings, *, instance_type: str = "") -> gpu.GpuShape | None:
    """This node's GPU shape per ``transfer.gpu_shape``: ``auto`` (NVML, then the instance-type map with
    ``instance_type``, else ``transfer.instance_type``), ``none`` (no filtering: ``None``) or a literal shape.
    Detected once per process and argument set."""
    return _shape(transfer.gpu_shape, instance_type or transfer.instance_type, transfer.instance_type_map)


@functools.cache
def _shape(spec: str, instance_type: str, instance_type_map: str | None) -> gpu.GpuShape | None:
    if spec == "none":
        return None
    if spec != "auto":
        return gpu.parse_shape(spec)
    type_map = gpu.load_instance_type_map(instance_type_map) if instance_type_map else None
    return gpu.detect_gpu_shape(instance_type=instance_type, instance_type_map=type_map)


def filter_for_shape(listing: Listing, transfer: TransferSettings, *, instance_type: str = "") -> Listing:
    """Keep only the TensorRT-LLM engines for this node's GPU shape (no-op for other layouts, and for
    ``gpu_shape=none``)."""
    if not gpu.is_trtllm_layout(f.path for f in listing.files):
        return listing
    shape = gpu_shape(transfer, instance_type=instance_type)
    if shape is None:
        if transfer.gpu_shape == "none":
            return listing
        raise ConfigError("this model has per-GPU-shape TensorRT-LLM engines but no GPU shape could be detected",
                          hint="pass --gpu-shape H200x8 (or set the node's instance type), or --gpu-shape none")
    kept = gpu.trtllm_filter(list(listing.files), shape)
    log.info("TensorRT-LLM layout: keeping %d of %d files for GPU shape %s", len(kept), len(listing.files),
             shape.name)
    return replace(listing, files=tuple(kept))
