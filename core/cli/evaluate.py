"""``lesionlab evaluate --checkpoint CKPT --data DIR`` (``python -m core.cli.evaluate``): a model's metrics on a
dataset split, with bootstrap intervals, as text or JSON; ``--shifts`` writes its robustness report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from core.common.runs import MAX_SPLIT_SEED
from core.common.runtime import device_problem
from core.data.splits import SPLITS, SplitError, check_fractions
from core.evaluation.evaluate import USER_ERRORS, evaluate_checkpoint, format_report
from core.inference.predictor import TTA_HELP, USE_TTA_BY_DEFAULT


def _parser() -> argparse.ArgumentParser:
    """Every flag of ``lesionlab evaluate`` (a declaration per flag, in the order ``--help`` lists them: long,
    and clearer in one place than split)."""
    parser = argparse.ArgumentParser(
        prog="lesionlab evaluate",
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
        "robustness.json (robustness-val.json with --split val) in the checkpoint's (or ensemble's) run folder, or at "
        "--out",
    )
    parser.add_argument(
        "--by-source",
        action="store_true",
        help="also each metric per image source (HAM10000_sources.csv beside the metadata, or its dataset column), "
        "with 95%% intervals resampling lesions",
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


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags' values, in one line (before any file is read); None when nothing is."""
    if args.mel_threshold is not None and not 0.0 <= args.mel_threshold <= 1.0:  # NaN fails too
        return f"--mel-threshold must be within [0, 1], got {args.mel_threshold}"
    if args.split_seed is not None and not 0 <= args.split_seed <= MAX_SPLIT_SEED:
        return f"--split-seed must be a whole number from 0 to {MAX_SPLIT_SEED}, got {args.split_seed}"
    if args.fractions is not None:
        try:
            check_fractions(args.fractions)
        except SplitError as exc:
            return f"--fractions: {exc}"
    for flag, value, least in (
        ("--bootstrap", args.bootstrap, 0),
        ("--workers", args.workers, 0),
        ("--batch-size", args.batch_size, 1),
        ("--max-images", args.max_images, 1),
    ):
        if value is not None and value < least:
            return f"{flag} must be a whole number from {least}, got {value}"
    problem = device_problem(args.device)
    return None if problem is None else f"--device: {problem}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = argument_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.shifts:
        return _robustness(args)
    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            decoded_dir=".cache/decoded" if args.decoded_dir is None else args.decoded_dir or None,
            by_source=args.by_source,
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


def _error(exc: Exception) -> int:
    message = str(exc)
    if "Original Traceback" in message:
        # Raised in a DataLoader worker: torch appends the worker's traceback; its last line is the error.
        message = message.strip().splitlines()[-1]
    print(f"error: {message}", file=sys.stderr)
    return 2


def _robustness(args: argparse.Namespace) -> int:
    """``--shifts``: the robustness report (core.evaluation.robustness), printed and saved."""
    from core.common.files import write_json
    from core.common.settings import run_folders
    from core.evaluation import robustness

    try:
        out = args.out or robustness.report_path(args.checkpoint, run_folders(), args.split)
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
