"""What Diagnose and its downloadable report say about each referral rule for one prediction, in the same words and
with the same measured figures (core.evaluation.records.recorded_operating_point, for the views the prediction used).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.common.formatting import percents_against
from core.evaluation.records import recorded_operating_point
from core.inference.prediction import Prediction
from core.inference.predictor import Referral

REFER = "refer / discuss with a dermatologist"


@dataclass(frozen=True)
class ReferralView:
    """One rule for one prediction, in words: its score and threshold written so that they compare as the numbers
    do, whether it refers, how the threshold was set and what it measured on the test split."""

    label: str  # "P(malignant)"
    p: str
    threshold: str
    refers: bool
    verdict: str  # "P(malignant) 99.9% is at or above the operating threshold of 31.2%: refer / …"
    chosen: str  # how the threshold was set
    measured: str  # its test-split sensitivity and specificity, or that they are not recorded

    @property
    def note(self) -> str:
        """The threshold, how it was set and what it measured, in one paragraph."""
        return f"The model's operating threshold is {self.label} ≥ {self.threshold}, {self.chosen}. {self.measured}"


def threshold_origin(referral: Referral) -> str:
    """How the model's threshold for the rule was set, to follow "the operating threshold is …, "."""
    rule = referral.rule
    if referral.recorded:
        return f"chosen on its validation split to flag {rule.sensitivity:.0%} of {rule.name}"
    return (
        f"the default: this model file records no {rule.key} operating point chosen on validation "
        "(`lesionlab operating-point` records one)"
    )


def referral_view(referral: Referral, prediction: Prediction, path: Path, checkpoint: dict) -> ReferralView:
    rule, threshold = referral.rule, referral.threshold
    shown_p, shown_t = percents_against(referral.score(prediction), threshold)
    refers = referral.refers(prediction)
    verdict = (
        f"{rule.label} {shown_p} is at or above the operating threshold of {shown_t}: {REFER}."
        if refers
        else f"{rule.label} {shown_p} is below the operating threshold of {shown_t}."
    )
    chosen = threshold_origin(referral)
    record = recorded_operating_point(path, checkpoint, threshold, tta=prediction.tta, rule=rule)
    measured = (
        f"On its test split ({record['n']} images) this model at {shown_t} found {record['sensitivity']:.1%} of "
        f"{rule.name} (sensitivity) and cleared {record['specificity']:.1%} of the rest (specificity), "
        f"{'averaging the flips' if record['tta'] else 'from one view of each image'}"
        f"{' as here' if record['tta'] == prediction.tta else ''}."
        if record and record["sensitivity"] is not None and record["specificity"] is not None
        else "Its sensitivity and specificity on a test split are not in its run records."
    )
    return ReferralView(rule.label, shown_p, shown_t, refers, verdict, chosen, measured)


def referral_views(
    referrals: Sequence[Referral], prediction: Prediction, path: str | Path, checkpoint: dict
) -> list[ReferralView]:
    """Every rule of the model for ``prediction``, in the model's order (broadest first)."""
    return [referral_view(r, prediction, Path(path), checkpoint) for r in referrals]
