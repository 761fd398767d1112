"""Bootstrap intervals of a metric, and paired intervals of the difference between two models on the same
images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.metrics.classification import accuracy, balanced_accuracy, macro_f1
from core.metrics.inputs import _check

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
