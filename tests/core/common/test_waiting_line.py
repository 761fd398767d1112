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
