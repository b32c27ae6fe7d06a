"""The pull timeline: first mark wins, offsets in order, engine phase names that are not marks pass."""

from __future__ import annotations

import threading

from modelherd.agent.reporting.timeline import Mark, Timeline, describe


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_each_mark_keeps_the_first_time_it_was_reached_and_the_summary_is_in_order() -> None:
    clock = Clock()
    tl = Timeline(clock, wall=lambda: 1_700_000_000.0)
    clock.t = 100.5
    tl.mark(Mark.CHECKED)
    clock.t = 101.0
    tl.mark(Mark.LEASE)
    clock.t = 105.0
    tl.mark(Mark.LEASE)  # seen again while following: not a new mark
    tl.phase("staged")
    clock.t = 105.25
    tl.phase("adopting")  # an engine phase that is no mark
    tl.mark(Mark.REPORTED)
    assert tl.started_wall == 1_700_000_000.0
    assert tl.summary() == {"checked": 0.5, "lease": 1.0, "staged": 5.0, "reported": 5.25}
    assert describe(tl.summary()) == "checked +0.50s, lease +0.50s, staged +4.00s, reported +0.25s"


def test_marks_from_many_threads_are_all_kept() -> None:
    tl = Timeline()
    marks = list(Mark)
    threads = [threading.Thread(target=tl.mark, args=(m,)) for m in marks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(tl.summary()) == {m.value for m in marks}
