"""The imbalance experiment as the app runs it, timed; writes its section of docs/BENCHMARKS.md and .json.

    python -m bench.experiment [--data ../shared/data/ham10000-200x150] [--epochs 5] [--quick]

The app's job worker trains the experiment as ``lesionlab train --config A.json --config B.json …``: one
config per imbalance strategy, cached head-only, in one process. This script runs exactly that twice, each
time in a fresh process: on an empty feature cache (the backbone features are computed first), then again
with the features cached. It reports the experiment's wall time with the features cached, the first feature
extraction (the first wall time minus the second), the start-up, and each strategy's head-only epoch as the
trainer logged it; the Compare page's time estimate falls back on these rates (docs/BENCHMARKS.json).

Weights are random (``--weights none``) unless asked otherwise: the speed does not depend on their values.
Measure on an otherwise idle machine; the load average before and after is written next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.benchmarks import DEFAULT_DATA, machine
from bench.report import update_json, write_section
from core.app.jobs import experiment_configs
from core.common.formatting import format_duration
from core.common.runs import read_run
from core.training.config import config_with

ROOT = Path(__file__).resolve().parents[1]


OWNER = "bench/experiment.py"
TARGET_S = 180  # the budget, for the experiment and again for the first extraction


def run_experiment(configs: list[Path], log: Path) -> float:
    """Wall seconds of one trainer process over ``configs``, the way the app's job worker starts it."""
    args = [arg for path in configs for arg in ("--config", str(path))]
    start = time.perf_counter()
    with open(log, "ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", "core.cli.train", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode:
        sys.exit(f"error: the experiment failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def run_figures(run_dir: Path) -> dict:
    """What one run's files say: its epochs as the trainer timed them, and its wall time (config.json is its
    first file, status.json its last)."""
    run = read_run(run_dir)
    epochs = run.epochs
    return {
        "strategy": run.config["imbalance"],
        "train_images": run.start["train_images"],
        "steps": run.start["steps_per_epoch"],
        "epochs": len(epochs),
        "epoch_s": statistics.median(e["seconds"] for e in epochs),
        "images_per_s": sum(e["images_per_s"] * e["seconds"] for e in epochs) / sum(e["seconds"] for e in epochs),
        "training_s": sum(e["seconds"] for e in epochs),
        "wall_s": (run_dir / "status.json").stat().st_mtime - (run_dir / "config.json").stat().st_mtime,
        "images": sum(run.start["split_sizes"].values()),
    }


def measure(args: argparse.Namespace, work: Path) -> dict:
    base = config_with(
        "seed",
        data=str(args.data),
        arch=args.arch,
        weights=args.weights,
        epochs=args.epochs,
        input_size=(args.size, args.size),
        max_images=args.max_images,
        cache_dir=str(work / "cache"),
    ).to_dict()
    results = {}
    for phase in ("cold", "warm"):  # the same cache: the first process computes the features, the second reuses
        out = work / phase
        out.mkdir()
        paths = []
        for cfg in experiment_configs({**base, "out": str(out)}, phase):
            paths.append(out / f"{cfg['name']}.json")
            paths[-1].write_text(json.dumps(cfg))
        wall = run_experiment(paths, work / "train.log")
        results[phase] = {"wall_s": wall, "runs": [run_figures(out / p.stem) for p in paths]}
        print(phase, format_duration(wall), flush=True)
    runs = results["warm"]["runs"]
    images = runs[0]["images"]
    run_walls = sum(r["wall_s"] for r in runs)
    training = sum(r["training_s"] for r in runs)
    extraction = results["cold"]["wall_s"] - results["warm"]["wall_s"]
    return {
        "arch": args.arch,
        "input_size": [args.size, args.size],
        "weights": args.weights,
        "epochs": args.epochs,
        "images": images,
        "strategies": [r["strategy"] for r in runs],
        "warm_wall_s": results["warm"]["wall_s"],
        "cold_wall_s": results["cold"]["wall_s"],
        "extraction_s": extraction,
        # The rates the Compare page's estimate uses: start-up + epochs × Σ (images / head rate + overhead).
        "startup_s": results["warm"]["wall_s"] - run_walls,
        "features_images_per_s": images / extraction if extraction > 0 else None,
        "head_images_per_s": sum(r["images_per_s"] * r["training_s"] for r in runs) / training,
        "epoch_overhead_s": (run_walls - training) / sum(r["epochs"] for r in runs),
        "runs": runs,
    }


def section(r: dict, command: str) -> list[str]:
    # Only the load before the start tells of other work: the one after includes this benchmark's own trainer.
    busy = r["load_average"][0] > 1.0
    lines = [
        "## The imbalance experiment, as the app runs it",
        "",
        f"Measured {r['date']} with `{command}` on: {r['machine']}. Load average (1 min) {r['load_average'][0]:.1f} "
        f"before, {r['load_average'][1]:.1f} after (its own trainer included)."
        + (" **The machine was shared with other work: these are not idle figures.**" if busy else ""),
        f"One trainer process, `lesionlab train --config …` once per strategy ({len(r['strategies'])}), as the "
        f"app's job runs it: {r['images']:,} images, {r['arch']} at {r['input_size'][0]}×{r['input_size'][1]} (weights "
        f"`{r['weights']}`), head-only on cached features, {r['epochs']} epochs of batch 16 per strategy.",
        "",
        "| what | measured | target |",
        "| --- | --- | --- |",
        f"| the whole experiment, features cached (wall, process start to exit) | "
        f"{format_duration(r['warm_wall_s'])} | ≤ 3 min |",
        f"| first feature extraction: the same experiment on an empty cache, minus the line above | "
        f"{format_duration(r['extraction_s'])} ({r['features_images_per_s'] or 0:.0f} images/s) | ≤ 3 min |",
        f"| start-up: Python, torch, arguments, until the first run begins | {r['startup_s']:.1f} s | |",
    ]
    for run in r["runs"]:
        lines.append(
            f"| head-only epoch as the trainer runs it, `{run['strategy']}` ({run['train_images']:,} images, "
            f"{run['steps']} steps), median of {run['epochs']} | {run['epoch_s']:.2f} s "
            f"({run['images_per_s']:,.0f} images/s) | |"
        )
    lines += [
        f"| per epoch, what a run spends outside its training epochs (data and model set-up, validation, "
        f"checkpoints, the final evaluation) | {r['epoch_overhead_s']:.2f} s | |",
        "",
        "The Compare page's time estimate uses these rates when no earlier run on the machine recorded its own.",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--arch", default="mobilenet_v2")
    p.add_argument("--weights", default="none")
    p.add_argument("--size", type=int, default=224, help="input size (square)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per strategy (the Compare form's default)")
    p.add_argument("--max-images", type=int, default=None, help="a stratified subsample, for trying the script")
    p.add_argument("--quick", action="store_true", help="1000 images and 2 epochs, for trying the script")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = p.parse_args()
    if args.quick:
        args.max_images, args.epochs = args.max_images or 1000, 2
    if not (args.data / "HAM10000_metadata.csv").is_file():
        sys.exit(f"error: no HAM10000 at {args.data}; pass --data DIR")
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lesionlab-experiment-") as tmp:
        results = measure(args, Path(tmp))
    results.update(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        load_average=[before, os.getloadavg()[0]],
    )
    command = "python " + " ".join([OWNER, *sys.argv[1:]])
    write_section(args.out, OWNER, section(results, command))
    update_json(args.out.with_suffix(".json"), {"experiment": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
