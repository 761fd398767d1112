"""``lesionlab predict CHECKPOINT IMAGE…`` (``python -m core.cli.predict``): predictions for images on the command
line, or a CSV for folders and .zip archives (``--csv``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT
from core.data.images import ImageError
from core.inference.batch import (
    ASSESSED,
    FAILED,
    NOT_ASSESSED,
    UNLIKE_DERMOSCOPY,
    BatchError,
    gather,
    predict_files,
    write_csv,
)
from core.inference.explain import CAM_METHODS, overlay
from core.inference.forward import PredictionError
from core.inference.opening import open_predictor
from core.inference.prediction import Prediction
from core.inference.predictor import DISCLAIMER, TTA_HELP, USE_TTA_BY_DEFAULT, Predictor
from core.inference.unfamiliar import UnfamiliarCheck
from core.models.checkpoints import CheckpointError
from core.models.metadata import MAX_AGE, MetadataError, describe


def _bar(p: float, width: int = 20) -> str:
    return "█" * int(round(p * width))


def format_prediction(name: str, pred: Prediction) -> str:
    lines = [f"{name}: {pred.top_name} ({pred.top_class}) {pred.confidence:.1%}{' [TTA]' if pred.tta else ''}"]
    width = max(len(n) for n in DISPLAY_NAMES.values())
    for code, display, p in pred.ranked():
        lines.append(f"  {code:<6}{display:<{width}}  {p:7.1%}  {_bar(p)}")
    malignant = "+".join(c for c in CLASSES if c in MALIGNANT)
    lines.append(f"  malignant ({malignant}): {pred.malignant_probability:.1%}")
    if pred.metadata_note:
        lines.append(f"  {pred.metadata_note}")
    if pred.members is not None:
        lines += [f"  {pred.members.agreement_text()}", f"  {pred.members.spread_text()}"]
    return "\n".join(lines)


def format_not_assessed(name: str, check: UnfamiliarCheck) -> str:
    """What is printed instead of a class for an image the unfamiliar-image check flags: as on Diagnose, the model's
    output for it is no finding about any class, so only why it was not assessed."""
    return "\n".join([f"{name}: {NOT_ASSESSED}: {UNLIKE_DERMOSCOPY}", *(f"  {reason}" for reason in check.reasons)])


def _cam_path(out: Path, image: str, i: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.stem}-{i + 1}-{Path(image).stem}{out.suffix}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionlab predict",
        description="Classify dermoscopy images with a Lesion Lab checkpoint: all seven class "
        "probabilities per image, optionally with a Grad-CAM overlay; with --csv, a batch of files, "
        "folders and .zip archives to one CSV row per file.",
        epilog="An image unlike dermoscopy is not assessed, as on the Diagnose page: no class, only why. Exit status "
        "2 when a checkpoint or an image cannot be used; with --csv, 1 when some files could not be predicted (their "
        f"rows say why) and 2 when nothing could. {DISCLAIMER}",
    )
    parser.add_argument("checkpoint", help="a .pt file written by the trainer")
    parser.add_argument(
        "images", nargs="+", metavar="INPUT", help="JPEG or PNG files; with --csv also folders and .zip archives"
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=USE_TTA_BY_DEFAULT,
        help=f"{TTA_HELP.replace('%', '%%')} (default: {'on' if USE_TTA_BY_DEFAULT else 'off'})",
    )
    parser.add_argument("--age", type=float, help="the patient's age, for a model that takes metadata")
    parser.add_argument("--sex", help="female or male, for a model that takes metadata")
    parser.add_argument("--site", help="the body site (e.g. back, face), for a model that takes metadata")
    parser.add_argument(
        "--gradcam",
        metavar="OUT.png",
        type=Path,
        help="write a class-activation overlay for the predicted class; with several images OUT-<n>-<image>.png each",
    )
    parser.add_argument("--method", default="gradcam", choices=sorted(CAM_METHODS), help="CAM method")
    parser.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity in the overlay")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument(
        "--csv",
        metavar="OUT.csv",
        help="predict in batches and write one row per file: file, top class, P(melanoma), confidence, the "
        "Diagnose page's warnings, the error for a file that cannot be used, all seven probabilities; an image unlike "
        "dermoscopy is not assessed (no class or probabilities; its not_assessed column says why) "
        "(- for standard output); progress goes to standard error",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass with --csv")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return parser


def _batch_main(predictor: Predictor, args: argparse.Namespace) -> int:
    """``--csv``: every file of the inputs to one CSV row, written as each batch finishes."""
    import time

    try:
        files = gather(args.images)
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no files in {' '.join(args.images)}", file=sys.stderr)
        return 2
    start, shown, tty = time.perf_counter(), [0], sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        line = f"  {done}/{total} files, {done / max(time.perf_counter() - start, 1e-9):.1f} images/s"
        if tty:
            print("\r" + line, end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done == total or done * 10 // total > shown[0] * 10 // total:  # a log gets a line per tenth
            shown[0] = done
            print(line, file=sys.stderr, flush=True)

    try:
        out = sys.stdout if args.csv == "-" else open(args.csv, "w", newline="", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"error: cannot write {args.csv} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    try:
        rows = predict_files(
            predictor, files, tta=args.tta, thumbnails=False, batch_size=args.batch_size, progress=progress
        )
        outcomes = write_csv(rows, out)
    except PredictionError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - start
    where = "" if args.csv == "-" else f"; wrote {args.csv}"
    errors = outcomes[FAILED]
    print(
        f"{len(files)} files: {outcomes[ASSESSED]} assessed, {outcomes[NOT_ASSESSED]} {NOT_ASSESSED} "
        f"({UNLIKE_DERMOSCOPY}; see their not_assessed column), {errors} could not be used (see their error column) "
        f"in {seconds:.1f} s{where}",
        file=sys.stderr,
    )
    # A file the model did not assess was still read and judged: the tool worked, so it is no failure.
    if errors == len(files):
        return 2
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.csv is not None and (args.gradcam or args.json):
        parser.error("--csv writes a table; it does not combine with --gradcam or --json")
    if args.csv is None and any(Path(i).is_dir() or i.lower().endswith(".zip") for i in args.images):
        parser.error("folders and .zip archives are predicted as a batch: add --csv OUT.csv")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.age is not None and not 0 <= args.age <= MAX_AGE:  # NaN too: the metadata would call it unknown
        print(f"error: --age must be a number of years from 0 to {MAX_AGE}; got {args.age}", file=sys.stderr)
        return 2
    metadata = {"age": args.age, "sex": args.sex, "site": args.site}
    if args.csv is not None and describe(metadata):
        parser.error("--age, --sex and --site describe one patient's image; they do not combine with --csv")
    try:
        predictor = open_predictor(args.checkpoint, device=args.device)
    except (CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.csv is not None:
        return _batch_main(predictor, args)
    results, failed = [], False
    for i, image in enumerate(args.images):
        try:
            pred = predictor.predict(image, tta=args.tta, metadata=metadata)
            check = predictor.unfamiliar(pred)
            if check.unfamiliar:  # as on Diagnose: no class, probabilities or heatmap, only why
                entry = {"image": image, "assessed": False, "not_assessed": list(check.reasons)}
            else:
                entry = {"image": image, "assessed": True, **pred.to_dict()}
            if args.gradcam and not check.unfamiliar:
                out = _cam_path(args.gradcam, image, i, len(args.images))
                out.parent.mkdir(parents=True, exist_ok=True)
                overlay(pred.image, predictor.explain(pred, args.method), args.alpha).save(out)
                entry["gradcam"] = str(out)
        except (ImageError, PredictionError, MetadataError, OSError) as exc:
            failed = True
            print(f"error: {exc}", file=sys.stderr)
            results.append({"image": image, "error": str(exc)})
            continue
        results.append(entry)
        if not args.json:
            print(format_not_assessed(image, check) if check.unfamiliar else format_prediction(image, pred))
            if "gradcam" in entry:
                print(f"  {args.method} overlay: {entry['gradcam']}")
            elif args.gradcam:
                print(f"  no {args.method} overlay: the image was not assessed")
    if args.json:
        print(json.dumps(results, indent=2))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
