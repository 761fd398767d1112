"""Which images a model trained, validated and was tested on: the lesion-grouped split, its defaults, and
the one rule every page and command uses to find a model's held-out images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from core.common.labels import CLASSES

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """A split that cannot be made as asked (fractions, an unknown or empty split); the message says why."""


def split_by_lesion(frame: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> pd.Series:
    """Assign each image to train/val/test so that all images of one lesion share a split.

    HAM10000 has 10015 images of 7470 lesions; splitting images directly leaks
    near-duplicate views of a lesion into the test set. Lesions are stratified
    by diagnosis so every split keeps the class proportions.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    train_f, val_f, test_f = fractions
    # A lesion's diagnosis is that of its images (HAM10000 never mixes them).
    lesions = frame.groupby("lesion_id", sort=True)["dx"].first()
    ids, dx = lesions.index.to_numpy(), lesions.to_numpy()

    def cut(ids: np.ndarray, dx: np.ndarray, fraction: float, step: int):
        if fraction <= 0:
            return ids, ids[:0]
        if fraction >= 1:
            return ids[:0], ids
        counts = pd.Series(dx).value_counts()
        stratify = dx if counts.min() >= 2 and round(fraction * len(ids)) >= len(counts) else None
        rest, part = train_test_split(ids, test_size=fraction, random_state=seed + step, stratify=stratify)
        return rest, part

    rest, test = cut(ids, dx, test_f, 0)
    rest_dx = lesions.loc[rest].to_numpy()
    train, val = cut(rest, rest_dx, val_f / (train_f + val_f) if train_f + val_f > 0 else 0.0, 1)
    split_of = {**{i: "train" for i in train}, **{i: "val" for i in val}, **{i: "test" for i in test}}
    return frame["lesion_id"].map(split_of).rename("split")


def split_counts(frame: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    """Images per class (rows, in ``CLASSES`` order) and split (columns)."""
    table = pd.crosstab(frame["dx"], split).reindex(index=list(CLASSES), columns=list(SPLITS), fill_value=0)
    return table.rename_axis(index="dx", columns="split")


DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


DEFAULT_SEED = 0


def resolve_split(
    checkpoint: dict, split_seed: int | None = None, fractions: Sequence[float] | None = None
) -> tuple[int, tuple[float, float, float], str]:
    """The split seed and fractions to use, and where they came from: "checkpoint" (the trainer's
    ``config``), "command line" (explicit values that differ from it) or "defaults"."""
    config = checkpoint.get("config") or {}
    stored_seed = config.get("split_seed")
    stored = config.get("split_fractions")
    stored_fracs = tuple(float(f) for f in stored) if stored is not None else None
    seed = split_seed if split_seed is not None else stored_seed
    fracs = tuple(float(f) for f in fractions) if fractions is not None else stored_fracs
    if (seed, fracs) != (stored_seed, stored_fracs):
        source = "command line"
    elif stored_seed is not None or stored_fracs is not None:
        source = "checkpoint"
    else:
        source = "defaults"
    seed = DEFAULT_SEED if seed is None else int(seed)
    fracs = DEFAULT_FRACTIONS if fracs is None else fracs
    if len(fracs) != 3 or min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise SplitError(f"split fractions must be three non-negative numbers summing to 1, got {list(fracs)}")
    return seed, fracs, source


def select_split(frame: pd.DataFrame, split: str, seed: int, fractions: Sequence[float]) -> pd.DataFrame:
    """The rows of ``frame`` in ``split`` ("train", "val", "test" or "all") under the lesion-grouped split."""
    if split == "all":
        return frame.reset_index(drop=True)
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; choose from {', '.join((*SPLITS, 'all'))}")
    assigned = split_by_lesion(frame, fractions, seed)
    rows = frame[assigned.to_numpy() == split].reset_index(drop=True)
    if rows.empty:
        raise SplitError(f"the {split} split is empty with fractions {list(fractions)}; use --split all")
    return rows
