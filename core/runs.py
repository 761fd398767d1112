"""The run folder: what the trainer writes while it trains and how readers parse it.

Layout of a run folder (``<out>/<name>/``):

- ``config.json``        the :class:`TrainConfig` used
- ``metrics.jsonl``      one JSON object per line: ``start``, ``progress`` (within an epoch),
                         ``epoch`` (losses, accuracy, balanced accuracy, lr, images/s) and ``end``
- ``status.json``        ``{"state": "running" | "finished" | "stopped" | "failed", "error": ...}``
- ``last.pt``/``best.pt`` checkpoints, written atomically; ``last.pt`` also carries the
                         optimiser and scheduler so a run resumes where it stopped
- ``split.csv``          which split every image went to
- ``test_predictions.csv`` and ``evaluation.json``: the best model on the test split,
                         after temperature scaling fitted on the validation split
- ``STOP``               created by anyone who wants the run to end cleanly

The trainer appends to ``metrics.jsonl`` and rewrites ``status.json`` atomically, so a
dashboard can tail them at any moment; this module holds the only writer and the only parser.
"""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

PROGRESS_INTERVAL_S = 1.0


class RunLog:
    """Appends JSON lines to metrics.jsonl and keeps status.json current."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self._last_progress = 0.0

    def event(self, event: str, **data) -> None:
        line = {"event": event, "time": datetime.now(UTC).isoformat(timespec="seconds"), **data}
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def progress(self, force: bool = False, **data) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.event("progress", **data)

    def status(self, state: str, error: str | None = None) -> None:
        tmp = self.dir / "status.json.tmp"
        tmp.write_text(json.dumps({"state": state, "error": error,
                                   "updated": datetime.now(UTC).isoformat(timespec="seconds")}))
        tmp.replace(self.dir / "status.json")


def read_events(path: Path) -> list[dict]:
    """The JSON lines of ``metrics.jsonl``; a line being written (incomplete) or garbled is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            events.append(obj)
    return events
