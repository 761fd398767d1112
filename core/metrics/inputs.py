"""The arrays every metric takes: integer ``labels`` and an (n, 7) array of ``probs`` in ``CLASSES`` order."""

from __future__ import annotations

import numpy as np

from core.common.labels import NUM_CLASSES


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
