"""Typed errors. Every error says what went wrong and what to do about it.

Exit codes (used by the CLI) are attached to the class so that the mapping lives in one place.
"""

from __future__ import annotations


class ModelherdError(Exception):
    """Base class. ``hint`` tells the user what to do next."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(ModelherdError):
    """Bad settings or arguments."""

    exit_code = 2


class BadURIError(ConfigError):
    """A model URI could not be parsed or names an unknown scheme."""


class ModelsRootError(ConfigError):
    """The models root (or a folder modelherd must write under it) is not a writable directory."""


class SourceError(ModelherdError):
    """The origin refused or failed a request."""

    exit_code = 3


class SourceNotFoundError(SourceError):
    """404: the repository, revision, bucket, prefix or file does not exist."""


class AuthError(SourceError):
    """401/403: missing or insufficient credentials."""


class RateLimitedError(SourceError):
    """429/503 after all retries; ``retry_after`` in seconds when the server said."""

    def __init__(self, message: str, *, retry_after: float | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class TransientSourceError(SourceError):
    """A retryable failure (5xx, reset connection, short body)."""


class MalformedListingError(SourceError):
    """The source's listing cannot describe a real model: a size no file can have, too many entries."""


class UnsafePathError(ModelherdError):
    """An untrusted name (index entry, object name, tree path) would leave the model folder."""

    exit_code = 4


class UnsafeArchiveError(UnsafePathError):
    """A tar layer holds an entry that may not be extracted: a path, symlink or hardlink leaving the model folder,
    a device, FIFO or socket, a size or entry count beyond the bounds, a name modelherd reserves."""


class DestinationError(UnsafePathError):
    """The destination may not be replaced: a reserved ``.modelherd-*`` name, a file, a folder under a file or
    inside a published model, or a folder holding other models or files modelherd did not publish."""


class VerificationError(ModelherdError):
    """Bytes on disk do not match what the source or manifest promised."""

    exit_code = 5

    def __init__(self, message: str, *, problems: list[str] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.problems = problems or []


class InsufficientSpaceError(ModelherdError):
    """Not enough free space for the bytes still to fetch, or ENOSPC while writing."""

    exit_code = 6


class StagingBusyError(ModelherdError):
    """Another pull (a thread of this process or another process on this node) owns the staging folder of this
    model, and the caller asked not to wait for it."""

    exit_code = 7


class CancelledError(ModelherdError):
    """The caller's cancel Event was set; staging has been cleaned."""

    exit_code = 130
