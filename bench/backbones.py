"""Backbones screened cheaply: each offline ImageNet backbone frozen, a head trained on its cached features, at home
and away from home; writes its own section of docs/BENCHMARKS.md (and .json).

    python -m bench.backbones [--data ../shared/data/ham10000-200x150] [--arch mobilenet_v2 efficientnet_lite0 ...]

Issue 22 asks for a stronger backbone usable offline, screened before anything is fine-tuned. Fine-tuning one
candidate and its leave-one-source-out runs costs hours on the 2-core CPU; a frozen backbone's features are computed
once per image and every head trains on them in seconds. So each backbone gets the same head recipe through the
trainer users run (``lesionlab train --finetune head``): at home (the lesion-grouped split of every source, scored on
its validation split) and with each source that can be held out left out in training and tested on. A screen ranks
backbones by what their features carry, not what a fine-tuned network would reach; the front-runner is what to
fine-tune first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.benchmarks import DEFAULT_DATA, DEFAULT_OUT, machine
from bench.report import update_json, write_section
from core.common.runs import read_evaluation
from core.data.dataset import index_dataset
from core.data.splits import holdout_sources
from core.training.config import config_with
from core.training.loop import train

ARCHS = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# The reference recipe's input and class weighting, with the seed's MLP head and learning rate: a head on frozen
# features needs more steps at a higher rate than a fine-tuned network's linear layer.
HEAD_RECIPE = {
    "finetune": "head",
    "head": "mlp",
    "lr": 1e-3,
    "epochs": 15,
    "batch_size": 64,
    "label_smoothing": 0.0,
    "warmup_epochs": 0,
    "feature_cache": True,
}


def screen(arch: str, data: Path, out: Path, sources: list[str]) -> dict:
    """One backbone's head at home and with each of ``sources`` held out: balanced accuracy on the home validation
    split and on each held-out source."""
    row: dict = {"arch": arch, "holdout": {}}
    for source in ["", *sources]:
        name = f"{arch}-{source or 'home'}"
        run_dir = train(
            config_with(
                "reference", arch=arch, data=str(data), out=str(out), name=name, holdout_source=source, **HEAD_RECIPE
            )
        )
        evaluation = read_evaluation(run_dir)
        if source:
            row["holdout"][source] = evaluation["test"]["balanced_accuracy"]
        else:
            row["val"] = evaluation["val"]["balanced_accuracy"]
            row["test"] = evaluation["test"]["balanced_accuracy"]
        print(f"{name}: {row}", flush=True)
    row["holdout_mean"] = float(np.mean(list(row["holdout"].values()))) if row["holdout"] else None
    return row


def report(rows: list[dict], sources: list[str], command: str) -> list[str]:
    header = ["backbone", "home: val balanced acc.", "home: test", *(f"without {s}: on {s}" for s in sources)]
    header.append("held-out mean")
    lines = [
        "## Backbones screened with frozen features",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` on: {machine()}.",
        "Each offline ImageNet backbone frozen at the reference input (150×200), an MLP head trained on its cached "
        f"features by the trainer (`--finetune head`, {HEAD_RECIPE['epochs']} epochs, lr {HEAD_RECIPE['lr']}, "
        "square-root class weights), at home and with each source that can be held out left out and tested on. "
        "Balanced accuracy; a screen of what the features carry, not of what fine-tuning would reach.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for r in rows:
        cells = [f"`{r['arch']}`", f"{r['val']:.3f}", f"{r['test']:.3f}"]
        cells += [f"{r['holdout'][s]:.3f}" for s in sources]
        cells.append(f"{r['holdout_mean']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    best = max(rows, key=lambda r: (r["holdout_mean"], r["val"]))
    lines += ["", f"Front-runner away from home: `{best['arch']}` (held-out mean {best['holdout_mean']:.3f})."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    sources = holdout_sources(index_dataset(args.data).frame)[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [screen(arch, args.data, Path(tmp), sources) for arch in args.arch]
    lines = report(rows, sources, ("python -m bench.backbones " + " ".join(sys.argv[1:])).strip())
    write_section(args.out, "bench/backbones.py", lines)
    update_json(args.out.with_suffix(".json"), {"backbones": {"rows": rows, "sources": sources}})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
