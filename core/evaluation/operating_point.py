"""Choose a model's melanoma operating point on its validation split and record it in the model file.

    lesionlab operating-point --checkpoint checkpoints/reference.pt --data ../shared/data/ham10000-200x150

The trainer and ``core.training.ensembles`` choose it when they finish (on one view of each image); this command is for
model files made before they did, or for another sensitivity, and by default looks at the validation images as Diagnose
does, with test-time augmentation. Diagnose's "refer" cue, Batch, the report and ``core.evaluation.evaluate`` then use
the recorded threshold. The test split is never looked at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.common.labels import CLASSES
from core.evaluation.evaluate import EvaluationError, evaluate_checkpoint
from core.inference.predictor import USE_TTA_BY_DEFAULT
from core.inference.unfamiliar import detector_path, file_digest, load_detector
from core.metrics.classification import MEL_SENSITIVITY, melanoma_operating_point, threshold_for_sensitivity
from core.models.checkpoints import ENSEMBLE_FORMAT, atomic_save, file_format
from core.models.ensemble_file import read_model_file


def choose_operating_point(
    checkpoint: str | Path,
    data: str | Path,
    *,
    sensitivity: float = MEL_SENSITIVITY,
    tta: bool = USE_TTA_BY_DEFAULT,
    device: str = "cpu",
    batch_size: int = 64,
) -> dict:
    """The validation split's melanoma operating point for ``sensitivity``, written into ``checkpoint``: the
    threshold and the validation sensitivity and specificity it gives."""
    if not 0.0 < sensitivity <= 1.0:
        raise EvaluationError(f"the sensitivity must be within (0, 1], got {sensitivity}")
    result = evaluate_checkpoint(
        checkpoint, data, split="val", tta=tta, device=device, batch_size=batch_size, bootstrap=0
    )
    rows = result["predictions"]
    labels = np.array([CLASSES.index(r["true"]) for r in rows])
    probs = np.array([[r["probabilities"][c] for c in CLASSES] for r in rows])
    threshold = threshold_for_sensitivity(labels, probs, sensitivity)
    if threshold is None:
        raise EvaluationError("the validation split holds no melanoma, so no operating point can be chosen on it")
    # The report's probabilities are rounded to 6 decimals: step 1e-6 below, so that the melanomas counted stay
    # at or above the threshold whichever way their probability was rounded.
    threshold = max(0.0, threshold - 1e-6)
    path = Path(checkpoint)
    detector = load_detector(path)  # fitted on this file's weights, which do not change here
    # Read and checked as the predictor reads it; an ensemble file keeps its format marker and members.
    payload = read_model_file(path)
    payload["mel_threshold"] = threshold
    atomic_save(payload, path)
    if detector is not None:  # it names the file's digest, which the new field changed
        detector.checkpoint_sha1 = file_digest(path)
        detector.save(detector_path(path))
    point = melanoma_operating_point(labels, probs, threshold)
    return {
        "checkpoint": str(path),
        "ensemble": file_format(path) == ENSEMBLE_FORMAT,
        "mel_threshold": threshold,
        "target_sensitivity": sensitivity,
        "val_images": len(labels),
        "val_sensitivity": point["sensitivity"],
        "val_specificity": point["specificity"],
        "tta_views": result["tta_views"],
    }
