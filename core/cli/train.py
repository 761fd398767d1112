"""Command line: ``lesionlab train --preset seed --data DIR``.

Every TrainConfig field is a flag, made from the dataclass: ``--focal-gamma`` for ``focal_gamma``, its help
and choices from the field's metadata. A preset supplies the defaults and flags override them.
Several ``--config`` files train one after another in this one process (:func:`core.training.loop.train_many`):
the app's imbalance experiment runs this way.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import types
import typing
from dataclasses import fields
from datetime import datetime
from pathlib import Path

from core.common.runs import check_run_name, has_finished, read_dataset_report, read_evaluation, run_header
from core.common.runtime import pick_device
from core.data.dataset import DatasetError
from core.models.architectures import WeightsUnavailableError
from core.models.checkpoints import CheckpointError
from core.training import distributed
from core.training.config import PRESETS, TrainConfig, config_with
from core.training.loop import train, train_many


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per TrainConfig field: ``--amp``/``--no-amp`` for a boolean, N values for an N-tuple.

    Every default is None, so that only the flags given override the preset or config file.
    """
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # ``X | None``: the flag takes an X
            (kind,) = (t for t in typing.get_args(kind) if t is not type(None))
        options = {"default": None, "help": f.metadata["help"].replace("%", "%%")}  # argparse formats help with %
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            items = typing.get_args(kind)
            options.update(type=items[0], nargs=len(items), metavar=f.metadata["metavar"])
        else:
            options.update(type=kind, choices=f.metadata.get("choices"))
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lesionlab train",
        description="Train a HAM10000 classifier. Writes a run folder with metrics.jsonl, checkpoints, "
        "the split and a calibrated test evaluation.",
        epilog="Example: lesionlab train --preset seed --data ../shared/data/ham10000-200x150 --epochs 3",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="seed", help="defaults to start from (default: seed)")
    p.add_argument(
        "--config",
        type=Path,
        action="append",
        help="a config.json (e.g. from a run folder); flags override it. Repeat it to train several "
        "configs one after another in one process, sharing the dataset index, split and features; "
        "a STOP file in the current run folder ends the run and the ones after it",
    )
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    p.add_argument(
        "--ensemble",
        type=int,
        metavar="K",
        help="train the config K times, with seeds seed … seed+K-1 (run folders NAME-seedS), then combine them "
        "into the ensemble run NAME: one model file, one temperature fitted on the validation split "
        "(core.training.ensembles)",
    )
    p.add_argument(
        "--leave-one-source-out",
        action="store_true",
        help="validation away from home: train the config once per image source that holds enough classes "
        "(core.data.splits.holdout_sources; the others are named with the reason), each run holding that source out "
        "(run folders NAME-holdout-SOURCE), then print the leave-one-source-out report and save it as NAME-loso.json "
        "in --out",
    )
    add_config_flags(p)
    return p


def config_from_args(args: argparse.Namespace, config: Path | None = None) -> TrainConfig:
    """The ``config`` file (else the preset) with the flags given applied."""
    base = TrainConfig.from_dict(json.loads(config.read_text())) if config else args.preset
    return config_with(base, **{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def set_aside_text(report: dict) -> str:
    """What a run left out of its data (its ``dataset_report.json``), as warnings for the terminal: the
    validation summary when indexing set anything aside, and the images that could not be decoded."""
    lines = []
    validation = report.get("validation") or {}
    if validation and not validation["ok"]:
        lines.append(f"warning: indexing set data aside:\n{validation['summary']}")
    damaged = report.get("damaged_images") or []
    if damaged:
        lines.append(
            f"warning: {len(damaged)} damaged image{'s' if len(damaged) > 1 else ''} could not be "
            f"decoded and {'were' if len(damaged) > 1 else 'was'} set aside: {'; '.join(damaged)}"
        )
    return "\n".join(lines)


def summary(run_dir: Path) -> str:
    test = read_evaluation(run_dir).get("test")
    if not test:
        return f"run: {run_dir} (stopped before the first epoch finished)"
    return (
        f"run: {run_dir}\ntest accuracy {test['accuracy']:.3f}, balanced accuracy "
        f"{test['balanced_accuracy']:.3f}, weighted F1 {test['weighted']['f1']:.3f}"
    )


def report(run_dir: Path) -> None:
    """What the run left out of its data (warnings, to stderr) and its test result."""
    set_aside = set_aside_text(read_dataset_report(run_dir))
    if set_aside:
        print(set_aside, file=sys.stderr, flush=True)
    print(summary(run_dir), flush=True)


def ensemble_configs(cfg: TrainConfig, k: int) -> tuple[Path, list[TrainConfig]]:
    """The ensemble run's folder and its ``k`` members' configs: ``cfg`` with seeds seed … seed+k-1."""
    from core.models.ensemble_file import MAX_MEMBERS

    if not 2 <= k <= MAX_MEMBERS:
        raise ValueError(f"--ensemble takes 2 to {MAX_MEMBERS} members; got {k}")
    name = cfg.name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}-ensemble{k}"
    run_dir = Path(cfg.out) / check_run_name(name)
    # Refused before hours of training, not after: the members' folders are checked by the trainer itself.
    if (run_dir / "best.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a model; choose another --name")
    return run_dir, [config_with(cfg, seed=cfg.seed + i, name=f"{name}-seed{cfg.seed + i}") for i in range(k)]


def loso_configs(cfg: TrainConfig) -> tuple[Path, list[TrainConfig], dict[str, str]]:
    """Where the leave-one-source-out report goes, a config per source that can be held out (``cfg`` holding it
    out, named NAME-holdout-SOURCE) and the sources left out with why. DatasetError when no source can be."""
    from core.data.dataset import index_dataset
    from core.data.splits import holdout_sources

    eligible, left_out = holdout_sources(index_dataset(cfg.data).frame)
    if not eligible:
        why = "; ".join(f"{source}: {reason}" for source, reason in left_out.items()) or "no image source is known"
        raise DatasetError(f"no image source of {cfg.data} can be held out ({why})")
    name = check_run_name(cfg.name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}-loso")
    configs = [config_with(cfg, holdout_source=s, name=f"{name}-holdout-{s}") for s in eligible]
    return Path(cfg.out) / f"{name}-loso.json", configs, left_out


def leave_one_source_out_report(run_dirs: list[Path], left_out: dict[str, str], out: Path) -> int:
    """Print and save the report over the runs that finished; 1 when some did not."""
    from core.common.files import write_json
    from core.evaluation.sources import format_holdout_report, holdout_report

    finished = [d for d in run_dirs if has_finished(d)]
    report = holdout_report(finished, left_out)
    print(format_holdout_report(report), flush=True)
    write_json(out, report)
    print(f"leave-one-source-out report written to {out}", flush=True)
    return 0 if len(finished) == len(run_dirs) else 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_ensemble_run(run_dirs: list[Path], k: int, ensemble_dir: Path, *, device: str = "auto") -> int:
    """Combine the members once all ``k`` finished (a stop or a failure leaves them as plain runs)."""
    from core.training.ensembles import build_ensemble, summary

    finished = [d for d in run_dirs if has_finished(d)]
    if len(finished) < k:
        print(
            f"error: only {len(finished)} of {k} members finished, so the ensemble was not built; combine finished "
            f"runs with lesionlab ensemble RUN_DIR… --name {ensemble_dir.name}",
            file=sys.stderr,
        )
        return 1
    print(run_header(ensemble_dir.name), flush=True)
    build_ensemble(run_dirs, ensemble_dir, device=str(pick_device(device)))
    print(summary(ensemble_dir), flush=True)
    return 0


def resume_run(args: argparse.Namespace, main_process: bool) -> int:
    """``--resume RUN_DIR``: continue one run from its last.pt."""
    if args.ensemble is not None or args.leave_one_source_out:
        print("error: --resume continues one run; resume each run, then combine or report them", file=sys.stderr)
        return 2
    if args.config and len(args.config) > 1:
        print("error: --resume continues one run; pass at most one --config", file=sys.stderr)
        return 2
    cfg = config_from_args(args, args.config[0] if args.config else args.resume / "config.json")
    run_dir = train(cfg, run_dir=args.resume, resume=True)
    if main_process:
        report(run_dir)
    return 0


def train_new(args: argparse.Namespace, main_process: bool) -> int:
    """New runs: each ``--config`` (else the preset) with the flags applied, K times for ``--ensemble`` and once per
    source that can be held out for ``--leave-one-source-out``, then the ensemble or the report built from them."""
    configs = [config_from_args(args, path) for path in args.config or [None]]
    if not all(cfg.data for cfg in configs):
        print("error: no dataset: pass --data DIR (the folder holding HAM10000_metadata.csv)", file=sys.stderr)
        return 2
    several = args.ensemble is not None or args.leave_one_source_out
    if several and (len(configs) > 1 or (args.ensemble is not None and args.leave_one_source_out)):
        print(
            "error: --ensemble and --leave-one-source-out each train one config several times; pass at most one "
            "--config, and one of them",
            file=sys.stderr,
        )
        return 2
    if args.ensemble is not None:
        ensemble_dir, configs = ensemble_configs(configs[0], args.ensemble)
    if args.leave_one_source_out:
        if configs[0].holdout_source:
            print("error: --leave-one-source-out chooses the held-out sources; drop --holdout-source", file=sys.stderr)
            return 2
        loso_out, configs, left_out = loso_configs(configs[0])
        if main_process and left_out:
            print("not held out: " + "; ".join(f"{s} ({why})" for s, why in left_out.items()), flush=True)
    run_dirs = train_many(
        configs,
        on_run_start=(lambda run_dir: print(run_header(run_dir.name), flush=True)) if main_process else None,
        on_run_end=report if main_process else None,
    )
    if args.ensemble is not None and main_process:
        return build_ensemble_run(run_dirs, len(configs), ensemble_dir, device=configs[0].device)
    if args.leave_one_source_out and main_process:
        return leave_one_source_out_report(run_dirs, left_out, loso_out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (a killed job) ends like Ctrl-C: the run is marked interrupted and its files stay intact.
    signal.signal(signal.SIGTERM, _interrupt)
    # Under torchrun every process trains its share; rank 0 alone writes the run and prints its results.
    distributed.init()
    try:
        return (resume_run if args.resume else train_new)(args, distributed.is_main())
    except (
        DatasetError,
        WeightsUnavailableError,
        CheckpointError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
