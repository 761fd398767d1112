"""A model's recorded results: the test reports saved beside its checkpoint, and the operating points measured on
their predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from core.common.labels import CLASSES
from core.common.schema import SchemaError
from core.metrics.classification import MELANOMA_RULE, ReferralRule, operating_point


def _unless_damaged(read: Callable[[Path], dict | None], folder: Path) -> dict | None:
    """What ``read`` finds in ``folder``; None for a damaged record, which measured nothing that may be quoted (its run
    is listed as damaged with the reason)."""
    try:
        return read(folder)
    except SchemaError:
        return None


def record_folders(path: Path, checkpoint: dict) -> list[Path]:
    """Where the checkpoint's run records may be, first found first: its run folder, then the published run of the
    name it was trained under (``docs/runs``)."""
    from core.common.settings import published_runs_dir

    folders = [Path(path).parent]
    published, name = published_runs_dir(), (checkpoint.get("config") or {}).get("name")
    if published is not None and name:
        folders.append(published / name)
    return folders


def recorded_test_results(path: Path, checkpoint: dict, *, tta: bool = False) -> list[dict]:
    """The checkpoint's test-split evaluations with (``tta``) or without flip averaging in its run records
    (:func:`record_folders`). In each, the saved ``lesionlab evaluate`` report (which records its views), then the
    trainer's one-view ``evaluation.json``."""
    from core.common.runs import read_evaluate_report, read_evaluation

    found = []
    for folder in record_folders(path, checkpoint):
        report = _unless_damaged(read_evaluate_report, folder)
        evaluation = (_unless_damaged(read_evaluation, folder) or {}) if not tta else {}
        if report is not None and bool(report.get("tta")) == tta:
            found.append(report["metrics"])
        if test := evaluation.get("test"):
            found.append(test)
    return found


def report_predictions(report: dict) -> tuple[np.ndarray, np.ndarray]:
    """Labels and calibrated probabilities (``CLASSES`` order) of a saved ``lesionlab evaluate`` report's images."""
    rows = report["predictions"]
    labels = np.array([CLASSES.index(r["true"]) for r in rows], dtype=int)
    probs = np.array([[r["probabilities"][c] for c in CLASSES] for r in rows], dtype=float)
    return labels, probs


def recorded_test_predictions(folders: Sequence[Path], *, tta: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The test labels and calibrated probabilities recorded in the first of ``folders`` that holds them for the
    ``tta`` setting: a saved ``lesionlab evaluate`` report of those views, or (one view) the trainer's
    ``test_predictions.csv``. None when none does."""
    from core.common.runs import read_evaluate_report, read_predictions

    for folder in folders:
        report = _unless_damaged(read_evaluate_report, folder)
        if report is not None and bool(report.get("tta")) == tta and report.get("predictions"):
            return report_predictions(report)
        if not tta:
            try:
                _, labels, probs, _, _ = read_predictions(folder)
            except ValueError:
                continue
            return labels, probs
    return None


def folder_operating_point(
    folders: Sequence[Path], threshold: float, *, tta: bool = False, rule: ReferralRule = MELANOMA_RULE
) -> dict | None:
    """``rule``'s test-split operating point at ``threshold`` (sensitivity, specificity, counts) computed on the
    test predictions recorded in ``folders``: those of the ``tta`` setting when recorded, else the other's, with
    ``"tta"`` saying which and ``"n"`` how many images. None without recorded test predictions.

    The one source of these figures: Diagnose's note, its downloadable report and Evaluate all quote it, so that one
    model, rule, threshold and setting reads the same everywhere."""
    for views in (tta, not tta):
        found = recorded_test_predictions(folders, tta=views)
        if found is not None:
            labels, probs = found
            return {**operating_point(labels, probs, threshold, rule), "tta": views, "n": len(labels)}
    return None


def recorded_operating_point(
    path: Path, checkpoint: dict, threshold: float, *, tta: bool = False, rule: ReferralRule = MELANOMA_RULE
) -> dict | None:
    """:func:`folder_operating_point` in the checkpoint's run records (:func:`record_folders`)."""
    return folder_operating_point(record_folders(path, checkpoint), threshold, tta=tta, rule=rule)
