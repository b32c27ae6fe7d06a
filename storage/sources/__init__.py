"""Sources: where model bytes come from. :func:`open_source` picks one by URI scheme.

Invariant: the returned object implements :class:`modelherd.storage.types.Source`; the source modules
(and their SDKs) are imported only when a URI of their scheme is opened.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import BadURIError
from ..retry import RetryPolicy
from ..types import Source
from ..uri import ModelURI
from .origins import HostPolicy

DEFAULT_RETRY = RetryPolicy()


def open_source(
    uri: ModelURI,
    *,
    hf_token: str | None = None,
    hf_endpoint: str = "https://huggingface.co",
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
    oci_auth: str = "auto",
    oci_config_file: str = "~/.oci/config",
    oci_profile: str = "DEFAULT",
    oci_region: str = "",
    oci_endpoint: str = "",
    registry_auth: Mapping[str, Any] | str | Path | None = None,
    insecure_registries: Sequence[str] = (),
    registry_mirrors: Mapping[str, str] | None = None,
    http_token: str | None = None,
    http_insecure_hosts: Sequence[str] = (),
    trust_loopback: bool = True,
    retry: RetryPolicy = DEFAULT_RETRY,
    pool_maxsize: int = 32,
    cancel: threading.Event | None = None,
) -> Source:
    """The source for ``uri``: ``HFSource``, ``OCISource``, ``HTTPSource`` (``https://``/``http://``, plain
    http only to ``http_insecure_hosts``) or ``LocalSource``; each gets only its options.

    ``oci://HOST/REPO:TAG`` registry artifacts get ``RegistrySource`` with ``registry_auth`` (a docker config: a
    mapping, a ``config.json`` path or its JSON text; ``None``: anonymous) and ``insecure_registries`` (plain
    HTTP allowed there) and ``registry_mirrors`` (registry ``host[:port]`` -> mirror ``host[:port][/PREFIX]``,
    asked first).

    ``trust_loopback``: plain HTTP may also go to this machine's loopback without being listed (the CLI). The node
    agent passes ``False`` for CRs: a tenant's URI, or a redirect from a server a tenant controls, then reaches no
    node-local host (loopback, link-local, unspecified) in any scheme unless listed (:mod:`.origins`).

    ``cancel`` (the pull's cancel Event) ends every back-off of the source's own retries (the listing's) at once.
    """
    if uri.scheme == "hf":
        from .hf import HFSource

        hf: Source = HFSource(uri, token=hf_token, endpoint=hf_endpoint, allow_patterns=allow_patterns,
                              ignore_patterns=ignore_patterns, retry=retry, pool_maxsize=pool_maxsize,
                              cancel=cancel)
        return hf
    if uri.scheme == "oci":
        from .oci import OCISource

        return OCISource(uri, auth=oci_auth, config_file=oci_config_file, profile=oci_profile, region=oci_region,
                         endpoint=oci_endpoint, retry=retry, pool_maxsize=pool_maxsize, cancel=cancel)
    if uri.scheme == "oci-registry":
        from .registry import open_registry

        return open_registry(uri, auth=registry_auth,
                             hosts=HostPolicy.of(insecure_registries, loopback=trust_loopback),
                             mirrors=registry_mirrors, retry=retry, pool_maxsize=pool_maxsize, cancel=cancel)
    if uri.scheme in ("https", "http"):
        from .http import HTTPSource

        return HTTPSource(uri, token=http_token,
                          hosts=HostPolicy.of(http_insecure_hosts, loopback=trust_loopback), retry=retry,
                          pool_maxsize=pool_maxsize, cancel=cancel)
    if uri.scheme == "local":
        from .local import LocalSource

        return LocalSource(uri)
    raise BadURIError(f"no source for scheme {uri.scheme!r}")
