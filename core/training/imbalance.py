"""Class-imbalance strategies, each declared once: a name, a label, a line of explanation and its hooks.

HAM10000 is two-thirds naevi; a classifier that ignores the rare classes looks accurate and misses
melanomas. A strategy counters that at one of three points of a run, its hooks:

- ``resample_rows(train_frame, seed)``: which training rows an epoch holds (oversampling duplicates images);
- ``sampler(labels, generator)``: how batches are drawn from them (``None``: shuffled, each row once);
- ``loss(train_labels, settings)``: how much each example's error counts.

The trainer, the command line, the Train and Compare pages, the imbalance experiment and the model card
all read :data:`STRATEGIES`, so a new strategy is one more entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler, WeightedRandomSampler

from core.common.labels import CLASSES

# class_balanced: no class counts for more than 1 / (1 - beta) = 1000 images, so HAM10000's ~4700 training
# naevi saturate while the rare classes (about 100 images) still count nearly in full.
CLASS_BALANCED_BETA = 0.999


class LossSettings(Protocol):
    """The run settings a loss may read; a :class:`core.training.config.TrainConfig` has them all."""

    label_smoothing: float
    class_weight_power: float
    focal_gamma: float


def oversample(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Duplicate each class's images at random until every class has the majority's count.

    The seed pipeline's strategy. Apply it to the training split only: oversampled
    validation or test sets report inflated minority-class numbers.
    """
    rng = np.random.default_rng(seed)
    target = frame["label"].value_counts().max()
    parts = []
    for _, group in frame.groupby("label", sort=True):
        extra = rng.choice(len(group), size=target - len(group), replace=True)
        parts.append(pd.concat([group, group.iloc[extra]]))
    return pd.concat(parts).reset_index(drop=True)


def class_weights(labels: Sequence[int], num_classes: int = len(CLASSES), power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights (sklearn's 'balanced') raised to ``power``, 0 for absent classes.

    ``power`` 1 weighs every class equally in total; 0.5 (square-root weighting) is a
    compromise that lifts rare classes without giving up most of the majority class's accuracy.
    """
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(float)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0) ** power
    return torch.tensor(weights, dtype=torch.float32)


def effective_number_weights(labels: Sequence[int], beta: float, num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Class-balanced weights (Cui et al., CVPR 2019): the inverse of each class's effective number of samples
    (1 - beta^n) / (1 - beta), normalised to sum to the number of classes present; 0 for absent classes.

    More images of a class add less and less information, so its effective number never exceeds
    1 / (1 - beta): rare classes gain less than under inverse frequency, and the weights do not depend
    on how big the majority class happens to be.
    """
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = (1 - beta) / (1 - beta ** counts[present])
    return torch.tensor(weights * present.sum() / weights.sum(), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): down-weights easy, mostly majority-class examples."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (-((1 - log_p.exp()) ** self.gamma) * log_p).mean()


def _keep_rows(train_frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    return train_frame


def _no_sampler(labels: np.ndarray, generator: torch.Generator) -> Sampler | None:
    return None


def _cross_entropy(train_labels: np.ndarray, settings: LossSettings) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)


def _balanced_sampler(labels: np.ndarray, generator: torch.Generator) -> Sampler:
    """Each class drawn equally often in expectation, with replacement; an epoch keeps its length."""
    per_sample = class_weights(labels)[torch.tensor(labels)]
    return WeightedRandomSampler(per_sample.double(), len(labels), generator=generator)


def _weighted_cross_entropy(train_labels: np.ndarray, settings: LossSettings) -> nn.Module:
    weights = class_weights(train_labels, power=settings.class_weight_power)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=settings.label_smoothing)


def _class_balanced_cross_entropy(train_labels: np.ndarray, settings: LossSettings) -> nn.Module:
    weights = effective_number_weights(train_labels, CLASS_BALANCED_BETA)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=settings.label_smoothing)


def _focal_loss(train_labels: np.ndarray, settings: LossSettings) -> nn.Module:
    return FocalLoss(settings.focal_gamma)


@dataclass(frozen=True)
class Strategy:
    """One way of countering class imbalance; the hooks it leaves out change nothing."""

    name: str  # the config value (``--imbalance``)
    label: str  # short, for tables
    explanation: str  # one line, for the UI and ``--help``
    resample_rows: Callable[[pd.DataFrame, int], pd.DataFrame] = _keep_rows
    sampler: Callable[[np.ndarray, torch.Generator], Sampler | None] = _no_sampler
    loss: Callable[[np.ndarray, LossSettings], nn.Module] = _cross_entropy


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("none", "none", "plain cross-entropy"),
        Strategy(
            "oversample",
            "oversample",
            "duplicate minority-class training images (the seed's choice)",
            resample_rows=oversample,
        ),
        Strategy(
            "sampler", "weighted sampler", "draw every class equally often into the batches", sampler=_balanced_sampler
        ),
        Strategy(
            "weighted_loss",
            "weighted loss",
            "cross-entropy weighted by inverse class frequency",
            loss=_weighted_cross_entropy,
        ),
        Strategy("focal", "focal loss", "easy, mostly majority-class examples count less", loss=_focal_loss),
        Strategy(
            "class_balanced",
            "class-balanced loss",
            "cross-entropy weighted by each class's effective number of samples (Cui et al. 2019)",
            loss=_class_balanced_cross_entropy,
        ),
    )
}


def get(name: str) -> Strategy:
    """The strategy called ``name``; ``ValueError`` names the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown imbalance strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def label(name: str) -> str:
    """The strategy's short label; the name itself for one no longer declared (an old run's config)."""
    return STRATEGIES[name].label if name in STRATEGIES else name
