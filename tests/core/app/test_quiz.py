"""core.app.quiz: which images a model may be quizzed on, the reproducible draw, and the scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.app import quiz
from core.app.quiz import QuizError, QuizSettings, draw_quiz, score, summary_sentences
from core.common.labels import CLASSES
from core.common.runs import write_config, write_split
from core.data.dataset import index_dataset
from core.data.splits import SplitError, model_split, split_column
from tests.conftest import ROOT

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"
PUBLISHED = ROOT / "docs" / "runs"


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return index_dataset(SAMPLE).frame


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE, map_location="cpu", weights_only=True)


def synthetic(counts: dict[str, int], split: str = "test", views: int = 1) -> tuple[pd.DataFrame, pd.Series]:
    """A frame with ``counts[code]`` lesions per class, ``views`` images each, all in ``split``."""
    rows = [
        {
            "image_id": f"ISIC_{code}_{i:03d}_{v}",
            "lesion_id": f"HAM_{code}_{i:03d}",
            "dx": code,
            "dx_type": "histo",
            "path": f"/nowhere/{code}_{i}_{v}.jpg",
        }
        for code, k in counts.items()
        for i in range(k)
        for v in range(views)
    ]
    frame = pd.DataFrame(rows)
    return frame, pd.Series(split, index=frame["image_id"])


def class_counts(drawn: pd.DataFrame) -> dict[str, int]:
    return drawn["dx"].value_counts().reindex(CLASSES, fill_value=0).to_dict()


# ---------------------------------------------------------------------------
# Which images are held out


def test_the_reference_model_finds_its_published_split(sample, reference):
    record = model_split(REFERENCE, reference, sample, [ROOT / "no-runs-here", PUBLISHED])
    assert record.recorded and record.source == "recorded in docs/runs/reference-mnv2/split.csv"
    splits = split_column(sample, record.split_of)
    # The sample was taken from the reference split's test and val images (sample_data/…/README.md).
    assert splits.value_counts().to_dict() == {"test": 126, "val": 14}


def test_a_run_folder_of_the_same_name_but_another_config_is_not_taken(sample, reference, tmp_path):
    impostor = tmp_path / "reference-mnv2"
    impostor.mkdir()
    write_config(impostor, {**reference["config"], "split_seed": 7})
    write_split(impostor, sample.assign(split="test"))
    record = model_split(REFERENCE, reference, sample, [tmp_path])
    assert not record.recorded
    assert "recomputed over this dataset from split seed 0 and fractions 0.7/0.15/0.15" in record.source
    assert set(record.split_of.unique()) == {"train", "val", "test"}

    write_config(impostor, reference["config"])  # now it is the checkpoint's run
    assert model_split(REFERENCE, reference, sample, [tmp_path]).split_of.eq("test").all()


def test_a_run_checkpoint_uses_the_split_beside_it(sample, reference, tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    config = {**reference["config"], "name": "something-else"}
    write_config(run, config)
    write_split(run, sample.assign(split=np.where(sample["dx"] == "nv", "train", "val")))
    record = model_split(run / "best.pt", {**reference, "config": config}, sample, [])
    assert record.recorded
    assert (split_column(sample, record.split_of) == "train").sum() == 20


def test_a_subsample_run_without_its_record_is_refused(sample, reference):
    checkpoint = {**reference, "config": {**reference["config"], "max_images": 500}}
    with pytest.raises(SplitError, match="subsample"):
        model_split(REFERENCE, checkpoint, sample, [PUBLISHED])


# ---------------------------------------------------------------------------
# The draw


def test_settings_never_allow_the_training_split_or_odd_sizes():
    with pytest.raises(QuizError, match="not 'train'"):
        QuizSettings(split="train")
    with pytest.raises(QuizError):
        QuizSettings(n=quiz.MIN_IMAGES - 1)
    with pytest.raises(QuizError):
        QuizSettings(n=quiz.MAX_IMAGES + 1)
    with pytest.raises(QuizError):
        QuizSettings(mix="whatever")
    with pytest.raises(QuizError):
        quiz.quiz_pool(pd.DataFrame({"image_id": []}), pd.Series(dtype=str), "train")


def test_the_draw_is_reproducible_and_differs_across_seeds(sample, reference):
    split_of = model_split(REFERENCE, reference, sample, [PUBLISHED]).split_of
    for mix in quiz.MIXES:
        first = draw_quiz(sample, split_of, QuizSettings(n=20, mix=mix, seed=11))
        again = draw_quiz(sample, split_of, QuizSettings(n=20, mix=mix, seed=11))
        # The dataset's row order (how its metadata happens to be sorted) does not matter either.
        shuffled = draw_quiz(sample.sample(frac=1, random_state=3), split_of, QuizSettings(n=20, mix=mix, seed=11))
        other = draw_quiz(sample, split_of, QuizSettings(n=20, mix=mix, seed=12))
        assert len(first) == 20 and first["image_id"].is_unique
        assert first["image_id"].tolist() == again["image_id"].tolist() == shuffled["image_id"].tolist()
        assert other["image_id"].tolist() != first["image_id"].tolist()


def test_training_images_are_never_drawn(sample, reference):
    # A split recomputed over the sample puts most of it in train.
    split_of = model_split(REFERENCE, reference, sample, []).split_of
    assert (split_of == "train").sum() > 90
    for split in quiz.QUIZ_SPLITS:
        pool = set(split_of.index[split_of == split])
        for seed in range(20):
            for mix in quiz.MIXES:
                drawn = draw_quiz(sample, split_of, QuizSettings(n=50, split=split, mix=mix, seed=seed))
                assert set(drawn["image_id"]) <= pool
        # The pool is smaller than 50: the quiz holds all of it.
        assert len(drawn) == len(pool) < 50


def test_images_missing_from_the_split_record_are_never_drawn(sample, reference):
    split_of = model_split(REFERENCE, reference, sample, [PUBLISHED]).split_of
    unlisted = split_of.drop(sample["image_id"].iloc[:60])
    drawn = draw_quiz(sample, unlisted, QuizSettings(n=50, seed=0))
    assert not set(drawn["image_id"]) & set(sample["image_id"].iloc[:60])


def test_balanced_mix_gives_equal_counts_when_the_pool_allows():
    frame, split_of = synthetic({c: 30 for c in CLASSES} | {"nv": 200})
    counts = class_counts(draw_quiz(frame, split_of, QuizSettings(n=35, mix="balanced", seed=4)))
    assert counts == {c: 5 for c in CLASSES}
    # 10 over 7 classes: one each, the three left over to three different classes.
    counts = class_counts(draw_quiz(frame, split_of, QuizSettings(n=10, mix="balanced", seed=4)))
    assert sorted(counts.values()) == [1, 1, 1, 1, 2, 2, 2]


def test_balanced_mix_shares_out_what_small_classes_lack():
    frame, split_of = synthetic({"akiec": 20, "bcc": 20, "bkl": 20, "df": 2, "mel": 20, "nv": 20, "vasc": 3})
    counts = class_counts(draw_quiz(frame, split_of, QuizSettings(n=30, mix="balanced", seed=0)))
    # 30 / 7 is 4 each, but df has 2 and vasc 3: the 3 missing go to the five other classes.
    assert counts["df"] == 2 and counts["vasc"] == 3
    assert sorted(counts[c] for c in ("akiec", "bcc", "bkl", "mel", "nv")) == [5, 5, 5, 5, 5]


def test_natural_mix_follows_the_pool_prevalence():
    # HAM10000's test split of the reference run, per class.
    pool = {"akiec": 43, "bcc": 79, "bkl": 165, "df": 21, "mel": 155, "nv": 1012, "vasc": 23}
    frame, split_of = synthetic(pool)
    drawn = draw_quiz(frame, split_of, QuizSettings(n=20, mix="natural", seed=5))
    # Quotas 20 × share: akiec 0.57, bcc 1.05, bkl 2.20, df 0.28, mel 2.07, nv 13.51, vasc 0.31; the two
    # images left after the whole parts go to the largest remainders (akiec .57, nv .51).
    assert class_counts(drawn) == {"akiec": 1, "bcc": 1, "bkl": 2, "df": 0, "mel": 2, "nv": 14, "vasc": 0}
    for n in (10, 33, 50):
        counts = class_counts(draw_quiz(frame, split_of, QuizSettings(n=n, seed=1)))
        assert sum(counts.values()) == n
        assert all(abs(counts[c] - n * k / sum(pool.values())) < 1 for c, k in pool.items())


def test_distinct_lesions_come_before_second_views():
    frame, split_of = synthetic({c: 6 for c in CLASSES}, views=3)
    drawn = draw_quiz(frame, split_of, QuizSettings(n=42, mix="balanced", seed=2))
    assert drawn["lesion_id"].is_unique
    # The order is shuffled across classes, not class by class.
    assert drawn["dx"].iloc[:7].nunique() > 1


# ---------------------------------------------------------------------------
# Scoring


def hand_example():
    """Ten images: 7 nv, 1 mel, 1 bkl, 1 df. The student answers nv six times right and once mel; mel right,
    bkl right, df as nv. The model says nv for all ten."""
    truths = ["nv"] * 7 + ["mel", "bkl", "df"]
    answers = ["nv"] * 6 + ["mel", "mel", "bkl", "nv"]
    model = np.full((10, len(CLASSES)), 0.02)
    model[:, CLASSES.index("nv")] = 0.88
    confidences = [5, 5, 4, 4, 5, 4, 2, 3, 1, 2]
    return truths, answers, model, confidences


def test_score_against_a_hand_computed_example():
    result = score(*hand_example())
    you, model = result["student"], result["model"]
    assert result["n"] == 10
    assert result["support"] == {"akiec": 0, "bcc": 0, "bkl": 1, "df": 1, "mel": 1, "nv": 7, "vasc": 0}
    # Student: 6 + 1 + 1 right of 10; recalls nv 6/7, mel 1, bkl 1, df 0 -> balanced (6/7 + 2) / 4.
    assert you["accuracy"] == pytest.approx(0.8)
    assert you["balanced_accuracy"] == pytest.approx((6 / 7 + 1 + 1 + 0) / 4)
    assert you["recall"] == pytest.approx(
        {"akiec": None, "bcc": None, "bkl": 1.0, "df": 0.0, "mel": 1.0, "nv": 6 / 7, "vasc": None}
    )
    nv, mel, bkl, df = (CLASSES.index(c) for c in ("nv", "mel", "bkl", "df"))
    cm = np.array(you["confusion_matrix"])
    assert cm[nv, nv] == 6 and cm[nv, mel] == 1 and cm[df, nv] == 1 and cm[mel, mel] == cm[bkl, bkl] == 1
    assert cm.sum() == 10
    # Model: every nv right, the rest wrong.
    assert model["accuracy"] == pytest.approx(0.7)
    assert model["balanced_accuracy"] == pytest.approx(0.25)
    assert np.array(model["confusion_matrix"])[:, nv].sum() == 10
    # Right: 5,5,4,4,5,4 (nv) + 3 (mel) + 1 (bkl); wrong: 2 (nv as mel), 2 (df as nv).
    assert you["confidence_right"] == pytest.approx(31 / 8)
    assert you["confidence_wrong"] == pytest.approx(2.0)


def test_summary_sentences_say_what_the_numbers_say():
    truths, answers, model, confidences = hand_example()
    sentences = summary_sentences(score(truths, answers, model, confidences), "natural")
    assert sentences[0] == (
        "Under natural prevalence (the most common class, nv, is 7 of the 10 images) accuracy "
        "flatters both: the model's accuracy 0.70 vs balanced accuracy 0.25, yours 0.80 vs "
        "balanced accuracy 0.71."
    )
    assert "nv makes up 70% of it" in sentences[1] and "so nv counts for 25%" in sentences[1]
    # 0.71 against 0.25 on 10 images: the paired interval of the difference holds 0, so no winner is named.
    [said] = [x for x in sentences if x.startswith("On balanced accuracy")]
    assert said.startswith("On balanced accuracy neither of you clearly did better: yours 0.71, the model's 0.25; on ")
    assert "beat" not in said and "95% interval -0.12 to +0.67" in said
    assert "Melanoma: you recognised 1 of 1, the model 0 of 1." in sentences
    assert "You were 3.9/5 sure on average when right and 2.0/5 when wrong." in sentences
    # Equal counts per class: the two measures coincide, and the sentences say so.
    balanced = score(["mel", "nv"], ["nv", "nv"], np.eye(len(CLASSES))[[CLASSES.index("mel")] * 2])
    sentences = summary_sentences(balanced, "balanced")
    assert sentences[0].startswith(
        "With a balanced mix (1 image per class) accuracy and balanced accuracy agree for both"
    )
    assert "coincide" in sentences[1]
    assert "On balanced accuracy you tied with the model (0.50)." in sentences


def test_a_winner_is_named_only_when_the_interval_of_the_difference_leaves_out_zero():
    """A student right on every image of a balanced 42-image quiz against a model that says nv to all: the
    difference's interval is above 0, and the sentence names the winner with it; each side has its own interval."""
    truths = [c for c in CLASSES for _ in range(6)]
    always_nv = np.eye(len(CLASSES))[[CLASSES.index("nv")] * len(truths)]
    result = score(truths, truths, always_nv)
    low, high = result["difference"]["ci"]
    assert 0 < low <= result["difference"]["balanced_accuracy"] <= high
    assert result["student"]["balanced_accuracy_ci"] == [1.0, 1.0]
    lo, hi = result["model"]["balanced_accuracy_ci"]
    assert lo <= result["model"]["balanced_accuracy"] <= hi
    [said] = [x for x in summary_sentences(result, "balanced") if x.startswith("On balanced accuracy")]
    assert said.startswith("On balanced accuracy you beat the model: 1.00 vs its 0.14 (yours minus the model's +0.86")
    assert f"95% interval +{low:.2f} to +{high:.2f} over these 42 images" in said
    # The other way round, the model's win is said from its side.
    flipped = score(truths, ["nv"] * len(truths), np.eye(len(CLASSES))[[CLASSES.index(c) for c in truths]])
    [said] = [x for x in summary_sentences(flipped, "balanced") if x.startswith("On balanced accuracy")]
    assert said.startswith("On balanced accuracy the model beat you: 1.00 vs your 0.14 (the model's minus yours +0.86")


def test_results_table_has_a_row_per_image_in_quiz_order():
    truths, answers, model, confidences = hand_example()
    rows = pd.DataFrame({"image_id": [f"ISIC_{i}" for i in range(10)], "dx": truths, "dx_type": "histo"})
    table = quiz.results_table(rows, answers, [None, *confidences[1:]], model)
    assert list(table.columns) == [
        "position",
        "image_id",
        "truth",
        "confirmed_by",
        "student_answer",
        "student_confidence",
        "model_top_class",
        *(f"prob_{c}" for c in CLASSES),
    ]
    assert table["position"].tolist() == list(range(1, 11))
    assert table["student_answer"].tolist() == answers and table["model_top_class"].eq("nv").all()
    assert pd.isna(table["student_confidence"].iloc[0]) and table["student_confidence"].iloc[1] == 5
    assert table["prob_nv"].tolist() == pytest.approx([0.88] * 10)
