"""The model's waiting line: one caller at a time, served in arrival order, and its length known."""

from __future__ import annotations

import threading
import time

from core.common.waiting_line import WaitingLine


def test_callers_are_served_one_at_a_time_in_arrival_order_and_counted():
    line = WaitingLine()
    served: list[int] = []
    inside = []

    def caller(i: int) -> None:
        with line:
            inside.append(i)
            assert len(inside) == 1  # nobody else holds it
            served.append(i)
            time.sleep(0.01)
            inside.remove(i)

    assert len(line) == 0
    with line:
        threads = []
        for i in range(5):
            threads.append(threading.Thread(target=caller, args=(i,)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while len(line) < i + 2 and time.monotonic() < deadline:  # each in line before the next arrives
                time.sleep(0.001)
        assert len(line) == 6  # the holder and five waiting
    for t in threads:
        t.join(10)
    assert served == [0, 1, 2, 3, 4]
    assert len(line) == 0


def test_an_exception_inside_lets_the_next_caller_in():
    line = WaitingLine()
    try:
        with line:
            raise ValueError("a pass that failed")
    except ValueError:
        pass

    def next_caller() -> None:
        with line:
            pass

    after = threading.Thread(target=next_caller)
    after.start()
    after.join(5)
    assert not after.is_alive() and len(line) == 0


def test_answers_go_before_the_work_that_can_wait_and_only_answers_are_counted_ahead():
    """Two heatmaps asked for, then two answers, while a pass holds the line: the answers are served first, each
    kind in arrival order, and a newcomer's answer is behind the holder and the answers only."""
    line = WaitingLine()
    served: list[str] = []

    def caller(name: str, later: bool) -> None:
        with line.later if later else line:
            served.append(name)

    with line:
        threads = []
        for name, later in (("heatmap 1", True), ("answer 1", False), ("heatmap 2", True), ("answer 2", False)):
            threads.append(threading.Thread(target=caller, args=(name, later)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while len(line._waiting) < len(threads) and time.monotonic() < deadline:  # in line before the next
                time.sleep(0.001)
        assert len(line) == 3  # the holder and the two answers
    for t in threads:
        t.join(10)
    assert served == ["answer 1", "answer 2", "heatmap 1", "heatmap 2"]
    assert len(line) == 0
