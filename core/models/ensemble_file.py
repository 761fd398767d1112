"""The ensemble file: several checkpoints in one file (see :mod:`core.inference.ensemble` for why one file and how the
members are combined), written, read and checked here like :mod:`core.models.checkpoints` does for one checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core.common.labels import CLASSES
from core.common.runs import check_config
from core.common.schema import Field, check_schema
from core.models.architectures import LesionNet
from core.models.checkpoints import (
    CHECKPOINT_SCHEMA,
    ENSEMBLE_FORMAT,
    THRESHOLD_FIELDS,
    CheckpointError,
    check_checkpoint,
    check_classes,
    check_temperature,
    model_from_checkpoint,
    read_file,
)

MAX_MEMBERS = 16


def ensemble_dict(
    members: Sequence[dict], names: Sequence[str], *, temperature: float = 1.0, config: dict, **extra
) -> dict:
    """The ensemble payload: ``members`` are checkpoint dicts (their optimiser state is left out)."""
    kept = [{k: v for k, v in m.items() if k not in ("optimizer_state", "scheduler_state")} for m in members]
    return {
        "format": ENSEMBLE_FORMAT,
        "classes": list(CLASSES),
        "temperature": float(temperature),
        "members": kept,
        "member_names": list(names),
        "config": config,
        **extra,
    }


def _check_members(members: object) -> None:
    if not isinstance(members, list | tuple) or not 1 <= len(members) <= MAX_MEMBERS:
        raise ValueError(f"members must be a list of 1 to {MAX_MEMBERS} checkpoints")


def _check_names(names: object) -> None:
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError("member_names must name each member")


# The ensemble file's schema, as CHECKPOINT_SCHEMA is a checkpoint's: a field not listed is refused. Each member is
# then checked as a checkpoint.
ENSEMBLE_SCHEMA: dict[str, Field] = {
    "format": CHECKPOINT_SCHEMA["format"],
    "classes": Field(True, check_classes),
    "temperature": Field(True, check_temperature),
    "members": Field(True, _check_members),
    "member_names": Field(True, _check_names),
    "config": Field(True, check_config),
    **THRESHOLD_FIELDS,
}


def check_ensemble(payload: object, where: str) -> dict:
    """``payload`` when it is a complete ensemble; :class:`CheckpointError` naming the field (and the member)
    otherwise. Every member is checked as :func:`core.models.checkpoints.read_checkpoint` checks a file."""
    if not isinstance(payload, dict) or payload.get("format") != ENSEMBLE_FORMAT:
        raise CheckpointError(f"{where} is not a Lesion Lab ensemble (no {ENSEMBLE_FORMAT!r} marker)")
    try:
        check_schema(payload, ENSEMBLE_SCHEMA, "a Lesion Lab ensemble")
        members, names = payload["members"], payload["member_names"]
        if len(names) != len(members):
            raise ValueError(f"member_names must name each of the {len(members)} members")
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    for i, (member, name) in enumerate(zip(members, names, strict=True)):
        check_checkpoint(member, f"{where}, member {i + 1} of {len(members)} ({name})")
    sizes = {tuple(m["preprocessing"].get("source_size") or ()) for m in members}
    if len(sizes) > 1:
        shown = ", ".join("×".join(map(str, s)) or "none" for s in sorted(sizes))
        raise CheckpointError(
            f"{where}: the members were trained on images of different sizes on disk ({shown}); an upload is "
            "decoded once for all members, so they must share it"
        )
    return payload


def read_ensemble(path: str | Path) -> dict:
    """The ensemble in ``path``, every field and member checked; raises :class:`CheckpointError` saying why not."""
    return check_ensemble(read_file(path), str(path))


def read_model_file(path: str | Path) -> dict:
    """A checkpoint or an ensemble, whichever ``path`` holds, checked as its kind is checked; raises
    :class:`CheckpointError` saying why not."""
    payload = read_file(path)
    if isinstance(payload, dict) and payload.get("format") == ENSEMBLE_FORMAT:
        return check_ensemble(payload, str(path))
    return check_checkpoint(payload, str(path))


def lead_model(path: str | Path) -> tuple[LesionNet, dict]:
    """The one network of a checkpoint, or an ensemble's first member, with its checkpoint dict: what similar
    cases and the unfamiliar-image score compare features in."""
    payload = read_model_file(path)
    if payload["format"] == ENSEMBLE_FORMAT:
        ckpt, where = payload["members"][0], f"{path}, member 1"
    else:
        ckpt, where = payload, str(path)
    return model_from_checkpoint(ckpt, where), ckpt
