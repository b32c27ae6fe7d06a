"""``agent/watching/workqueue.py`` with real threads: dedup, dirty re-queue, one worker per key, backoff,
delayed adds, remove, shutdown. Delays are tens of milliseconds; waits are Events with generous bounds.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from modelherd.agent.watching.workqueue import WorkQueue

GENEROUS = 5.0  # upper bound for anything that should take milliseconds


def drain(q: WorkQueue[str]) -> list[str]:
    """Every key that is waiting now, each marked done at once."""
    out: list[str] = []
    while (key := q.get(timeout=0)) is not None:
        out.append(key)
        q.done(key)
    return out


def test_a_waiting_key_is_queued_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    for key in ["a", "b", "a", "a", "c", "b"]:
        q.add(key)
    assert len(q) == 3
    assert drain(q) == ["a", "b", "c"]
    assert len(q) == 0


def test_a_key_added_while_processing_is_requeued_once_at_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")
    q.add("a")
    assert len(q) == 0, "a processing key must not wait beside itself"
    assert q.processing() == 1
    assert q.get(timeout=0.05) is None
    q.done("a")
    assert len(q) == 1
    assert q.get(timeout=0) == "a"
    q.done("a")
    assert len(q) == 0
    assert q.processing() == 0


def test_a_processing_key_is_not_handed_to_a_second_worker() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    first = q.get(timeout=0)
    assert first == "a"
    second: list[str | None] = []
    got = threading.Event()

    def worker() -> None:
        second.append(q.get(timeout=GENEROUS))
        got.set()

    thread = threading.Thread(target=worker)
    thread.start()
    q.add("a")  # dirty while worker 1 holds it
    assert not got.wait(0.1), "the second worker got a key that the first one is processing"
    q.done("a")
    assert got.wait(GENEROUS)
    thread.join(GENEROUS)
    assert second == ["a"]


def test_many_workers_never_process_one_key_concurrently() -> None:
    q: WorkQueue[int] = WorkQueue()
    lock = threading.Lock()
    active: set[int] = set()
    overlaps: list[int] = []
    runs: Counter[int] = Counter()

    def worker() -> None:
        while (key := q.get()) is not None:
            with lock:
                if key in active:
                    overlaps.append(key)
                active.add(key)
                runs[key] += 1
            time.sleep(0.0005)  # widen the window in which a second worker could wrongly get the key
            with lock:
                active.discard(key)
            q.done(key)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in range(200):
        for key in range(5):
            q.add(key)
    deadline = time.monotonic() + GENEROUS
    while (len(q) or q.processing()) and time.monotonic() < deadline:
        time.sleep(0.01)
    q.shutdown()
    for t in threads:
        t.join(GENEROUS)
    assert not overlaps
    assert set(runs) == set(range(5))
    assert all(not t.is_alive() for t in threads)


def test_backoff_doubles_from_base_up_to_the_cap() -> None:
    q: WorkQueue[str] = WorkQueue(backoff_base_s=1.0, backoff_max_s=10.0, jitter=0.0)
    delays = [q.add_rate_limited("a") for _ in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert q.retries("a") == 7
    assert q.retries("b") == 0
    assert q.add_rate_limited("b") == 1.0, "backoff is per key"
    q.shutdown()


def test_backoff_jitter_stays_below_the_nominal_delay_and_the_cap() -> None:
    q: WorkQueue[str] = WorkQueue(backoff_base_s=1.0, backoff_max_s=300.0, jitter=0.1, rng=random.Random(7))
    seen: set[float] = set()
    for n in range(12):
        nominal = min(300.0, 2.0**n)
        delay = q.add_rate_limited("a")
        assert 0.9 * nominal <= delay <= nominal
        seen.add(delay / nominal)
    assert len(seen) > 1, "no jitter at all"
    many = [q.add_rate_limited("a") for _ in range(100)]
    assert max(many) <= 300.0


def test_huge_retry_counts_stay_at_the_cap() -> None:
    q: WorkQueue[str] = WorkQueue(backoff_base_s=0.5, backoff_max_s=60.0, jitter=0.0)
    assert [q.add_rate_limited("a") for _ in range(2000)][-1] == 60.0


def test_forget_resets_the_backoff() -> None:
    q: WorkQueue[str] = WorkQueue(backoff_base_s=1.0, backoff_max_s=300.0, jitter=0.0)
    for _ in range(4):
        q.add_rate_limited("a")
    assert q.retries("a") == 4
    q.forget("a")
    assert q.retries("a") == 0
    assert q.add_rate_limited("a") == 1.0


def test_a_rate_limited_key_arrives_after_its_delay() -> None:
    q: WorkQueue[str] = WorkQueue(backoff_base_s=0.05, backoff_max_s=1.0, jitter=0.0)
    start = time.monotonic()
    q.add_rate_limited("a")
    assert len(q) == 0
    assert q.get(timeout=GENEROUS) == "a"
    assert time.monotonic() - start >= 0.05
    q.done("a")


def test_add_after_delivers_in_due_order_after_plain_adds() -> None:
    q: WorkQueue[str] = WorkQueue()
    start = time.monotonic()
    q.add_after("late", 0.2)
    q.add_after("early", 0.05)
    q.add("now")
    got = []
    for _ in range(3):
        key = q.get(timeout=GENEROUS)
        assert key is not None
        got.append((key, time.monotonic() - start))
        q.done(key)
    assert [k for k, _ in got] == ["now", "early", "late"]
    assert got[1][1] >= 0.05
    assert got[2][1] >= 0.2


def test_add_after_keeps_the_earlier_due_instant() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 60.0)
    start = time.monotonic()
    q.add_after("a", 0.02)  # earlier: wins
    q.add_after("a", 30.0)  # later: ignored
    assert q.get(timeout=GENEROUS) == "a"
    assert time.monotonic() - start < GENEROUS
    q.done("a")
    assert q.get(timeout=0.1) is None, "the superseded 60 s entry must not come back as a second key"


def test_an_earlier_add_after_wakes_a_getter_sleeping_for_a_later_one() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("later", 60.0)
    got: list[str | None] = []
    done = threading.Event()

    def worker() -> None:
        got.append(q.get(timeout=30.0))  # a getter not woken would sleep all of this
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.05)  # let it sleep toward the 60 s instant (the assertion holds either way)
    q.add_after("sooner", 0.02)
    woken = done.wait(2.0)
    q.shutdown()
    thread.join(GENEROUS)
    assert woken, "the getter slept past the new, earlier due instant"
    assert got == ["sooner"]


def test_add_after_with_no_delay_queues_at_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 0)
    q.add_after("b", -1)
    assert len(q) == 2


def test_remove_drops_a_delayed_key() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("a", 0.05)
    q.add_after("b", 0.06)
    q.remove("a")
    assert q.get(timeout=GENEROUS) == "b"
    q.done("b")
    assert q.get(timeout=0.15) is None


def test_remove_drops_a_waiting_key_and_keeps_the_others_in_order() -> None:
    q: WorkQueue[str] = WorkQueue()
    for key in "abc":
        q.add(key)
    q.remove("b")
    q.remove("zzz")  # unknown: nothing happens
    assert drain(q) == ["a", "c"]


def test_remove_of_a_processing_key_cancels_its_requeue_but_not_the_run() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")
    q.remove("a")
    assert q.processing() == 1
    q.done("a")
    assert len(q) == 0
    q.add("a")
    assert len(q) == 1, "a removed key can be added again"


def test_shutdown_wakes_every_blocked_getter() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add_after("far", 60.0)
    results: list[str | None] = []
    lock = threading.Lock()

    def worker() -> None:
        key = q.get()  # no timeout: only shutdown can end this
        with lock:
            results.append(key)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # let them block (the assertion holds either way)
    q.shutdown()
    for t in threads:
        t.join(GENEROUS)
    assert all(not t.is_alive() for t in threads)
    assert results == [None] * 4
    assert q.is_shutdown


def test_after_shutdown_adds_are_ignored_and_get_returns_none() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("waiting")
    q.add("held")
    assert q.get(timeout=0) == "waiting"
    q.shutdown()
    assert q.get(timeout=0) is None
    q.add("new")
    q.add_after("new", 0.01)
    q.add_rate_limited("new")
    assert q.get(timeout=0.05) is None
    q.done("waiting")  # still allowed for a key in flight
    assert q.processing() == 0


def test_get_times_out_with_none() -> None:
    q: WorkQueue[str] = WorkQueue()
    start = time.monotonic()
    assert q.get(timeout=0.05) is None
    assert 0.05 <= time.monotonic() - start < GENEROUS


def test_done_of_a_key_not_processing_is_an_error() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    with pytest.raises(ValueError, match="not being processed"):
        q.done("a")
    assert q.get(timeout=0) == "a"
    q.done("a")
    with pytest.raises(ValueError):
        q.done("a")


def test_producers_do_not_wait_for_blocked_workers() -> None:
    q: WorkQueue[int] = WorkQueue(backoff_base_s=30.0, backoff_max_s=60.0)
    q.add(-1)
    held = q.get(timeout=0)
    release = threading.Event()

    def slow_worker() -> None:
        release.wait(GENEROUS)

    getters = [threading.Thread(target=q.get, kwargs={"timeout": GENEROUS}) for _ in range(3)]
    slow = threading.Thread(target=slow_worker)
    for t in [slow, *getters]:
        t.start()
    start = time.monotonic()
    for i in range(3000):
        q.add(i)
        q.add_after(i + 10_000, 60.0)
        q.add_rate_limited(i + 20_000)
    elapsed = time.monotonic() - start
    release.set()
    q.shutdown()
    for t in [slow, *getters]:
        t.join(GENEROUS)
    assert held == -1
    assert elapsed < GENEROUS


@pytest.mark.parametrize(("base", "cap", "jitter"), [(0, 1, 0.1), (2, 1, 0.1), (1, 2, 1.0), (1, 2, -0.1)])
def test_bad_backoff_settings_are_rejected(base: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        WorkQueue(backoff_base_s=base, backoff_max_s=cap, jitter=jitter)


def test_remove_after_a_dirty_key_finishes_past_shutdown_does_not_raise() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")  # dirty
    q.shutdown()
    q.done("a")
    q.remove("a")
    assert q.get(timeout=0) is None
