"""Retries with exponential backoff and full jitter, honouring ``Retry-After`` up to a cap.

Invariants:
* only errors that can succeed on retry (``TransientSourceError``, ``RateLimitedError``) are retried, and every
  retry, a rate-limited one included, spends one of ``policy.retries``;
* a server's ``Retry-After`` is a floor for the next wait, but never more than ``policy.retry_after_max_s``:
  no answer of an origin (``999999999``, ``inf``, ``1e309``, a date in the year 9999) can make a pull sleep
  longer than that, or crash the sleep with ``OverflowError``;
* every back-off sleeps on the ``cancel`` Event: once it is set, the wait ends at once with ``CancelledError``,
  and no further attempt starts.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from .errors import CancelledError, RateLimitedError, TransientSourceError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: the longest ``Retry-After`` :func:`parse_retry_after` reports (a year); the policy's cap applies on top
RETRY_AFTER_CEILING_S = 366 * 86400.0


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` per request; waits of ``backoff_s * 2**n`` (full jitter) up to ``backoff_max_s``; a server's
    ``Retry-After`` is honoured up to ``retry_after_max_s``."""

    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds in ``[0, RETRY_AFTER_CEILING_S]``: delta-seconds or an HTTP date.

    ``None`` when absent or unreadable (``nan``, garbage, an impossible date). Never raises: a negative delay or a
    past date is 0, an enormous one (``inf``, ``1e309``, a date in the year 9999) is the ceiling.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else min(max(0.0, seconds), RETRY_AFTER_CEILING_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
            when = when.replace(tzinfo=dt.UTC)
        stamp = when.timestamp()
    except (TypeError, ValueError, OverflowError, IndexError, OSError):
        return None
    return min(max(0.0, stamp - (time.time() if now is None else now)), RETRY_AFTER_CEILING_S)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    cancel: threading.Event | None = None,
    what: str = "request",
) -> T:
    """Call ``fn`` until it succeeds or ``policy.retries`` retries are spent; re-raise the last error.

    With ``cancel`` set (before an attempt or during a back-off) it raises ``CancelledError`` without calling
    ``fn`` again.
    """
    jitter = wait_random_exponential(multiplier=policy.backoff_s, max=policy.backoff_max_s)

    def wait(state: RetryCallState) -> float:
        base = float(jitter(state))
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            asked = exc.retry_after if not math.isnan(exc.retry_after) else 0.0
            if asked > policy.retry_after_max_s:
                log.warning("%s: the server asked to wait %.0fs; waiting at most %.0fs (retry_after_max_s)",
                            what, asked, policy.retry_after_max_s)
            return max(base, min(max(0.0, asked), policy.retry_after_max_s))
        return base

    def sleep(seconds: float) -> None:
        seconds = min(max(0.0, seconds), threading.TIMEOUT_MAX)
        if cancel is None:
            time.sleep(seconds)
        elif cancel.wait(seconds):
            raise CancelledError(f"cancelled while waiting to retry {what}", hint="run the pull again")

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc, state.attempt_number, policy.retries,
                    state.upcoming_sleep)

    def attempt() -> T:
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"cancelled before {what}", hint="run the pull again")
        return fn()

    retrying = Retrying(
        retry=retry_if_exception_type((TransientSourceError, RateLimitedError)),
        stop=stop_after_attempt(policy.retries + 1),
        wait=wait,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(attempt)
