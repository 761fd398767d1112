"""A lock that serves answers first, each in arrival order, and can say how long the line is.

One model serves every open session of the app: its passes run one at a time (they use every core anyway).
With a room of students uploading together a page would otherwise just freeze; knowing the line, it can say
"3 analyses ahead of yours" instead (docs/BENCHMARKS.md, "A classroom"). What a student waits for is the answer:
the work a page adds after it (a heatmap, feature maps) waits behind every answer in line (``with line.later:``),
so thirty uploads are thirty passes to the last answer, not thirty passes and thirty heatmaps. In a room that
never stops uploading that work would wait until it does; a classroom's uploads come in bursts.
"""

from __future__ import annotations

import heapq
import threading

ANSWER, LATER = 0, 1  # ranks: the lower is served first


class WaitingLine:
    """A non-reentrant lock (``with line: ...``) handed out by ticket: answers in arrival order, then the work that
    can wait (``with line.later: ...``), also in arrival order."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._waiting: list[tuple[int, int]] = []  # a heap of (rank, ticket)
        self._held = False
        self.later = _Later(self)

    def _enter(self, rank: int) -> None:
        with self._changed:
            entry = (rank, self._next_ticket)
            self._next_ticket += 1
            heapq.heappush(self._waiting, entry)
            self._changed.wait_for(lambda: not self._held and self._waiting[0] == entry)
            heapq.heappop(self._waiting)
            self._held = True

    def __enter__(self) -> WaitingLine:
        self._enter(ANSWER)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()

    def __len__(self) -> int:
        """The callers a newcomer's answer would be behind: the one holding the lock and the answers waiting."""
        with self._changed:
            return int(self._held) + sum(rank == ANSWER for rank, _ in self._waiting)


class _Later:
    """The line's entrance for work that waits behind every answer (``with line.later: ...``)."""

    def __init__(self, line: WaitingLine) -> None:
        self._line = line

    def __enter__(self) -> WaitingLine:
        self._line._enter(LATER)
        return self._line

    def __exit__(self, *exc_info: object) -> None:
        self._line.__exit__(*exc_info)
