"""Work that runs in a thread of the app's server while the pages go on, and says how far it has got.

The first Diagnose on a dataset indexes every image under the model: minutes on a CPU (docs/BENCHMARKS.md,
"The similar-case index"). Run in the page, it held up the report for all that time; run here, the answer, the
heatmap and the report come first and the similar cases follow when the index is ready, with a bar that reads
``done``, ``total`` and ``started`` for its rate and ETA.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BackgroundTask(Generic[T]):
    """``work(task)`` started at once in a daemon thread; ``work`` reports through :meth:`progress` and
    :attr:`stage`, and its return value becomes :attr:`result` (an exception it raises, :attr:`error`).

    Readers on other threads see plain attributes, each written whole: a bar drawn between two updates shows the
    one before, never a torn one."""

    def __init__(self, work: Callable[[BackgroundTask[T]], T], stage: str = "starting") -> None:
        self.stage = stage  # what is being done now, in words ("loading the model", "computing features")
        self.done = 0
        self.total: int | None = None
        self.started = time.time()  # a Unix time, as core.common.formatting.progress_text reads it
        self.result: T | None = None
        self.error: BaseException | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name="lesionlab-background")
        self._thread.start()

    def _run(self, work: Callable[[BackgroundTask[T]], T]) -> None:
        try:
            self.result = work(self)
        except BaseException as exc:  # noqa: BLE001 — kept for the page to show; a thread's exception is lost
            self.error = exc
        finally:
            self._finished.set()

    def progress(self, done: int, total: int) -> None:
        """``done`` of ``total`` items so far (a :data:`core.inference.features.ProgressFn`)."""
        self.total, self.done = total, done

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work has ended (at most ``timeout`` seconds); whether it has."""
        return self._finished.wait(timeout)
