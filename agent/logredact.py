"""A safety net for the agent's logs: a secret it has read never reaches a log line.

Invariant: once a value was passed to :func:`register_secret`, every record that passes a handler carrying
:class:`RedactingFilter` (``cli._setup_logging`` puts one on each root handler) leaves it with no form of that
value (:func:`~modelherd.storage.credentials.redact`: raw, escaped, percent-encoded, each long line of a
multi-line value) in its message, arguments, exception or stack text, or in a string passed in ``extra``.
Messages are built without secrets in the first place (``storage/credentials.py``); this only catches what
slips through. The registry is process-wide and only grows (a value once read stays redacted).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from ..storage.credentials import redact

__all__ = ["MIN_SECRET_LENGTH", "RedactingFilter", "install", "register_secret"]

MIN_SECRET_LENGTH = 8  # shorter values are no credential, and redacting them would eat ordinary words

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def register_secret(value: str) -> None:
    """Redact ``value`` from every record logged from now on, in this process. Idempotent; thread-safe.

    A value shorter than :data:`MIN_SECRET_LENGTH` characters once stripped is ignored.
    """
    global _secrets
    if not isinstance(value, str) or len(value.strip()) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if value not in _secrets:
            _secrets = (*_secrets, value)


class RedactingFilter(logging.Filter):
    """Removes every registered secret from a record in place; never drops a record.

    The message is formatted once (``msg % args``), redacted and stored as ``msg`` with ``args`` cleared. The
    exception is formatted into ``exc_text``; when that text held a secret, ``exc_info`` is dropped and the
    redacted traceback is appended to the message, so no formatter (the JSON one formats ``exc_info`` itself) can
    print the original.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = _secrets
        if secrets:
            _scrub(record, secrets)
        return True


def _scrub(record: logging.LogRecord, secrets: tuple[str, ...]) -> None:
    try:
        message = record.getMessage()
    except Exception:  # arguments that do not format: logging would print them raw in its error report
        message = f"{record.msg} (log arguments not shown: they did not format)"
    record.msg = redact(message, secrets)
    record.args = None
    if record.exc_info and record.exc_info[1] is not None:
        text = record.exc_text or logging.Formatter().formatException(record.exc_info)
        clean = redact(text, secrets)
        if clean != text:
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.msg}\n{clean}"
        else:
            record.exc_text = text
    elif record.exc_text:
        record.exc_text = redact(record.exc_text, secrets)
    if record.stack_info:
        record.stack_info = redact(record.stack_info, secrets)
    for key, value in list(record.__dict__.items()):
        if key not in _STANDARD and isinstance(value, str):
            setattr(record, key, redact(value, secrets))


def install(handlers: Iterable[logging.Handler]) -> None:
    """Put one :class:`RedactingFilter` on each handler (a handler that has one keeps it)."""
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
