"""How long the imbalance experiment will take, said before it starts.

The experiment trains the head once per strategy on cached backbone features, all in one process. Its time
is the start-up, then per strategy and epoch the images the epoch holds (oversampling duplicates rows) at
the head's training rate plus the validation and checkpoints; the first time, computing the features
comes first. The rates are those that earlier cached head-only runs here recorded (their epochs' images/s
and seconds, their start and end, the progress of their feature phase), else those ``bench/experiment.py``
measured (``docs/BENCHMARKS.json``); an estimate says which.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.common.files import read_json
from core.common.formatting import format_duration
from core.common.runs import RunState, read_events
from core.common.settings import PROJECT_ROOT
from core.training.config import TrainConfig, config_with
from core.training.loaders import prepare_data, split_dataset

BENCHMARKS = PROJECT_ROOT / "docs" / "BENCHMARKS.json"
RATES = ("startup_s", "features_images_per_s", "head_images_per_s", "epoch_overhead_s")
RECENT_RUNS = 6  # the newest matching runs whose rates count: the machine's load changes
MIN_FEATURE_SPAN_S = 10  # progress lines carry whole seconds: a shorter feature phase gives no usable rate


@dataclass(frozen=True)
class Rate:
    value: float
    basis: str  # where it was measured, as a phrase


@dataclass(frozen=True)
class Estimate:
    cached_s: float  # the whole experiment with the backbone features already cached
    features_s: float  # computing the features first, the first time for this backbone and image size
    rates: dict[str, Rate]

    def basis(self) -> str:
        """Each rate with where it was measured, as one sentence."""
        r = self.rates
        return (
            f"start-up {format_duration(r['startup_s'].value)} ({r['startup_s'].basis}); "
            f"feature extraction {r['features_images_per_s'].value:,.0f} images/s "
            f"({r['features_images_per_s'].basis}); head training {r['head_images_per_s'].value:,.0f} images/s "
            f"({r['head_images_per_s'].basis}) and {r['epoch_overhead_s'].value:.1f} s per epoch for validation "
            f"and checkpoints ({r['epoch_overhead_s'].basis})."
        )


def experiment_images(cfg: TrainConfig, strategies: Sequence[str]) -> tuple[int, dict[str, int]]:
    """For ``cfg``'s dataset and subsample: the images whose features the experiment uses, and the training
    images an epoch holds under each strategy."""
    frame = split_dataset(cfg)
    return len(frame), {s: len(prepare_data(config_with(cfg, imbalance=s), frame)[1]) for s in strategies}


def _same_head(run: RunState, cfg: TrainConfig) -> bool:
    c = run.config
    return (
        c.get("finetune") == "head"
        and c.get("feature_cache", True)
        and c.get("arch") == cfg.arch
        and c.get("head") == cfg.head
        and c.get("batch_size") == cfg.batch_size
    )


def _feature_rate(run: RunState) -> float | None:
    lines = [e for e in read_events(run.path / "metrics.jsonl") if e.get("phase") == "features" and "done" in e]
    if len(lines) < 2:
        return None
    span = (datetime.fromisoformat(lines[-1]["time"]) - datetime.fromisoformat(lines[0]["time"])).total_seconds()
    return (lines[-1]["done"] - lines[0]["done"]) / span if span >= MIN_FEATURE_SPAN_S else None


def recorded_rates(runs: Iterable[RunState], cfg: TrainConfig) -> dict[str, Rate]:
    """The rates earlier runs (newest first, as :func:`core.common.runs.list_runs` gives them) recorded for ``cfg``:
    head training and per-epoch overhead from finished cached head-only runs of its backbone, head and batch
    size; feature extraction from the newest run that computed features for its backbone and image size."""
    runs = list(runs)
    head_runs = [
        r for r in runs if r.state == "finished" and r.epochs and r.wall_time_s is not None and _same_head(r, cfg)
    ]
    head_runs = head_runs[:RECENT_RUNS]
    found: dict[str, Rate] = {}
    if head_runs:
        seconds = [sum(e["seconds"] for e in r.epochs) for r in head_runs]
        images = sum(e["images_per_s"] * e["seconds"] for r in head_runs for e in r.epochs)
        basis = f"{len(head_runs)} earlier cached head-only {cfg.arch} run{'s' * (len(head_runs) > 1)} here"
        found["head_images_per_s"] = Rate(images / sum(seconds), basis)
        found["epoch_overhead_s"] = Rate(
            statistics.median(
                max(0.0, r.wall_time_s - s) / len(r.epochs) for r, s in zip(head_runs, seconds, strict=True)
            ),
            basis,
        )
    for run in runs:
        c = run.config
        if c.get("arch") == cfg.arch and list(c.get("input_size", ())) == list(cfg.input_size):
            rate = _feature_rate(run)
            if rate:
                found["features_images_per_s"] = Rate(rate, f"run {run.name} here")
                break
    return found


def benchmark_rates(path: Path = BENCHMARKS) -> dict[str, Rate]:
    """The rates ``bench/experiment.py`` measured, if it has written its section of ``path``."""
    measured = (read_json(path) or {}).get("experiment") or {}
    basis = (
        f"bench/experiment.py on {measured.get('date', '?')}, {measured.get('arch', '?')} at "
        f"{'×'.join(map(str, measured.get('input_size', ())))}"
    )
    return {k: Rate(float(measured[k]), basis) for k in RATES if measured.get(k)}


def estimate(images: Mapping[str, int], total_images: int, epochs: int, rates: Mapping[str, Rate]) -> Estimate | None:
    """The experiment's time for the epoch sizes ``images`` (per strategy) on ``total_images`` images; None when
    a rate is unknown."""
    if not all(k in rates for k in RATES):
        return None
    r = {k: rates[k] for k in RATES}
    per_epoch = sum(n / r["head_images_per_s"].value + r["epoch_overhead_s"].value for n in images.values())
    return Estimate(
        cached_s=r["startup_s"].value + epochs * per_epoch,
        features_s=total_images / r["features_images_per_s"].value,
        rates=r,
    )
