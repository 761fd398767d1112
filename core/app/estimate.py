"""How long the imbalance experiment will take, said before it starts.

The experiment trains the head once per strategy on cached backbone features, all in one process. Its time
is the start-up, then per strategy and epoch the images the epoch holds (oversampling duplicates rows) at
the head's training rate plus the validation and checkpoints; the first time, computing the features
comes first. The rates are those that earlier cached head-only runs here recorded (their epochs' images/s
and seconds, their start and end, the progress of their feature phase), else those ``bench/experiment.py``
measured (``docs/BENCHMARKS.json``); an estimate says which.

Those rates were measured on another day, often on an idle machine: on a busy one the experiment ran 7 times
longer than said (3 min 39 s said, 27 min taken). Once it runs, :func:`time_left` re-estimates it from the speed its
own runs measure on this machine, from its first seconds on, and the page updates it as it goes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.common.files import read_json
from core.common.formatting import format_duration
from core.common.runs import DAMAGED, RunState, read_events
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
        if run.state == DAMAGED:  # its records are not to be read (a log past its bound raises in read_events)
            continue
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


def load_note() -> str:
    """What the estimate before the click cannot know, in a sentence: the rates are from other days, and how busy
    the cores are now (the 1-minute load average against the core count) when others are using them."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = (
        f"This computer is busy now (load {load:.1f} on {cores} cores), so expect it to take longer. "
        if load > cores / 2
        else ""
    )
    return busy + "Once it runs, the time left is estimated again from the speed measured here, as it goes."


@dataclass(frozen=True)
class TimeLeft:
    seconds: float  # until the experiment's last run has ended
    rates: dict[str, Rate]  # those it was computed with, each with where it was measured

    def basis(self) -> str:
        return "; ".join(
            f"{RATE_WORDS[k]} {_rate_value(k, rate.value)} ({rate.basis})" for k, rate in self.rates.items()
        )


RATE_WORDS = {
    "features_images_per_s": "feature extraction",
    "head_images_per_s": "head training",
    "epoch_overhead_s": "validation and checkpoints",
}


def _rate_value(key: str, value: float) -> str:
    return f"{value:.1f} s per epoch" if key == "epoch_overhead_s" else f"{value:,.0f} images/s"


def measured_rates(runs: Sequence[RunState], cfg: TrainConfig, now: float | None = None) -> dict[str, Rate]:
    """The rates an experiment under way has measured on this machine: from its finished runs (as
    :func:`recorded_rates` reads them), else from its current run's first seconds (images done since its feature
    extraction started, the running epoch's images/s)."""
    now = time.time() if now is None else now
    found = {k: Rate(r.value, "measured by this experiment here") for k, r in recorded_rates(runs, cfg).items()}
    current = next((r for r in runs if not r.done and r.progress), None)
    if current is None:
        return found
    p = current.progress
    if current.phase == "features" and p.get("done") and p.get("started") and now > p["started"]:
        found.setdefault(
            "features_images_per_s", Rate(p["done"] / (now - p["started"]), "this experiment's features so far")
        )
    elif current.phase is None and p.get("images_per_s"):
        found.setdefault("head_images_per_s", Rate(float(p["images_per_s"]), f"{current.name}'s epoch so far"))
    return found


def time_left(
    runs: Sequence[tuple[str, RunState | None]],
    images: Mapping[str, int],
    total_images: int,
    cfg: TrainConfig,
    fallback: Mapping[str, Rate],
    now: float | None = None,
) -> TimeLeft | None:
    """How long the experiment under way has left: ``runs`` are its (strategy, run) in the order they run, None
    for one not started; ``images`` each strategy's epoch size, ``total_images`` the images whose features it
    computes once. From the rates it has measured here (:func:`measured_rates`), ``fallback``'s (the rates the
    estimate before it started used) where it has measured none yet; None when a rate it needs is unknown."""
    measured = measured_rates([r for _, r in runs if r is not None], cfg, now)
    rates = {**fallback, **measured}
    if not all(k in rates for k in ("head_images_per_s", "epoch_overhead_s")):
        return None
    head, overhead = rates["head_images_per_s"].value, rates["epoch_overhead_s"].value
    used = {k: rates[k] for k in ("head_images_per_s", "epoch_overhead_s")}

    def epochs_s(strategy: str, epochs: int) -> float:
        return epochs * (images[strategy] / head + overhead)

    left = 0.0
    for strategy, run in runs:
        if run is None or run.state == "queued":
            left += epochs_s(strategy, cfg.epochs)
        elif run.done:
            continue
        elif run.phase == "features":
            if "features_images_per_s" not in rates:
                return None
            used["features_images_per_s"] = rates["features_images_per_s"]
            p = run.progress
            left += (p.get("total", total_images) - p.get("done", 0)) / rates["features_images_per_s"].value
            left += epochs_s(strategy, cfg.epochs)
        elif run.phase is None and (eta := run.eta_s()) is not None:
            left += eta  # its own epochs so far: RunState's ETA
        else:  # starting, decoding, or its final evaluation: the epochs not yet done, at the rates above
            left += epochs_s(strategy, max(0, cfg.epochs - len(run.epochs))) or overhead
    return TimeLeft(left, used)
