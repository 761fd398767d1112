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
from core.common.labels import CLASSES, check_class_order
from core.data.preprocessing import Preprocessing, is_finite_number
from core.models.architectures import ARCHITECTURES, FINETUNE_POLICIES, HEADS, LesionNet, build_model
from core.models.metadata import MetadataHead, read_spec

FORMAT = "lesionlab-checkpoint/1"
# Several checkpoints in one file with one temperature for their average (core.inference.ensemble).
ENSEMBLE_FORMAT = "lesionlab-ensemble/1"
# What every checkpoint carries besides the marker (``checkpoint_dict`` writes them all).
REQUIRED_FIELDS = ("arch", "head", "finetune", "classes", "preprocessing", "temperature", "model_state")
# The largest real checkpoint is a full ResNet-50 run's last.pt with Adam's two moments: about 300 MB.
# torch.load reads a file whole before anything can be checked, so a bigger one is refused unread.
MAX_CHECKPOINT_BYTES = 2**30
# The split draws with random_state seed and seed + 1, which scikit-learn takes below 2**32.
MAX_SPLIT_SEED = 2**32 - 2


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


def _is_whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_fields(ckpt: dict) -> None:
    """Raise ValueError naming the first field that is missing or out of bounds; nothing is built before."""
    missing = [key for key in REQUIRED_FIELDS if key not in ckpt]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    for key, allowed in (("arch", tuple(ARCHITECTURES)), ("head", HEADS), ("finetune", FINETUNE_POLICIES)):
        if not isinstance(ckpt[key], str) or ckpt[key] not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {ckpt[key]!r}")
    if not isinstance(ckpt["classes"], list | tuple):
        raise ValueError(f"classes must be the list {list(CLASSES)}; got {ckpt['classes']!r}")
    check_class_order(ckpt["classes"])
    if not isinstance(ckpt["preprocessing"], dict):
        raise ValueError(f"preprocessing must be a dict; got {type(ckpt['preprocessing']).__name__}")
    try:
        Preprocessing.from_dict(ckpt["preprocessing"])
    except ValueError as exc:
        raise ValueError(f"preprocessing.{exc}") from None
    temperature = ckpt["temperature"]
    if not is_finite_number(temperature) or temperature <= 0:
        # 0 or NaN gives NaN probabilities; a negative temperature turns the prediction upside down.
        raise ValueError(f"temperature must be a finite number above 0; got {temperature!r}")
    state = ckpt["model_state"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError("model_state must map parameter names to tensors")
    # Optional fields: the trainer's config and progress, the optimiser state a resumed run needs, and the
    # metadata a model takes.
    for key in ("config", "metrics", "optimizer_state", "scheduler_state", "metadata"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise ValueError(f"{key} must be a dict; got {type(ckpt[key]).__name__}")
    if "epoch" in ckpt and not _is_whole(ckpt["epoch"], 0):
        raise ValueError(f"epoch must be a whole number from 0; got {ckpt['epoch']!r}")
    best = ckpt.get("best_score", 0.0)
    if not (is_finite_number(best) or best == -math.inf and isinstance(best, float)):  # -inf: no score yet
        raise ValueError(f"best_score must be a finite number; got {best!r}")
    if "metadata" in ckpt:  # absent: a model of the image alone, as every checkpoint before metadata fusion
        try:
            read_spec(ckpt["metadata"])
        except ValueError as exc:
            raise ValueError(f"metadata.{exc}") from None
    _check_config(ckpt.get("config") or {})


def _check_config(config: dict) -> None:
    """The config entries read back from a checkpoint (by the evaluator, to recompute the split)."""
    seed = config.get("split_seed")
    if seed is not None and not (_is_whole(seed, 0) and seed <= MAX_SPLIT_SEED):
        raise ValueError(f"config.split_seed must be a whole number from 0 to {MAX_SPLIT_SEED}; got {seed!r}")
    fractions = config.get("split_fractions")
    if fractions is not None and (
        not isinstance(fractions, list | tuple)
        or len(fractions) != 3
        or not all(is_finite_number(f) and f >= 0 for f in fractions)
    ):
        raise ValueError(f"config.split_fractions must be three numbers from 0 (train, val, test); got {fractions!r}")
    limit = config.get("max_images")
    if limit is not None and not _is_whole(limit, 0):  # 0, like None, means every image
        raise ValueError(f"config.max_images must be empty or a whole number from 0; got {limit!r}")
    if not isinstance(config.get("data", ""), str):
        raise ValueError(f"config.data must be a folder name; got {config['data']!r}")


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip archives, foreign objects
        raise _load_failure(path, exc) from None


def file_format(path: str | Path) -> str | None:
    """The format marker of the Lesion Lab file ``path``, read without reading its tensors (they are
    memory-mapped, not loaded); None for anything else or a file that cannot be read that way."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 — read_file says why when the file is opened for real
        return None
    return payload.get("format") if isinstance(payload, dict) else None


def check_checkpoint(ckpt: object, where: str) -> dict:
    """``ckpt`` when it is a complete checkpoint dict; :class:`CheckpointError` naming ``where`` otherwise."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        if isinstance(ckpt, dict) and ckpt.get("format") == ENSEMBLE_FORMAT:
            raise CheckpointError(f"{where} is an ensemble of models, not one checkpoint; open it with open_predictor")
        raise CheckpointError(f"{where} is not a Lesion Lab checkpoint (no {FORMAT!r} marker)")
    try:
        _check_fields(ckpt)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return ckpt


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint in ``path``, every field checked (see ``REQUIRED_FIELDS`` and the bounds in
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
