"""Checkpoint files: everything needed to rebuild a model and preprocess its inputs.

A checkpoint holds only tensors and plain Python values so it loads with
``torch.load(weights_only=True)``, which cannot execute code from a file
someone sent you.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

import torch

from core.common.files import atomic_write
from core.common.formatting import format_bytes
from core.common.labels import CLASSES
from core.common.runs import check_config
from core.common.schema import (
    TEMPERATURE_RANGE,
    Field,
    a_dict,
    check_schema,
    class_list,
    is_finite_number,
    number,
    one_of,
    probability,
    whole,
)
from core.data.preprocessing import Preprocessing
from core.models.architectures import ARCHITECTURES, FINETUNE_POLICIES, HEADS, LesionNet, build_model
from core.models.metadata import MetadataHead, read_spec
from core.models.torchfile import ForeignName, UnsafeFile, outline

FORMAT = "lesionlab-checkpoint/1"
# Several checkpoints in one file with one temperature for their average (core.inference.ensemble).
ENSEMBLE_FORMAT = "lesionlab-ensemble/1"
# The largest real checkpoint is a full ResNet-50 run's last.pt with Adam's two moments: about 300 MB.
# torch.load reads a file whole before anything can be checked, so a bigger one is refused unread.
MAX_CHECKPOINT_BYTES = 2**30
PREPROCESSING_FIELDS = ("input_size", "source_size", "mean", "std", "colour_constancy")


class CheckpointError(ValueError):
    """A file that is not a usable Lesion Lab checkpoint; the message says why."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """Save ``obj`` so that a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def checkpoint_dict(
    model: LesionNet, prep: Preprocessing, *, head: str, temperature: float = 1.0, **extra: Any
) -> dict:
    """The checkpoint payload; ``extra`` holds plain values such as config, epoch and metrics. A model that
    takes metadata records it and its encoding in ``metadata`` (:meth:`core.models.metadata.MetadataHead.spec`)."""
    fusion = {"metadata": model.head.spec()} if isinstance(model.head, MetadataHead) else {}
    return {
        "format": FORMAT,
        "arch": model.arch,
        "head": head,
        "finetune": getattr(model, "finetune", "full"),
        "classes": list(CLASSES),
        "preprocessing": prep.to_dict(),
        "temperature": float(temperature),
        "model_state": model.state_dict(),
        **fusion,
        **extra,
    }


def _load_failure(path: Path, exc: Exception) -> CheckpointError:
    """Why ``torch.load`` refused the file, without torch's advice to retry with ``weights_only=False``:
    for a file from someone else that advice is how code gets run."""
    text = str(exc)
    if "Weights only load failed" in text:
        name = re.search(r"GLOBAL ([\w.]+)", text)
        if name:
            return CheckpointError(
                f"{path} was not loaded: opening it would import and call {name.group(1)}, which a Lesion Lab "
                "checkpoint never does. The file may be malicious; use only checkpoints written by Lesion Lab."
            )
        # torch keeps the unpickler's own complaint as the context; its wrapper is all advice.
        text = str(exc.__context__ or "").strip() or "not a pickle of tensors and plain values"
    # The first sentence: torch goes on with advice on how it saves files.
    detail = text.strip().splitlines()[0].split(". ")[0] if text.strip() else "the file is empty or cut short"
    return CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {detail})")


check_classes = class_list("classes")


def _check_preprocessing(value: object) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"preprocessing must be a dict; got {type(value).__name__}")
    unknown = sorted(map(str, set(value) - set(PREPROCESSING_FIELDS)))
    if unknown:
        allowed = ", ".join(PREPROCESSING_FIELDS)
        raise ValueError(f"preprocessing holds {', '.join(unknown)}; it may hold only {allowed}")
    try:
        Preprocessing.from_dict(value)
    except ValueError as exc:
        raise ValueError(f"preprocessing.{exc}") from None


# 0 or NaN gives NaN probabilities, a negative one turns the prediction upside down, and 1e-30 makes any logit gap
# "100 %": the range the fit itself searches.
check_temperature = number("temperature", *TEMPERATURE_RANGE)
# The referral rules' thresholds (core.metrics.classification.REFERRAL_RULES), each chosen on the validation split:
# below 0 every image is "refer", NaN or above 1 none ever is, so each is a probability from 0 to 1.
THRESHOLD_FIELDS: dict[str, Field] = {
    name: Field(False, probability(name)) for name in ("mel_threshold", "malignant_threshold")
}


def _check_weights(value: object) -> None:
    pairs = value.items() if isinstance(value, dict) else [(None, None)]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in pairs):
        raise ValueError("model_state must map parameter names to tensors")


def _check_best_score(value: object) -> None:
    if not (is_finite_number(value) or value == -math.inf and isinstance(value, float)):  # -inf: no score yet
        raise ValueError(f"best_score must be a finite number; got {value!r}")


def _check_metadata(value: object) -> None:
    # Absent: a model of the image alone, as every checkpoint before metadata fusion.
    if not isinstance(value, dict):
        raise ValueError(f"metadata must be a dict; got {type(value).__name__}")
    try:
        read_spec(value)
    except ValueError as exc:
        raise ValueError(f"metadata.{exc}") from None


def _nothing(value: object) -> None:
    """The format marker: checked first, since it says which schema applies."""


# The checkpoint's schema: every field it may hold, whether it must, and its check (a ValueError naming the field).
# A field not listed is refused, so nothing reaches the app beside what is checked here.
CHECKPOINT_SCHEMA: dict[str, Field] = {
    "format": Field(True, _nothing),
    "arch": Field(True, one_of("arch", tuple(ARCHITECTURES))),
    "head": Field(True, one_of("head", HEADS)),
    "finetune": Field(True, one_of("finetune", FINETUNE_POLICIES)),
    "classes": Field(True, check_classes),
    "preprocessing": Field(True, _check_preprocessing),
    "temperature": Field(True, check_temperature),
    "model_state": Field(True, _check_weights),
    # Written by the trainer: its config and progress, and what a resumed run needs (last.pt).
    "config": Field(False, check_config),
    "epoch": Field(False, whole("epoch", 0)),
    "metrics": Field(False, a_dict("metrics")),
    "best_score": Field(False, _check_best_score),
    "optimizer_state": Field(False, a_dict("optimizer_state")),
    "scheduler_state": Field(False, a_dict("scheduler_state")),
    # A model that takes age, sex and site; the operating points chosen on the validation split.
    "metadata": Field(False, _check_metadata),
    **THRESHOLD_FIELDS,
}


def read_file(path: str | Path) -> Any:
    """What ``path`` holds, loaded with ``weights_only=True`` after the size bound; raises
    :class:`CheckpointError` saying why it cannot be read. The caller checks what it is."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"{path} is {format_bytes(size)}, larger than any Lesion Lab checkpoint "
            f"(the limit is {format_bytes(MAX_CHECKPOINT_BYTES)}); it was not loaded"
        )
    _outline(path)  # before torch allocates anything the file asks for
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip archives, foreign objects
        raise _load_failure(path, exc) from None


def _outline(path: Path) -> object:
    """The file's :func:`core.models.torchfile.outline`, its refusal a :class:`CheckpointError` naming ``path``."""
    try:
        return outline(path)
    except ForeignName as exc:
        raise CheckpointError(
            f"{path} was not loaded: opening it would import and call {exc.name}, which a Lesion Lab "
            "checkpoint never does. The file may be malicious; use only checkpoints written by Lesion Lab."
        ) from None
    except UnsafeFile as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc}); it was not loaded") from None


def file_format(path: str | Path) -> str | None:
    """The format marker of the Lesion Lab file ``path``, read from its outline (no tensor is loaded); None for
    anything else or a file that cannot be read."""
    try:
        payload = outline(path)
    except (UnsafeFile, OSError):  # read_file says why when the file is opened for real
        return None
    return payload.get("format") if isinstance(payload, dict) else None


def stored_config(path: str | Path) -> dict:
    """The training config the Lesion Lab file ``path`` records (a checkpoint's or an ensemble's), read from its outline
    (no tensor is loaded); empty for a file that records none, cannot be read or holds one its schema refuses (opening
    the file for real says why)."""
    try:
        payload = outline(path)
    except (UnsafeFile, OSError):
        return {}
    config = payload.get("config") if isinstance(payload, dict) else None
    try:
        check_config(config)
    except ValueError:
        return {}
    return config


def check_checkpoint(ckpt: object, where: str) -> dict:
    """``ckpt`` when it is a complete checkpoint dict; :class:`CheckpointError` naming ``where`` otherwise."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        if isinstance(ckpt, dict) and ckpt.get("format") == ENSEMBLE_FORMAT:
            raise CheckpointError(f"{where} is an ensemble of models, not one checkpoint; open it with open_predictor")
        raise CheckpointError(f"{where} is not a Lesion Lab checkpoint (no {FORMAT!r} marker)")
    try:
        check_schema(ckpt, CHECKPOINT_SCHEMA, "a Lesion Lab checkpoint")
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return ckpt


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint in ``path``, every field checked (see ``CHECKPOINT_SCHEMA`` and the bounds in
    :mod:`core.data.preprocessing`); raises :class:`CheckpointError` naming the field and what is allowed."""
    return check_checkpoint(read_file(path), str(path))


def load_model(path: str | Path) -> tuple[LesionNet, dict]:
    """Rebuild the model stored in ``path`` (in eval mode, on the CPU) and return it with the checkpoint dict."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, str(path)), ckpt


def model_from_checkpoint(ckpt: dict, where: str) -> LesionNet:
    """The model of a checked checkpoint dict, in eval mode on the CPU; ``where`` names it in errors."""
    model = build_model(
        ckpt["arch"], weights="none", finetune=ckpt["finetune"], head=ckpt["head"], metadata=ckpt.get("metadata")
    )
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:  # weights of another architecture, or an edited state
        # torch's first line only says that loading failed; the next ones list the missing and odd keys.
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        detail = "; ".join(textwrap.shorten(line, 160, placeholder=" …") for line in lines[:2]) or str(exc)
        raise CheckpointError(f"{where} does not rebuild into a {ckpt['arch']} model ({detail})") from None
    model.eval()
    return model
