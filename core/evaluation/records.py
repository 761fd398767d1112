"""A model's recorded results: the test reports saved beside its checkpoint, and the operating point they
measured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.common.schema import SchemaError


def _unless_damaged(read: Callable[[Path], dict | None], folder: Path) -> dict | None:
    """What ``read`` finds in ``folder``; None for a damaged record, which measured nothing that may be quoted (its run
    is listed as damaged with the reason)."""
    try:
        return read(folder)
    except SchemaError:
        return None


def recorded_test_results(path: Path, checkpoint: dict, *, tta: bool = False) -> list[dict]:
    """The checkpoint's test-split evaluations with (``tta``) or without flip averaging in its run records,
    first found first: its run folder, then the published run of the name it was trained under (``docs/runs``).
    In each, the saved ``lesionlab evaluate`` report (which records its views), then the trainer's one-view
    ``evaluation.json``."""
    from core.common.runs import read_evaluate_report, read_evaluation
    from core.common.settings import published_runs_dir

    folders = [Path(path).parent]
    published, name = published_runs_dir(), (checkpoint.get("config") or {}).get("name")
    if published is not None and name:
        folders.append(published / name)
    found = []
    for folder in folders:
        report = _unless_damaged(read_evaluate_report, folder)
        evaluation = (_unless_damaged(read_evaluation, folder) or {}) if not tta else {}
        if report is not None and bool(report.get("tta")) == tta:
            found.append(report["metrics"])
        if test := evaluation.get("test"):
            found.append(test)
    return found


def recorded_operating_point(path: Path, checkpoint: dict, threshold: float, *, tta: bool = False) -> dict | None:
    """Test-split melanoma sensitivity/specificity at ``threshold`` from the checkpoint's run records
    (:func:`recorded_test_results`), with ``"tta"`` saying whether they averaged the flips: those of the
    ``tta`` setting when recorded, else the other's. None when no record evaluated it at that threshold."""
    for views in (tta, not tta):
        for test in recorded_test_results(path, checkpoint, tta=views):
            mel = test.get("melanoma") or {}
            if mel.get("threshold") == threshold and "sensitivity" in mel:
                return {**mel, "tta": views}
    return None
