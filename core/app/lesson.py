"""The imbalance lesson: what each class-imbalance strategy did to each class, in numbers and in words.

An experiment is one run per strategy: those the app's one-click experiment trained here
(:func:`core.app.jobs.start_experiment` leaves a manifest), or published runs that differ only in their
strategy (``docs/runs``). The lesson reads each run's test evaluation (``evaluation.json``: the most
probable class after temperature scaling) and, for the melanoma threshold curves, its test predictions.
The sentences are written here from the table the page shows, so a test can hold them to its numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.common.labels import CLASSES, DISPLAY_NAMES, MELANOMA
from core.common.runs import RunState, has_evaluation
from core.metrics.classification import operating_point
from core.training import imbalance

NEVUS = "nv"
BASELINE = "none"
THRESHOLDS = np.round(np.linspace(0.02, 0.98, 49), 2)
# Settings that differ between the runs of one experiment.
_PER_RUN = ("name", "out", "imbalance")


@dataclass(frozen=True)
class Experiment:
    key: str  # the manifest's name for an experiment started here
    title: str  # for the experiment picker
    runs: dict[str, Path]  # strategy name -> run folder, in the registry's order

    def evaluated(self) -> dict[str, Path]:
        """The runs that have finished with a test evaluation."""
        return {s: path for s, path in self.runs.items() if has_evaluation(path)}


def in_registry_order(names: Iterable[str]) -> list[str]:
    """Strategy names in the order of :data:`core.training.imbalance.STRATEGIES`; names it no longer declares last."""
    order = list(imbalance.STRATEGIES)
    return sorted(names, key=lambda s: (order.index(s) if s in order else len(order), s))


def _settings(config: Mapping) -> str:
    images = f"at most {config['max_images']} images" if config.get("max_images") else "all images"
    return f"{config.get('arch', '?')}, {config.get('epochs', '?')} epochs, {images}"


def local_experiments(manifests: Sequence[Mapping], runs_dir: Path) -> list[Experiment]:
    """The experiments started here, from their manifests (:func:`core.app.jobs.list_experiments`, newest first)."""
    found = []
    for m in manifests:
        runs = dict(zip(m.get("strategies", []), m["runs"], strict=False))
        found.append(
            Experiment(
                m["name"],
                f"{m['name']} ({_settings(m.get('base', {}))})",
                {s: Path(runs_dir) / runs[s] for s in in_registry_order(runs)},
            )
        )
    return found


def published_experiments(runs: Iterable[RunState]) -> list[Experiment]:
    """Evaluated runs that differ only in their strategy, grouped into experiments (two strategies at least)."""
    groups: dict[str, dict[str, RunState]] = {}
    for run in runs:
        strategy = run.config.get("imbalance")
        if strategy and run.has_evaluation:
            key = json.dumps({k: v for k, v in run.config.items() if k not in _PER_RUN}, sort_keys=True)
            groups.setdefault(key, {}).setdefault(strategy, run)
    found = []
    for group in groups.values():
        if len(group) >= 2:
            first = next(iter(group.values()))
            found.append(
                Experiment(
                    f"published:{first.name}",
                    f"published with the model card ({_settings(first.config)})",
                    {s: group[s].path for s in in_registry_order(group)},
                )
            )
    return found


# ---------------------------------------------------------------------------
# Numbers


def strategy_table(evaluations: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per strategy (indexed by name, in the registry's order) from its run's ``evaluation.json``:
    ``label``, ``accuracy``, ``balanced_accuracy``, and per class (``CLASSES`` order) ``recall_<code>``,
    ``precision_<code>`` and ``support_<code>`` (test images of the class)."""
    rows = {}
    for strategy in in_registry_order(evaluations):
        test = evaluations[strategy]["test"]
        per_class = {c["code"]: c for c in test["per_class"]}
        rows[strategy] = {
            "label": imbalance.label(strategy),
            "accuracy": test["accuracy"],
            "balanced_accuracy": test["balanced_accuracy"],
            **{f"recall_{c}": per_class[c]["recall"] for c in CLASSES},
            **{f"precision_{c}": per_class[c]["precision"] for c in CLASSES},
            **{f"support_{c}": per_class[c]["support"] for c in CLASSES},
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def fmt(value: float) -> str:
    """A rate as the lesson writes it, in the table and in the sentences alike."""
    return f"{value:.2f}"


def shown_table(table: pd.DataFrame) -> pd.DataFrame:
    """The numbers as the page shows them: a column per strategy (its label), a row per number (accuracy,
    balanced accuracy, then each class's recall and precision), formatted by :func:`fmt`. Strategies run
    across, so the table stays narrow however many classes there are."""
    rows = {
        "accuracy": "accuracy",
        "balanced accuracy": "balanced_accuracy",
        **{f"recall · {c}": f"recall_{c}" for c in CLASSES},
        **{f"precision · {c}": f"precision_{c}" for c in CLASSES},
    }
    shown = pd.DataFrame({name: table[column].map(fmt) for name, column in rows.items()}).T
    shown.columns = list(table["label"])
    return shown


def melanoma_curve(labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Recall and precision of "melanoma when P(mel) ≥ t" for each of :data:`THRESHOLDS`; precision is
    missing where no image is flagged."""
    points = [operating_point(labels, probs, t) for t in THRESHOLDS]
    return pd.DataFrame(
        {
            "threshold": THRESHOLDS,
            "recall": [p["sensitivity"] for p in points],
            "precision": [p["ppv"] for p in points],
        },
        dtype=float,
    )


# ---------------------------------------------------------------------------
# Words


def _raised(what: str, before: float, after: float, down: str = "lowered") -> str:
    if fmt(before) == fmt(after):
        return f"left {what} at {fmt(after)}"
    return f"{'raised' if after > before else down} {what} from {fmt(before)} to {fmt(after)}"


def _rose(before: float, after: float) -> str:
    if fmt(before) == fmt(after):
        return f"stayed at {fmt(after)}"
    return f"{'rose' if after > before else 'fell'} from {fmt(before)} to {fmt(after)}"


def sentences(table: pd.DataFrame) -> list[str]:
    """Two or three sentences on what the strategies changed, against plain cross-entropy (``none``; else
    the first strategy): melanoma found and nevi lost by the strategy that found the most melanomas,
    balanced accuracy against accuracy, and the largest gain in any class's recall. Empty for fewer
    than two strategies."""
    if len(table) < 2:
        return []
    base_name = BASELINE if BASELINE in table.index else table.index[0]
    base, others = table.loc[base_name], table.drop(index=base_name)
    baseline = (
        f"{base['label']} ({imbalance.STRATEGIES[base_name].explanation})"
        if base_name in imbalance.STRATEGIES
        else base["label"]
    )
    mel, nv = f"recall_{MELANOMA}", f"recall_{NEVUS}"
    best = others.loc[others[mel].idxmax()]
    said = [
        f"Compared with {baseline}, {best['label']} "
        f"{_raised('melanoma recall', base[mel], best[mel])} and "
        f"{_raised('its precision', base[f'precision_{MELANOMA}'], best[f'precision_{MELANOMA}'], 'cut')}; "
        f"nevus recall {_rose(base[nv], best[nv])}."
    ]

    balanced = others.loc[others["balanced_accuracy"].idxmax()]
    share = base[f"support_{NEVUS}"] / sum(base[f"support_{c}"] for c in CLASSES)
    why = (
        f": {share:.0%} of the test images are nevi, and accuracy counts every image the same"
        if share >= 0.5 and balanced["accuracy"] < base["accuracy"]
        else ""
    )
    said.append(
        f"Balanced accuracy, the mean of the seven recalls, "
        f"{_rose(base['balanced_accuracy'], balanced['balanced_accuracy'])} with {balanced['label']}, "
        f"while accuracy {_rose(base['accuracy'], balanced['accuracy'])}{why}."
    )

    gains = pd.DataFrame({c: others[f"recall_{c}"] - base[f"recall_{c}"] for c in CLASSES})
    strategy, code = gains.stack().idxmax()
    if gains.loc[strategy, code] > 0 and fmt(table.loc[strategy, f"recall_{code}"]) != fmt(base[f"recall_{code}"]):
        said.append(
            f"The largest gain in a single class is {DISPLAY_NAMES[code].lower()} ({code}): its recall "
            f"{_rose(base[f'recall_{code}'], table.loc[strategy, f'recall_{code}'])} with "
            f"{table.loc[strategy, 'label']}."
        )
    return said
