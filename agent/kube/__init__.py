"""The one Kubernetes access layer of the agent: every request to the API server goes through this package.

:mod:`.client` loads the credentials and holds the one urllib3 pool (:class:`KubeClient`); :mod:`.request` makes
one raw-JSON request over it (counted in :data:`REQUESTS`, paths checked by :func:`api_path`). :mod:`.watch` streams a
list or watch over the same pool (the informers, the Lease watch). :mod:`.leases` implements coordination's
``LeaseApi`` (coordinated pulls, the staging GC, the controller's leader election) and :mod:`.secrets` reads one
key of a Secret; import those two from their modules (they pull in coordination's types, which the status
writers do not need). Higher layers (reporting, watching, lifecycle, the controller, the CLI) take a
``KubeClient`` and call these functions; none of them builds its own client or pool.

Invariant: one process holds one :class:`KubeClient` (one connection pool), and every API-server request is made
through :func:`request` or a streaming watch of this package over it.
"""

from . import watch
from .client import SA_DIR, KubeClient, load
from .request import (
    JSON_PATCH,
    MERGE_PATCH,
    REQUESTS,
    ApiError,
    UnsafeApiPathError,
    action_of,
    api_path,
    request,
)

__all__ = [
    "JSON_PATCH",
    "MERGE_PATCH",
    "REQUESTS",
    "SA_DIR",
    "ApiError",
    "KubeClient",
    "UnsafeApiPathError",
    "action_of",
    "api_path",
    "load",
    "request",
    "watch",
]
