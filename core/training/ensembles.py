"""Building an ensemble from finished runs: the members' shared split, the ensemble's temperature fitted
on validation, its test evaluation and its run folder.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.common.runs import (
    RunLog,
    check_run_name,
    read_dataset_report,
    read_split,
    write_config,
    write_evaluation,
    write_split,
)
from core.data.dataset import DatasetError, index_dataset
from core.inference.ensemble import EnsemblePredictor, combine, fit_ensemble_temperature, mean_log_probs
from core.metrics.classification import compute_metrics, operating_point_fields
from core.models.checkpoints import CheckpointError, atomic_save, read_checkpoint
from core.models.ensemble_file import MAX_MEMBERS, ensemble_dict


def ensemble_config(
    name: str, member_runs: Sequence[Path], members: Sequence[dict], data: str | Path | None = None
) -> dict:
    """The ensemble run's config: the split and data its members share (refused when they differ), the settings
    they all agree on, and what each member was. ``data``: the dataset's folder where it is now, when the
    members were trained elsewhere (their split is by image id, so only the folder differs)."""
    configs = [m.get("config") or {} for m in members]
    if data is not None:
        configs = [{**c, "data": str(data)} for c in configs]
    shared = ("data", "split_seed", "split_fractions", "max_images")
    for key in shared:
        values = {repr(c.get(key)) for c in configs}
        if len(values) > 1:
            raise ValueError(
                f"the members were not trained on the same split: their {key} differ ({', '.join(sorted(values))}); "
                "an ensemble is evaluated on the test split its members all held out"
            )
    agreed = {
        key: configs[0][key]
        for key in ("finetune", "imbalance", "epochs", "source_size")
        if key in configs[0] and all(c.get(key) == configs[0][key] for c in configs)
    }
    return {
        "name": name,
        "arch": "ensemble",
        **{key: configs[0].get(key) for key in shared},
        **agreed,
        "members": [
            {"run": run.name, "arch": c.get("arch"), "seed": c.get("seed")}
            for run, c in zip(member_runs, configs, strict=True)
        ],
    }


def ensemble_split(member_runs: Sequence[Path]) -> pd.DataFrame:
    """The ensemble's ``split.csv`` table: the first member's, with an image left in val or test only where no
    member put it in another split. Members subsampled with ``max_images`` draw their subsample with their own
    seed, so one member's test image may be another's training image; such an image counts as "train" here."""
    table = read_split(member_runs[0]).astype({"image_id": str})
    for run in member_runs[1:]:
        other = read_split(run).astype({"image_id": str}).set_index("image_id")["split"]
        theirs = table["image_id"].map(other)
        table.loc[theirs.notna() & (theirs != table["split"]), "split"] = "train"
    return table


def _split_frames(member_runs: Sequence[Path], split: pd.DataFrame, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The val and test images of the ensemble's ``split`` among ``frame`` (the dataset's index), without the
    images a member's run could not decode."""
    split = split.set_index("image_id")["split"]
    damaged = {p for run in member_runs for p in read_dataset_report(run).get("damaged_images") or []}
    frame = frame[~frame["path"].isin(damaged)].assign(split=frame["image_id"].astype(str).map(split))
    return {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("val", "test")}


def build_ensemble(
    member_runs: Sequence[str | Path],
    run_dir: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    data: str | Path | None = None,
) -> Path:
    """Combine the finished runs ``member_runs`` into the ensemble run ``run_dir`` and return it: its ``best.pt``
    (the ensemble file, with the temperature fitted on the validation split), ``config.json``, ``split.csv`` and
    the test evaluation (with each member's own numbers on the same images). ``data`` overrides the members'
    dataset folder (see :func:`ensemble_config`). Everything that can be refused is refused before the run
    folder exists; a failure after that is recorded in the folder, as a training run records its own."""
    member_runs, run_dir = [Path(r) for r in member_runs], Path(run_dir)
    members = read_members(member_runs, run_dir)
    config = ensemble_config(run_dir.name, member_runs, members, data)
    index = index_dataset(config["data"])
    split = ensemble_split(member_runs)
    frames = _split_frames(member_runs, split, index.frame)
    if frames["val"].empty or frames["test"].empty:
        raise DatasetError(f"{config['data']} holds none of the members' validation or test images")

    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir)
    log.begin()
    try:
        write_config(run_dir, config)
        write_split(run_dir, split)
        log.event(
            "start",
            members=[r.name for r in member_runs],
            split_sizes={s: len(f) for s, f in frames.items()},
            dataset={"name": Path(config["data"]).resolve().name, "images": len(index.frame)},
        )
        log.status("running")
        names = [r.name for r in member_runs]
        # Written uncalibrated first: the members are read back through it, each with its own preprocessing.
        atomic_save(ensemble_dict(members, names, config=config), run_dir / "best.pt")
        probs = member_probabilities(run_dir / "best.pt", frames, log, device, batch_size, num_workers)
        evaluation, calibration, calibrated_test = ensemble_evaluation(names, probs)
        atomic_save(ensemble_dict(members, names, config=config, **calibration), run_dir / "best.pt")
        write_evaluation(run_dir, evaluation, frames["test"], calibrated_test, mean_log_probs(probs["test"][0]))
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        log.event("end", status="failed", error=message)
        log.status("failed", message)
        raise
    log.event("end", status="finished")
    log.status("finished")
    return run_dir


def read_members(member_runs: Sequence[Path], run_dir: Path) -> list[dict]:
    """The members' ``best.pt`` checkpoints, once the ensemble's name, its number of members and their runs are
    checked: only a finished run has a ``best.pt``, and an existing ensemble is never overwritten."""
    check_run_name(run_dir.name)
    if not 2 <= len(member_runs) <= MAX_MEMBERS:
        raise ValueError(f"an ensemble has 2 to {MAX_MEMBERS} members; got {len(member_runs)}")
    if (run_dir / "best.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a model; choose another name")
    members = []
    for run in member_runs:
        if not (run / "best.pt").is_file():
            raise CheckpointError(f"run {run} has no best.pt: only a finished run can be a member")
        members.append(read_checkpoint(run / "best.pt"))
    return members


def member_probabilities(
    ensemble_file: Path,
    frames: dict[str, pd.DataFrame],
    log: RunLog,
    device: str,
    batch_size: int,
    num_workers: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each split of ``frames``: every member's calibrated probabilities (K, n, classes) and the labels,
    through the ensemble file, so that each member reads the images with its own preprocessing. The passes over
    both splits are one "evaluate" phase in ``log``."""
    predictor = EnsemblePredictor(ensemble_file, device=device)
    total, started, done = sum(len(f) for f in frames.values()) * predictor.passes, time.time(), 0
    probs = {}
    for split, frame in frames.items():

        def progress(images: int, before: int = done) -> None:
            log.phase("evaluate", before + images, total, started)

        probs[split] = predictor.frame_probabilities(
            frame, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        done += len(frame) * predictor.passes
    return probs


def ensemble_evaluation(
    names: Sequence[str], probs: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[dict, dict, np.ndarray]:
    """The evaluation (``evaluation.json``) of the ensemble and of each member on the same images, from
    :func:`member_probabilities`; the ensemble's calibration, which its file keeps: the temperature fitted on
    the validation split and the operating point chosen there; and the calibrated test probabilities."""
    (val_probs, val_labels), (test_probs, test_labels) = probs["val"], probs["test"]
    temperature = fit_ensemble_temperature(val_labels, val_probs)
    calibrated_test, calibrated_val = combine(test_probs, temperature), combine(val_probs, temperature)
    operating = operating_point_fields(val_labels, calibrated_val)
    evaluation = {
        "temperature": temperature,
        **operating,
        "test": compute_metrics(test_labels, calibrated_test, **operating),
        "test_uncalibrated": compute_metrics(test_labels, combine(test_probs, 1.0), **operating),
        "val": compute_metrics(val_labels, calibrated_val, **operating),
        "members": [
            {
                "run": name,
                "val": compute_metrics(val_labels, val_probs[k]),
                "test": compute_metrics(test_labels, test_probs[k]),
            }
            for k, name in enumerate(names)
        ],
    }
    return evaluation, {"temperature": temperature, **operating}, calibrated_test


def summary(run_dir: Path) -> str:
    """The ensemble's test and validation numbers beside each member's, one line each."""
    from core.common.runs import read_evaluation

    evaluation = read_evaluation(run_dir)

    def line(label: str, val: dict, test: dict) -> str:
        return (
            f"  {label:<28} val balanced accuracy {val['balanced_accuracy']:.3f} · test accuracy "
            f"{test['accuracy']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f}, "
            f"melanoma AUC {test['roc_auc']['per_class']['mel'] or float('nan'):.3f}, ECE {test['ece']:.3f}"
        )

    lines = [f"ensemble run: {run_dir} (temperature {evaluation['temperature']:.3f})"]
    lines.append(line("ensemble", evaluation["val"], evaluation["test"]))
    lines += [line(f"member {m['run']}", m["val"], m["test"]) for m in evaluation["members"]]
    return "\n".join(lines)
