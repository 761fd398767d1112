"""Results by image source, and the leave-one-source-out report.

HAM10000's images come from four sources (cameras and clinics: ``HAM10000_sources.csv``, read by
:mod:`core.data.dataset`). A model can score well overall and poorly on one source's images:
:func:`metrics_by_source` says so for any evaluated split (``lesionlab evaluate --by-source``, the model card), and
:func:`holdout_report` gathers the runs trained without one source and tested on it
(``lesionlab train --holdout-source`` / ``--leave-one-source-out``). Every interval resamples lesions
(:mod:`core.metrics.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.common.labels import CLASSES
from core.common.runs import lesions_of, read_config, read_evaluation, read_predictions
from core.metrics.bootstrap import bootstrap_ci
from core.metrics.calibration import expected_calibration_error
from core.metrics.classification import (
    accuracy,
    balanced_accuracy,
    macro_f1,
    melanoma_auc,
    operating_point,
)

Metric = Callable[[np.ndarray, np.ndarray], float | None]


def source_metrics(mel_threshold: float) -> dict[str, Metric]:
    """The metrics reported per source, each a function of (labels, probs); melanoma sensitivity and specificity at
    the model's operating point ``mel_threshold``."""

    def rate(name: str) -> Metric:
        return lambda y, p: operating_point(y, p, mel_threshold)[name]

    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": macro_f1,
        "mel_auc": melanoma_auc,
        "mel_sensitivity": rate("sensitivity"),
        "mel_specificity": rate("specificity"),
        "ece": expected_calibration_error,
    }


def scored_group(
    labels: np.ndarray,
    probs: np.ndarray,
    lesions: Sequence[str],
    *,
    mel_threshold: float,
    bootstrap: int,
    seed: int = 0,
) -> dict:
    """One group of images (a source, a held-out source's test split): its image, lesion and per-class counts,
    each of :func:`source_metrics` (None where undefined: no melanoma, say) and its 95% interval over ``bootstrap``
    resamples of the lesions (None without resamples or where undefined on every one)."""
    values, intervals = {}, {}
    for name, fn in source_metrics(mel_threshold).items():
        values[name] = fn(labels, probs)
        intervals[name] = None
        if bootstrap and values[name] is not None:
            try:
                intervals[name] = list(bootstrap_ci(labels, probs, fn, n=bootstrap, seed=seed, groups=lesions))
            except ValueError:  # undefined on every resample
                intervals[name] = None
    return {
        "n_images": int(len(labels)),
        "n_lesions": int(len(set(lesions))),
        "classes": {code: int((labels == i).sum()) for i, code in enumerate(CLASSES)},
        "metrics": values,
        "confidence_intervals": intervals,
    }


def metrics_by_source(
    frame: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, *, mel_threshold: float, bootstrap: int = 1000
) -> list[dict]:
    """:func:`scored_group` for each image source in ``frame`` (the evaluated images, in the order of ``labels`` and
    ``probs``: columns ``source`` and ``lesion_id``), largest first, each named by its ``source``."""
    sources = frame["source"].to_numpy()
    lesions = frame["lesion_id"].astype(str).to_numpy()
    rows = []
    for source in pd.Series(sources).value_counts().index:
        mask = sources == source
        scored = scored_group(
            labels[mask], probs[mask], lesions[mask].tolist(), mel_threshold=mel_threshold, bootstrap=bootstrap
        )
        rows.append({"source": str(source), **scored})
    return rows


# The columns of the text tables: (heading, metric).
TABLE_COLUMNS = (
    ("accuracy", "accuracy"),
    ("balanced acc.", "balanced_accuracy"),
    ("macro F1", "macro_f1"),
    ("mel AUC", "mel_auc"),
    ("mel sens.", "mel_sensitivity"),
    ("mel spec.", "mel_specificity"),
    ("ECE", "ece"),
)


def _cell(row: dict, metric: str) -> str:
    value, ci = row["metrics"][metric], row["confidence_intervals"].get(metric)
    if value is None:
        return "—"
    return f"{value:.3f}" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")


def _table(rows: Sequence[dict], name: str) -> list[list[str]]:
    """The header and a line of cells per group: its name, images, lesions and each metric with its interval."""
    header = [name, "images", "lesions", *(heading for heading, _ in TABLE_COLUMNS)]
    return [header] + [
        [str(r[name]), str(r["n_images"]), str(r["n_lesions"]), *(_cell(r, metric) for _, metric in TABLE_COLUMNS)]
        for r in rows
    ]


def format_groups(rows: Sequence[dict], name: str = "source") -> str:
    """Aligned plain text: one line per group (``row[name]``), its images and lesions, and every metric with its
    95% interval over lesions."""
    table = _table(rows, name)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table)


def markdown_groups(rows: Sequence[dict], name: str = "source") -> list[str]:
    """The same table as :func:`format_groups`, as Markdown lines (the model card's)."""
    header, *body = _table(rows, name)
    return [f"| {' | '.join(header)} |", f"|{' --- |' * len(header)}", *(f"| {' | '.join(line)} |" for line in body)]


def holdout_row(run_dir: Path, *, bootstrap: int = 1000) -> dict:
    """A finished run trained with ``holdout_source``: its held-out source's test results (:func:`scored_group`, the
    calibrated test predictions at its operating point, intervals over lesions) and its in-distribution validation
    balanced accuracy. ValueError for a run that held out no source or has no test predictions."""
    source = read_config(run_dir).get("holdout_source")
    if not source:
        raise ValueError(f"{run_dir} did not hold out an image source (no holdout_source in its config.json)")
    table, labels, probs, _, evaluation = read_predictions(run_dir)
    lesions = lesions_of(run_dir, table["image_id"].astype(str).tolist())
    threshold = evaluation.get("mel_threshold")
    scored = scored_group(
        labels, probs, lesions, mel_threshold=0.5 if threshold is None else threshold, bootstrap=bootstrap
    )
    val = read_evaluation(run_dir).get("val") or {}
    return {
        "source": source,
        "run": Path(run_dir).name,
        "val_balanced_accuracy": val.get("balanced_accuracy"),
        **scored,
    }


def holdout_report(run_dirs: Sequence[Path], left_out: dict[str, str], *, bootstrap: int = 1000) -> dict:
    """The leave-one-source-out report: a :func:`holdout_row` per run, and the sources left out with why
    (:func:`core.data.splits.holdout_sources`)."""
    return {
        "rows": [holdout_row(d, bootstrap=bootstrap) for d in run_dirs],
        "left_out": dict(left_out),
        "bootstrap": bootstrap,
        "bootstrap_unit": "lesion",
    }


def format_holdout_report(report: dict) -> str:
    """The report as text: the held-out sources' test results, each run's in-distribution validation balanced
    accuracy beside them, and the sources left out with the reason."""
    lines = ["Leave-one-source-out: each run trained and validated without one source, tested on it"]
    lines += format_groups(report["rows"]).splitlines()
    for row in report["rows"]:
        val = row["val_balanced_accuracy"]
        lines.append(
            f"  {row['source']} ({row['run']}): validation balanced accuracy on the other sources "
            f"{'—' if val is None else f'{val:.3f}'}"
        )
    for source, why in report["left_out"].items():
        lines.append(f"not held out: {source}: {why}")
    return "\n".join(lines)
