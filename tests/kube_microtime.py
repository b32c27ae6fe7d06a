"""``MicroTimeApiClient``: a ``kubernetes`` ApiClient that writes datetimes the way the API server parses them.

modelherd itself writes Leases as raw JSON (coordination/leaseapi.py), never through the ``kubernetes`` client's
models; the control-plane tests use this client to show what the server accepts and what the plain client gets
wrong (see coordination/microtime.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubernetes import client
from modelherd.coordination.microtime import format_microtime


class MicroTimeApiClient(client.ApiClient):
    """``kubernetes.client.ApiClient`` that writes datetimes the way the API server parses them.

    Build one from an existing client's configuration:
    ``MicroTimeApiClient(configuration=api_client.configuration)``. Naive datetimes in a request
    body raise :class:`ValueError` before anything is sent.
    """

    def sanitize_for_serialization(self, obj: Any) -> Any:
        if isinstance(obj, datetime):
            return format_microtime(obj)
        return super().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
