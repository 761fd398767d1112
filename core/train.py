"""Command line: ``python -m core.train --preset seed --data DIR``.

Every TrainConfig field is a flag; a preset supplies the defaults and flags override them.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from core.checkpoints import CheckpointError
from core.data import AUGMENTATIONS, DatasetError
from core.imbalance import STRATEGIES
from core.models import ARCHITECTURES, FINETUNE_POLICIES, HEADS, WeightsUnavailableError
from core.training import OPTIMIZERS, PRESETS, SCHEDULERS, TrainConfig, config_with, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m core.train",
        description="Train a HAM10000 classifier. Writes a run folder with metrics.jsonl, checkpoints, "
        "the split and a calibrated test evaluation.",
        epilog="Example: python -m core.train --preset seed --data ../shared/data/ham10000-200x150 --epochs 3",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="seed", help="defaults to start from (default: seed)")
    p.add_argument("--config", type=Path, help="a config.json (e.g. from a run folder); flags override it")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    p.add_argument("--data", help="dataset folder (HAM10000_metadata.csv and images anywhere below it)")
    p.add_argument("--out", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run folder name (default: timestamp + model + strategy)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES))
    p.add_argument("--weights", help="imagenet, none, or a path to a torchvision state dict")
    p.add_argument("--finetune", choices=FINETUNE_POLICIES)
    p.add_argument("--head", choices=HEADS)
    p.add_argument("--imbalance", choices=tuple(STRATEGIES))
    p.add_argument("--focal-gamma", type=float)
    p.add_argument("--class-weight-power", type=float, help="weighted_loss: inverse frequency to this power")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--step-size", type=int)
    p.add_argument("--gamma", type=float)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--source-size", type=int, nargs=2, metavar=("W", "H"),
                   help="size the training images were downscaled to on disk; uploads are resized to it")
    p.add_argument("--augmentation", choices=AUGMENTATIONS)
    p.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--split-seed", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", default=None,
                   help="head-only mode: run the backbone every epoch (with augmentation) instead of caching")
    p.add_argument("--cache-dir")
    p.add_argument("--max-images", type=int, help="stratified subsample for quick experiments")
    p.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig.from_dict(json.loads(args.config.read_text())) if args.config else args.preset
    skip = {"preset", "config", "resume"}
    return config_with(base, **{k: v for k, v in vars(args).items() if k not in skip})


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a killed job) ends like Ctrl-C: the run is marked interrupted and its files stay intact.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.resume:
            args.config = args.config or args.resume / "config.json"
            cfg = config_from_args(args)
            run_dir = train(cfg, run_dir=args.resume, resume=True)
        else:
            cfg = config_from_args(args)
            if not cfg.data:
                print("error: no dataset: pass --data DIR (the folder holding HAM10000_metadata.csv)", file=sys.stderr)
                return 2
            run_dir = train(cfg)
    except (DatasetError, WeightsUnavailableError, CheckpointError, ValueError, FileExistsError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    evaluation = run_dir / "evaluation.json"
    if evaluation.is_file():
        test = json.loads(evaluation.read_text())["test"]
        print(f"run: {run_dir}\ntest accuracy {test['accuracy']:.3f}, balanced accuracy "
              f"{test['balanced_accuracy']:.3f}, weighted F1 {test['weighted']['f1']:.3f}")
    else:
        print(f"run: {run_dir} (stopped before the first epoch finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
