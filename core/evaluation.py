"""Metrics and calibration: the numbers the trainer, the evaluator and the app report.

Everything here works on numpy arrays indexed by ``CLASSES``: ``labels`` are
integer class indices, ``probs`` an (n, 7) array of probabilities, ``logits`` the
raw (n, 7) scores; as in scikit-learn, ``labels`` always come first. Metric
outputs are plain dicts of floats, ints, lists and ``None`` so they go straight
into JSON. :mod:`core.inference` runs a model to get these arrays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as _softmax
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from core.labels import CLASSES, DISPLAY_NAMES, MELANOMA, NUM_CLASSES

ALL_LABELS = list(range(NUM_CLASSES))
MEL = CLASSES.index(MELANOMA)
# Temperatures outside [0.05, 20] mean the validation set is broken, not that the model needs them.
_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"probs must have shape (n, {NUM_CLASSES}), got {probs.shape}")
    if len(labels) != len(probs):
        raise ValueError(f"{len(labels)} labels but {len(probs)} rows of probabilities")
    if len(labels) == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be class indices 0..{NUM_CLASSES - 1}")
    return labels, probs


# ---------------------------------------------------------------------------
# Calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits (last axis), after dividing by ``temperature``."""
    return _softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)


def uncalibrated(probs: np.ndarray, temperature: float, floor: float = 1e-12) -> np.ndarray:
    """The probabilities before temperature scaling, from the calibrated ones: ``probs`` is softmax(z / T), so
    softmax(T · log probs) is softmax(z). For records that keep no logits (an external evaluation's report);
    ``floor`` stands in for probabilities rounded to 0, whose share after the power T stays negligible."""
    return softmax(np.log(np.maximum(np.asarray(probs, dtype=np.float64), floor)), 1.0 / float(temperature))


def nll(labels: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(logp)), np.asarray(labels, dtype=int)].mean())


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T minimising validation NLL of ``softmax(logits / T)`` (Guo et al., 2017).

    T > 1 softens an over-confident model; argmax predictions never change. The
    search runs over log T, where the NLL is smooth and unimodal in practice.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need n labels and (n, classes) logits, got {labels.shape} and {logits.shape}")
    result = minimize_scalar(
        lambda log_t: nll(labels, logits, np.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def reliability_curve(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Top-label reliability diagram: per equal-width confidence bin, the mean confidence,
    the accuracy and the count. Empty bins have ``None`` confidence and accuracy."""
    labels, probs = _check(labels, probs)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Bins are (lo, hi]; confidence 0 joins the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    curve = []
    for b in range(n_bins):
        members = bins == b
        count = int(members.sum())
        curve.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return curve


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between accuracy and confidence over the reliability bins."""
    curve = reliability_curve(labels, probs, n_bins)
    total = sum(b["count"] for b in curve)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in curve if b["count"]) / total)


# ---------------------------------------------------------------------------
# Discrimination


def _auc(is_class: np.ndarray, score: np.ndarray) -> float | None:
    # AUC needs both positives and negatives; a class absent from the labels has none.
    if is_class.all() or not is_class.any():
        return None
    return float(roc_auc_score(is_class, score))


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


def melanoma_operating_point(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Melanoma-vs-rest sensitivity and specificity when ``P(mel) >= threshold`` counts as positive.

    This is the number a clinician cares about, independent of whether melanoma
    also wins the argmax. Rates are ``None`` when their denominator is empty.
    """
    labels, probs = _check(labels, probs)
    truth = labels == MEL
    flagged = probs[:, MEL] >= threshold
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


# The melanoma sensitivity a model's own operating point is chosen for on the validation split (by the trainer,
# core.ensemble and core.operating_point): missing a melanoma costs more than a second look at a benign lesion, and
# at P(mel) >= 0.5 the first reference model found only 56 % of the test split's melanomas.
MEL_SENSITIVITY = 0.80


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, sensitivity: float) -> float | None:
    """The highest P(mel) threshold at which at least ``sensitivity`` of the melanomas in ``labels`` count as
    positive (``P(mel) >= threshold``); ``None`` without melanomas. Chosen on the validation split, it is the
    operating point a model records for Diagnose and evaluation."""
    labels, probs = _check(labels, probs)
    scores = np.sort(probs[labels == MEL, MEL])[::-1]
    if not len(scores):
        return None
    needed = max(1, math.ceil(sensitivity * len(scores) - 1e-9))
    return float(scores[needed - 1])


def operating_point_fields(labels: np.ndarray, probs: np.ndarray) -> dict:
    """``{"mel_threshold": t}`` for a finished model's record and file, ``t`` chosen on the validation split's
    ``labels`` and calibrated ``probs`` for :data:`MEL_SENSITIVITY`; empty without validation melanomas (the
    model then keeps the default threshold). Spread into ``compute_metrics`` it scores that operating point."""
    if not len(labels):
        return {}
    threshold = threshold_for_sensitivity(labels, probs, MEL_SENSITIVITY)
    return {} if threshold is None else {"mel_threshold": threshold}


# ---------------------------------------------------------------------------
# Fast headline metrics for the bootstrap (sklearn's are ~100x slower per call)


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


BOOTSTRAP_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_f1": macro_f1,
}


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(labels, probs)`` over ``n`` resamples of the images."""
    labels, probs = _check(labels, probs)
    stats = [metric_fn(labels[idx], probs[idx]) for idx in _resamples(len(labels), n, seed)]
    return _percentile_interval(stats, level)


def paired_bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    other: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(labels, probs) - metric_fn(labels, other)``, both
    probability arrays holding the same images in the same order: each resample draws the same images for
    both, so the interval reflects the difference, not the spread of either score. Resamples where the
    metric is undefined (``None``: no melanoma drawn, say) are left out."""
    labels, probs = _check(labels, probs)
    _, other = _check(labels, other)
    stats = []
    for idx in _resamples(len(labels), n, seed):
        a, b = metric_fn(labels[idx], probs[idx]), metric_fn(labels[idx], other[idx])
        if a is not None and b is not None:
            stats.append(a - b)
    return _percentile_interval(stats, level)


def _resamples(size: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, size, size=(n, size))


def _percentile_interval(stats: list[float], level: float) -> tuple[float, float]:
    if not stats:
        raise ValueError("the metric is undefined on every bootstrap resample")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def confidence_intervals(labels: np.ndarray, probs: np.ndarray, n: int = 1000, seed: int = 0) -> dict:
    """95% bootstrap intervals for accuracy, balanced accuracy and macro F1: ``{name: [low, high]}``."""
    return {name: list(bootstrap_ci(labels, probs, fn, n=n, seed=seed)) for name, fn in BOOTSTRAP_METRICS.items()}


# ---------------------------------------------------------------------------
# The full report


def compute_metrics(labels: np.ndarray, probs: np.ndarray, *, mel_threshold: float = 0.5) -> dict:
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
        "melanoma": melanoma_operating_point(labels, probs, mel_threshold),
        "ece": expected_calibration_error(labels, probs),
        "nll": float(-np.log(p_true).mean()),
    }
