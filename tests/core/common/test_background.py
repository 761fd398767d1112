"""core.common.background: work in a thread whose progress, result or error other threads read."""

from __future__ import annotations

import threading

import pytest

from core.common.background import BackgroundTask


def test_a_task_reports_its_stage_and_count_while_it_runs_and_keeps_its_result():
    go = threading.Event()

    def work(task: BackgroundTask[str]) -> str:
        task.stage = "counting"
        task.progress(3, 10)
        go.wait(10)
        return "done"

    task = BackgroundTask(work)
    while task.done != 3:
        task.wait(0.01)
    assert not task.finished and (task.stage, task.done, task.total) == ("counting", 3, 10)
    go.set()
    assert task.wait(10) and task.result == "done" and task.error is None


def test_an_error_is_kept_for_the_page_to_say():
    def work(task: BackgroundTask[None]) -> None:
        raise ValueError("no split of this model can be trusted")

    task = BackgroundTask(work)
    assert task.wait(10)
    with pytest.raises(ValueError, match="no split"):
        raise task.error
    assert task.result is None
