"""Each imbalance strategy's effect, checked against its formula written out here, and the trainer's use of it."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from core.training import imbalance
from core.training.config import config_with
from core.training.imbalance import (
    CLASS_BALANCED_BETA,
    STRATEGIES,
    FocalLoss,
    class_weights,
    effective_number_weights,
    oversample,
)
from core.training.loaders import make_sampler, prepare_data
from core.training.loop import make_criterion

# HAM10000-like training labels (two-thirds naevi, class 5) and a fixed batch holding every class.
COUNTS = [30, 50, 110, 12, 111, 670, 14]
TRAIN_LABELS = np.repeat(np.arange(7), COUNTS)
LOGITS = torch.randn(9, 7, generator=torch.Generator().manual_seed(0)) * 2
TARGET = torch.tensor([0, 1, 2, 3, 4, 5, 6, 5, 5])


def nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p_y per example, with the softmax written out."""
    p = logits.exp() / logits.exp().sum(1, keepdim=True)
    return -p[torch.arange(len(target)), target].log()


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """How PyTorch's cross-entropy averages with class weights: sum w_y·loss / sum w_y."""
    return (weights * losses).sum() / weights.sum()


def inverse_frequency(counts: torch.Tensor, power: float) -> torch.Tensor:
    return (counts.sum() / (len(counts) * counts)) ** power


def inverse_effective_number(counts: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - beta) / (1 - beta**counts)


# The loss each strategy must give on the fixed batch: (-log p_y, y, class counts, config) -> value.
EXPECTED_LOSS = {
    "none": lambda loss, y, n, cfg: loss.mean(),
    "oversample": lambda loss, y, n, cfg: loss.mean(),
    "sampler": lambda loss, y, n, cfg: loss.mean(),
    "weighted_loss": lambda loss, y, n, cfg: weighted_mean(loss, inverse_frequency(n, cfg.class_weight_power)[y]),
    "focal": lambda loss, y, n, cfg: ((1 - (-loss).exp()) ** cfg.focal_gamma * loss).mean(),
    "class_balanced": lambda loss, y, n, cfg: weighted_mean(loss, inverse_effective_number(n, 0.999)[y]),
}


def test_registry_declares_each_strategy_once_in_display_order():
    assert list(STRATEGIES) == ["none", "oversample", "sampler", "weighted_loss", "focal", "class_balanced"]
    for name, strategy in STRATEGIES.items():
        assert strategy.name == name and strategy.label and strategy.explanation
        assert "\n" not in strategy.explanation
    assert len({s.label for s in STRATEGIES.values()}) == len(STRATEGIES)
    assert imbalance.get("focal") is STRATEGIES["focal"]
    with pytest.raises(ValueError, match="none, oversample"):
        imbalance.get("smote")
    assert imbalance.label("sampler") == "weighted sampler" and imbalance.label("smote") == "smote"
    with pytest.raises(ValueError, match="imbalance must be one of"):
        config_with("seed", imbalance="smote")


@pytest.mark.parametrize("name", STRATEGIES)
def test_trainer_loss_is_the_strategys_formula(name):
    # Non-default settings, so a strategy that ignores them fails.
    cfg = config_with("seed", imbalance=name, class_weight_power=0.5, focal_gamma=1.5)
    criterion = make_criterion(cfg, TRAIN_LABELS)
    expected = EXPECTED_LOSS[name](nll(LOGITS, TARGET), TARGET, torch.tensor(COUNTS, dtype=torch.float64), cfg)
    assert criterion(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_label_smoothing_reaches_the_cross_entropy():
    cfg = config_with("seed", imbalance="none", label_smoothing=0.1)
    # (1 - ε)·(-log p_y) + ε/K·Σ_c(-log p_c), averaged over the batch
    all_nll = torch.stack([nll(LOGITS, torch.full_like(TARGET, c)) for c in range(7)], 1)
    expected = (0.9 * nll(LOGITS, TARGET) + 0.1 / 7 * all_nll.sum(1)).mean()
    assert make_criterion(cfg, TRAIN_LABELS)(LOGITS, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_discounts_easy_examples():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    target = torch.tensor([0, 2])
    ce = nn.functional.cross_entropy(logits, target)
    assert FocalLoss(0.0)(logits, target).item() == pytest.approx(ce.item())
    per_easy = FocalLoss(2.0)(logits[:1], target[:1]) / nn.functional.cross_entropy(logits[:1], target[:1])
    per_hard = FocalLoss(2.0)(logits[1:], target[1:]) / nn.functional.cross_entropy(logits[1:], target[1:])
    assert per_easy < 0.01 < 0.3 < per_hard


def test_class_weights_are_inverse_frequency_and_zero_for_absent_classes():
    labels = [0] * 10 + [1] * 2 + [3]
    weights = class_weights(labels)
    assert weights.tolist() == pytest.approx([13 / 70, 13 / 14, 0, 13 / 7, 0, 0, 0])
    assert class_weights(labels, power=0.5).tolist() == pytest.approx(np.sqrt(weights.numpy()).tolist())


def test_class_balanced_weights_follow_the_effective_number_and_sum_to_the_classes_present():
    assert CLASS_BALANCED_BETA == 0.999
    weights = effective_number_weights([0] * 1000 + [1] * 10 + [3] * 100, beta=0.999)
    raw = {c: 0.001 / (1 - 0.999**n) for c, n in ((0, 1000), (1, 10), (3, 100))}
    expected = [3 * raw[c] / sum(raw.values()) if c in raw else 0 for c in range(7)]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert weights.sum().item() == pytest.approx(3)
    # Milder than inverse frequency: the rare class gets about 64 times the majority's weight, not 100.
    assert weights[1] / weights[0] == pytest.approx(63.5, abs=0.1)
    criterion = make_criterion(config_with("seed", imbalance="class_balanced"), TRAIN_LABELS)
    assert criterion.weight.sum().item() == pytest.approx(7)


def test_sampler_draws_every_class_about_equally_often():
    labels = np.repeat(np.arange(7), [4900, 1000, 500, 300, 200, 70, 30])
    sampler = make_sampler(config_with("seed", imbalance="sampler"), labels, torch.Generator().manual_seed(0))
    drawn = labels[list(sampler)]
    assert len(drawn) == len(labels)  # an epoch keeps its length
    assert (np.bincount(drawn, minlength=7) / len(drawn)).tolist() == pytest.approx([1 / 7] * 7, abs=0.02)


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "sampler"])
def test_other_strategies_leave_batches_to_plain_shuffling(name):
    assert make_sampler(config_with("seed", imbalance=name), TRAIN_LABELS, torch.Generator()) is None


def test_oversample_balances_to_majority_only_with_existing_images():
    frame = pd.DataFrame({"path": [f"p{i}" for i in range(13)], "label": [0] * 10 + [1] * 2 + [3]})
    out = oversample(frame, seed=1)
    assert out["label"].value_counts().to_dict() == {0: 10, 1: 10, 3: 10}
    assert set(out.loc[out["label"] == 1, "path"]) == {"p10", "p11"}


@pytest.fixture(scope="module")
def lopsided_root(tiny_root, tmp_path_factory):
    """The tiny dataset with naevi twice as common as each other class (12 images against 6)."""
    root = tmp_path_factory.mktemp("lopsided") / "ham"
    shutil.copytree(tiny_root, root)
    meta = root / "HAM10000_metadata.csv"
    header, *rows = meta.read_text().splitlines()
    keep = [r for r in rows if ",nv," in r or int(r.split(",")[0][-5:]) < 3]  # lesion ids end in i // 2
    meta.write_text("\n".join([header, *keep]) + "\n")
    return root


def lopsided_config(root, tmp_path, imbalance: str):
    return config_with(
        "seed",
        data=str(root),
        imbalance=imbalance,
        split_fractions=(0.5, 0.25, 0.25),
        cache_dir=str(tmp_path / "cache"),
    )


def test_oversampling_equalises_the_training_split_only(lopsided_root, tmp_path):
    plain_frame, plain_train = prepare_data(lopsided_config(lopsided_root, tmp_path, "none"))
    frame, train = prepare_data(lopsided_config(lopsided_root, tmp_path, "oversample"))
    assert frame.equals(plain_frame)  # validation and test rows untouched
    before, after = plain_train["label"].value_counts(), train["label"].value_counts()
    assert before.nunique() > 1 and len(train) > len(plain_train)
    assert set(after.index) == set(before.index) and set(after) == {before.max()}
    assert set(train["path"]) == set(plain_train["path"])  # only training images are duplicated


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "oversample"])
def test_other_strategies_train_on_the_training_split_as_it_is(lopsided_root, tmp_path, name):
    frame, train = prepare_data(lopsided_config(lopsided_root, tmp_path, name))
    pd.testing.assert_frame_equal(train, frame[frame["split"] == "train"])
