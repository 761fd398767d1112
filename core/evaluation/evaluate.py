"""Evaluate a checkpoint on a dataset split: ``lesionlab evaluate --checkpoint CKPT --data DIR``.

The split is recomputed exactly as the trainer made it (lesion-grouped, with the
seed and fractions stored in the checkpoint's config), so "test" means the
images this model never trained or selected on, provided the folder is the one it
trained on: :func:`split_warning` says when it is not, or when the run's own
``split.csv`` disagrees.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.common.labels import CLASSES, DISPLAY_NAMES
from core.common.runs import read_split
from core.data.augment import eval_batches
from core.data.dataset import SOURCES_NAME, UNKNOWN_SOURCE, DatasetError, DatasetIndex
from core.data.decoded import CacheUnavailable, open_decoded
from core.data.images import ImageError
from core.data.layouts import index_any
from core.data.splits import SplitError, resolve_split, select_split
from core.evaluation.sources import format_groups, metrics_by_source
from core.inference.forward import (
    PredictionError,
    bounded_batch_size,
    tta_description,
)
from core.inference.opening import open_predictor
from core.inference.predictor import USE_TTA_BY_DEFAULT, ModelView, frame_batches
from core.metrics.bootstrap import confidence_intervals
from core.metrics.classification import (
    BALANCED_ACCURACY_UNDEFINED,
    REFERRAL_RULES,
    balanced_accuracy_defined,
    compute_metrics,
)
from core.models.checkpoints import CheckpointError

# Below this share of the recomputed split's images in the run's own split.csv, the "test" split
# evaluated is not the one the run held out, and the result says so.
SPLIT_OVERLAP_MIN = 0.9


class EvaluationError(ValueError):
    """The requested evaluation cannot be done as asked; the message says what to change."""


def index_data(root: str | Path) -> DatasetIndex:
    """The usable images below ``root`` and what was set aside: HAM10000 as the trainer indexes it, or an
    external set (isic-cli export, ISIC 2018 ground truth, class folders)."""
    return index_any(root)


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def _share_in_run_split(run_dir: Path, split: str, frame: pd.DataFrame) -> float | None:
    """The share of ``frame``'s images that the run in ``run_dir`` put in ``split``; None without a readable
    ``split.csv``."""
    try:
        own = read_split(run_dir)
        own_ids = set(own.loc[own["split"] == split, "image_id"].astype(str))
    except (OSError, ValueError, KeyError):  # no split.csv, or one that proves nothing either way
        return None
    return float(frame["image_id"].astype(str).isin(own_ids).mean()) if len(frame) else None


def split_warning(
    checkpoint: str | Path, data: str | Path, config: dict, split: str, frame: pd.DataFrame
) -> str | None:
    """Why the ``split`` recomputed on ``data`` (its rows are ``frame``) may not be the images the
    checkpoint's run held out as ``split``, or None. Compares with the run's ``split.csv`` when the
    checkpoint sits in its run folder, and ``data`` with the folder the run trained on."""
    if split == "all":
        return None
    reasons = []
    trained_on = config.get("data")
    same_folder = bool(trained_on) and _same_folder(trained_on, data)
    if trained_on and Path(trained_on).expanduser().is_dir() and not same_folder:
        reasons.append(f"{data} is not the folder this model was trained on ({trained_on})")
    run_dir = Path(checkpoint).parent
    share = _share_in_run_split(run_dir, split, frame)
    if share is not None and share < SPLIT_OVERLAP_MIN:
        reasons.append(
            f"only {share:.0%} of these {len(frame)} {split} images are in the {split} split of run {run_dir.name}"
        )
    if not reasons:
        return None
    # "all" is the honest choice on other images; on the training images it would include training images.
    if same_folder:
        advice = "some of these images may have been training images"
    elif share is not None and share >= SPLIT_OVERLAP_MIN:  # the run's image names: a copy, or other images
        advice = f"unless {data} is a copy of the training images, pass --split all to evaluate on every image"
    else:
        advice = f"pass --split all to evaluate on every image of {data}"
    return (
        f"{'; '.join(reasons)}. The {split} split recomputed here may not be the one the run held out, so "
        f"these numbers may not be its {split} results; {advice}"
    )


def _terminal_progress(done: int, total: int) -> None:
    print(f"\r  {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)


def _cached_batches(
    model: ModelView,
    device: torch.device,
    data: str | Path,
    index: DatasetIndex,
    frame: pd.DataFrame,
    batch_size: int,
    decoded_dir: str | Path,
) -> tuple[Iterable | None, str | None]:
    """Model-ready batches of ``frame``'s images and labels for ``model`` (a checkpoint or one member of an
    ensemble: its preprocessing) from the decoded-image cache in ``decoded_dir``; or None, and why the images
    must come from the files. The cache is reused, never built here: building it decodes the whole dataset, more
    than one split. Its batches equal the files' within resampling error (tests/core/data/test_decoded_reuse.py);
    a split holding an image the cache found damaged is read from the files, which say what is wrong with it."""
    try:
        cache = open_decoded(index.frame["path"].tolist(), model.prep, root=data, cache_dir=decoded_dir, build=False)
    except CacheUnavailable as exc:
        return None, f"{exc}; reading the JPEG files instead"
    damaged = set(cache.damaged).intersection(frame["path"])
    if damaged:
        return None, f"the decoded-image cache found {len(damaged)} of these images damaged; reading the JPEG files"
    paths, labels = frame["path"].tolist(), frame["label"].tolist()
    return eval_batches(cache, paths, labels, model.prep, batch_size, device, channels_last=False), None


def split_images(
    checkpoint_path: str | Path,
    checkpoint: dict,
    data: str | Path,
    split: str = "test",
    split_seed: int | None = None,
    fractions: Sequence[float] | None = None,
) -> tuple[DatasetIndex, pd.DataFrame, dict]:
    """The dataset in ``data``, the rows of its ``split`` for the checkpoint (its dict and path), and a JSON-ready
    record of them: data, split, seed, fractions and where they came from, notes, image count, validation."""
    config = checkpoint.get("config") or {}
    seed, fracs, source = resolve_split(checkpoint, split_seed, fractions)
    if split != "all" and config.get("max_images") and source == "checkpoint":
        raise EvaluationError(
            f"{checkpoint_path} was trained on a subsample (max_images={config['max_images']}), so its split cannot "
            "be recomputed from the full dataset; pass --split all, or --split-seed/--fractions to choose a split."
        )
    index = index_data(data)
    holdout = config.get("holdout_source") or ""  # a model trained without one image source is tested on it
    frame = select_split(index.frame, split, seed, fracs, holdout)
    return (
        index,
        frame,
        {
            "data": str(data),
            "split": split,
            "split_seed": seed if split != "all" else None,
            "split_fractions": list(fracs) if split != "all" else None,
            "split_source": source if split != "all" else None,
            "holdout_source": holdout or None,
            "split_note": (
                "this is not the split the checkpoint was trained with; its test images may have been training images"
                if split != "all" and source == "command line" and "split_seed" in config
                else None
            ),
            "split_warning": split_warning(checkpoint_path, data, config, split, frame),
            "n_images": len(frame),
            "validation": {
                "ok": index.report.ok,
                "summary": index.report.summary(),
                "problems": index.report.problems().values.tolist(),
            },
        },
    )


def _rounded(p: np.ndarray) -> dict[str, float]:
    return {code: round(float(q), 6) for code, q in zip(CLASSES, p, strict=True)}


def prediction_rows(
    frame: pd.DataFrame, labels: np.ndarray, probs: np.ndarray, withheld: np.ndarray | None = None
) -> list[dict]:
    """One JSON-ready row per image: its id, path, true and predicted class and probabilities; with the
    probabilities the model gave with its metadata withheld (``withheld``) beside them, so that the two can be
    compared on the same images (paired)."""
    rows = [
        {
            "image_id": image_id,
            "path": path,
            "true": CLASSES[label],
            "predicted": CLASSES[int(p.argmax())],
            "probabilities": _rounded(p),
        }
        for image_id, path, label, p in zip(frame["image_id"], frame["path"], labels, probs, strict=True)
    ]
    if withheld is not None:
        for row, p in zip(rows, withheld, strict=True):
            row["probabilities_withheld"] = _rounded(p)
    return rows


def withheld_report(
    known: dict,
    labels: np.ndarray,
    withheld: np.ndarray,
    *,
    thresholds: dict[str, float],
    bootstrap: int,
    lesions: Sequence[str] | None = None,
) -> dict:
    """What a model that takes age, sex and site scored with every field withheld, beside how many images knew
    each field (``known``); intervals resample ``lesions`` (each image's lesion id) when given."""
    return {
        "known": known,
        "withheld": {
            "metrics": compute_metrics(labels, withheld, **thresholds),
            "confidence_intervals": (
                confidence_intervals(labels, withheld, n=bootstrap, groups=lesions) if bootstrap else None
            ),
        },
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    split_seed: int | None = None,
    fractions: Sequence[float] | None = None,
    mel_threshold: float | None = None,
    tta: bool = USE_TTA_BY_DEFAULT,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    bootstrap: int = 1000,
    decoded_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    by_source: bool = False,
    stage: Callable[[str], None] | None = None,
) -> dict:
    """Run the checkpoint over one split of the dataset in ``data``; a JSON-ready dict of everything. With a
    ``decoded_dir``, the images come from the decoded-image cache there when it holds them (see
    :func:`_cached_batches`). ``progress(done, total)`` follows the images (by default a count on the terminal, when
    there is one: a log file full of carriage returns helps nobody). ``by_source`` adds each metric per image source
    (:func:`core.evaluation.sources.metrics_by_source`); an :class:`EvaluationError`, before the model runs, when no
    image's source is known. ``stage(text)`` hears each step as it starts (loading the model, finding the images,
    predicting, the bootstrap), so that a page says what is being done before the first images are.

    Longer than most functions here on purpose: it reads top to bottom as the command runs (open, choose the
    images, one pass, the pass without metadata, the record), and each step is a call of its own."""
    if progress is None and sys.stderr.isatty():
        progress = _terminal_progress
    say = stage or (lambda text: None)
    say(f"loading the model {Path(checkpoint).name}")
    predictor = open_predictor(checkpoint, device=device)
    thresholds = predictor.thresholds | ({} if mel_threshold is None else {"mel_threshold": mel_threshold})
    say(f"finding the images in {Path(data).name} and checking its metadata")
    index, frame, described = split_images(checkpoint, predictor.checkpoint, data, split, split_seed, fractions)
    if by_source and not (frame["source"] != UNKNOWN_SOURCE).any():
        raise EvaluationError(
            f"no image source is known for these images: put {SOURCES_NAME} (image_id,dataset) beside the metadata "
            f"of {data}, or give the metadata a dataset column"
        )
    files, notes = frame_batches(frame, batch_size, num_workers, tta), []

    def batches_for(model: ModelView) -> Iterable:
        if decoded_dir is not None:
            size = bounded_batch_size(batch_size, model.prep.input_size, tta)
            cached, why_not = _cached_batches(model, predictor.device, data, index, frame, size, decoded_dir)
            if cached is not None:
                return cached
            notes.append(why_not)
        return files(model)

    total = len(frame) * predictor.passes
    hear = (lambda done: progress(done, total)) if progress is not None else None
    encoding = predictor.metadata_encoding
    encoded = None if encoding is None else torch.from_numpy(encoding.encode_frame(frame))

    def run(metadata: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        return predictor.split_probabilities(batches_for, tta=tta, metadata=metadata, progress=hear)

    say(f"reading, decoding and predicting {len(frame):,} images" + (f" ({tta_description(tta)})" if tta else ""))
    probs, labels = run(encoded)
    lesions = frame["lesion_id"].tolist()  # the intervals resample lesions: a lesion's images are not independent
    # A model that takes metadata: the same images again with every field unknown, what it does without them.
    withheld, metadata = None, None
    if encoding is not None:
        say("predicting the images again with age, sex and site withheld")
        withheld = run(None)[0]
    if bootstrap:
        say(f"95% intervals: {bootstrap:,} bootstrap resamples of the lesions")
    if withheld is not None:
        metadata = withheld_report(
            encoding.known(encoded), labels, withheld, thresholds=thresholds, bootstrap=bootstrap, lesions=lesions
        )
    return {
        "checkpoint": str(checkpoint),
        "arch": predictor.arch,
        **described,
        "temperature": predictor.temperature,
        "tta": tta,
        "tta_views": tta_description(tta),
        "input_pipeline": "jpeg" if notes or decoded_dir is None else "decoded",
        "input_pipeline_note": notes[0] if notes else None,
        "metrics": compute_metrics(labels, probs, **thresholds),
        "confidence_intervals": confidence_intervals(labels, probs, n=bootstrap, groups=lesions) if bootstrap else None,
        "bootstrap_unit": "lesion",
        "by_source": (
            metrics_by_source(frame, labels, probs, mel_threshold=thresholds["mel_threshold"], bootstrap=bootstrap)
            if by_source
            else None
        ),
        # A model that takes metadata: how many images knew each field (the metrics above use them) and the
        # metrics with every field withheld. None for a model of the image alone.
        "metadata": metadata,
        "predictions": prediction_rows(frame, labels, probs, withheld),
    }


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(result: dict, key: str) -> str:
    intervals = result.get("confidence_intervals") or {}
    if key not in intervals:
        return ""
    low, high = intervals[key]
    return f"  (95% CI {low:.3f}–{high:.3f})"


def format_report(result: dict) -> str:
    """The per-class table, headline numbers and confusion matrix as aligned plain text."""
    m = result["metrics"]
    name_w = max(len(n) for n in DISPLAY_NAMES.values())
    where = (
        result["split"]
        if result["split"] == "all"
        else (
            f"{result['split']} split, seed {result['split_seed']}, fractions "
            f"{'/'.join(f'{f:g}' for f in result['split_fractions'])} from {result['split_source']}"
        )
    )
    lines = [
        f"{result['arch']} checkpoint {result['checkpoint']}",
        f"{result['n_images']} images from {result['data']} ({where}); temperature {result['temperature']:.3f}"
        f"{', TTA: ' + result['tta_views'] if result['tta'] else ', no TTA'}",
        "",
    ]
    if not result["validation"]["ok"]:  # what indexing set aside, so nobody mistakes the image count
        lines += result["validation"]["summary"].splitlines()[1:] + [""]

    header = f"{'code':<6} {'diagnosis':<{name_w}} {'precision':>9} {'recall':>7} {'f1':>6} {'AUC':>6} {'support':>7}"
    lines += [header, "-" * len(header)]
    for row in m["per_class"]:
        lines.append(
            f"{row['code']:<6} {row['name']:<{name_w}} {row['precision']:>9.3f} {row['recall']:>7.3f} "
            f"{row['f1']:>6.3f} {_num(row['auc']):>6} {row['support']:>7}"
        )
    lines.append("-" * len(header))
    for avg in ("macro", "weighted"):
        a = m[avg]
        auc = _num(m["roc_auc"]["macro"]) if avg == "macro" else ""
        lines.append(
            f"{avg + ' avg':<{6 + 1 + name_w}} {a['precision']:>9.3f} {a['recall']:>7.3f} "
            f"{a['f1']:>6.3f} {auc:>6} {m['n']:>7}"
        )

    rules = []
    for rule in REFERRAL_RULES:
        if (op := m.get(rule.key)) is not None:  # reports written before the malignant rule lack it
            sens = f"{_num(op['sensitivity'])} ({op['tp']}/{op['tp'] + op['fn']})"
            spec = f"{_num(op['specificity'])} ({op['tn']}/{op['tn'] + op['fp']})"
            rules.append(f"{rule.key}, {rule.label} >= {op['threshold']:g}: sensitivity {sens}, specificity {spec}")
    lines += [
        "",
        f"accuracy             {m['accuracy']:.3f}{_ci(result, 'accuracy')}",
        "balanced accuracy    "
        + (
            f"{m['balanced_accuracy']:.3f}{_ci(result, 'balanced_accuracy')}"
            if balanced_accuracy_defined(m)
            else BALANCED_ACCURACY_UNDEFINED
        ),
        f"macro F1             {m['macro']['f1']:.3f}{_ci(result, 'macro_f1')}",
        f"macro AUC            {_num(m['roc_auc']['macro'])}",
        f"ECE (15 bins)        {m['ece']:.3f}",
        *rules,
        "",
        "Confusion matrix (rows: true diagnosis, columns: predicted)",
    ]
    cell = max(5, len(str(max(max(r) for r in m["confusion_matrix"]))) + 1)
    lines.append(f"{'true/pred':<10}" + "".join(f"{code:>{cell}}" for code in CLASSES))
    for code, row in zip(CLASSES, m["confusion_matrix"], strict=True):
        lines.append(f"{code:<10}" + "".join(f"{v:>{cell}}" for v in row))
    if result.get("metadata"):
        lines += ["", *metadata_lines(result)]
    if result.get("by_source"):
        lines += ["", "By image source (95% intervals over lesions)", format_groups(result["by_source"])]
    return "\n".join(lines)


def metadata_lines(result: dict) -> list[str]:
    """A metadata model's report with metadata and with all of it withheld, side by side."""
    known, withheld = result["metadata"]["known"], result["metadata"]["withheld"]
    counts = ", ".join(f"{field} {n}" for field, n in known.items())
    lines = [
        f"Metadata (age, sex, body site) known for {counts} of {result['n_images']} images; the numbers above "
        "use them.",
        f"{'':<20} {'with metadata':>14} {'withheld':>10}",
    ]
    rows = {
        "accuracy": lambda r: r["metrics"]["accuracy"],
        "balanced accuracy": lambda r: r["metrics"]["balanced_accuracy"],
        "melanoma AUC": lambda r: r["metrics"]["roc_auc"]["per_class"].get("mel"),
        "macro AUC": lambda r: r["metrics"]["roc_auc"]["macro"],
        "ECE (15 bins)": lambda r: r["metrics"]["ece"],
    }
    for name, value in rows.items():
        lines.append(f"{name:<20} {_num(value(result)):>14} {_num(value(withheld)):>10}")
    return lines


USER_ERRORS = (CheckpointError, DatasetError, ImageError, EvaluationError, SplitError, PredictionError, OSError)
