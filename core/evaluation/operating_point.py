"""Choose a model's referral operating points on its validation split and record them in the model file: the
melanoma rule (P(mel)) and the malignant rule (P(akiec) + P(bcc) + P(mel)), core.metrics.classification.REFERRAL_RULES.

    lesionlab operating-point --checkpoint checkpoints/reference.pt --data ../shared/data/ham10000-200x150

The trainer and ``core.training.ensembles`` choose them when they finish (on one view of each image); this command is
for model files made before they did (``--rule malignant`` adds the malignant rule alone, leaving the melanoma
threshold as it was), or for another sensitivity, and by default looks at the validation images as Diagnose does, with
test-time augmentation. Diagnose's "refer" cues, Batch, the report and ``core.evaluation.evaluate`` then use the
recorded thresholds. The test split is never looked at.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.evaluation.evaluate import EvaluationError, evaluate_checkpoint
from core.evaluation.records import report_predictions
from core.inference.predictor import USE_TTA_BY_DEFAULT
from core.inference.unfamiliar import detector_path, file_digest, load_detector
from core.metrics.classification import REFERRAL_RULES, ReferralRule, operating_point, threshold_for_sensitivity
from core.models.checkpoints import ENSEMBLE_FORMAT, atomic_save, file_format
from core.models.ensemble_file import read_model_file


def choose_operating_point(
    checkpoint: str | Path,
    data: str | Path,
    *,
    rules: Sequence[ReferralRule] = REFERRAL_RULES,
    sensitivity: float | None = None,
    tta: bool = USE_TTA_BY_DEFAULT,
    device: str = "cpu",
    batch_size: int = 64,
) -> dict:
    """Each of ``rules``' validation operating point, for ``sensitivity`` (by default the rule's own), written into
    ``checkpoint``: per rule the threshold and the validation sensitivity and specificity it gives."""
    if sensitivity is not None and not 0.0 < sensitivity <= 1.0:
        raise EvaluationError(f"the sensitivity must be within (0, 1], got {sensitivity}")
    result = evaluate_checkpoint(
        checkpoint, data, split="val", tta=tta, device=device, batch_size=batch_size, bootstrap=0
    )
    labels, probs = report_predictions(result)
    chosen = record_thresholds(checkpoint, labels, probs, rules=rules, sensitivity=sensitivity)
    return {
        "checkpoint": str(checkpoint),
        "ensemble": file_format(checkpoint) == ENSEMBLE_FORMAT,
        "rules": chosen,
        "val_images": len(labels),
        "tta_views": result["tta_views"],
    }


def record_thresholds(
    checkpoint: str | Path,
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    rules: Sequence[ReferralRule] = REFERRAL_RULES,
    sensitivity: float | None = None,
) -> list[dict]:
    """Each of ``rules``' threshold chosen on the validation ``labels`` and calibrated ``probs`` (rounded to 6
    decimals, as a report holds them) for ``sensitivity`` (by default the rule's own), written into ``checkpoint``;
    per rule the threshold and the validation sensitivity and specificity it gives."""
    chosen = []
    for rule in rules:
        target = rule.sensitivity if sensitivity is None else sensitivity
        threshold = threshold_for_sensitivity(labels, probs, target, rule)
        if threshold is None:
            raise EvaluationError(
                f"the validation split holds no {rule.name}, so no {rule.key} operating point can be chosen on it"
            )
        # The report's probabilities are rounded to 6 decimals: step 1e-6 below, so that the positives counted stay
        # at or above the threshold whichever way their probability was rounded.
        threshold = max(0.0, threshold - 1e-6)
        point = operating_point(labels, probs, threshold, rule)
        chosen.append(
            {
                "rule": rule.key,
                "field": rule.field,
                "threshold": threshold,
                "target_sensitivity": target,
                "val_sensitivity": point["sensitivity"],
                "val_specificity": point["specificity"],
            }
        )
    path = Path(checkpoint)
    detector = load_detector(path)  # fitted on this file's weights, which do not change here
    # Read and checked as the predictor reads it; an ensemble file keeps its format marker and members.
    payload = read_model_file(path)
    payload.update({c["field"]: c["threshold"] for c in chosen})
    atomic_save(payload, path)
    if detector is not None:  # it names the file's digest, which the new fields changed
        detector.checkpoint_sha1 = file_digest(path)
        detector.save(detector_path(path))
    return chosen
