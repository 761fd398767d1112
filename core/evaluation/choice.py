"""The rule that decides which candidate becomes the bundled model, fixed before the candidates were trained.

The bundled model answers every Diagnose, Batch and Quiz question, and it meets images from other clinics and
cameras. Chosen on HAM10000 validation alone, the choice picked the model that travels worse (issue 22), so a
candidate must pass three gates, each read from its recorded results and none from the HAM10000 test split:

1. **At home**: its validation balanced accuracy (``evaluation.json``'s ``val``) is at least
   :attr:`Rule.min_val_balanced_accuracy`.
2. **Away from home**: the leave-one-source-out runs of its recipe (``lesionlab train … --leave-one-source-out``:
   runs whose config is the candidate's but for where files go, the seed and ``holdout_source``) cover every source
   that can be held out, and their balanced accuracy on the held-out sources averages at least
   :attr:`Rule.min_holdout_balanced_accuracy`. An ensemble's recipe is its members' when they share one.
3. **Under acquisition shifts**: its robustness report on the validation split (``lesionlab evaluate … --shifts
   --split val``) drops balanced accuracy by at most :attr:`Rule.max_shift_drop` under every shift.

Among the candidates that pass, the one that travels best (highest mean held-out balanced accuracy) is kept, the
higher validation balanced accuracy deciding a tie; when none passes, the bundled model stays as it is. A candidate
is a finished run that trains its backbone (fine-tuning ``last`` or ``full``, or an ensemble of such runs) and holds
out no source; head-only runs on cached features are screens, not candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.common.runs import has_evaluation, read_config, read_evaluation
from core.common.schema import SchemaError
from core.evaluation.robustness import read_robustness

# Config fields that say where a run kept its files or how the machine ran it, not what it learnt; the seed, so that
# one leave-one-source-out run per source speaks for every seed of a recipe; and the held-out source itself.
NOT_THE_RECIPE = frozenset(
    {
        "name",
        "out",
        "data",
        "cache_dir",
        "decoded_dir",
        "device",
        "num_workers",
        "input_pipeline",
        "amp",
        "channels_last",
        "compile",
        "seed",
        "holdout_source",
    }
)


@dataclass(frozen=True)
class Rule:
    """The three gates' thresholds (see the module's docstring)."""

    min_val_balanced_accuracy: float
    min_holdout_balanced_accuracy: float
    max_shift_drop: float

    def describe(self) -> list[str]:
        """The gates in words, one per line, as the model card states them."""
        return [
            f"at home: validation balanced accuracy ≥ {self.min_val_balanced_accuracy:.3f};",
            "away from home: leave-one-source-out runs of the same recipe on every source that can be held out, "
            f"their balanced accuracy on the held-out sources ≥ {self.min_holdout_balanced_accuracy:.3f} on average;",
            f"under acquisition shifts: on the validation split, no shift lowers balanced accuracy by more than "
            f"{self.max_shift_drop:.3f}.",
        ]


# Fixed on 2026-12-07, before the candidates of issue 22 were trained. At home: the bundled model's 0.745 on
# validation less 0.025, about the half-width of its interval there, so a candidate may give up no more than noise
# on HAM10000's own cameras. Away from home: 0.65, what the bundled model reached on 1,512 dermoscopy images from
# other clinics (balanced accuracy 0.654): a new model must travel at least as well. Under shifts: the issue's
# target, a drop of at most 0.03 under each shift.
RULE = Rule(min_val_balanced_accuracy=0.72, min_holdout_balanced_accuracy=0.65, max_shift_drop=0.03)


@dataclass(frozen=True)
class Record:
    """What the rule reads of one candidate: ``holdout`` maps each held-out source to the balanced accuracy on it
    (from ``holdout_runs``); ``shift_drops`` each shift to its balanced-accuracy drop on the validation split (None
    without such a report)."""

    run: str
    val_balanced_accuracy: float | None
    holdout: dict[str, float]
    holdout_runs: list[str]
    shift_drops: dict[str, float] | None

    @property
    def holdout_mean(self) -> float | None:
        return float(np.mean(list(self.holdout.values()))) if self.holdout else None


@dataclass(frozen=True)
class Verdict:
    """A candidate judged: whether it passes every gate, and one line per gate saying why."""

    record: Record
    passed: bool
    reasons: list[str]


def recipe(run_dir: Path, runs: Path | None = None, defaults: Mapping[str, object] | None = None) -> dict | None:
    """What ``run_dir`` learnt from: its config less :data:`NOT_THE_RECIPE`; for an ensemble, the recipe its members
    (run folders under ``runs``) share, or None when they differ or are not there. ``defaults``: the trainer's
    config defaults (``TrainConfig().to_dict()``), taken for a field an older run's config lacks: it was trained
    before the field existed, as the default trains now (a run from before colour constancy used none)."""
    config = {**(defaults or {}), **read_config(run_dir)}
    if config.get("arch") != "ensemble":
        return {k: v for k, v in config.items() if k not in NOT_THE_RECIPE}
    members = [recipe(Path(runs) / m["run"], defaults=defaults) if runs else None for m in config.get("members", [])]
    return members[0] if members and members[0] and all(m == members[0] for m in members) else None


def holdout_runs_of(run_dir: Path, runs: Path, defaults: Mapping[str, object] | None = None) -> list[Path]:
    """The finished runs in ``runs`` that held out a source and share ``run_dir``'s recipe (:func:`recipe`), by
    source."""
    own = recipe(run_dir, runs, defaults)
    if own is None or not Path(runs).is_dir():
        return []
    found = [
        d
        for d in sorted(Path(runs).iterdir())
        if read_config(d).get("holdout_source") and has_evaluation(d) and recipe(d, defaults=defaults) == own
    ]
    return sorted(found, key=lambda d: read_config(d)["holdout_source"])


def validation_drops(run_dir: Path) -> dict[str, float] | None:
    """Each shift's balanced-accuracy drop in the run's robustness report, when that report is on the validation
    split (a report on the test split must not choose a model); None otherwise."""
    try:
        report = read_robustness(run_dir, "val")
    except SchemaError:  # a damaged report says nothing about the model
        return None
    if not report:
        return None
    return {c["name"]: c["drop"]["balanced_accuracy"]["value"] for c in report["conditions"] if c.get("drop")}


def read_record(run_dir: Path, runs: Path, defaults: Mapping[str, object] | None = None) -> Record:
    """The candidate's recorded results the rule reads (its leave-one-source-out runs found in ``runs``, recipes
    compared as :func:`recipe` does)."""
    holdouts = holdout_runs_of(run_dir, runs, defaults)
    holdout = {}
    for d in holdouts:  # one result per source: the first run found, by name
        holdout.setdefault(read_config(d)["holdout_source"], read_evaluation(d)["test"]["balanced_accuracy"])
    val = read_evaluation(run_dir).get("val") or {}
    return Record(
        run=Path(run_dir).name,
        val_balanced_accuracy=val.get("balanced_accuracy"),
        holdout=holdout,
        holdout_runs=[d.name for d in holdouts],
        shift_drops=validation_drops(run_dir),
    )


def is_candidate(run_dir: Path) -> bool:
    """A finished run that trains its backbone, or an ensemble, and holds out no source."""
    config = read_config(run_dir)
    return (
        has_evaluation(run_dir)
        and not config.get("holdout_source")
        and (config.get("arch") == "ensemble" or config.get("finetune") in ("last", "full"))
    )


def candidate_runs(runs: Path) -> list[Path]:
    """Every candidate in the folder ``runs``, by name."""
    return [d for d in sorted(Path(runs).iterdir()) if d.is_dir() and is_candidate(d)] if Path(runs).is_dir() else []


def _at_least(what: str, value: float, floor: float) -> tuple[bool, str]:
    if value >= floor:
        return True, f"{what} {value:.3f} ≥ {floor:.3f}"
    return False, f"{what} {value:.3f}, {floor - value:.3f} below {floor:.3f}"


def judge(record: Record, rule: Rule = RULE, sources: Sequence[str] | None = None) -> Verdict:
    """``record`` against ``rule``. ``sources``: the sources that can be held out (all must have been), when known;
    otherwise the held-out results found are read as they are."""
    gates = []
    if record.val_balanced_accuracy is None:
        gates.append((False, "no validation balanced accuracy recorded"))
    else:
        gates.append(
            _at_least("validation balanced accuracy", record.val_balanced_accuracy, rule.min_val_balanced_accuracy)
        )

    missing = [s for s in sources or () if s not in record.holdout]
    if not record.holdout:
        gates.append((False, "no leave-one-source-out run of its recipe"))
    elif missing:
        gates.append((False, f"not trained without {', '.join(missing)} (held out: {', '.join(record.holdout)})"))
    else:
        each = ", ".join(f"{s} {v:.3f}" for s, v in record.holdout.items())
        ok, line = _at_least(
            "held-out sources' mean balanced accuracy", record.holdout_mean, rule.min_holdout_balanced_accuracy
        )
        gates.append((ok, f"{line} ({each})"))

    if record.shift_drops is None:
        gates.append((False, "no robustness report on the validation split"))
    else:
        over = {s: d for s, d in record.shift_drops.items() if d > rule.max_shift_drop}
        worst = max(record.shift_drops, key=record.shift_drops.get)
        if not over:
            gates.append(
                (True, f"largest shift drop {record.shift_drops[worst]:.3f} ({worst}) ≤ {rule.max_shift_drop:.3f}")
            )
        else:
            said = "; ".join(
                f"{s} {d:.3f} ({d - rule.max_shift_drop:.3f} over)"
                for s, d in sorted(over.items(), key=lambda kv: -kv[1])
            )
            gates.append((False, f"shift drops over {rule.max_shift_drop:.3f}: {said}"))
    return Verdict(record, all(ok for ok, _ in gates), [line for _, line in gates])


def choose(verdicts: Sequence[Verdict]) -> Verdict | None:
    """The candidate kept: of those that pass, the highest mean held-out balanced accuracy, then validation
    balanced accuracy; None when none passes."""
    passed = [v for v in verdicts if v.passed]
    if not passed:
        return None
    return max(passed, key=lambda v: (v.record.holdout_mean, v.record.val_balanced_accuracy))
