"""Calibration: softmax with a temperature, its fit on validation logits, reliability curves and the
expected calibration error.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as _softmax

from core.common.schema import TEMPERATURE_RANGE
from core.metrics.inputs import _check

_LOG_T_BOUNDS = (np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1]))


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
