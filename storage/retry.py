"""Retries with exponential backoff and full jitter, honouring ``Retry-After``.

Invariant: only errors that can succeed on retry (``TransientSourceError``, ``RateLimitedError``) are
retried; a server's ``Retry-After`` is a floor for the next wait; a set ``cancel`` Event stops waiting
at once with ``CancelledError``.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from .errors import CancelledError, RateLimitedError, TransientSourceError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 60.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date. ``None`` when absent/garbled."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    cancel: threading.Event | None = None,
    what: str = "request",
) -> T:
    """Call ``fn`` until it succeeds or ``policy.retries`` retries are spent; re-raise the last error."""
    jitter = wait_random_exponential(multiplier=policy.backoff_s, max=policy.backoff_max_s)

    def wait(state: RetryCallState) -> float:
        base = jitter(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            return max(base, exc.retry_after)
        return base

    def sleep(seconds: float) -> None:
        if cancel is None:
            time.sleep(seconds)
        elif cancel.wait(seconds):
            raise CancelledError(f"cancelled while waiting to retry {what}")

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc, state.attempt_number, policy.retries,
                    state.upcoming_sleep)

    retrying = Retrying(
        retry=retry_if_exception_type((TransientSourceError, RateLimitedError)),
        stop=stop_after_attempt(policy.retries + 1),
        wait=wait,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
