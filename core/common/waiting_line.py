"""A lock that serves its callers first come, first served and can say how long the line is.

One model serves every open session of the app: its passes run one at a time (they use every core anyway).
With a room of students uploading together a page would otherwise just freeze; knowing the line, it can say
"3 analyses ahead of yours" instead (docs/BENCHMARKS.md, "A classroom").
"""

from __future__ import annotations

import threading


class WaitingLine:
    """A non-reentrant lock (``with line: ...``) handed out in arrival order by ticket."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> WaitingLine:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()

    def __len__(self) -> int:
        """The callers holding the lock or waiting for it now: how many a newcomer would be behind."""
        with self._changed:
            return self._next_ticket - self._serving
