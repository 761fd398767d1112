"""Checkpoint files: everything needed to rebuild a model and preprocess its inputs.

A checkpoint holds only tensors and plain Python values so it loads with
``torch.load(weights_only=True)``, which cannot execute code from a file
someone sent you.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from core.common.files import atomic_write
from core.common.formatting import format_bytes
from core.common.labels import CLASSES, check_class_order
from core.common.runs import check_run_name
from core.data.preprocessing import Preprocessing, is_finite_number
from core.data.splits import SplitError, check_fractions
from core.metrics.calibration import TEMPERATURE_RANGE
from core.models.architectures import ARCHITECTURES, FINETUNE_POLICIES, HEADS, LesionNet, build_model
from core.models.metadata import MetadataHead, read_spec
from core.models.torchfile import ForeignName, UnsafeFile, check_structure, outline

FORMAT = "lesionlab-checkpoint/1"
# Several checkpoints in one file with one temperature for their average (core.inference.ensemble).
ENSEMBLE_FORMAT = "lesionlab-ensemble/1"
# The largest real checkpoint is a full ResNet-50 run's last.pt with Adam's two moments: about 300 MB.
# torch.load reads a file whole before anything can be checked, so a bigger one is refused unread.
MAX_CHECKPOINT_BYTES = 2**30
# The split draws with random_state seed and seed + 1, which scikit-learn takes below 2**32.
MAX_SPLIT_SEED = 2**32 - 2
# A config is the trainer's flat settings (an ensemble's adds a list of its members): a few dozen values.
MAX_CONFIG_DEPTH = 3
MAX_CONFIG_VALUES = 2_000
PREPROCESSING_FIELDS = ("input_size", "source_size", "mean", "std", "colour_constancy")

Check = Callable[[object], None]


class Field(NamedTuple):
    """One field of a model file's schema: whether every file has it, and its check."""

    required: bool
    check: Check


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


def _one_of(key: str, allowed: Sequence[str]) -> Check:
    def check(value: object) -> None:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")

    return check


def check_classes(value: object) -> None:
    if not isinstance(value, list | tuple):
        raise ValueError(f"classes must be the list {list(CLASSES)}; got {value!r}")
    check_class_order(value)


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


def check_temperature(value: object) -> None:
    # 0 or NaN gives NaN probabilities, a negative one turns the prediction upside down, and 1e-30 makes any
    # logit gap "100 %": the range the fit itself searches.
    low, high = TEMPERATURE_RANGE
    if not is_finite_number(value) or not low <= value <= high:
        raise ValueError(f"temperature must be a finite number from {low} to {high:g}; got {value!r}")


def _a_threshold(name: str) -> Callable[[object], None]:
    def check(value: object) -> None:
        # Below 0 every image is "refer", NaN or above 1 none ever is: a probability threshold is within [0, 1].
        if not is_finite_number(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a probability from 0 to 1; got {value!r}")

    return check


# The referral rules' thresholds (core.metrics.classification.REFERRAL_RULES), each chosen on the validation split.
THRESHOLD_FIELDS: dict[str, Field] = {
    name: Field(False, _a_threshold(name)) for name in ("mel_threshold", "malignant_threshold")
}


def _check_weights(value: object) -> None:
    pairs = value.items() if isinstance(value, dict) else [(None, None)]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in pairs):
        raise ValueError("model_state must map parameter names to tensors")


def _a_dict(key: str) -> Check:
    def check(value: object) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a dict; got {type(value).__name__}")

    return check


def _check_epoch(value: object) -> None:
    if not _is_whole(value, 0):
        raise ValueError(f"epoch must be a whole number from 0; got {value!r}")


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


def check_config(config: object) -> None:
    """The trainer's config as a model file records it: a dict of plain values at most ``MAX_CONFIG_DEPTH`` deep
    with at most ``MAX_CONFIG_VALUES`` values (the pages print it whole), and the entries read back from it
    checked: the run's name (a path is made of it), the split seed and fractions, ``max_images`` and ``data``."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict; got {type(config).__name__}")
    try:
        check_structure(config, "config", max_depth=MAX_CONFIG_DEPTH, max_values=MAX_CONFIG_VALUES)
    except UnsafeFile as exc:
        raise ValueError(str(exc)) from None
    name = config.get("name")
    if name not in (None, ""):  # empty: the trainer chose the folder's name
        try:
            check_run_name(name if isinstance(name, str) else "")
        except ValueError:
            raise ValueError(f"config.name must be a run folder's name; got {name!r}") from None
    seed = config.get("split_seed")
    if seed is not None and not (_is_whole(seed, 0) and seed <= MAX_SPLIT_SEED):
        raise ValueError(f"config.split_seed must be a whole number from 0 to {MAX_SPLIT_SEED}; got {seed!r}")
    fractions = config.get("split_fractions")
    if fractions is not None:
        numbers = isinstance(fractions, list | tuple) and all(is_finite_number(f) for f in fractions)
        try:
            check_fractions(fractions if numbers else ())
        except SplitError:
            raise ValueError(
                "config.split_fractions must be three numbers from 0 summing to 1 (train, val, test); "
                f"got {fractions!r}"
            ) from None
    limit = config.get("max_images")
    if limit is not None and not _is_whole(limit, 0):  # 0, like None, means every image
        raise ValueError(f"config.max_images must be empty or a whole number from 0; got {limit!r}")
    if not isinstance(config.get("data", ""), str):
        raise ValueError(f"config.data must be a folder name; got {config['data']!r}")


def _nothing(value: object) -> None:
    """The format marker: checked first, since it says which schema applies."""


# The checkpoint's schema: every field it may hold, whether it must, and its check (a ValueError naming the field).
# A field not listed is refused, so nothing reaches the app beside what is checked here.
CHECKPOINT_SCHEMA: dict[str, Field] = {
    "format": Field(True, _nothing),
    "arch": Field(True, _one_of("arch", tuple(ARCHITECTURES))),
    "head": Field(True, _one_of("head", HEADS)),
    "finetune": Field(True, _one_of("finetune", FINETUNE_POLICIES)),
    "classes": Field(True, check_classes),
    "preprocessing": Field(True, _check_preprocessing),
    "temperature": Field(True, check_temperature),
    "model_state": Field(True, _check_weights),
    # Written by the trainer: its config and progress, and what a resumed run needs (last.pt).
    "config": Field(False, check_config),
    "epoch": Field(False, _check_epoch),
    "metrics": Field(False, _a_dict("metrics")),
    "best_score": Field(False, _check_best_score),
    "optimizer_state": Field(False, _a_dict("optimizer_state")),
    "scheduler_state": Field(False, _a_dict("scheduler_state")),
    # A model that takes age, sex and site; the operating points chosen on the validation split.
    "metadata": Field(False, _check_metadata),
    **THRESHOLD_FIELDS,
}


def check_schema(payload: dict, schema: dict[str, Field], kind: str) -> None:
    """ValueError naming the first field of ``payload`` that is missing, not in ``schema`` or out of its bounds."""
    missing = [key for key, field in schema.items() if field.required and key not in payload]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    unknown = sorted(map(repr, set(payload) - set(schema)))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a field of {kind}")
    for key, field in schema.items():
        if key in payload:
            field.check(payload[key])


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
