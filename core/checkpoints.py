"""Checkpoint files: everything needed to rebuild a model and preprocess its inputs.

A checkpoint holds only tensors and plain Python values so it loads with
``torch.load(weights_only=True)``, which cannot execute code from a file
someone sent you.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.files import atomic_write
from core.labels import CLASSES, check_class_order
from core.models import LesionNet, build_model
from core.preprocessing import Preprocessing

FORMAT = "lesionlab-checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not a usable Lesion Lab checkpoint; the message says why."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """Save ``obj`` so that a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def checkpoint_dict(model: LesionNet, prep: Preprocessing, *, head: str, temperature: float = 1.0,
                    **extra: Any) -> dict:
    """The checkpoint payload; ``extra`` holds plain values such as config, epoch and metrics."""
    return {
        "format": FORMAT,
        "arch": model.arch,
        "head": head,
        "finetune": getattr(model, "finetune", "full"),
        "classes": list(CLASSES),
        "preprocessing": prep.to_dict(),
        "temperature": float(temperature),
        "model_state": model.state_dict(),
        **extra,
    }


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # pickle errors, truncated zip archives, foreign objects
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Lesion Lab checkpoint (no {FORMAT!r} marker)")
    try:
        check_class_order(ckpt["classes"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return ckpt


def load_model(path: str | Path) -> tuple[LesionNet, dict]:
    """Rebuild the model stored in ``path`` (in eval mode, on the CPU) and return it with the checkpoint dict."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["arch"], weights="none", finetune=ckpt.get("finetune", "full"), head=ckpt["head"])
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return model, ckpt
