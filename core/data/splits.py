"""Which images a model trained, validated and was tested on: the lesion-grouped split, its defaults, and
the one rule Evaluate, the robustness report, Quiz and the similar cases use to find a model's held-out images.

:func:`model_split` finds the split the model was trained with by one rule:

1. the ``split.csv`` of the run that wrote the checkpoint: the checkpoint's own folder (``runs/NAME/best.pt``),
   then a run folder named after the checkpoint's ``config["name"]`` among ``run_folders`` (the app passes the
   local runs, then the runs published in ``docs/runs``; that is how ``checkpoints/reference.pt`` finds
   ``docs/runs/reference-mnv2``). A folder counts only when its ``config.json`` equals the checkpoint's stored
   config, so a different run that happens to share the name is never taken for it;
2. otherwise the split is recomputed over the dataset in use with :func:`core.data.splits.split_by_lesion` and the
   seed and fractions stored in the checkpoint (:func:`core.data.splits.resolve_split`), as ``python -m
   core.evaluation.evaluate`` does.

Images of the dataset that a split record does not list have an unknown split and are never drawn.

A model validated away from home holds out one image source (``holdout_source``, :func:`split_by_lesion`): its
images are the test split, the other sources' lesions are split into train and validation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from core.common.labels import CLASSES
from core.common.runs import matching_runs, read_split
from core.common.schema import are_fractions
from core.common.settings import PROJECT_ROOT
from core.data.dataset import UNKNOWN_SOURCE

SPLITS = ("train", "val", "test")
# The split every run, evaluation and quiz uses unless told otherwise (the trainer's TrainConfig defaults too).
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SEED = 0
# A source can be held out when it holds at least this many images of at least this many classes: fewer, and its
# balanced accuracy averages the recall of a handful of images (HAM10000's vienna_dias holds melanomas and nevi,
# vidir_molemax is 94 % nevi with 24 melanomas).
MIN_HOLDOUT_CLASSES = 5
MIN_HOLDOUT_CLASS_IMAGES = 30


class SplitError(ValueError):
    """A split that cannot be made as asked (fractions, an unknown or empty split); the message says why."""


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``fractions`` as three floats, or a :class:`SplitError`: the one check of split fractions, for a
    training config, a checkpoint's stored split and the command lines alike."""
    if not are_fractions(list(fractions)):
        raise SplitError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    return tuple(float(f) for f in fractions)


def split_by_lesion(
    frame: pd.DataFrame,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    holdout_source: str = "",
) -> pd.Series:
    """Assign each image to train/val/test so that all images of one lesion share a split.

    HAM10000 has 10015 images of 7470 lesions; splitting images directly leaks
    near-duplicate views of a lesion into the test set. Lesions are stratified
    by diagnosis so every split keeps the class proportions.

    With ``holdout_source`` (a value of ``frame["source"]``) the test split is that source's images and the other
    sources' lesions are split into train and validation in the proportions of ``fractions``' first two. The
    other sources' images of a lesion the held-out source also shows are in no split (NaN): training on them would
    train on a test lesion.
    """
    train_f, val_f, test_f = check_fractions(fractions)
    if holdout_source:
        return _holding_out(frame, (train_f, val_f), seed, holdout_source)
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


def _holding_out(frame: pd.DataFrame, fractions: tuple[float, float], seed: int, source: str) -> pd.Series:
    sources = frame["source"] if "source" in frame.columns else pd.Series(dtype=str)
    held = (sources == source).reindex(frame.index, fill_value=False)
    if not held.any():
        known = sorted(set(sources) - {UNKNOWN_SOURCE})
        raise SplitError(
            f"no image of the dataset comes from source {source!r}; "
            + (
                f"its sources are {', '.join(known)}"
                if known
                else "its image sources are not known (HAM10000_sources.csv)"
            )
        )
    if sum(fractions) <= 0:
        raise SplitError("holding out a source needs a share of the other lesions for training (--split-fractions)")
    other_views = frame["lesion_id"].isin(frame.loc[held, "lesion_id"]) & ~held
    rest = frame[~held & ~other_views]
    inner = split_by_lesion(rest, (fractions[0] / sum(fractions), fractions[1] / sum(fractions), 0.0), seed)
    split = pd.Series(None, index=frame.index, dtype=object, name="split")
    split[held] = "test"
    split[inner.index] = inner
    return split


def holdout_sources(frame: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """The sources a model can be tested on when trained without them (at least :data:`MIN_HOLDOUT_CLASSES` classes
    of :data:`MIN_HOLDOUT_CLASS_IMAGES` images each), largest first, and why each other source cannot, in words."""
    table = pd.crosstab(frame["source"], frame["dx"]).reindex(columns=list(CLASSES), fill_value=0)
    table = table.drop(index=UNKNOWN_SOURCE, errors="ignore")
    eligible, left_out = [], {}
    for source in table.sum(axis=1).sort_values(ascending=False).index:
        counts = table.loc[source]
        enough = counts[counts >= MIN_HOLDOUT_CLASS_IMAGES]
        if len(enough) >= MIN_HOLDOUT_CLASSES:
            eligible.append(source)
            continue
        top = counts.idxmax()
        left_out[source] = (
            f"{len(enough)} class{'es' if len(enough) != 1 else ''} with at least {MIN_HOLDOUT_CLASS_IMAGES} images "
            f"({', '.join(f'{c} {n}' for c, n in enough.items()) or 'none'}; {MIN_HOLDOUT_CLASSES} needed); "
            f"{counts[top] / counts.sum():.0%} of its {counts.sum():,} images are {top}"
        )
    return eligible, left_out


def split_counts(frame: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    """Images per class (rows, in ``CLASSES`` order) and split (columns)."""
    table = pd.crosstab(frame["dx"], split).reindex(index=list(CLASSES), columns=list(SPLITS), fill_value=0)
    return table.rename_axis(index="dx", columns="split")


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
    fracs = DEFAULT_FRACTIONS if fracs is None else check_fractions(fracs)
    return seed, fracs, source


def select_split(
    frame: pd.DataFrame, split: str, seed: int, fractions: Sequence[float], holdout_source: str = ""
) -> pd.DataFrame:
    """The rows of ``frame`` in ``split`` ("train", "val", "test" or "all") under the lesion-grouped split (holding
    out ``holdout_source``, when given: :func:`split_by_lesion`)."""
    if split == "all":
        return frame.reset_index(drop=True)
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; choose from {', '.join((*SPLITS, 'all'))}")
    assigned = split_by_lesion(frame, fractions, seed, holdout_source)
    rows = frame[assigned.to_numpy() == split].reset_index(drop=True)
    if rows.empty:
        raise SplitError(f"the {split} split is empty with fractions {list(fractions)}; use --split all")
    return rows


@dataclass(frozen=True)
class SplitRecord:
    """Which split each image went to for one model: ``split_of`` maps image_id to train/val/test."""

    split_of: pd.Series
    source: str  # for the page: where the split came from
    recorded: bool  # True: the run's own split.csv; False: recomputed over this dataset


def _stored_config(checkpoint: dict) -> dict:
    # Through JSON, as config.json holds it: tuples become lists.
    return json.loads(json.dumps(checkpoint.get("config") or {}))


def _shown(path: Path) -> str:
    """``path`` relative to the project when it lies inside it (docs/runs/…), else in full."""
    path = path.resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def model_split(
    checkpoint_path: str | Path, checkpoint: dict, frame: pd.DataFrame, run_folders: Sequence[Path]
) -> SplitRecord:
    """The split the checkpoint's model was trained with, by the rule in this module's docstring.

    ``frame`` is the dataset in use (image_id, lesion_id, dx), needed only when the split is recomputed.
    Raises :class:`SplitError` when neither a record nor a recomputation can be trusted.
    """
    config = _stored_config(checkpoint)
    for run_dir in matching_runs(checkpoint_path, config, run_folders):
        if (run_dir / "split.csv").is_file():
            table = read_split(run_dir)
            return SplitRecord(
                pd.Series(table["split"].to_numpy(), index=table["image_id"].astype(str)),
                f"recorded in {_shown(run_dir / 'split.csv')}",
                recorded=True,
            )
    if config.get("max_images"):
        raise SplitError(
            f"{checkpoint_path} was trained on a subsample (max_images={config['max_images']}) and "
            "its split record was not found, so which images it trained on cannot be known."
        )
    seed, fractions, source = resolve_split(checkpoint)
    assigned = split_by_lesion(frame, fractions, seed, config.get("holdout_source") or "")
    return SplitRecord(
        pd.Series(assigned.to_numpy(), index=frame["image_id"].astype(str)),
        f"recomputed over this dataset from split seed {seed} and fractions "
        f"{'/'.join(f'{f:g}' for f in fractions)} ({source}); held out only if this is the "
        "dataset the model was trained on",
        recorded=False,
    )


def split_column(frame: pd.DataFrame, split_of: pd.Series) -> pd.Series:
    """Each row's split (NaN where the record does not list its image), aligned with ``frame``."""
    return frame["image_id"].astype(str).map(split_of).rename("split")
