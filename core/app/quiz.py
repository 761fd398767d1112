"""The quiz that puts students beside the model: which images a model may be quizzed on, a reproducible draw
of them, and the side-by-side scoring of the students' answers and the model's.

**Which images are held out for a model** is :func:`core.data.splits.model_split`'s answer: only images the
model neither trained on nor was selected on count as "test" (val is allowed too, when an instructor wants more
images); training images are never offered.

**The draw** (:func:`draw_quiz`) is a function of the settings, the dataset and the split alone: the same seed,
settings, dataset and model give the same images in the same order on every machine. Class counts are
allocated exactly (natural prevalence: proportional to the pool, largest remainder; balanced: equal shares,
the leftovers of small classes passed to the others), and within a class distinct lesions come first.

**Scoring** (:func:`score`) uses :func:`core.metrics.classification.compute_metrics` for both the students (their answer
as a one-hot probability) and the model, on the same images. Nothing here touches disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.common.labels import CLASSES, DISPLAY_NAMES, MELANOMA, NUM_CLASSES, class_index
from core.data.splits import split_column
from core.metrics.bootstrap import bootstrap_ci, paired_bootstrap_ci
from core.metrics.classification import balanced_accuracy, compute_metrics

QUIZ_SPLITS = ("test", "val")  # never "train"
MIXES = {"natural": "natural prevalence", "balanced": "balanced"}
MIN_IMAGES, MAX_IMAGES = 10, 50
CONFIDENCE_LEVELS = (1, 5)  # "how sure are you": 1 = guessing, 5 = certain
# Accuracy and balanced accuracy closer than this read as "agree" in the summary.
AGREEMENT = 0.05
# Resamples of the quiz's images for the intervals: 10 images give wide ones, and the summary names no winner while
# the difference's interval holds 0 ("the model beat you: 0.46 vs 0.25" on 10 images was chance as often as not).
BOOTSTRAP = 2000


class QuizError(ValueError):
    """A quiz that cannot be set up as asked; the message says why."""


@dataclass(frozen=True)
class QuizSettings:
    """What the instructor chooses; together with the dataset and the model it fixes the quiz."""

    n: int = 20
    split: str = "test"
    mix: str = "natural"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in QUIZ_SPLITS:
            raise QuizError(f"a quiz draws from {' or '.join(QUIZ_SPLITS)} images, not {self.split!r}")
        if self.mix not in MIXES:
            raise QuizError(f"unknown class mix {self.mix!r}; choose {' or '.join(MIXES)}")
        if not MIN_IMAGES <= self.n <= MAX_IMAGES:
            raise QuizError(f"a quiz has {MIN_IMAGES} to {MAX_IMAGES} images, not {self.n}")

    def describe(self) -> str:
        return f"{self.n} {self.split} images, {MIXES[self.mix]}, seed {self.seed}"


def quiz_pool(frame: pd.DataFrame, split_of: pd.Series, split: str) -> pd.DataFrame:
    """The images a quiz on ``split`` may draw, sorted by image_id so the draw ignores the dataset's row order."""
    if split not in QUIZ_SPLITS:
        raise QuizError(f"a quiz draws from {' or '.join(QUIZ_SPLITS)} images, not {split!r}")
    rows = frame[split_column(frame, split_of).to_numpy() == split]
    return rows.sort_values("image_id", kind="stable").reset_index(drop=True)


def natural_counts(available: pd.Series, n: int) -> pd.Series:
    """``n`` images shared out in proportion to ``available`` (per class), by largest remainder;
    ties go to the more common class, then to the first in ``CLASSES``."""
    available = available.reindex(CLASSES, fill_value=0).astype(int)
    n = min(n, int(available.sum()))
    quota = available * n / max(int(available.sum()), 1)
    counts = np.floor(quota).astype(int)
    order = sorted(CLASSES, key=lambda c: (-(quota[c] - counts[c]), -available[c], CLASSES.index(c)))
    for code in order[: n - int(counts.sum())]:
        counts[code] += 1
    return counts


def balanced_counts(available: pd.Series, n: int, rng: np.random.Generator) -> pd.Series:
    """``n`` images shared equally over the classes present; a class with too few images gives all it has and
    the others share the rest. Leftovers smaller than one per class go to classes chosen by ``rng``."""
    available = available.reindex(CLASSES, fill_value=0).astype(int)
    counts = pd.Series(0, index=list(CLASSES))
    remaining = min(n, int(available.sum()))
    open_ = [c for c in CLASSES if available[c] > 0]
    while remaining and open_:
        share = remaining // len(open_)
        if share == 0:
            for code in rng.choice(open_, size=remaining, replace=False):
                counts[code] += 1
            break
        for code in open_:
            take = min(share, int(available[code] - counts[code]))
            counts[code] += take
            remaining -= take
        open_ = [c for c in open_ if counts[c] < available[c]]
    return counts


def draw_quiz(frame: pd.DataFrame, split_of: pd.Series, settings: QuizSettings) -> pd.DataFrame:
    """The quiz's images, in the order they are shown: ``settings.n`` rows of ``frame`` from
    ``settings.split`` (fewer when the pool is smaller), in the class mix asked for."""
    pool = quiz_pool(frame, split_of, settings.split)
    if pool.empty:
        raise QuizError(f"this dataset has no {settings.split} images for this model")
    rng = np.random.default_rng(settings.seed)
    available = pool["dx"].value_counts()
    counts = (
        natural_counts(available, settings.n)
        if settings.mix == "natural"
        else balanced_counts(available, settings.n, rng)
    )
    chosen = []
    for code in CLASSES:
        rows = pool[pool["dx"] == code]
        rows = rows.iloc[rng.permutation(len(rows))]
        # Another view of a lesion already in the quiz teaches little: first views of each lesion come first.
        view = rows.groupby("lesion_id", sort=False).cumcount().to_numpy()
        chosen.append(rows.iloc[np.argsort(view, kind="stable")[: counts[code]]])
    drawn = pd.concat(chosen)
    return drawn.iloc[rng.permutation(len(drawn))].reset_index(drop=True)


# ---------------------------------------------------------------------------
# Scoring


def _side(metrics: dict) -> dict:
    recall = {row["code"]: (row["recall"] if row["support"] else None) for row in metrics["per_class"]}
    return {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "recall": recall,
        "confusion_matrix": metrics["confusion_matrix"],
    }


def score(
    truths: Sequence[str],
    answers: Sequence[str],
    model_probs: np.ndarray,
    confidences: Sequence[int | None] | None = None,
) -> dict:
    """The students' and the model's results on the same images.

    ``truths`` and ``answers`` are class codes, ``model_probs`` the model's (n, 7) probabilities and
    ``confidences`` the students' 1–5 ratings (None where not asked). Per side: accuracy, balanced accuracy,
    per-class recall (None for a class not in the quiz) and the confusion matrix (rows: truth).
    """
    labels = np.array([class_index(c) for c in truths], dtype=int)
    chosen = np.array([class_index(c) for c in answers], dtype=int)
    picked, model_probs = np.eye(NUM_CLASSES)[chosen], np.asarray(model_probs, dtype=float)
    student = _side(compute_metrics(labels, picked))
    model = _side(compute_metrics(labels, model_probs))
    for side, probs in ((student, picked), (model, model_probs)):
        side["balanced_accuracy_ci"] = list(bootstrap_ci(labels, probs, balanced_accuracy, n=BOOTSTRAP))
    rated = [(c, bool(a == t)) for c, a, t in zip(confidences or [], chosen, labels, strict=False) if c is not None]
    for key, right in (("confidence_right", True), ("confidence_wrong", False)):
        values = [c for c, ok in rated if ok is right]
        student[key] = float(np.mean(values)) if values else None
    support = np.bincount(labels, minlength=NUM_CLASSES)
    return {
        "n": len(labels),
        "support": dict(zip(CLASSES, map(int, support), strict=True)),
        "student": student,
        "model": model,
        # Yours minus the model's, with the paired bootstrap's 95% interval: the same images drawn for both.
        "difference": {
            "balanced_accuracy": student["balanced_accuracy"] - model["balanced_accuracy"],
            "ci": list(paired_bootstrap_ci(labels, picked, model_probs, balanced_accuracy, n=BOOTSTRAP)),
        },
    }


def _images(k: int) -> str:
    return f"{k} image" if k == 1 else f"{k} images"


def _verdict(side: dict) -> str:
    gap = side["accuracy"] - side["balanced_accuracy"]
    return "flatters" if gap > AGREEMENT else "understates" if gap < -AGREEMENT else "matches"


def _pair(side: dict) -> str:
    return f"{side['accuracy']:.2f} vs balanced accuracy {side['balanced_accuracy']:.2f}"


def interval_text(side: dict, n: int) -> str:
    """A side's balanced accuracy interval (:func:`score`), in a sentence for its number's help."""
    low, high = side["balanced_accuracy_ci"]
    return f"95% bootstrap interval {low:.2f}–{high:.2f} over these {_images(n)}: a short quiz measures roughly."


def _interval(low: float, high: float) -> str:
    return f"95% interval {low:+.2f} to {high:+.2f}"


def _who_did_better(result: dict) -> str:
    """Who did better on balanced accuracy, said only where the paired interval of the difference leaves out 0."""
    ours, theirs = result["student"]["balanced_accuracy"], result["model"]["balanced_accuracy"]
    diff, (low, high) = result["difference"]["balanced_accuracy"], result["difference"]["ci"]
    if abs(diff) < 1e-9:
        return f"On balanced accuracy you tied with the model ({ours:.2f})."
    if low > 0:
        return (
            f"On balanced accuracy you beat the model: {ours:.2f} vs its {theirs:.2f} (yours minus the model's "
            f"{diff:+.2f}, {_interval(low, high)} over these {_images(result['n'])})."
        )
    if high < 0:
        return (
            f"On balanced accuracy the model beat you: {theirs:.2f} vs your {ours:.2f} (the model's minus yours "
            f"{-diff:+.2f}, {_interval(-high, -low)} over these {_images(result['n'])})."
        )
    return (
        f"On balanced accuracy neither of you clearly did better: yours {ours:.2f}, the model's {theirs:.2f}; on "
        f"{_images(result['n'])} the difference ({diff:+.2f}, {_interval(low, high)}) may be chance. A longer "
        "quiz tells them apart."
    )


def summary_sentences(result: dict, mix: str) -> list[str]:
    """What the numbers of :func:`score` say, in sentences: what the class mix did to accuracy, who did better,
    the largest per-class difference, the melanomas and the students' confidence. Over 60 lines because it is
    prose: one short block per sentence, read top to bottom as the page shows them."""
    student, model, n = result["student"], result["model"], result["n"]
    present = {c: k for c, k in result["support"].items() if k}
    common = max(present, key=present.get)
    if mix == "natural":
        lead = f"Under natural prevalence (the most common class, {common}, is {present[common]} of the {n} images)"
    else:
        low, high = min(present.values()), max(present.values())
        lead = f"With a balanced mix ({_images(low) if low == high else f'{low}–{high} images'} per class)"
    verdicts = {"student": _verdict(student), "model": _verdict(model)}
    if verdicts["student"] == verdicts["model"] == "matches":
        mix_sentence = (
            f"{lead} accuracy and balanced accuracy agree for both: the model's accuracy "
            f"{_pair(model)}, yours {_pair(student)}."
        )
    elif verdicts["student"] == verdicts["model"]:
        mix_sentence = (
            f"{lead} accuracy {verdicts['model']} both: the model's accuracy {_pair(model)}, yours {_pair(student)}."
        )
    else:
        words = {"flatters": "flatters", "understates": "understates", "matches": "fairly reflects"}
        mix_sentence = (
            f"{lead} accuracy {words[verdicts['model']]} the model ({_pair(model)}) and "
            f"{words[verdicts['student']]} you ({_pair(student)})."
        )
    sentences = [mix_sentence]
    if len(set(present.values())) == 1:
        sentences.append(
            "Every class in this quiz has the same number of images, so accuracy and balanced accuracy coincide."
        )
    else:
        sentences.append(
            f"Accuracy counts images, so {common} makes up {present[common] / n:.0%} of it; balanced "
            f"accuracy averages the recall of the {len(present)} classes present, so {common} counts "
            f"for {1 / len(present):.0%}, like every other class."
        )

    sentences.append(_who_did_better(result))

    gaps = {c: student["recall"][c] - model["recall"][c] for c in present}
    widest = max(gaps, key=lambda c: (abs(gaps[c]), present[c]))
    if gaps[widest]:
        sentences.append(
            f"The largest difference is on {DISPLAY_NAMES[widest]} ({widest}, "
            f"{_images(present[widest])}): your recall {student['recall'][widest]:.2f}, the model's "
            f"{model['recall'][widest]:.2f}."
        )
    if MELANOMA in present:
        k, index = present[MELANOMA], CLASSES.index(MELANOMA)
        caught = [int(side["confusion_matrix"][index][index]) for side in (student, model)]
        sentences.append(f"Melanoma: you recognised {caught[0]} of {k}, the model {caught[1]} of {k}.")
    right, wrong = student["confidence_right"], student["confidence_wrong"]
    if right is not None and wrong is not None:
        sentences.append(f"You were {right:.1f}/5 sure on average when right and {wrong:.1f}/5 when wrong.")
    return sentences


def results_table(
    rows: pd.DataFrame, answers: Sequence[str], confidences: Sequence[int | None], model_probs: np.ndarray
) -> pd.DataFrame:
    """One row per quiz image, in quiz order, for the CSV download: the image, the truth and how it was
    confirmed, the student's answer and confidence, the model's top class and every class probability."""
    probs = np.asarray(model_probs, dtype=float)
    return pd.DataFrame(
        {
            "position": np.arange(1, len(rows) + 1),
            "image_id": rows["image_id"].to_numpy(),
            "truth": rows["dx"].to_numpy(),
            "confirmed_by": rows["dx_type"].to_numpy(),
            "student_answer": list(answers),
            "student_confidence": pd.array(list(confidences), dtype="Int64"),
            "model_top_class": [CLASSES[i] for i in probs.argmax(axis=1)],
            **{f"prob_{code}": probs[:, i].round(6) for i, code in enumerate(CLASSES)},
        }
    )
