"""Ensembles: several trained checkpoints used as one model, and ``python -m core.ensemble`` to make one from runs.

**The file.** One file (marker :data:`core.checkpoints.ENSEMBLE_FORMAT`) holds every member's whole checkpoint
dict, the members' run names, the ensemble's temperature and its config. One file rather than a manifest beside
member files: it is copied, shipped in ``checkpoints/`` and picked in the app like any checkpoint, cannot lose a
member or point at a retrained one, is written atomically, loads with one ``torch.load(weights_only=True)``
within the same size bound, and each member is checked by the same checks as a checkpoint. The price is disk:
a member's weights are stored again beside its run folder's ``best.pt`` (9 MB for a MobileNetV2).

**What is averaged and scaled.** Each member's calibrated probabilities ``softmax(z_k / T_k)`` (``T_k`` its own
validation temperature: what it says when it predicts alone) are averaged, and one ensemble temperature ``T``
rescales the log of that mean: ``p = softmax(log(mean_k p_k) / T)``, ``T`` fitted by
:func:`core.evaluation.fit_temperature` on the validation split. Probabilities rather than logits are averaged
because members of different backbones have logits on different scales, and the mean of probabilities is the
deep-ensemble rule (Lakshminarayanan et al., 2017). Members are calibrated first so that the agreement and the
P(melanoma) spread Diagnose shows compare each member's honest statement. A mean of calibrated members that
disagree is under-confident (Wu & Gales, 2021), so the ensemble gets its own temperature, fitted on the same
validation split as the members' ones; like any temperature it never changes the predicted class.

**Preprocessing.** Each member keeps its own input size and normalisation. They must share the size their
training images had on disk (``source_size``): an upload is decoded once, to that size, for all of them.
Similar cases, the unfamiliar-image score and the feature maps use the first member's network: they compare
one network's features, which an average over different backbones would not give.

An ensemble trained with ``python -m core.train --ensemble K`` (or combined here from finished runs) is a run
folder like any other: ``best.pt`` is the ensemble file, ``evaluation.json`` and ``test_predictions.csv`` its
test results, so Diagnose, Batch, Quiz, Evaluate and Compare list it with the runs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image

from core.checkpoints import CheckpointError, atomic_save, model_from_checkpoint, read_checkpoint
from core.data import DatasetError, LesionDataset, index_dataset
from core.ensemble_file import MAX_MEMBERS, ensemble_dict, read_ensemble
from core.evaluate import bounded_batch_size
from core.evaluation import compute_metrics, fit_temperature, operating_point_fields, softmax
from core.explain import gradcam
from core.inference import check_probabilities, class_probabilities, predict_probs
from core.labels import CLASSES, DISPLAY_NAMES, NUM_CLASSES, class_index
from core.models import LesionNet
from core.predict import Prediction, Predictor, melanoma_threshold
from core.preprocessing import Preprocessing, eval_transform
from core.runs import (
    RunLog,
    check_run_name,
    read_dataset_report,
    read_split,
    write_config,
    write_evaluation,
    write_split,
)
from core.runtime import tune_allocator
from core.unfamiliar import load_detector

# The mean of the members' probabilities is floored before its log: a class every member rules out
# (rounded to 0 in float32) must not make the ensemble's log-probability -inf.
PROB_FLOOR = 1e-12
MELANOMA = class_index("mel")


# ---------------------------------------------------------------------------
# Combining the members


def mean_log_probs(member_probs: np.ndarray) -> np.ndarray:
    """log of the mean over members of (K, n, classes) calibrated probabilities: the ensemble's scores before its
    temperature (what :func:`fit_ensemble_temperature` fits and the test record keeps as logits)."""
    mean = np.asarray(member_probs, dtype=np.float64).mean(axis=0)
    return np.log(np.clip(mean, PROB_FLOOR, None))


def combine(member_probs: np.ndarray, temperature: float) -> np.ndarray:
    """The ensemble's calibrated probabilities (n, classes) from its members' (K, n, classes)."""
    return softmax(mean_log_probs(member_probs), temperature)


def fit_ensemble_temperature(labels: np.ndarray, member_probs: np.ndarray) -> float:
    """The one ensemble temperature, fitted on the validation split's members' calibrated probabilities."""
    return fit_temperature(labels, mean_log_probs(member_probs))


@dataclass(frozen=True)
class MemberVotes:
    """What each member said about one image: an honest uncertainty signal beside the ensemble's number."""

    names: tuple[str, ...]
    probs: np.ndarray  # (K, classes): each member's own calibrated probabilities, in CLASSES order
    top_class: str  # the ensemble's

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def own_top_classes(self) -> tuple[str, ...]:
        """Each member's own most likely class."""
        return tuple(CLASSES[i] for i in self.probs.argmax(axis=1))

    @property
    def agreeing(self) -> int:
        """How many members have the ensemble's top class as their own."""
        return self.own_top_classes.count(self.top_class)

    @property
    def p_melanoma(self) -> np.ndarray:
        return self.probs[:, MELANOMA]

    def agreement_text(self) -> str:
        return f"{self.agreeing} of {self.count} models agree on {DISPLAY_NAMES[self.top_class]} ({self.top_class})"

    def spread_text(self) -> str:
        mel = self.p_melanoma
        return (
            f"P(melanoma) across the {self.count} models: {mel.min():.1%} to {mel.max():.1%} "
            f"(standard deviation {mel.std():.1%})"
        )

    def to_dict(self) -> dict:
        mel = self.p_melanoma
        return {
            "count": self.count,
            "agreeing": self.agreeing,
            "p_melanoma_min": float(mel.min()),
            "p_melanoma_max": float(mel.max()),
            "p_melanoma_std": float(mel.std()),
            "per_member": [
                {"name": name, "probabilities": {c: float(p) for c, p in zip(CLASSES, row, strict=True)}}
                for name, row in zip(self.names, self.probs, strict=True)
            ],
        }


# ---------------------------------------------------------------------------
# Predicting


@dataclass(frozen=True)
class Member:
    name: str
    model: LesionNet
    prep: Preprocessing
    transform: Callable  # its eval transform
    temperature: float


def _arch_summary(archs: Sequence[str]) -> str:
    counts = Counter(archs)
    parts = [f"{n} × {arch}" if n > 1 else arch for arch, n in counts.items()]
    return f"ensemble of {len(archs)} ({', '.join(parts)})"


class EnsemblePredictor(Predictor):
    """:class:`core.predict.Predictor` for an ensemble file (``Predictor(path)`` returns one), with the same
    methods. ``model``, ``prep`` and ``transform`` are the first member's: the network for embeddings, feature
    maps and similar cases. Predictions carry :class:`MemberVotes`; :meth:`explain` averages the members'
    maps. Thread-safe as the base class: the members are touched only under its lock."""

    def __init__(self, checkpoint: str | Path, *, device: str | torch.device = "cpu"):
        tune_allocator()
        self.path = Path(checkpoint)
        self.checkpoint = read_ensemble(self.path)
        self.device = torch.device(device)
        self.members = [
            Member(
                name,
                model_from_checkpoint(ckpt, f"{self.path}, member {i + 1} ({name})").to(self.device),
                prep := Preprocessing.from_dict(ckpt["preprocessing"]),
                eval_transform(prep),
                float(ckpt["temperature"]),
            )
            for i, (name, ckpt) in enumerate(
                zip(self.checkpoint["member_names"], self.checkpoint["members"], strict=True)
            )
        ]
        lead = self.members[0]
        self.model, self.prep, self.transform = lead.model, lead.prep, lead.transform
        self.temperature = float(self.checkpoint["temperature"])
        self.mel_threshold = melanoma_threshold(self.checkpoint)
        self.detector = load_detector(self.path)
        self._lock = threading.Lock()

    @property
    def arch(self) -> str:
        return _arch_summary([m.model.arch for m in self.members])

    def _member_inputs(self, member: Member, images: Sequence[Image.Image], lead: torch.Tensor) -> torch.Tensor:
        """The member's own input batch: the first member's when they preprocess alike, else its own transform
        of the decoded images."""
        if member.prep == self.prep:
            return lead
        return torch.stack([member.transform(image) for image in images]).to(self.device)

    @property
    def metadata_encoding(self) -> None:
        """Ensembles take the image only: their members are combined on images alone."""
        return None

    def predict_batch(
        self,
        inputs: Sequence[tuple[Image.Image, torch.Tensor]],
        tta: bool = False,
        *,
        metadata: Sequence[Mapping[str, object] | None] | None = None,
    ) -> list[Prediction]:
        """As :meth:`Predictor.predict_batch`: each member's calibrated probabilities (flip-averaged with
        ``tta``), combined by :func:`combine`; every prediction carries its :class:`MemberVotes`. ``metadata``
        is not used, and each prediction says so."""
        if not inputs:
            return []
        metadata = list(metadata) if metadata is not None else [None] * len(inputs)
        images = [image for image, _ in inputs]
        x = torch.cat([tensor for _, tensor in inputs])
        with self._lock, torch.inference_mode():
            member_probs = np.stack(
                [
                    class_probabilities(m.model, self._member_inputs(m, images, x), m.temperature, tta)
                    .double()
                    .cpu()
                    .numpy()
                    for m in self.members
                ]
            )
        check_probabilities(member_probs.reshape(-1, NUM_CLASSES))
        probs = combine(member_probs, self.temperature)
        check_probabilities(probs)
        predictions = self._predictions(inputs, x, probs, tta, metadata)
        names = tuple(m.name for m in self.members)
        for i, prediction in enumerate(predictions):
            prediction.members = MemberVotes(names, member_probs[:, i], prediction.top_class)
        return predictions

    def explain_members(
        self, prediction: Prediction, method: str = "gradcam", target: int | str | None = None
    ) -> list[np.ndarray]:
        """Each member's class activation map for ``target`` (default: the ensemble's predicted class), resized
        to ``prediction.image`` (members may have different input sizes), values in [0, 1]."""
        index = prediction.top_index if target is None else class_index(target) if isinstance(target, str) else target
        width, height = prediction.image.size
        maps = []
        with self._lock:
            for m in self.members:
                x = self._member_inputs(m, [prediction.image], prediction.input_tensor)
                heat = gradcam(m.model, x, int(index), method)
                maps.append(cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR))
        return maps

    def explain(self, prediction: Prediction, method: str = "gradcam", target: int | str | None = None) -> np.ndarray:
        """The mean of the members' maps (:meth:`explain_members`), at the size of ``prediction.image``."""
        return np.mean(self.explain_members(prediction, method, target), axis=0).clip(0.0, 1.0).astype(np.float32)

    def frame_probabilities(
        self,
        frame: pd.DataFrame,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        tta: bool = False,
        progress: Callable[[str, torch.utils.data.DataLoader], object] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every member's calibrated probabilities (K, n, classes) over the images of ``frame`` (a dataset index's
        rows) with its own preprocessing, and their labels (n,). ``progress(member name, loader)`` may wrap each
        member's loader to report it."""
        return self.dataset_probabilities(
            lambda m: LesionDataset.from_frame(frame, m.transform, m.prep),
            batch_size=batch_size,
            num_workers=num_workers,
            tta=tta,
            progress=progress,
        )

    def dataset_probabilities(
        self,
        dataset_for: Callable[[Member], torch.utils.data.Dataset],
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        tta: bool = False,
        progress: Callable[[str, torch.utils.data.DataLoader], object] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`frame_probabilities`, over the (image, label) dataset ``dataset_for(member)`` makes with that
        member's preprocessing (``member.prep``, ``member.transform``): the same images, in the same order, for
        every member."""
        outputs, labels = [], None
        for m in self.members:
            dataset = dataset_for(m)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=bounded_batch_size(batch_size, m.prep.input_size, tta), num_workers=num_workers
            )
            probs, labels = predict_probs(
                m.model,
                progress(m.name, loader) if progress else loader,
                self.device,
                temperature=m.temperature,
                tta=tta,
            )
            outputs.append(probs.astype(np.float64))
        return np.stack(outputs), labels


# ---------------------------------------------------------------------------
# Building one from finished runs


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
    dataset folder (see :func:`ensemble_config`)."""
    member_runs = [Path(r) for r in member_runs]
    run_dir = Path(run_dir)
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
        atomic_save(ensemble_dict(members, names, config=config), run_dir / "best.pt")
        predictor = EnsemblePredictor(run_dir / "best.pt", device=device)
        total, started, done = sum(len(f) for f in frames.values()) * len(members), time.time(), [0]

        def progress(name: str, loader):
            for inputs, labels in loader:
                yield inputs, labels
                done[0] += len(labels)
                log.phase("evaluate", done[0], total, started)

        member_probs = {
            s: predictor.frame_probabilities(f, batch_size=batch_size, num_workers=num_workers, progress=progress)
            for s, f in frames.items()
        }
        (val_probs, val_labels), (test_probs, test_labels) = member_probs["val"], member_probs["test"]
        temperature = fit_ensemble_temperature(val_labels, val_probs)
        probs, calibrated_val = combine(test_probs, temperature), combine(val_probs, temperature)
        operating = operating_point_fields(val_labels, calibrated_val)
        evaluation = {
            "temperature": temperature,
            **operating,
            "test": compute_metrics(test_labels, probs, **operating),
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
        payload = ensemble_dict(members, names, temperature=temperature, config=config, **operating)
        atomic_save(payload, run_dir / "best.pt")
        write_evaluation(run_dir, evaluation, frames["test"], probs, mean_log_probs(test_probs))
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        log.event("end", status="failed", error=message)
        log.status("failed", message)
        raise
    log.event("end", status="finished")
    log.status("finished")
    return run_dir


def summary(run_dir: Path) -> str:
    """The ensemble's test and validation numbers beside each member's, one line each."""
    from core.runs import read_evaluation

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.ensemble",
        description="Combine finished training runs (same data and split; any seeds and backbones) into an "
        "ensemble run: one model file holding every member, one temperature fitted on the validation split, "
        "and its test evaluation beside each member's.",
        epilog="python -m core.train --ensemble K trains K members and calls this. Exit status 2 when a run or "
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
