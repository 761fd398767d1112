"""One door for every model file: :func:`open_predictor` opens a checkpoint as a :class:`Predictor` and an
ensemble file as an :class:`EnsemblePredictor`, which has the same interface, so the pages, batch
prediction and the evaluator take either without asking which."""

from __future__ import annotations

from pathlib import Path

import torch

from core.inference.ensemble import EnsemblePredictor
from core.inference.predictor import Predictor
from core.models.checkpoints import ENSEMBLE_FORMAT, file_format


def open_predictor(path: str | Path, *, device: str | torch.device = "cpu") -> Predictor:
    """The model file at ``path`` ready to predict: an ensemble when the file says it is one."""
    if file_format(path) == ENSEMBLE_FORMAT:
        return EnsemblePredictor(path, device=device)
    return Predictor(path, device=device)
