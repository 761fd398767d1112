"""What a prediction is: one image's calibrated probabilities and what the app shows beside them, and
the members' votes of an ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.common.labels import CLASSES, DISPLAY_NAMES, MELANOMA, class_index

MEL_INDEX = class_index(MELANOMA)


@dataclass
class Prediction:
    """One image's result. ``probs`` and ``probabilities`` follow ``CLASSES``."""

    probs: np.ndarray
    probabilities: dict[str, float]
    top_class: str
    top_name: str
    confidence: float
    malignant_probability: float
    input_tensor: torch.Tensor  # (1, 3, H, W), normalised: what the network received
    # Upright RGB as handed to the eval transform: at the checkpoint's source size when it records one
    # (large JPEGs otherwise decode at a reduced DCT scale), before the resize to the input size.
    image: Image.Image
    tta: bool
    # The backbone's pooled features of ``input_tensor`` (no flips), once :meth:`Predictor.embed` computed them.
    embedding: np.ndarray | None = None
    # Whether age, sex or body site reached the model (it takes them and at least one was given), and a
    # sentence saying what happened to the metadata ("" when none was given to a model that does not take it).
    metadata_used: bool = False
    metadata_note: str = ""
    # An ensemble's members one by one (core.inference.ensemble): their probabilities, agreement and P(melanoma) spread.
    members: MemberVotes | None = None

    @property
    def top_index(self) -> int:
        return CLASSES.index(self.top_class)

    def ranked(self) -> list[tuple[str, str, float]]:
        """(code, display name, probability), most probable first."""
        order = np.argsort(-self.probs, kind="stable")
        return [(CLASSES[i], DISPLAY_NAMES[CLASSES[i]], float(self.probs[i])) for i in order]

    def to_dict(self) -> dict:
        return {
            "top_class": self.top_class,
            "top_name": self.top_name,
            "confidence": self.confidence,
            "malignant_probability": self.malignant_probability,
            "probabilities": self.probabilities,
            "tta": self.tta,
            "metadata_used": self.metadata_used,
            "metadata_note": self.metadata_note,
            **({"members": self.members.to_dict()} if self.members is not None else {}),
        }


@dataclass(frozen=True)
class MemberVotes:
    """What each member said about one image: an honest uncertainty signal beside the ensemble's number."""

    names: tuple[str, ...]
    probs: np.ndarray  # (K, classes): each member's own calibrated probabilities, in CLASSES order
    top_class: str  # the ensemble's

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def own_top_classes(self) -> tuple[str, ...]:
        """Each member's own most likely class."""
        return tuple(CLASSES[i] for i in self.probs.argmax(axis=1))

    @property
    def agreeing(self) -> int:
        """How many members have the ensemble's top class as their own."""
        return self.own_top_classes.count(self.top_class)

    @property
    def p_melanoma(self) -> np.ndarray:
        return self.probs[:, MEL_INDEX]

    def agreement_text(self) -> str:
        return f"{self.agreeing} of {self.count} models agree on {DISPLAY_NAMES[self.top_class]} ({self.top_class})"

    def spread_text(self) -> str:
        mel = self.p_melanoma
        return (
            f"P(melanoma) across the {self.count} models: {mel.min():.1%} to {mel.max():.1%} "
            f"(standard deviation {mel.std():.1%})"
        )

    def to_dict(self) -> dict:
        mel = self.p_melanoma
        return {
            "count": self.count,
            "agreeing": self.agreeing,
            "p_melanoma_min": float(mel.min()),
            "p_melanoma_max": float(mel.max()),
            "p_melanoma_std": float(mel.std()),
            "per_member": [
                {"name": name, "probabilities": {c: float(p) for c, p in zip(CLASSES, row, strict=True)}}
                for name, row in zip(self.names, self.probs, strict=True)
            ],
        }


LOW_CONFIDENCE = 0.5
