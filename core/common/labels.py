"""The one source of truth for the diagnosis classes and their order.

Every tensor of logits, every confusion-matrix row and every report table in the
project is indexed by ``CLASSES``. Nothing else may hard-code the order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnosis:
    code: str
    name: str
    malignant: bool


# Alphabetical by code, the order HAM10000 tools (and the course project) used.
DIAGNOSES: tuple[Diagnosis, ...] = (
    Diagnosis("akiec", "Actinic keratosis / intraepithelial carcinoma", True),
    Diagnosis("bcc", "Basal cell carcinoma", True),
    Diagnosis("bkl", "Benign keratosis-like lesion", False),
    Diagnosis("df", "Dermatofibroma", False),
    Diagnosis("mel", "Melanoma", True),
    Diagnosis("nv", "Melanocytic nevus", False),
    Diagnosis("vasc", "Vascular lesion", False),
)

CLASSES: tuple[str, ...] = tuple(d.code for d in DIAGNOSES)
NUM_CLASSES = len(CLASSES)
DISPLAY_NAMES: dict[str, str] = {d.code: d.name for d in DIAGNOSES}
MALIGNANT: frozenset[str] = frozenset(d.code for d in DIAGNOSES if d.malignant)
MELANOMA = "mel"

# HAM10000's dx_type: how the ground truth was established.
CONFIRMATION = {
    "histo": "histopathology",
    "follow_up": "follow-up (unchanged on digital dermoscopy over time)",
    "consensus": "expert consensus",
    "confocal": "in-vivo confocal microscopy",
}

# ISIC 2018 Task 3 ground-truth CSVs carry one upper-case one-hot column per class.
ISIC2018_COLUMNS: dict[str, str] = {code.upper(): code for code in CLASSES}


def class_index(code: str) -> int:
    """Index of a diagnosis code in ``CLASSES``; accepts ISIC 2018 column names too."""
    key = code.strip().lower()
    try:
        return CLASSES.index(key)
    except ValueError:
        raise KeyError(f"unknown diagnosis code {code!r}; expected one of {', '.join(CLASSES)}") from None


def code_from_onehot(row: Mapping[str, object]) -> str:
    """Diagnosis code from an ISIC 2018 ground-truth row such as ``{"MEL": 1.0, "NV": 0.0, ...}``."""
    hot = [ISIC2018_COLUMNS[col] for col in ISIC2018_COLUMNS if float(row[col]) >= 0.5]
    if len(hot) != 1:
        raise ValueError(f"expected exactly one positive ISIC 2018 column, got {hot or 'none'}")
    return hot[0]


def check_class_order(classes: Sequence[str]) -> None:
    """Refuse a checkpoint or file whose class order differs from ours: silently
    re-pairing names and rows is the bug this project was founded to fix."""
    if tuple(classes) != CLASSES:
        raise ValueError(f"class order {list(classes)} differs from the project's {list(CLASSES)}")
