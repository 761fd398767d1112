"""Metrics and calibration: the numbers the trainer, the evaluator and the app report.

Everything here works on numpy arrays indexed by ``CLASSES``: ``labels`` are
integer class indices, ``probs`` an (n, 7) array of probabilities, ``logits`` the
raw (n, 7) scores; as in scikit-learn, ``labels`` always come first. Metric
outputs are plain dicts of floats, ints, lists and ``None`` so they go straight
into JSON. :mod:`core.inference.forward` runs a model to get these arrays.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_curve,
)

from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT, MELANOMA, NUM_CLASSES
from core.metrics.calibration import expected_calibration_error
from core.metrics.inputs import _check

ALL_LABELS = list(range(NUM_CLASSES))


MEL = CLASSES.index(MELANOMA)


def _auc(is_class: np.ndarray, score: np.ndarray) -> float | None:
    # AUC needs both positives and negatives; a class absent from the labels has none.
    if is_class.all() or not is_class.any():
        return None
    # The Mann-Whitney form of the ROC AUC (average ranks for ties, as the curve's trapezoids count them): the
    # same number as roc_auc_score (tests/core/metrics/test_metrics.py), without its per-call input validation,
    # which made up two thirds of a robustness report's time on a small split (its paired bootstrap computes
    # thousands of AUCs).
    positives = int(is_class.sum())
    negatives = len(is_class) - positives
    ranks = rankdata(score)
    return float((ranks[is_class].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curves(labels: np.ndarray, probs: np.ndarray) -> dict[str, dict | None]:
    """One-vs-rest ROC curve per class code: ``{"fpr": [...], "tpr": [...], "auc": float}``,
    or ``None`` for a class that is absent from (or the only class in) ``labels``."""
    labels, probs = _check(labels, probs)
    curves: dict[str, dict | None] = {}
    for k, code in enumerate(CLASSES):
        is_class = labels == k
        auc = _auc(is_class, probs[:, k])
        if auc is None:
            curves[code] = None
            continue
        fpr, tpr, _ = roc_curve(is_class, probs[:, k])
        curves[code] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc}
    return curves


def melanoma_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Melanoma-vs-rest ROC AUC of P(mel); ``None`` without both melanomas and other lesions."""
    labels, probs = _check(labels, probs)
    return _auc(labels == MEL, probs[:, MEL])


# The sensitivity each referral rule's threshold is chosen for on the validation split (by the trainer,
# core.training.ensembles and core.evaluation.operating_point). Melanoma: missing one costs more than a second look at
# a benign lesion, and at P(mel) >= 0.5 the first reference model missed almost half the test split's melanomas
# (MODEL_CARD.md). Any malignant class: the broader rule is the safety net that also catches the carcinomas (akiec,
# bcc) the melanoma rule never looks at, so it asks for more. On the reference model's validation split (flip TTA,
# 300 malignant lesions) 0.90 cost specificity 0.75 where 0.80 would have kept 0.88: ten more of every hundred
# malignant lesions referred for a quarter of the benign ones seen twice.
MEL_SENSITIVITY = 0.80
MALIGNANT_SENSITIVITY = 0.90


@dataclass(frozen=True)
class ReferralRule:
    """ "Refer / discuss with a dermatologist" when the probability of any of ``classes`` together reaches a threshold
    chosen on the validation split for ``sensitivity``. ``key`` names the rule's operating point in a metrics dict,
    ``field`` its threshold in a model file and its run records.

    Malignancy is one rule on the summed probability, not one per class: a referral is the same action whichever
    malignant class it is, a lesion the model splits between bcc and akiec is still likely malignant, and a summed
    score is chosen on all the validation split's malignant lesions rather than on a few dozen of one class."""

    key: str
    field: str
    classes: tuple[str, ...]
    name: str  # its positives, in words: "melanomas"
    sensitivity: float

    @property
    def label(self) -> str:
        """What the app calls the score: "P(melanoma)", "P(malignant)"."""
        return f"P({self.key})"

    @property
    def indices(self) -> list[int]:
        return [CLASSES.index(c) for c in self.classes]

    def score(self, probs: np.ndarray) -> np.ndarray:
        """The rule's probability for each row of ``probs`` (n, 7) (or one vector (7,))."""
        return np.asarray(probs)[..., self.indices].sum(axis=-1)

    def positives(self, labels: np.ndarray) -> np.ndarray:
        return np.isin(labels, self.indices)


MELANOMA_RULE = ReferralRule("melanoma", "mel_threshold", (MELANOMA,), "melanomas", MEL_SENSITIVITY)
MALIGNANT_RULE = ReferralRule(
    "malignant",
    "malignant_threshold",
    tuple(c for c in CLASSES if c in MALIGNANT),
    "malignant lesions (" + ", ".join(c for c in CLASSES if c in MALIGNANT) + ")",
    MALIGNANT_SENSITIVITY,
)
# Broadest first: the order the app shows them in.
REFERRAL_RULES = (MALIGNANT_RULE, MELANOMA_RULE)


def operating_point(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5, rule: ReferralRule = MELANOMA_RULE
) -> dict:
    """Sensitivity and specificity of ``rule`` (its classes against the rest) when its score at or above
    ``threshold`` counts as positive.

    This is the number a clinician cares about, independent of whether the class also wins the argmax. Rates are
    ``None`` when their denominator is empty.
    """
    labels, probs = _check(labels, probs)
    truth = rule.positives(labels)
    flagged = rule.score(probs) >= threshold
    tp, fn = int((truth & flagged).sum()), int((truth & ~flagged).sum())
    tn, fp = int((~truth & ~flagged).sum()), int((~truth & flagged).sum())
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "ppv": tp / (tp + fp) if tp + fp else None,
        "npv": tn / (tn + fn) if tn + fn else None,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def threshold_for_sensitivity(
    labels: np.ndarray, probs: np.ndarray, sensitivity: float, rule: ReferralRule = MELANOMA_RULE
) -> float | None:
    """The highest threshold on ``rule``'s score at which at least ``sensitivity`` of its positives in ``labels``
    count as positive (score >= threshold); ``None`` without positives. Chosen on the validation split, it is the
    operating point a model records for Diagnose and evaluation."""
    labels, probs = _check(labels, probs)
    scores = np.sort(rule.score(probs)[rule.positives(labels)])[::-1]
    if not len(scores):
        return None
    needed = max(1, math.ceil(sensitivity * len(scores) - 1e-9))
    return float(scores[needed - 1])


def operating_point_fields(labels: np.ndarray, probs: np.ndarray) -> dict:
    """``{"mel_threshold": t, "malignant_threshold": u}`` for a finished model's record and file, each chosen on the
    validation split's ``labels`` and calibrated ``probs`` for its rule's sensitivity; a rule without positives
    there is left out (the model then keeps the default threshold). Spread into ``compute_metrics`` it scores those
    operating points."""
    if not len(labels):
        return {}
    found = {rule.field: threshold_for_sensitivity(labels, probs, rule.sensitivity, rule) for rule in REFERRAL_RULES}
    return {field: t for field, t in found.items() if t is not None}


def _confusion(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    preds = np.asarray(probs).argmax(axis=1)
    return np.bincount(np.asarray(labels) * NUM_CLASSES + preds, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    cm = _confusion(labels, probs)
    return float(np.trace(cm) / cm.sum())


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (as scikit-learn computes it)."""
    cm = _confusion(labels, probs)
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean())


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean F1 over the classes occurring in labels or predictions (scikit-learn's default)."""
    cm = _confusion(labels, probs)
    tp = np.diag(cm)
    denom = 2 * tp + (cm.sum(axis=0) - tp) + (cm.sum(axis=1) - tp)
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean())


def weighted_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """F1 averaged over the classes occurring in labels or predictions, weighted by support (scikit-learn's)."""
    cm = _confusion(labels, probs)
    tp, support = np.diag(cm), cm.sum(axis=1)
    denom = 2 * tp + (cm.sum(axis=0) - tp) + (support - tp)
    f1 = np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0)
    return float((f1 * support).sum() / support.sum())


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC averaged over the classes that have positives and negatives; None if none has."""
    labels, probs = _check(labels, probs)
    defined = [a for k in range(probs.shape[1]) if (a := _auc(labels == k, probs[:, k])) is not None]
    return float(np.mean(defined)) if defined else None


def balanced_accuracy_defined(metrics: dict) -> bool:
    """Whether ``metrics`` (:func:`compute_metrics`) come from images of two classes or more: over one class, the
    mean recall is that class's recall, which is the accuracy again and says nothing about balance."""
    return sum(row["support"] > 0 for row in metrics["per_class"]) >= 2


# What the reports say instead of a balanced accuracy over one class.
BALANCED_ACCURACY_UNDEFINED = "undefined: the images are of one class"


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, *, mel_threshold: float = 0.5, malignant_threshold: float = 0.5
) -> dict:
    """Every number the report, the model card and the dashboard show, as a JSON-ready dict.

    Per-class rows and confusion-matrix rows/columns follow ``CLASSES``; they are
    computed with ``labels=range(7)`` so a class missing from this split keeps its
    row (support 0) instead of shifting the others. Macro and weighted averages
    follow scikit-learn: over the classes that occur in labels or predictions.
    """
    labels, probs = _check(labels, probs)
    preds = probs.argmax(axis=1)
    with warnings.catch_warnings():
        # Absent classes are expected in small splits; their rows read 0 and their AUC None.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, preds, labels=ALL_LABELS, zero_division=0
        )
        averages = {
            avg: precision_recall_fscore_support(labels, preds, average=avg, zero_division=0)[:3]
            for avg in ("macro", "weighted")
        }
        balanced = balanced_accuracy_score(labels, preds)
    cm = confusion_matrix(labels, preds, labels=ALL_LABELS)
    rows = cm.sum(axis=1, keepdims=True)
    cm_norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    aucs = {code: _auc(labels == k, probs[:, k]) for k, code in enumerate(CLASSES)}
    defined = [a for a in aucs.values() if a is not None]
    per_class = [
        {
            "code": code,
            "name": DISPLAY_NAMES[code],
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
            "auc": aucs[code],
        }
        for k, code in enumerate(CLASSES)
    ]
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {
        "n": len(labels),
        "classes": list(CLASSES),
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced),
        "macro": dict(zip(("precision", "recall", "f1"), map(float, averages["macro"]), strict=True)),
        "weighted": dict(zip(("precision", "recall", "f1"), map(float, averages["weighted"]), strict=True)),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": cm_norm.tolist(),
        "roc_auc": {"per_class": aucs, "macro": float(np.mean(defined)) if defined else None},
        "melanoma": operating_point(labels, probs, mel_threshold, MELANOMA_RULE),
        "malignant": operating_point(labels, probs, malignant_threshold, MALIGNANT_RULE),
        "ece": expected_calibration_error(labels, probs),
        "nll": float(-np.log(p_true).mean()),
    }
