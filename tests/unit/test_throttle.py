"""The deep-verification rate limiter: real sleeps, real files, real hashing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from modelherd.storage.errors import CancelledError
from modelherd.storage.hashing import hash_file
from modelherd.storage.throttle import MB, RateLimiter

MiB = 1024 * 1024


def test_hashing_through_the_limiter_runs_at_the_rate_asked_within_ten_percent(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    f.write_bytes(b"\x5a" * (6 * MiB))
    limiter = RateLimiter(8 * MB)
    started = time.monotonic()
    hash_file(str(f), ["sha256"], chunk=256 * 1024, throttle=limiter)
    elapsed = time.monotonic() - started
    expected = (6 * MiB) / (8 * MB)  # the bucket starts empty: no burst before the first byte
    assert expected * 0.9 <= elapsed <= expected * 1.1
    assert limiter.taken == 6 * MiB


def test_idle_time_does_not_bank_more_than_the_burst() -> None:
    limiter = RateLimiter(4 * MB, burst=0.5 * MB)
    time.sleep(0.3)  # would be 1.2 MB of credit without the cap
    started = time.monotonic()
    for _ in range(4):
        limiter.take(500_000)
    assert time.monotonic() - started >= (2.0 - 0.5) / 4 * 0.9


def test_a_set_cancel_stops_a_throttled_read_at_once() -> None:
    cancel = threading.Event()
    limiter = RateLimiter(1 * MB, cancel=cancel)
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(CancelledError):
        limiter.take(10 * MB)  # would sleep ~10 s
    assert time.monotonic() - started < 1.0


def test_zero_megabytes_per_second_means_no_limit() -> None:
    assert RateLimiter.mb_per_s(0) is None
    limiter = RateLimiter.mb_per_s(2.5)
    assert limiter is not None and limiter.rate == 2.5 * MB
