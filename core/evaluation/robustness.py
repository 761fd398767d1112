"""The robustness report: a checkpoint or an ensemble evaluated on one split as it is ("clean") and under each
acquisition shift of :mod:`core.data.shifts`, with balanced accuracy, melanoma AUC and ECE, and each one's drop from
clean with a paired bootstrap interval (the same resampled images under both conditions).

Each shift is applied to the decoded image file, before the fitting every upload gets
(:func:`core.data.images.fit_to_source`), so the report measures what the predictor does with such an upload: its
own probabilities (an ensemble's members each with their own preprocessing and temperature), with the predictor's
default test-time augmentation unless told otherwise. ``lesionlab evaluate --checkpoint CKPT --data DIR --shifts``
prints it and saves it in the model's run folder (``robustness.json`` for the test split, ``robustness-val.json`` for
validation: :func:`core.common.runs.robustness_file`, :func:`write_robustness`, checked against
:data:`ROBUSTNESS_SCHEMA` when read),
where the Evaluate page and the model card read it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.common.files import write_json
from core.common.formatting import progress_text
from core.common.runs import EVALUATE_REPORT_SCHEMA, check_metrics, matching_runs, robustness_file
from core.common.schema import (
    Field,
    JsonFormat,
    SchemaError,
    closed_schema,
    list_of,
    number,
    one_of,
    probability,
    read_json_file,
    record,
    text,
    whole,
)
from core.data.images import FIT_RULE, fit_to_source, open_image
from core.data.preprocessing import Preprocessing
from core.data.shifts import DESCRIPTIONS, SHIFTS, Shift
from core.evaluation.evaluate import EvaluationError, split_images
from core.inference.forward import tta_description
from core.inference.opening import open_predictor
from core.inference.predictor import USE_TTA_BY_DEFAULT, BatchesFor, dataset_batches
from core.metrics.bootstrap import paired_bootstrap_ci
from core.metrics.calibration import expected_calibration_error
from core.metrics.classification import balanced_accuracy, compute_metrics, melanoma_auc
from core.models.ensemble_file import read_model_file

CLEAN = "clean"
# The report's metrics: fast functions of (labels, probs), so that the bootstrap can recompute them.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float | None]] = {
    "balanced_accuracy": balanced_accuracy,
    "mel_auc": melanoma_auc,
    "ece": expected_calibration_error,
}
Progress = Callable[[int, int], None]  # (images done, images in all) over every condition (and member)


class ShiftedImages(torch.utils.data.Dataset):
    """Images and labels as the model receives them after ``shift`` (None: as they are), fitted to the
    checkpoint's source size by ``fit_rule``."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        shift: Shift | None,
        prep: Preprocessing,
        transform: Callable,
        fit_rule: str = FIT_RULE,
    ):
        self.paths, self.labels = list(paths), [int(x) for x in labels]
        self.shift, self.prep, self.transform, self.fit_rule = shift, prep, transform, fit_rule

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # Decoded in full, never drafted down to the source size: the shift sees the file as it is.
        image = open_image(self.paths[i])
        if self.shift is not None:
            image = self.shift(image)
        if self.prep.source_size:
            image = fit_to_source(image, self.prep.source_size, self.fit_rule)
        return self.transform(image), self.labels[i]


def _drops(labels: np.ndarray, clean: np.ndarray, shifted: np.ndarray, bootstrap: int, groups: Sequence | None) -> dict:
    """Per metric: clean minus shifted (positive: lower under the shift) and its paired 95% interval, resampling
    the lesions ``groups`` names (images without it)."""
    drops = {}
    for name, fn in METRICS.items():
        before, after = fn(labels, clean), fn(labels, shifted)
        value = None if before is None or after is None else before - after
        ci = None
        if value is not None and bootstrap:
            try:
                ci = list(paired_bootstrap_ci(labels, clean, shifted, fn, n=bootstrap, groups=groups))
            except ValueError:  # undefined on every resample of a tiny split
                ci = None
        drops[name] = {"value": value, "ci": ci}
    return drops


def shifted_batches(
    paths: Sequence[str],
    labels: Sequence[int],
    shift: Shift | None,
    fit_rule: str,
    *,
    batch_size: int,
    num_workers: int,
    tta: bool,
) -> BatchesFor:
    """The batches of the images after ``shift``, for any model (a checkpoint or one member of an ensemble),
    each read with that model's own preprocessing as :meth:`Predictor.split_probabilities` asks."""
    return dataset_batches(
        lambda model: ShiftedImages(paths, labels, shift, model.prep, model.transform, fit_rule),
        batch_size,
        num_workers,
        tta,
    )


def known_shifts(shifts: Sequence[str] | None) -> list[str]:
    """``shifts`` (default: all of them), or an :class:`EvaluationError` naming the unknown ones."""
    names = list(SHIFTS if shifts is None else shifts)
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        raise EvaluationError(f"unknown shift {', '.join(unknown)}; choose from {', '.join(SHIFTS)}")
    return names


def condition_rows(
    labels: np.ndarray,
    probs: dict[str, np.ndarray],
    *,
    mel_threshold: float,
    bootstrap: int,
    groups: Sequence | None = None,
) -> list:
    """The report's rows, clean first: each condition's headline metrics, its drop from clean with a paired
    bootstrap interval (over the lesions ``groups`` names, else the images), and every metric at the model's
    operating point."""
    rows = []
    for name, shifted in probs.items():
        row = {"name": name, "description": DESCRIPTIONS[name]}
        row.update({metric: fn(labels, shifted) for metric, fn in METRICS.items()})
        if name != CLEAN:
            row["drop"] = _drops(labels, probs[CLEAN], shifted, bootstrap, groups)
        row["metrics"] = compute_metrics(labels, shifted, mel_threshold=mel_threshold)
        rows.append(row)
    return rows


def evaluate_shifts(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    split_seed: int | None = None,
    fractions: Sequence[float] | None = None,
    shifts: Sequence[str] | None = None,
    fit_rule: str = FIT_RULE,
    mel_threshold: float | None = None,
    tta: bool = USE_TTA_BY_DEFAULT,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    bootstrap: int = 1000,
    max_images: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """The robustness report of ``checkpoint`` (a checkpoint or an ensemble file) on ``split`` of ``data`` under
    ``shifts`` (names in :data:`core.data.shifts.SHIFTS`; default all), as a JSON-ready dict; ``progress`` hears the
    images done. The probabilities are the predictor's own, as :func:`core.evaluation.evaluate.evaluate_checkpoint`
    computes them, with test-time augmentation by default as the predictor uses it (``tta``). ``max_images``: a random
    sample (seed 0) of at most that many of the split's images, for a quicker look.

    Longer than most functions here on purpose: the report reads top to bottom as it is computed (the images,
    the pass as they are, one pass per shift, the record), each step a call of its own."""
    names = known_shifts(shifts)
    predictor = open_predictor(checkpoint, device=device)
    mel_threshold = predictor.mel_threshold if mel_threshold is None else mel_threshold
    _, frame, described = split_images(checkpoint, predictor.checkpoint, data, split, split_seed, fractions)
    described["sampled_from"] = None
    if max_images and len(frame) > max_images:
        described["sampled_from"] = len(frame)
        frame = frame.sample(n=max_images, random_state=0).reset_index(drop=True)
        described["n_images"] = len(frame)
    conditions = [CLEAN, *names]
    total, started = len(frame) * len(conditions) * predictor.passes, time.time()
    probs: dict[str, np.ndarray] = {}
    # A model that takes age, sex and body site gets them, as core.evaluation.evaluate gives them: shifts change the
    # image only.
    encoding = predictor.metadata_encoding
    encoded = None if encoding is None else torch.from_numpy(encoding.encode_frame(frame))
    for k, name in enumerate(conditions):
        base = k * len(frame) * predictor.passes
        hear = (lambda done, base=base: progress(base + done, total)) if progress else None
        batches = shifted_batches(
            frame["path"].tolist(),
            frame["label"].tolist(),
            SHIFTS.get(name),
            fit_rule,
            batch_size=batch_size,
            num_workers=num_workers,
            tta=tta,
        )
        probs[name], labels = predictor.split_probabilities(batches, tta=tta, metadata=encoded, progress=hear)
    seconds = time.time() - started
    return {
        "checkpoint": str(checkpoint),
        "arch": predictor.arch,
        **described,
        "temperature": predictor.temperature,
        "tta": tta,
        "tta_views": tta_description(tta),
        "fit_rule": fit_rule if predictor.prep.source_size else None,
        "bootstrap": bootstrap,
        "seconds": seconds,
        "images_per_s": len(frame) * len(conditions) / seconds if seconds > 0 else None,
        "bootstrap_unit": "lesion",
        "conditions": condition_rows(
            labels, probs, mel_threshold=mel_threshold, bootstrap=bootstrap, groups=frame["lesion_id"].tolist()
        ),
    }


# ---------------------------------------------------------------------------
# Where the report lives, and its schema

_DROP = {
    "value": Field(True, number("value", -1, 1, empty=True)),  # None: the metric is undefined under a condition
    "ci": Field(True, list_of("ci", number("ci[]", -1, 1), length=2, empty=True)),  # None: no bootstrap
}
_CONDITION = {
    "name": Field(True, one_of("name", (CLEAN, *SHIFTS))),
    "description": Field(True, text("description")),
    "balanced_accuracy": Field(True, probability("balanced_accuracy")),
    "mel_auc": Field(True, probability("mel_auc", empty=True)),  # None: no melanoma in the images
    "ece": Field(True, probability("ece")),
    "drop": Field(False, record("drop", {metric: Field(True, record(metric, _DROP)) for metric in METRICS})),
    "metrics": Field(True, check_metrics("metrics")),
}
# What evaluate_shifts records: the split described as an evaluate report describes it, then the conditions.
ROBUSTNESS_SCHEMA: dict[str, Field] = {
    **{
        key: EVALUATE_REPORT_SCHEMA[key]
        for key in (
            "checkpoint",
            "arch",
            "data",
            "split",
            "split_seed",
            "split_fractions",
            "split_source",
            "holdout_source",
            "split_note",
            "split_warning",
            "n_images",
            "validation",
            "temperature",
            "tta",
            "tta_views",
            "bootstrap_unit",
        )
    },
    "sampled_from": Field(False, whole("sampled_from", 0, empty=True)),
    "fit_rule": Field(False, text("fit_rule", empty=True)),
    "bootstrap": Field(True, whole("bootstrap", 0)),
    "seconds": Field(False, number("seconds", 0, math.inf)),
    "images_per_s": Field(False, number("images_per_s", 0, math.inf, empty=True)),
    "conditions": Field(True, list_of("conditions", record("conditions[]", _CONDITION))),
}
for _required in ("checkpoint", "arch", "data", "n_images", "tta"):  # what describe() reads of every report
    ROBUSTNESS_SCHEMA[_required] = ROBUSTNESS_SCHEMA[_required]._replace(required=True)
# A report is about 3 KB per condition (its metrics), 25 KB for the clean images and six shifts.
ROBUSTNESS_FILE_FORMAT = JsonFormat(
    "a robustness report", 2**20, 8, 50_000, closed_schema(ROBUSTNESS_SCHEMA, "a robustness report")
)


def read_robustness(run_dir: Path, split: str = "test") -> dict | None:
    """The robustness report saved for the run's model on ``split``; None when there is none, :class:`SchemaError`
    naming what is wrong when its schema refuses it (or it is another split's)."""
    name = robustness_file(split)
    try:
        report = read_json_file(Path(run_dir) / name, ROBUSTNESS_FILE_FORMAT)
    except FileNotFoundError:
        return None
    if not report["conditions"] or report["conditions"][0]["name"] != CLEAN:
        raise SchemaError(f"{name} is not {ROBUSTNESS_FILE_FORMAT.kind}: its first condition is not {CLEAN}")
    if report.get("split", "test") != split:  # a copied or renamed file must not speak for another split
        raise SchemaError(f"{name} holds the {report['split']} split's report, not the {split} split's")
    return report


def write_robustness(run_dir: Path, report: dict) -> None:
    """Saved as its split's file in ``run_dir`` (:func:`core.common.runs.robustness_file`)."""
    write_json(Path(run_dir) / robustness_file(report.get("split", "test")), report)


def record_folder(checkpoint_path: str | Path, run_folders: Sequence[Path]) -> Path | None:
    """The run folder that recorded the model file's training (see :func:`core.common.runs.matching_runs`), or None: a
    checkpoint's run, or an ensemble's run folder (the file's parent, whose ``config.json`` is the ensemble's)."""
    config = read_model_file(checkpoint_path).get("config") or {}
    found = matching_runs(checkpoint_path, config, run_folders)
    return found[0] if found else None


def checkpoint_for_run(run_dir: Path, model_files: Sequence[Path]) -> Path | None:
    """The checkpoint a run folder records: its ``best.pt``, else the first of ``model_files`` whose stored
    config is the run's (``checkpoints/reference.pt`` for the published ``reference-mnv2``), else None."""
    if (Path(run_dir) / "best.pt").is_file():
        return Path(run_dir) / "best.pt"
    for path in model_files:
        if record_folder(path, [Path(run_dir).parent]) == Path(run_dir):
            return Path(path)
    return None


def report_path(checkpoint_path: str | Path, run_folders: Sequence[Path], split: str = "test") -> Path:
    """Where ``lesionlab evaluate --shifts`` saves the report on ``split`` without ``--out``: the run folder's
    ``robustness.json`` (``robustness-val.json`` for validation); an EvaluationError when no run folder records the
    checkpoint."""
    folder = record_folder(checkpoint_path, run_folders)
    if folder is None:
        raise EvaluationError(
            f"no run folder records how {checkpoint_path} was trained, so the robustness report has no place "
            "beside it; pass --out FILE"
        )
    return folder / robustness_file(split)


# ---------------------------------------------------------------------------
# The table, as the command line, the page and the model card show it


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _drop(drop: dict | None, sign: int = 1) -> str:
    if drop is None or drop["value"] is None:
        return ""
    text = f"{sign * drop['value']:+.3f}"
    if drop["ci"]:
        low, high = sorted(sign * v for v in drop["ci"])
        text += f" ({low:+.3f} to {high:+.3f})"
    return text


def table_rows(report: dict) -> list[dict[str, str]]:
    """One row per condition: the three metrics and, under a shift, the drop in balanced accuracy and
    melanoma AUC and the change in ECE (shifted minus clean: positive is worse), each with its 95% interval."""
    rows = []
    for c in report["conditions"]:
        drop = c.get("drop") or {}
        rows.append(
            {
                "condition": c["name"],
                "what": c["description"],
                "balanced accuracy": _num(c["balanced_accuracy"]),
                "drop (95% CI)": _drop(drop.get("balanced_accuracy")),
                "melanoma AUC": _num(c["mel_auc"]),
                "AUC drop (95% CI)": _drop(drop.get("mel_auc")),
                "ECE": _num(c["ece"]),
                "ECE change (95% CI)": _drop(drop.get("ece"), sign=-1),
            }
        )
    return rows


def describe(report: dict) -> str:
    """One line: which model, images, split, TTA and fitting rule the report is about."""
    where = report["split"] if report["split"] == "all" else f"{report['split']} split (seed {report['split_seed']})"
    fit = f"; uploads fitted by the {report['fit_rule']!r} rule" if report.get("fit_rule") else ""
    sample = f" (a random sample of the {report['sampled_from']})" if report.get("sampled_from") else ""
    return (
        f"{report['arch']} checkpoint {report['checkpoint']} on {report['n_images']}{sample} images of "
        f"{Path(report['data']).name} ({where}), {views(report)}{fit}; {report['bootstrap']} paired bootstrap resamples"
    )


def views(report: dict) -> str:
    """Which views of each image the report's predictions averaged: "TTA: 4 flips", or "one view (no TTA)"."""
    if not report["tta"]:
        return "one view (no TTA)"
    return f"TTA: {report.get('tta_views') or '4 flips'}"  # a report from before tta_views: flips were all it took


def format_table(report: dict) -> str:
    """The table as aligned plain text, headed by :func:`describe`."""
    rows = table_rows(report)
    columns = [c for c in rows[0] if c != "what"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = [describe(report), "", "  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    lines += ["", *(f"{c['name']}: {c['description']}" for c in report["conditions"])]
    return "\n".join(lines)


def markdown_table(report: dict) -> list[str]:
    """The table as Markdown lines (the model card)."""
    rows = table_rows(report)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]


def terminal_progress(label: str = "robustness") -> Progress | None:
    """A progress line with images/s and ETA on stderr, on a terminal only (as ``core.evaluation.evaluate``'s)."""
    if not sys.stderr.isatty():
        return None
    started = time.time()

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r  {progress_text(label, done, total, started=started)}", end=end, file=sys.stderr, flush=True)

    return show
