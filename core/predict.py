"""Predicting one uploaded image with a saved checkpoint, and the ``python -m core.predict`` CLI.

The :class:`Predictor` decodes exactly as training did (EXIF rotation, mode
conversion, the training images' source size, then the checkpoint's eval
transform) and applies the checkpoint's fitted temperature.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from core.checkpoints import ENSEMBLE_FORMAT, CheckpointError, file_format, load_model
from core.explain import CAM_METHODS, feature_maps, gradcam, overlay
from core.images import ImageError, ImageSource
from core.inference import PredictionError, check_probabilities, class_probabilities, tta_description, view_count
from core.labels import CLASSES, DISPLAY_NAMES, MALIGNANT, class_index
from core.metadata import MetadataEncoding, MetadataError, describe
from core.preprocessing import Preprocessing, eval_transform, load_for_model
from core.runtime import tune_allocator
from core.unfamiliar import UnfamiliarCheck, check_unfamiliar, load_detector

if TYPE_CHECKING:
    from core.ensemble import MemberVotes

DISCLAIMER = "For research and education only; not a medical diagnosis."
# The operating point: P(melanoma) at or above this counts as melanoma-positive, unless the checkpoint
# records its own ``mel_threshold`` (chosen on its validation split for core.evaluation.MEL_SENSITIVITY). It is the
# threshold core.evaluate reports sensitivity and specificity at.
DEFAULT_MEL_THRESHOLD = 0.5

# Test-time augmentation (core.inference: the four flips at each zoom of TTA_SCALES), measured with core.evaluate
# on the reference model (checkpoints/reference.pt) and the validation split of HAM10000 (1519 images): flips
# raised balanced accuracy 0.745 -> 0.749 and melanoma sensitivity at P(mel) >= 0.5 0.591 -> 0.632 at specificity
# 0.944 -> 0.947, and lowered ECE 0.053 -> 0.046. Better on every count, so it is on by default on Diagnose, on
# Batch, in core.evaluate and in core.predict. Zooms (bench/tta.py) are not in TTA_SCALES until a full validation
# run shows they help: see docs/BENCHMARKS.md.
USE_TTA_BY_DEFAULT = True
TTA_HELP = (
    f"Average the prediction over {view_count(True)} views of the image ({tta_description(True)}), in one pass. "
    "On the reference model's validation split (1519 images) flip averaging raised balanced accuracy from 74.5 % "
    "to 74.9 % and melanoma sensitivity at P(mel) ≥ 50 % from 59.1 % to 63.2 % (specificity 94.4 % → 94.7 %), "
    "and lowered the calibration error (ECE) from 0.053 to 0.046; it costs a few times one pass's time per "
    "image on the CPU (docs/BENCHMARKS.md)."
)


def melanoma_threshold(checkpoint: dict) -> float:
    """The melanoma operating point of a loaded checkpoint dict."""
    value = checkpoint.get("mel_threshold")
    return DEFAULT_MEL_THRESHOLD if value is None else float(value)


def recorded_test_results(path: Path, checkpoint: dict, *, tta: bool = False) -> list[dict]:
    """The checkpoint's test-split evaluations with (``tta``) or without flip averaging in its run records,
    first found first: its run folder, then the published run of the name it was trained under (``docs/runs``).
    In each, the saved ``python -m core.evaluate`` report (which records its views), then the trainer's one-view
    ``evaluation.json``."""
    from core.runs import read_evaluate_report, read_evaluation
    from core.settings import published_runs_dir

    folders = [Path(path).parent]
    published, name = published_runs_dir(), (checkpoint.get("config") or {}).get("name")
    if published is not None and name:
        folders.append(published / name)
    found = []
    for folder in folders:
        report = read_evaluate_report(folder)
        if report is not None and bool(report.get("tta")) == tta:
            found.append(report["metrics"])
        if not tta and (test := read_evaluation(folder).get("test")):
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


@dataclass
class Prediction:
    """One image's result. ``probs`` and ``probabilities`` follow ``CLASSES``."""

    probs: np.ndarray
    probabilities: dict[str, float]
    top_class: str
    top_name: str
    confidence: float
    malignant_probability: float
    input_tensor: torch.Tensor  # (1, 3, H, W), normalised: what the network received
    # Upright RGB as handed to the eval transform: at the checkpoint's source size when it records one
    # (large JPEGs otherwise decode at a reduced DCT scale), before the resize to the input size.
    image: Image.Image
    tta: bool
    # The backbone's pooled features of ``input_tensor`` (no flips), once :meth:`Predictor.embed` computed them.
    embedding: np.ndarray | None = None
    # Whether age, sex or body site reached the model (it takes them and at least one was given), and a
    # sentence saying what happened to the metadata ("" when none was given to a model that does not take it).
    metadata_used: bool = False
    metadata_note: str = ""
    # An ensemble's members one by one (core.ensemble): their probabilities, agreement and P(melanoma) spread.
    members: MemberVotes | None = None

    @property
    def top_index(self) -> int:
        return CLASSES.index(self.top_class)

    def ranked(self) -> list[tuple[str, str, float]]:
        """(code, display name, probability), most probable first."""
        order = np.argsort(-self.probs, kind="stable")
        return [(CLASSES[i], DISPLAY_NAMES[CLASSES[i]], float(self.probs[i])) for i in order]

    def to_dict(self) -> dict:
        return {
            "top_class": self.top_class,
            "top_name": self.top_name,
            "confidence": self.confidence,
            "malignant_probability": self.malignant_probability,
            "probabilities": self.probabilities,
            "tta": self.tta,
            "metadata_used": self.metadata_used,
            "metadata_note": self.metadata_note,
            **({"members": self.members.to_dict()} if self.members is not None else {}),
        }


class Predictor:
    """A checkpoint loaded once, ready to classify and explain images.

    Thread-safe: Streamlit sessions share one instance, so the model is only touched under
    ``_lock`` and callers reach it only through these methods. Model passes are serialised
    (they use every core anyway, and CAM and feature-map hooks must not see other threads' passes).
    """

    def __new__(cls, checkpoint: str | Path, **kwargs):
        # One door for every model file: an ensemble file opens as core.ensemble.EnsemblePredictor, which has
        # this interface, so the pages, the batch and the evaluator take either without asking which.
        if cls is Predictor and file_format(checkpoint) == ENSEMBLE_FORMAT:
            from core.ensemble import EnsemblePredictor  # it builds on this module

            cls = EnsemblePredictor
        return super().__new__(cls)

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu"):
        tune_allocator()
        model, ckpt = load_model(checkpoint)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.checkpoint = ckpt
        self.path = Path(checkpoint)
        self.prep = Preprocessing.from_dict(ckpt["preprocessing"])
        self.temperature = float(ckpt["temperature"])
        self.transform = eval_transform(self.prep)
        self.mel_threshold = melanoma_threshold(ckpt)
        # The measured "unfamiliar image" detector saved beside the checkpoint (bench/similar.py), if any.
        self.detector = load_detector(self.path)
        self._lock = threading.Lock()

    @property
    def arch(self) -> str:
        return self.model.arch

    @property
    def metadata_encoding(self) -> MetadataEncoding | None:
        """How the model reads age, sex and body site (:mod:`core.metadata`); None when it takes the image only."""
        return self.model.metadata_encoding

    @property
    def uses_metadata(self) -> bool:
        return self.metadata_encoding is not None

    def metadata_note(self, metadata: Mapping[str, object] | None) -> tuple[bool, str]:
        """Whether ``metadata`` ({"age", "sex", "site"}, any left out) will be used, and a sentence saying so."""
        given = describe(metadata)
        if not self.uses_metadata:
            return (
                False,
                f"This model takes the image only; the metadata given ({given}) were ignored." if given else "",
            )
        if not given:
            return False, "No age, sex or body site given: the model predicted from the image alone (all unknown)."
        return True, f"Metadata used: {given} (fields not given count as unknown)."

    def preprocess(self, source: ImageSource, *, upload: bool = True) -> tuple[Image.Image, torch.Tensor]:
        """The decoded RGB image and the (1, 3, H, W) model input; raises :class:`ImageError`."""
        image = load_for_model(source, self.prep, upload=upload)
        return image, self.transform(image).unsqueeze(0).to(self.device)

    def predict(
        self,
        source: ImageSource,
        tta: bool = False,
        *,
        upload: bool = True,
        metadata: Mapping[str, object] | None = None,
    ) -> Prediction:
        """Classify an image given as a path, bytes or a binary file object.

        ``metadata`` ({"age": 45, "sex": "male", "site": "back"}, any field left out or None for unknown)
        reaches a model that takes it; a model that does not ignores it, and the prediction says so. A value
        the encoding does not know raises :class:`core.metadata.MetadataError`.

        With ``tta`` the probabilities are the mean over the image and its horizontal,
        vertical and double flips. An image is refused (:class:`ImageError`) when it is too small or too
        elongated to diagnose (``core.images.MIN_SIDE``, ``MAX_ASPECT``); ``upload=False`` lifts that for
        a dataset image, which its evaluation already took as it is. Raises :class:`PredictionError` when
        the model's output is not a probability distribution.
        """
        return self.predict_batch([self.preprocess(source, upload=upload)], tta, metadata=[metadata])[0]

    def predict_batch(
        self,
        inputs: Sequence[tuple[Image.Image, torch.Tensor]],
        tta: bool = False,
        *,
        metadata: Sequence[Mapping[str, object] | None] | None = None,
    ) -> list[Prediction]:
        """Classify images already decoded by :meth:`preprocess`, in one forward pass (a batch of files goes
        many times faster than one at a time); ``metadata``, one per image, as :meth:`predict` takes it.
        Raises :class:`PredictionError` when any output is not a probability distribution: broken weights
        break every image alike."""
        if not inputs:
            return []
        metadata = list(metadata) if metadata is not None else [None] * len(inputs)
        if len(metadata) != len(inputs):
            raise ValueError(f"{len(metadata)} metadata for {len(inputs)} images")
        x = torch.cat([tensor for _, tensor in inputs])
        model, encoding = self.model, self.model.metadata_encoding
        # Checked for every model: a typo is an error, whether or not this model would have used the field.
        rows = torch.from_numpy(np.stack([(encoding or MetadataEncoding()).encode_mapping(m) for m in metadata]))
        if encoding is not None:
            model = partial(self.model, metadata=rows)
        with self._lock, torch.inference_mode():
            all_probs = class_probabilities(model, x, self.temperature, tta).double().cpu().numpy()
        check_probabilities(all_probs)
        return self._predictions(inputs, x, all_probs, tta, metadata)

    def _predictions(
        self,
        inputs: Sequence[tuple[Image.Image, torch.Tensor]],
        x: torch.Tensor,
        all_probs: np.ndarray,
        tta: bool,
        metadata: Sequence[Mapping[str, object] | None],
    ) -> list[Prediction]:
        predictions = []
        for i, ((image, _), probs) in enumerate(zip(inputs, all_probs, strict=True)):
            top = int(probs.argmax())
            used, note = self.metadata_note(metadata[i])
            predictions.append(
                Prediction(
                    probs=probs,
                    probabilities={code: float(p) for code, p in zip(CLASSES, probs, strict=True)},
                    top_class=CLASSES[top],
                    top_name=DISPLAY_NAMES[CLASSES[top]],
                    confidence=float(probs[top]),
                    malignant_probability=float(
                        sum(p for code, p in zip(CLASSES, probs, strict=True) if code in MALIGNANT)
                    ),
                    input_tensor=x[i : i + 1],
                    image=image,
                    tta=tta,
                    metadata_used=used,
                    metadata_note=note,
                )
            )
        return predictions

    def explain(self, prediction: Prediction, method: str = "gradcam", target: int | str | None = None) -> np.ndarray:
        """A class activation map (input size, values in [0, 1]) for ``target`` (index or code;
        default: the predicted class). Lay it over ``prediction.image`` with ``core.explain.overlay``."""
        if target is None:
            index = prediction.top_index
        elif isinstance(target, str):
            index = class_index(target)
        else:
            index = int(target)
        with self._lock:
            return gradcam(self.model, prediction.input_tensor, index, method)

    def embed(self, prediction: Prediction) -> np.ndarray:
        """The pooled backbone features of the predicted image (what similar cases and the unfamiliar-image
        score compare), computed once per prediction."""
        if prediction.embedding is None:
            with self._lock, torch.inference_mode():
                features = self.model.backbone(prediction.input_tensor)[0]
            prediction.embedding = features.float().cpu().numpy()
        return prediction.embedding

    def unfamiliar(self, prediction: Prediction) -> UnfamiliarCheck:
        """Whether the image is unlike the dermoscopy the model learnt from, and why in words: the measured
        feature-space score when the checkpoint has a saved detector, and the colour heuristic."""
        embedding = self.embed(prediction) if self.detector is not None else None
        return check_unfamiliar(prediction.image, embedding, self.detector)

    def layer_names(self) -> list[str]:
        """The layers :meth:`feature_maps` shows, shallow to deep."""
        with self._lock:
            return self.model.feature_layers()

    def feature_maps(self, prediction: Prediction, layer: str) -> np.ndarray:
        """The activations (C, h, w) of ``layer`` (one of :meth:`layer_names`) for the predicted image;
        raises ValueError for a layer the model does not have."""
        with self._lock:
            return feature_maps(self.model, prediction.input_tensor, layer)


# ---------------------------------------------------------------------------
# Command line


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


def _cam_path(out: Path, image: str, i: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.stem}-{i + 1}-{Path(image).stem}{out.suffix}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.predict",
        description="Classify dermoscopy images with a Lesion Lab checkpoint: all seven class "
        "probabilities per image, optionally with a Grad-CAM overlay; with --csv, a batch of files, "
        "folders and .zip archives to one CSV row per file.",
        epilog="Exit status 2 when a checkpoint or an image cannot be used; with --csv, 1 when some files could "
        f"not be predicted (their rows say why) and 2 when nothing could. {DISCLAIMER}",
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
        "Diagnose page's warnings, the error for a file that cannot be used, all seven probabilities "
        "(- for standard output); progress goes to standard error",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass with --csv")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return parser


def _batch_main(predictor: Predictor, args: argparse.Namespace) -> int:
    """``--csv``: every file of the inputs to one CSV row, written as each batch finishes."""
    import time

    from core.batch import BatchError, gather, predict_files, write_csv

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
        errors = write_csv(rows, out)
    except PredictionError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - start
    where = "" if args.csv == "-" else f"; wrote {args.csv}"
    print(
        f"{len(files)} files: {len(files) - errors} predicted, {errors} could not be (see their error column) in "
        f"{seconds:.1f} s{where}",
        file=sys.stderr,
    )
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
    metadata = {"age": args.age, "sex": args.sex, "site": args.site}
    if args.csv is not None and describe(metadata):
        parser.error("--age, --sex and --site describe one patient's image; they do not combine with --csv")
    try:
        predictor = Predictor(args.checkpoint, device=args.device)
    except (CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.csv is not None:
        return _batch_main(predictor, args)
    results, failed = [], False
    for i, image in enumerate(args.images):
        try:
            pred = predictor.predict(image, tta=args.tta, metadata=metadata)
            entry = {"image": image, **pred.to_dict()}
            if args.gradcam:
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
            print(format_prediction(image, pred))
            if "gradcam" in entry:
                print(f"  {args.method} overlay: {entry['gradcam']}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
