"""``Retry-After`` parsing and the retry loop: no origin's answer can make a wait endless or crash it."""

from __future__ import annotations

import email.utils
import itertools
import math
import threading
import time

import pytest
from modelherd.agent.cli import build_parser, load_settings
from modelherd.agent.transfer import retry_policy
from modelherd.storage.errors import CancelledError, RateLimitedError, TransientSourceError
from modelherd.storage.retry import RETRY_AFTER_CEILING_S, RetryPolicy, call_with_retry, parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("value", "expected"), [
    ("999999999", RETRY_AFTER_CEILING_S),
    ("inf", RETRY_AFTER_CEILING_S),
    ("+Infinity", RETRY_AFTER_CEILING_S),
    ("1e309", RETRY_AFTER_CEILING_S),
    ("9" * 400, RETRY_AFTER_CEILING_S),
    ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_CEILING_S),
    ("-5", 0.0),
    ("-inf", 0.0),
    ("Mon, 01 Jan 2001 00:00:00 GMT", 0.0),
    ("  7 ", 7.0),
    ("1.5", 1.5),
    ("nan", None),
    ("soon", None),
    ("", None),
    (None, None),
    ("Fri, 31 Dec 99999 23:59:59 GMT", None),
    ("Mon, 32 Foo 2020 99:99:99 GMT", None),
])
def test_retry_after_is_a_bounded_number_of_seconds_or_none(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, now=NOW)
    assert got == expected
    assert got is None or math.isfinite(got)


def test_a_retry_after_date_counts_from_now_and_a_zone_less_date_is_utc() -> None:
    assert parse_retry_after(email.utils.formatdate(NOW + 30, usegmt=True), now=NOW) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(NOW + 30).replace("+0000", "-0000"), now=NOW) == \
        pytest.approx(30)


def test_a_retry_after_above_the_cap_waits_the_cap_and_spends_a_retry() -> None:
    calls: list[float] = []

    def limited() -> None:
        calls.append(time.monotonic())
        raise RateLimitedError("429", retry_after=math.inf)

    policy = RetryPolicy(retries=2, backoff_s=0.001, backoff_max_s=0.002, retry_after_max_s=0.1)
    with pytest.raises(RateLimitedError):
        call_with_retry(limited, policy)
    assert len(calls) == 3
    assert all(0.09 <= b - a < 2 for a, b in itertools.pairwise(calls))


def test_no_attempt_starts_once_cancel_is_set() -> None:
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        raise TransientSourceError("reset")

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        call_with_retry(flaky, RetryPolicy(retries=3), cancel=cancel)
    assert calls == 0


def test_retry_after_max_s_is_a_setting_that_reaches_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["pull", "hf://org/m"])
    assert retry_policy(load_settings(args).transfer).retry_after_max_s == 300
    monkeypatch.setenv("MODELHERD_RETRY_AFTER_MAX_S", "12.5")
    assert retry_policy(load_settings(args).transfer).retry_after_max_s == 12.5
