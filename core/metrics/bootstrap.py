"""Bootstrap intervals of a metric, and paired intervals of the difference between two models on the same
images.

Given each image's lesion (``groups``), a resample draws lesions, each with all of its images: HAM10000 has several
images of many lesions, which are not independent, and drawing images one by one counts them as if they were, so
the interval comes out too narrow. Callers without lesion ids (``groups=None``) resample images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

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
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(labels, probs)`` over ``n`` resamples of the images, or of
    their lesions when ``groups`` gives each image's lesion id. Resamples where the metric is undefined (``None``:
    no melanoma drawn, say) are left out."""
    labels, probs = _check(labels, probs)
    values = (metric_fn(labels[idx], probs[idx]) for idx in _resamples(len(labels), n, seed, groups))
    return _percentile_interval([v for v in values if v is not None], level)


def paired_bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    other: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(labels, probs) - metric_fn(labels, other)``, both
    probability arrays holding the same images in the same order: each resample draws the same images for
    both, so the interval reflects the difference, not the spread of either score. Resamples where the
    metric is undefined (``None``: no melanoma drawn, say) are left out. ``groups``: as :func:`bootstrap_ci`."""
    labels, probs = _check(labels, probs)
    _, other = _check(labels, other)
    stats = []
    for idx in _resamples(len(labels), n, seed, groups):
        a, b = metric_fn(labels[idx], probs[idx]), metric_fn(labels[idx], other[idx])
        if a is not None and b is not None:
            stats.append(a - b)
    return _percentile_interval(stats, level)


def _resamples(size: int, n: int, seed: int, groups: Sequence | None = None) -> Iterator[np.ndarray] | np.ndarray:
    """``n`` resamples of ``size`` items' indices: items drawn with replacement, or, with ``groups`` (one id per
    item), groups drawn with replacement, each bringing all of its items."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, size, size=(n, size))
    if len(groups) != size:
        raise ValueError(f"{len(groups)} group ids for {size} items")
    _, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return _group_resamples(group_of, n, rng)


def _group_resamples(group_of: np.ndarray, n: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    members = np.argsort(group_of, kind="stable")  # the items of group g are members[start[g] : start[g] + count[g]]
    count = np.bincount(group_of)
    start = np.cumsum(count) - count
    for _ in range(n):
        drawn = rng.integers(0, len(count), size=len(count))
        sizes = count[drawn]
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        yield members[np.repeat(start[drawn], sizes) + offsets]


def _percentile_interval(stats: list[float], level: float) -> tuple[float, float]:
    if not stats:
        raise ValueError("the metric is undefined on every bootstrap resample")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def confidence_intervals(
    labels: np.ndarray, probs: np.ndarray, n: int = 1000, seed: int = 0, groups: Sequence | None = None
) -> dict:
    """95% bootstrap intervals for accuracy, balanced accuracy and macro F1: ``{name: [low, high]}``; resampling
    lesions when ``groups`` gives each image's lesion id (:func:`bootstrap_ci`)."""
    return {
        name: list(bootstrap_ci(labels, probs, fn, n=n, seed=seed, groups=groups))
        for name, fn in BOOTSTRAP_METRICS.items()
    }
