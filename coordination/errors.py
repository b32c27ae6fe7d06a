"""Errors of the coordination layer (all :class:`ModelherdError`, so the CLI maps them to exit codes)."""

from __future__ import annotations

from ..storage.errors import ModelherdError

__all__ = ["CoordinationError", "HolderFailedError", "LeaseLostError", "LeaseUnavailableError"]


class CoordinationError(ModelherdError):
    """The lease store refused us for good (RBAC, a malformed record, a bad setting)."""

    exit_code = 7


class LeaseUnavailableError(CoordinationError):
    """The lease store could not be reached or answered 5xx/429; retry later (transient)."""


class LeaseLostError(CoordinationError):
    """Another writer changed the lease since we last held it: stop writing at once, never publish."""


class HolderFailedError(CoordinationError):
    """The node that was downloading for us reported a failure (its message is in ``message``)."""

    exit_code = 3
