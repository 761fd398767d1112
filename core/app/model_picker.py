"""The models Diagnose and Batch offer: every model file (:func:`core.common.settings.model_files`) with its measured
test balanced accuracy, and which are experimental, kept behind the pages' "Show experimental models" switch, and why.

A model is experimental when its run records say that its training did not finish (stopped, failed, interrupted or
still running), that it learnt from fewer than :data:`MIN_TRAIN_IMAGES` images, or that it scored below
:data:`MIN_BALANCED_ACCURACY` on its test split. The bundled reference model is always offered, first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from core.common import settings
from core.common.runs import read_start, read_status, run_started
from core.common.schema import SchemaError
from core.evaluation.records import record_folders, recorded_test_results
from core.models.checkpoints import stored_config

# At HAM10000's class mix, 1,000 training images hold about 11 dermatofibromas and 14 vascular lesions: the rare
# classes' recall rests on a handful of examples, and such runs are tries (a subsample, a smoke test), not models.
MIN_TRAIN_IMAGES = 1_000
# Balanced accuracy is the mean of the seven classes' recalls: chance, and a model that calls every lesion a nevus,
# score 1/7 (0.14). Below 0.5 the model misnames, on average, more of a class's lesions than it names. The bundled
# reference scores 0.73 on its test split; the published head-only imbalance runs without a correction for the
# imbalance (none 0.46, focal 0.45) fall below this floor, those with one (0.57 to 0.59) above it.
MIN_BALANCED_ACCURACY = 0.5

# Why a run whose status is not "finished" is experimental, by its state (core.common.runs.read_run's states).
UNFINISHED = {
    "stopped": "stopped before its last epoch",
    "failed": "its training failed",
    "interrupted": "its training was interrupted",
    # A live status whose trainer has died reads the same: either way, its training has not finished.
    "starting": "its training has not finished",
    "running": "its training has not finished",
}


@dataclass(frozen=True)
class ModelChoice:
    """One model file as the pickers offer it."""

    path: Path
    name: str  # settings.model_label: "checkpoint: reference", "run: NAME"
    balanced_accuracy: float | None  # on its test split, from its run records; None when none records it
    tta: bool  # whether that figure averaged the flips (as Diagnose and Batch do by default)
    why_experimental: tuple[str, ...]  # empty for a model offered without the switch

    @property
    def experimental(self) -> bool:
        return bool(self.why_experimental)

    @property
    def label(self) -> str:
        """The picker's line: the name, the measured test balanced accuracy or "not evaluated", and why the model is
        experimental when it is."""
        measured = (
            "not evaluated"
            if self.balanced_accuracy is None
            else f"test balanced accuracy {self.balanced_accuracy:.1%}{' (flip-averaged)' if self.tta else ''}"
        )
        why = f" — experimental: {'; '.join(self.why_experimental)}" if self.experimental else ""
        return f"{self.name} — {measured}{why}"


def _test_balanced_accuracy(path: Path, checkpoint: dict) -> tuple[float | None, bool]:
    """The balanced accuracy of the model's recorded test evaluation, flip-averaged when recorded (the views Diagnose
    and Batch use by default, and what the report quotes for them), else one view."""
    for tta in (True, False):
        if tests := recorded_test_results(path, checkpoint, tta=tta):
            return float(tests[0]["balanced_accuracy"]), tta
    return None, False


def _training_doubts(path: Path, checkpoint: dict) -> list[str]:
    """What the run that trained the model recorded against it: an unfinished training, too few training images.
    Nothing for a model without a run record (its label says "not evaluated" where nothing measured it either)."""
    folder = next((f for f in record_folders(path, checkpoint) if run_started(f)), None)
    if folder is None:
        return []
    try:
        state = read_status(folder).get("state")
    except SchemaError:
        return ["its run records are damaged"]
    doubts = [] if state == "finished" else [UNFINISHED.get(state, f"its training is {state}")]
    train = ((read_start(folder) or {}).get("split_sizes") or {}).get("train")
    if isinstance(train, int) and train < MIN_TRAIN_IMAGES:
        doubts.append(f"trained on {train:,} images (fewer than {MIN_TRAIN_IMAGES:,})")
    return doubts


def model_choice(path: Path) -> ModelChoice:
    """``path`` with its measured test balanced accuracy and what makes it experimental, if anything."""
    path = Path(path)
    checkpoint = {"config": _config(path)}
    balanced, tta = _test_balanced_accuracy(path, checkpoint)
    why = _training_doubts(path, checkpoint)
    if balanced is not None and balanced < MIN_BALANCED_ACCURACY:
        why.append(f"test balanced accuracy below {MIN_BALANCED_ACCURACY:.0%}")
    if path == settings.checkpoints_dir() / settings.REFERENCE_CHECKPOINT:
        why = []  # the bundled model, described in MODEL_CARD.md: always offered
    return ModelChoice(path, settings.model_label(path), balanced, tta, tuple(why))


def _config(path: Path) -> dict:
    """The model file's stored config, read once per version of the file: reading its outline is most of what a
    label costs, and the pickers label every model on every rerun. Shared between callers: do not change it."""
    try:
        stat = path.stat()
    except OSError:
        return {}
    return _stored_config(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _stored_config(path: str, _mtime_ns: int, _size: int) -> dict:
    return stored_config(path)


def model_choices() -> list[ModelChoice]:
    """Every model file as :func:`core.common.settings.model_files` orders them: the reference model first."""
    return [model_choice(path) for path in settings.model_files()]
