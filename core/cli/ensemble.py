"""``lesionlab ensemble RUN_DIR…`` (``python -m core.cli.ensemble``): one ensemble file from finished runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.common.runs import check_run_name
from core.data.dataset import DatasetError
from core.models.checkpoints import CheckpointError
from core.training.ensembles import build_ensemble, summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionlab ensemble",
        description="Combine finished training runs (same data and split; any seeds and backbones) into an "
        "ensemble run: one model file holding every member, one temperature fitted on the validation split, "
        "and its test evaluation beside each member's.",
        epilog="lesionlab train --ensemble K trains K members and calls this. Exit status 2 when a run or "
        "the data cannot be used.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="the members' run folders")
    parser.add_argument("--name", required=True, help="the ensemble run's folder name")
    parser.add_argument("--out", type=Path, help="parent folder of the ensemble run (default: the first member's)")
    parser.add_argument(
        "--data",
        type=Path,
        help="the dataset folder, where the members' runs recorded another (e.g. they were trained on another "
        "machine); the split stays theirs, by image id",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = args.out or args.runs[0].parent
    try:
        check_run_name(args.name)  # before it is joined to a path: ../escape would leave the runs folder
        run_dir = build_ensemble(
            args.runs, out / args.name, device=args.device, batch_size=args.batch_size, data=args.data
        )
    except (CheckpointError, DatasetError, ValueError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
