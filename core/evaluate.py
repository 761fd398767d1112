"""Evaluate a checkpoint on a dataset split: ``python -m core.evaluate --checkpoint CKPT --data DIR``.

The split is recomputed exactly as the trainer made it (lesion-grouped, with the
seed and fractions stored in the checkpoint's config), so "test" means the
images this model never trained or selected on, provided the folder is the one it
trained on: :func:`split_warning` says when it is not, or when the run's own
``split.csv`` disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.augment import eval_batches
from core.checkpoints import CheckpointError
from core.data import SPLITS, DatasetError, DatasetIndex, LesionDataset, split_by_lesion
from core.decoded import CacheUnavailable, open_decoded
from core.evaluation import compute_metrics, confidence_intervals
from core.images import ImageError
from core.inference import PredictionError, check_probabilities, predict_probs, tta_description, view_count
from core.labels import CLASSES, DISPLAY_NAMES
from core.layouts import index_any
from core.predict import TTA_HELP, USE_TTA_BY_DEFAULT, Predictor
from core.runs import read_split

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SEED = 0
# A batch holds at most as many pixels as 64 images of 224×224, whatever input size the checkpoint asks
# for: a 1024×1024 image takes about 260 MB of activations in ResNet-50, so 64 of them would take 16 GB.
MAX_BATCH_PIXELS = 64 * 224 * 224
# Below this share of the recomputed split's images in the run's own split.csv, the "test" split
# evaluated is not the one the run held out, and the result says so.
SPLIT_OVERLAP_MIN = 0.9


class EvaluationError(ValueError):
    """The requested evaluation cannot be done as asked; the message says what to change."""


def index_data(root: str | Path) -> DatasetIndex:
    """The usable images below ``root`` and what was set aside: HAM10000 as the trainer indexes it, or an
    external set (isic-cli export, ISIC 2018 ground truth, class folders)."""
    return index_any(root)


def resolve_split(
    checkpoint: dict, split_seed: int | None = None, fractions: Sequence[float] | None = None
) -> tuple[int, tuple[float, float, float], str]:
    """The split seed and fractions to use, and where they came from: "checkpoint" (the trainer's
    ``config``), "command line" (explicit values that differ from it) or "defaults"."""
    config = checkpoint.get("config") or {}
    stored_seed = config.get("split_seed")
    stored = config.get("split_fractions")
    stored_fracs = tuple(float(f) for f in stored) if stored is not None else None
    seed = split_seed if split_seed is not None else stored_seed
    fracs = tuple(float(f) for f in fractions) if fractions is not None else stored_fracs
    if (seed, fracs) != (stored_seed, stored_fracs):
        source = "command line"
    elif stored_seed is not None or stored_fracs is not None:
        source = "checkpoint"
    else:
        source = "defaults"
    seed = DEFAULT_SEED if seed is None else int(seed)
    fracs = DEFAULT_FRACTIONS if fracs is None else fracs
    if len(fracs) != 3 or min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise EvaluationError(f"split fractions must be three non-negative numbers summing to 1, got {list(fracs)}")
    return seed, fracs, source


def select_split(frame: pd.DataFrame, split: str, seed: int, fractions: Sequence[float]) -> pd.DataFrame:
    """The rows of ``frame`` in ``split`` ("train", "val", "test" or "all") under the lesion-grouped split."""
    if split == "all":
        return frame.reset_index(drop=True)
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; choose from {', '.join((*SPLITS, 'all'))}")
    assigned = split_by_lesion(frame, fractions, seed)
    rows = frame[assigned.to_numpy() == split].reset_index(drop=True)
    if rows.empty:
        raise EvaluationError(f"the {split} split is empty with fractions {list(fractions)}; use --split all")
    return rows


def bounded_batch_size(requested: int, input_size: Sequence[int], tta: bool = False) -> int:
    """``requested`` images, lowered so that a batch of ``input_size`` (height, width) images stays within
    ``MAX_BATCH_PIXELS``, with their test-time augmentation views when ``tta`` (they go through the model
    together); at least 1."""
    pixels = input_size[0] * input_size[1] * view_count(tta)
    return max(1, min(requested, MAX_BATCH_PIXELS // pixels))


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


def _progress(batches: Iterable, total: int, batch_size: int, report: Callable[[int, int], None] | None) -> Iterator:
    """``batches``, calling ``report(done, total)`` once each batch has been used."""
    for i, batch in enumerate(batches):
        yield batch
        if report is not None:
            report(min((i + 1) * batch_size, total), total)


def _batches(
    predictor: Predictor,
    data: str | Path,
    index: DatasetIndex,
    frame: pd.DataFrame,
    batch_size: int,
    num_workers: int,
    decoded_dir: str | Path | None,
) -> tuple[Iterable, str | None]:
    """Model-ready batches of ``frame``'s images and labels, and why they are not from the decoded-image cache
    when one was asked for (``decoded_dir``). The cache is reused, never built here: building it decodes the
    whole dataset, more than one split. Its batches equal the files' within resampling error
    (tests/test_decoded_reuse.py); a split holding an image the cache found damaged is read from the files,
    which say what is wrong with it."""
    note, prep = None, predictor.prep
    if decoded_dir is not None:
        try:
            cache = open_decoded(index.frame["path"].tolist(), prep, root=data, cache_dir=decoded_dir, build=False)
            damaged = set(cache.damaged).intersection(frame["path"])
            if not damaged:
                paths, labels = frame["path"].tolist(), frame["label"].tolist()
                return eval_batches(cache, paths, labels, prep, batch_size, predictor.device, channels_last=False), None
            note = f"the decoded-image cache found {len(damaged)} of these images damaged; reading the JPEG files"
        except CacheUnavailable as exc:
            note = f"{exc}; reading the JPEG files instead"
    dataset = LesionDataset.from_frame(frame, predictor.transform, prep)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers), note


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
    frame = select_split(index.frame, split, seed, fracs)
    return (
        index,
        frame,
        {
            "data": str(data),
            "split": split,
            "split_seed": seed if split != "all" else None,
            "split_fractions": list(fracs) if split != "all" else None,
            "split_source": source if split != "all" else None,
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
) -> dict:
    """Run the checkpoint over one split of the dataset in ``data``; a JSON-ready dict of everything. With a
    ``decoded_dir``, the images come from the decoded-image cache there when it holds them (see :func:`_batches`).
    ``progress(done, total)`` follows the images (by default a count on the terminal, when there is one:
    a log file full of carriage returns helps nobody)."""
    if progress is None and sys.stderr.isatty():
        progress = _terminal_progress
    predictor = Predictor(checkpoint, device=device)
    mel_threshold = predictor.mel_threshold if mel_threshold is None else mel_threshold
    index, frame, described = split_images(checkpoint, predictor.checkpoint, data, split, split_seed, fractions)
    batch_size = bounded_batch_size(batch_size, predictor.prep.input_size, tta)
    # Imported here: core.ensemble builds on this module.
    from core.ensemble import EnsemblePredictor, combine

    ensemble = isinstance(predictor, EnsemblePredictor)
    # An ensemble's members read the files, each with its own preprocessing (frame_probabilities).
    loader, pipeline_note = (
        (None, None) if ensemble else _batches(predictor, data, index, frame, batch_size, num_workers, decoded_dir)
    )
    encoding = None if ensemble else predictor.metadata_encoding
    encoded = None if encoding is None else torch.from_numpy(encoding.encode_frame(frame))

    def run(metadata: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        if ensemble:  # each member reads the images with its own preprocessing
            member_probs, labels = predictor.frame_probabilities(
                frame, batch_size=batch_size, num_workers=num_workers, tta=tta
            )
            probs = combine(member_probs, predictor.temperature)
        else:
            probs, labels = predict_probs(
                predictor.model,
                _progress(loader, len(frame), batch_size, progress),
                predictor.device,
                temperature=predictor.temperature,
                tta=tta,
                metadata=metadata,
            )
        check_probabilities(probs)
        return probs, labels

    probs, labels = run(encoded)
    metrics = compute_metrics(labels, probs, mel_threshold=mel_threshold)
    metadata, withheld = None, None
    if encoding is not None:
        # The same images again with every field unknown (metadata None): what the model does without them.
        withheld, _ = run(None)
        metadata = {
            "known": encoding.known(encoded),
            "withheld": {
                "metrics": compute_metrics(labels, withheld, mel_threshold=mel_threshold),
                "confidence_intervals": confidence_intervals(labels, withheld, n=bootstrap) if bootstrap else None,
            },
        }
    rounded = lambda p: {code: round(float(q), 6) for code, q in zip(CLASSES, p, strict=True)}  # noqa: E731
    predictions = [
        {
            "image_id": image_id,
            "path": path,
            "true": CLASSES[label],
            "predicted": CLASSES[int(p.argmax())],
            "probabilities": rounded(p),
        }
        for image_id, path, label, p in zip(frame["image_id"], frame["path"], labels, probs, strict=True)
    ]
    if withheld is not None:  # per image, so that the two can be compared on the same images (paired)
        for row, p in zip(predictions, withheld, strict=True):
            row["probabilities_withheld"] = rounded(p)
    return {
        "checkpoint": str(checkpoint),
        "arch": predictor.arch,
        **described,
        "temperature": predictor.temperature,
        "tta": tta,
        "tta_views": tta_description(tta),
        "input_pipeline": "jpeg" if ensemble or pipeline_note or decoded_dir is None else "decoded",
        "input_pipeline_note": pipeline_note,
        "metrics": metrics,
        "confidence_intervals": confidence_intervals(labels, probs, n=bootstrap) if bootstrap else None,
        # A model that takes metadata: how many images knew each field (the metrics above use them) and the
        # metrics with every field withheld. None for a model of the image alone.
        "metadata": metadata,
        "predictions": predictions,
    }


# ---------------------------------------------------------------------------
# The terminal report


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

    mel = m["melanoma"]
    sens = f"{_num(mel['sensitivity'])} ({mel['tp']}/{mel['tp'] + mel['fn']})"
    spec = f"{_num(mel['specificity'])} ({mel['tn']}/{mel['tn'] + mel['fp']})"
    lines += [
        "",
        f"accuracy             {m['accuracy']:.3f}{_ci(result, 'accuracy')}",
        f"balanced accuracy    {m['balanced_accuracy']:.3f}{_ci(result, 'balanced_accuracy')}",
        f"macro F1             {m['macro']['f1']:.3f}{_ci(result, 'macro_f1')}",
        f"macro AUC            {_num(m['roc_auc']['macro'])}",
        f"ECE (15 bins)        {m['ece']:.3f}",
        f"melanoma, P(mel) >= {mel['threshold']:g}: sensitivity {sens}, specificity {spec}",
        "",
        "Confusion matrix (rows: true diagnosis, columns: predicted)",
    ]
    cell = max(5, len(str(max(max(r) for r in m["confusion_matrix"]))) + 1)
    lines.append(f"{'true/pred':<10}" + "".join(f"{code:>{cell}}" for code in CLASSES))
    for code, row in zip(CLASSES, m["confusion_matrix"], strict=True):
        lines.append(f"{code:<10}" + "".join(f"{v:>{cell}}" for v in row))
    if result.get("metadata"):
        lines += ["", *metadata_lines(result)]
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.evaluate",
        description="Evaluate a Lesion Lab checkpoint on a HAM10000-layout dataset: per-class precision, "
        "recall, F1 and AUC, balanced accuracy, calibration, melanoma sensitivity/specificity "
        "and the confusion matrix.",
        epilog="The split is recomputed from the seed and fractions stored in the checkpoint unless "
        "--split-seed/--fractions are given. Exit status 2 when the checkpoint or data cannot be used.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by the trainer")
    parser.add_argument(
        "--data",
        required=True,
        help="HAM10000 folder (metadata CSV and images), or an external set: isic-cli export, "
        "ISIC 2018 Task 3 ground truth with images, or one folder per class",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=(*SPLITS, "all"),
        help="which images (default: test); use all for an external test set",
    )
    parser.add_argument("--split-seed", type=int, help="override the checkpoint's split seed")
    parser.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help="override the checkpoint's split fractions",
    )
    parser.add_argument("--out", type=Path, help="write the full report (with per-image predictions) as JSON")
    parser.add_argument(
        "--mel-threshold",
        type=float,
        help="P(melanoma) at or above which an image counts as melanoma-positive (default: the model's own "
        "operating point, chosen on its validation split, else 0.5)",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=USE_TTA_BY_DEFAULT,
        help=f"{TTA_HELP.replace('%', '%%')} (default: {'on' if USE_TTA_BY_DEFAULT else 'off'}; the report "
        "records which views)",
    )
    parser.add_argument(
        "--shifts",
        action="store_true",
        help="the robustness report instead: the split as it is and under each acquisition shift (square crop, "
        "2× and ½ scale, JPEG quality 50, a colour cast, 90° rotation) with the drops from clean; saved as "
        "robustness.json in the checkpoint's (or ensemble's) run folder, or at --out",
    )
    parser.add_argument(
        "--max-images", type=int, help="with --shifts: a random sample (seed 0) of this many of the split's images"
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--decoded-dir",
        help="the decoded-image cache training built (its --decoded-dir, default .cache/decoded): the images are "
        "read from it when it holds this dataset at the checkpoint's source size, else from their files (with a "
        "note saying why when this flag names it); '' always reads the files",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mel_threshold is not None and not 0.0 <= args.mel_threshold <= 1.0:
        print(f"error: --mel-threshold must be within [0, 1], got {args.mel_threshold}", file=sys.stderr)
        return 2
    if args.shifts:
        return _robustness(args)
    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            decoded_dir=".cache/decoded" if args.decoded_dir is None else args.decoded_dir or None,
            **_options(args),
        )
        if result["split_note"]:
            print(f"note: {result['split_note']}.", file=sys.stderr)
        if result["split_warning"]:
            print(f"warning: {result['split_warning']}.", file=sys.stderr)
        if result["input_pipeline_note"] and args.decoded_dir:  # said when the cache was asked for by name
            print(f"note: {result['input_pipeline_note']}.", file=sys.stderr)
        print(format_report(result))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
            print(f"\nreport written to {args.out}")
    except USER_ERRORS as exc:
        return _error(exc)
    return 0


def _options(args: argparse.Namespace) -> dict:
    """The command line's settings shared by the evaluation and the robustness report."""
    return {
        "split": args.split,
        "split_seed": args.split_seed,
        "fractions": args.fractions,
        "mel_threshold": args.mel_threshold,
        "tta": args.tta,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": args.device,
        "bootstrap": args.bootstrap,
    }


USER_ERRORS = (CheckpointError, DatasetError, ImageError, EvaluationError, PredictionError, OSError)


def _error(exc: Exception) -> int:
    message = str(exc)
    if "Original Traceback" in message:
        # Raised in a DataLoader worker: torch appends the worker's traceback; its last line is the error.
        message = message.strip().splitlines()[-1]
    print(f"error: {message}", file=sys.stderr)
    return 2


def _robustness(args: argparse.Namespace) -> int:
    """``--shifts``: the robustness report (core.robustness), printed and saved."""
    from core import robustness  # it builds on this module
    from core.files import write_json
    from core.settings import run_folders

    try:
        out = args.out or robustness.report_path(args.checkpoint, run_folders())
        report = robustness.evaluate_shifts(
            args.checkpoint,
            args.data,
            **_options(args),
            max_images=args.max_images,
            progress=robustness.terminal_progress(),
        )
        if report["split_warning"]:
            print(f"warning: {report['split_warning']}.", file=sys.stderr)
        print(robustness.format_table(report))
        write_json(out, report)
        print(f"\nrobustness report written to {out}")
    except USER_ERRORS as exc:
        return _error(exc)
    except KeyboardInterrupt:
        print("\nstopped; no report was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
