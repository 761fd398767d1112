"""The trainer: a config dataclass, explicit loops, and a run folder that survives crashes.

What a run folder holds is described in :mod:`core.runs`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from core.checkpoints import atomic_save, checkpoint_dict, read_checkpoint
from core.data import (
    LesionDataset,
    class_weights,
    index_dataset,
    oversample,
    split_by_lesion,
)
from core.evaluation import compute_metrics, fit_temperature, softmax
from core.features import FeatureCache, backbone_key
from core.inference import predict_logits
from core.models import ARCHITECTURES, FINETUNE_POLICIES, HEADS, LesionNet, build_model, train_mode
from core.preprocessing import AUGMENTATIONS, Preprocessing, eval_transform, train_transform
from core.runs import STOP_FILE, RunLog, check_run_name, write_config, write_evaluation, write_split
from core.runtime import default_workers, pick_device, tune_allocator

IMBALANCE_STRATEGIES = ("none", "oversample", "sampler", "weighted_loss", "focal")
SCHEDULERS = ("step", "cosine", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the seed (course project) pipeline."""

    data: str = ""
    out: str = "runs"
    name: str = ""
    arch: str = "resnet18"
    weights: str = "imagenet"  # "imagenet", "none" or a path to a torchvision state dict
    finetune: str = "head"  # head | last | full
    head: str = "mlp"
    imbalance: str = "oversample"
    focal_gamma: float = 2.0
    class_weight_power: float = 1.0  # weighted_loss: inverse class frequency to this power
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    scheduler: str = "step"
    step_size: int = 7
    gamma: float = 0.1
    warmup_epochs: int = 0
    input_size: tuple[int, int] = (224, 224)  # (height, width)
    source_size: tuple[int, int] | None = None  # (width, height) of the training images on disk, if downscaled
    augmentation: str = "seed"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    seed: int = 0
    feature_cache: bool = True  # head-only runs train on cached backbone features
    cache_dir: str = ".cache/features"
    max_images: int | None = None  # subsample the dataset (stratified) for quick experiments
    device: str = "auto"
    num_workers: int | None = None  # None: chosen for the device
    amp: bool = True  # bfloat16 autocast on CUDA
    channels_last: bool = True
    select_metric: str = "val_balanced_acc"  # which validation number picks best.pt

    def __post_init__(self) -> None:
        self.input_size = tuple(self.input_size)
        self.split_fractions = tuple(self.split_fractions)
        if self.source_size is not None:
            self.source_size = tuple(self.source_size)
        checks = [
            (self.arch, ARCHITECTURES, "arch"), (self.finetune, FINETUNE_POLICIES, "finetune"),
            (self.head, HEADS, "head"), (self.imbalance, IMBALANCE_STRATEGIES, "imbalance"),
            (self.scheduler, SCHEDULERS, "scheduler"), (self.optimizer, OPTIMIZERS, "optimizer"),
            (self.augmentation, AUGMENTATIONS, "augmentation"),
        ]
        for value, allowed, label in checks:
            if value not in allowed:
                raise ValueError(f"{label} must be one of {', '.join(allowed)}; got {value!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be at least 1 and lr positive")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(input_size=self.input_size, source_size=self.source_size)

    @property
    def uses_feature_cache(self) -> bool:
        return self.finetune == "head" and self.feature_cache


PRESETS: dict[str, TrainConfig] = {
    # The course project: frozen ImageNet ResNet-18, MLP head, oversampling, batch 16, Adam 1e-3, StepLR(7, 0.1).
    "seed": TrainConfig(),
    # The reference model: full fine-tuning at the images' native 150×200, class-weighted loss.
    "reference": TrainConfig(
        arch="mobilenet_v2", finetune="full", head="linear", imbalance="weighted_loss", class_weight_power=0.5,
        epochs=14, batch_size=32, optimizer="adamw", lr=3e-4, weight_decay=1e-4, label_smoothing=0.1,
        scheduler="cosine", warmup_epochs=1, input_size=(150, 200), source_size=(200, 150),
        augmentation="strong",
    ),
}


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): down-weights easy, mostly majority-class examples."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


def make_criterion(cfg: TrainConfig, train_labels: np.ndarray) -> nn.Module:
    weights = class_weights(train_labels, power=cfg.class_weight_power) if cfg.imbalance == "weighted_loss" else None
    if cfg.imbalance == "focal":
        return FocalLoss(cfg.focal_gamma)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped once per batch, so warm-up and cosine decay are smooth; StepLR keeps its per-epoch meaning."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        if cfg.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_sampler(cfg: TrainConfig, labels: np.ndarray, generator: torch.Generator):
    """Class-balanced sampling with replacement: each class is drawn equally often in expectation."""
    if cfg.imbalance != "sampler":
        return None
    per_sample = class_weights(labels)[torch.tensor(labels)]
    return torch.utils.data.WeightedRandomSampler(per_sample.double(), len(labels), generator=generator)


# ---------------------------------------------------------------------------
# Run folder


def new_run_dir(cfg: TrainConfig) -> Path:
    """A new folder in ``cfg.out``; ValueError for a name that would leave it, before anything is created."""
    name = (check_run_name(cfg.name) if cfg.name
            else f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}-{cfg.finetune}-{cfg.imbalance}")
    run_dir = Path(cfg.out) / name
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a run; resume it or choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ---------------------------------------------------------------------------
# Data for a run


def prepare_data(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The indexed images (optionally subsampled) with their split, and the training rows after oversampling."""
    frame = index_dataset(cfg.data).frame
    if cfg.max_images and cfg.max_images < len(frame):
        # Stratified subsample: keeps rare classes present (at least two images each) in small experiments.
        fraction = cfg.max_images / len(frame)
        parts = [group.sample(max(2, round(len(group) * fraction)), random_state=cfg.seed) if len(group) > 2
                 else group for _, group in frame.groupby("dx", sort=True)]
        frame = pd.concat(parts).reset_index(drop=True)
    frame = frame.assign(split=split_by_lesion(frame, cfg.split_fractions, cfg.split_seed).to_numpy())
    train = frame[frame["split"] == "train"]
    if cfg.imbalance == "oversample":
        train = oversample(train, cfg.seed)
    return frame, train


# ---------------------------------------------------------------------------
# One epoch


def train_one_epoch(model: nn.Module, loader, criterion, optimizer, scheduler, device: torch.device, *,
                    epoch: int, cfg: TrainConfig, log: RunLog, should_stop: Callable[[], bool]) -> dict:
    """One pass over the training data. ``model`` is the whole network, or only the head on cached features."""
    if isinstance(model, LesionNet):
        train_mode(model)
    else:
        model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    steps = len(loader)
    for step, (inputs, targets) in enumerate(loader, 1):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if cfg.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            logits = model(inputs)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        elapsed = time.perf_counter() - start
        rate = seen / elapsed if elapsed > 0 else 0.0
        log.progress(force=step == steps, epoch=epoch, step=step, steps=steps, loss=total_loss / seen,
                     images_per_s=rate, eta_s=(steps - step) * elapsed / step)
        if should_stop():
            break
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": seen / elapsed if elapsed > 0 else 0.0, "seconds": elapsed}


def collect_logits(model: nn.Module, loader, device: torch.device, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """:func:`core.inference.predict_logits` under the run's autocast setting."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        return predict_logits(model, loader, device)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    pred = logits.argmax(1)
    return {"val_loss": loss, "val_acc": float((pred == labels).mean()),
            "val_balanced_acc": float(balanced_accuracy_score(labels, pred))}


# ---------------------------------------------------------------------------
# The whole run


def _loaders(cfg: TrainConfig, model: LesionNet, frame: pd.DataFrame, train_rows: pd.DataFrame,
             device: torch.device, log: RunLog, generator: torch.Generator):
    """Training and evaluation loaders, and the module they feed: the head on cached features
    in head-only mode, the whole network otherwise."""
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    prep = cfg.preprocessing
    eval_bs = max(cfg.batch_size, 64)
    sampler = make_sampler(cfg, train_rows["label"].to_numpy(), generator)
    if cfg.uses_feature_cache:
        cache = FeatureCache(cfg.cache_dir)
        key = backbone_key(cfg.arch, cfg.weights, prep)
        paths = frame["path"].tolist()

        def report(done: int, total: int) -> None:
            log.progress(force=done == total, epoch=0, step=done, steps=total, phase="features")

        feats = cache.features(model.backbone, key, paths, prep, device=device, batch_size=eval_bs,
                               num_workers=workers, progress=report)
        row_of = {p: i for i, p in enumerate(paths)}

        def tensors(rows: pd.DataFrame):
            idx = torch.as_tensor([row_of[p] for p in rows["path"]], dtype=torch.long)
            return torch.utils.data.TensorDataset(feats[idx], torch.tensor(rows["label"].to_numpy()))

        train_ds = tensors(train_rows)
        eval_ds = {s: tensors(frame[frame["split"] == s]) for s in ("val", "test")}
        step_module = model.head
        loader_options: dict = {}  # features are already in memory: no worker processes
    else:
        train_ds = LesionDataset.from_frame(train_rows, train_transform(prep, cfg.augmentation), prep)
        eval_ds = {s: LesionDataset.from_frame(frame[frame["split"] == s], eval_transform(prep), prep)
                   for s in ("val", "test")}
        step_module = model
        loader_options = {"num_workers": workers, "pin_memory": device.type == "cuda",
                          "persistent_workers": workers > 0}
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
        drop_last=len(train_ds) > cfg.batch_size, **loader_options)
    eval_loaders = {s: torch.utils.data.DataLoader(ds, batch_size=eval_bs, **loader_options)
                    for s, ds in eval_ds.items()}
    return step_module, train_loader, eval_loaders


def train(cfg: TrainConfig, *, run_dir: str | Path | None = None, resume: bool = False,
          should_stop: Callable[[], bool] | None = None) -> Path:
    """Train according to ``cfg`` and return the run folder.

    ``resume=True`` continues the run in ``run_dir`` from its ``last.pt``.
    ``should_stop`` (and a ``STOP`` file in the run folder) end training after
    the current step; the best model so far is still evaluated and saved.
    """
    tune_allocator()
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir)
    log.begin()
    try:
        state = _run(cfg, run_dir, log, resume, should_stop or (lambda: False))
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        log.event("end", status="failed", error=message)
        log.status("failed", message)
        raise
    log.event("end", status=state)
    log.status(state)
    return run_dir


def _run(cfg: TrainConfig, run_dir: Path, log: RunLog, resume: bool, should_stop: Callable[[], bool]) -> str:
    device = pick_device(cfg.device)
    write_config(run_dir, cfg.to_dict())
    stop_file = run_dir / STOP_FILE
    stop = lambda: should_stop() or stop_file.exists()  # noqa: E731
    # Read before anything is logged: the log is cut back to the epochs the checkpoint holds, so the epochs a
    # killed run logged but did not save, and its progress after them, are not there twice once they rerun.
    last = read_checkpoint(run_dir / "last.pt") if resume and (run_dir / "last.pt").is_file() else None
    log.truncate_to_epoch(last["epoch"] if last else 0)

    frame, train_rows = prepare_data(cfg)
    write_split(run_dir, frame)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.weights, cfg.finetune, cfg.head).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(cfg.seed)
    step_module, train_loader, eval_loaders = _loaders(cfg, model, frame, train_rows, device, log, generator)
    criterion = make_criterion(cfg, train_rows["label"].to_numpy()).to(device)
    optimizer = make_optimizer(cfg, step_module)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))

    start_epoch, best_score = 1, -math.inf
    if last is not None:
        model.load_state_dict(last["model_state"])
        optimizer.load_state_dict(last["optimizer_state"])
        scheduler.load_state_dict(last["scheduler_state"])
        start_epoch, best_score = last["epoch"] + 1, last["best_score"]

    log.event("start", epochs=cfg.epochs, first_epoch=start_epoch, steps_per_epoch=len(train_loader),
              device=str(device), train_images=len(train_loader.dataset),
              cached_features=cfg.uses_feature_cache,
              split_sizes={s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")})
    log.status("running")
    prep = cfg.preprocessing
    stopped = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        # Seeding per epoch makes a resumed run draw the same batches and dropout masks as an uninterrupted one.
        torch.manual_seed(cfg.seed + epoch)
        generator.manual_seed(cfg.seed + epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(step_module, train_loader, criterion, optimizer, scheduler, device,
                                epoch=epoch, cfg=cfg, log=log, should_stop=stop)
        if stop():
            stopped = True
            break  # a partial epoch is not recorded; last.pt holds the previous complete one
        stats.update(validation_metrics(*collect_logits(step_module, eval_loaders["val"], device, cfg)))
        log.event("epoch", epoch=epoch, lr=lr, **stats)
        extra = {"config": cfg.to_dict(), "epoch": epoch, "metrics": stats}
        score = stats[cfg.select_metric]
        if score > best_score:
            best_score = score
            atomic_save(checkpoint_dict(model, prep, head=cfg.head, **extra), run_dir / "best.pt")
        atomic_save(checkpoint_dict(model, prep, head=cfg.head, best_score=best_score,
                                    optimizer_state=optimizer.state_dict(),
                                    scheduler_state=scheduler.state_dict(), **extra), run_dir / "last.pt")
    if (run_dir / "best.pt").is_file():
        finalize(run_dir, frame, cfg, model, step_module, eval_loaders, device)
    return "stopped" if stopped else "finished"


def finalize(run_dir: Path, frame: pd.DataFrame, cfg: TrainConfig, model: LesionNet, step_module: nn.Module,
             eval_loaders: dict, device: torch.device) -> dict:
    """Calibrate the best model on the validation split and evaluate it on the test split.

    ``step_module`` is the module the loaders feed (the head, on cached features, in head-only mode).
    """
    best = read_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model_state"])
    logits = {split: collect_logits(step_module, eval_loaders[split], device, cfg) for split in ("val", "test")}
    val_logits, val_labels = logits["val"]
    temperature = fit_temperature(val_labels, val_logits) if len(val_labels) else 1.0
    test_logits, test_labels = logits["test"]
    probs = softmax(test_logits, temperature)
    evaluation = {
        "temperature": temperature,
        "epoch": best["epoch"],
        "test": compute_metrics(test_labels, probs),
        "test_uncalibrated": compute_metrics(test_labels, softmax(test_logits)),
        "val": compute_metrics(val_labels, softmax(val_logits, temperature)),
    }
    write_evaluation(run_dir, evaluation, frame[frame["split"] == "test"], probs, test_logits)
    best["temperature"] = temperature
    atomic_save(best, run_dir / "best.pt")
    return evaluation


def config_with(base: str | TrainConfig = "seed", **overrides) -> TrainConfig:
    """A preset (by name) or config with some fields replaced, validated."""
    cfg = PRESETS[base] if isinstance(base, str) else base
    return TrainConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})

