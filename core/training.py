"""The trainer: a config dataclass, explicit loops, and a run folder that survives crashes.

What a run folder holds is described in :mod:`core.runs`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from core import distributed, imbalance
from core.augment import DeviceBatches, batch_transform
from core.checkpoints import atomic_save, checkpoint_dict, read_checkpoint
from core.data import (
    SPLITS,
    DatasetError,
    DatasetIndex,
    LesionDataset,
    index_dataset,
    split_by_lesion,
)
from core.decoded import CacheUnavailable, DecodedImages, open_decoded
from core.evaluation import compute_metrics, fit_temperature, operating_point_fields, softmax
from core.features import FeatureBatches, FeatureCache, backbone_key
from core.inference import predict_logits
from core.labels import CLASSES
from core.metadata import new_spec
from core.models import ARCHITECTURES, FINETUNE_POLICIES, HEADS, LesionNet, build_model, train_mode
from core.preprocessing import (
    AUGMENTATION_HELP,
    AUGMENTATIONS,
    Preprocessing,
    check_size,
    eval_transform,
    train_transform,
)
from core.runs import (
    STOP_FILE,
    RunLog,
    StopRequested,
    check_run_name,
    write_config,
    write_dataset_report,
    write_evaluation,
    write_split,
)
from core.runtime import compile_problem, default_workers, pick_device, torch_threads, tune_allocator

SCHEDULERS = ("step", "cosine", "onecycle", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
INPUT_PIPELINES = ("decoded", "jpeg")


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A TrainConfig field with its ``--help`` line and, for the command line, ``choices`` (also checked
    on every config) or a ``metavar`` per value of a tuple."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the seed (course project) pipeline.

    Each field's metadata is its command-line help (:mod:`core.train` makes a flag of every field).
    """

    data: str = setting("", "dataset folder (HAM10000_metadata.csv and images anywhere below it)")
    out: str = setting("runs", "parent folder of run folders")
    name: str = setting("", "run folder name (default: timestamp + model + strategy)")
    arch: str = setting("resnet18", "backbone", choices=tuple(ARCHITECTURES))
    weights: str = setting("imagenet", "imagenet, none, or a path to a torchvision state dict")
    finetune: str = setting(
        "head",
        "what trains: the head (frozen backbone), the last block and the head, or all",
        choices=FINETUNE_POLICIES,
    )
    head: str = setting("mlp", "classifier head: the seed's 512-256-7 MLP or one linear layer", choices=HEADS)
    dropout: float | None = setting(None, "dropout probability in the head (default: the head's, 0.5 mlp, 0.2 linear)")
    imbalance: str = setting(
        "oversample",
        "class-imbalance strategy, one of: "
        + "; ".join(f"{s.name} = {s.explanation}" for s in imbalance.STRATEGIES.values()),
        choices=tuple(imbalance.STRATEGIES),
    )
    focal_gamma: float = setting(2.0, "focal: the focusing exponent (0 is plain cross-entropy)")
    class_weight_power: float = setting(1.0, "weighted_loss: inverse class frequency to this power")
    epochs: int = setting(10, "training epochs")
    batch_size: int = setting(16, "images per training step")
    optimizer: str = setting("adam", "optimizer (sgd: Nesterov momentum 0.9)", choices=OPTIMIZERS)
    lr: float = setting(1e-3, "learning rate (the peak, with warm-up or a schedule)")
    weight_decay: float = setting(0.0, "weight decay")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy losses")
    scheduler: str = setting("step", "learning-rate schedule after the warm-up", choices=SCHEDULERS)
    step_size: int = setting(7, "step schedule: epochs between decays")
    gamma: float = setting(0.1, "step schedule: factor at each decay")
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up")
    input_size: tuple[int, int] = setting((224, 224), "model input size", metavar=("H", "W"))
    source_size: tuple[int, int] | None = setting(
        None, "size the training images were downscaled to on disk; uploads are resized to it", metavar=("W", "H")
    )
    augmentation: str = setting(
        "seed",
        "training-image augmentation (cached features are never augmented); " + "; ".join(AUGMENTATION_HELP.values()),
        choices=AUGMENTATIONS,
    )
    split_fractions: tuple[float, float, float] = setting(
        (0.7, 0.15, 0.15),
        "fractions of the lesions in the train, validation and test splits",
        metavar=("TRAIN", "VAL", "TEST"),
    )
    split_seed: int = setting(0, "seed of the lesion-grouped split")
    seed: int = setting(0, "seed of initialisation, batch order and resampling")
    feature_cache: bool = setting(
        True,
        "head-only mode: train on backbone features computed once; without it "
        "the backbone runs every epoch (with augmentation)",
    )
    cache_dir: str = setting(".cache/features", "folder of the cached backbone features")
    input_pipeline: str = setting(
        "decoded",
        "how images reach the network when it trains on them: decoded = decoded once into a cache on disk "
        "(--decoded-dir) and augmented in batches on the device; jpeg = decoded and augmented one at a time by "
        "PIL in DataLoader workers (also what decoded falls back to when the disk has no room)",
        choices=INPUT_PIPELINES,
    )
    decoded_dir: str = setting(".cache/decoded", "folder of the decoded-image cache")
    max_images: int | None = setting(None, "stratified subsample of the dataset, for quick experiments")
    device: str = setting("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    num_workers: int | None = setting(None, "data-loading worker processes (default: chosen for the device)")
    amp: bool = setting(True, "bfloat16 autocast on CUDA")
    channels_last: bool = setting(True, "channels-last memory format for the images and the model")
    compile: bool = setting(
        False,
        "torch.compile what trains (the head alone on cached features); the log and the output report what "
        "compiling cost the first epoch",
    )
    select_metric: str = setting(
        "val_balanced_acc",
        "the validation number that picks best.pt, or last: the last epoch, whatever validation says",
        choices=("val_balanced_acc", "val_acc", "last"),
    )
    metadata: bool = setting(
        False,
        "the head also takes age, sex and body site (core/metadata.py): on cached features (--finetune head) or, "
        "for fine-tuning, through the decoded-image cache",
    )
    metadata_dropout: float = setting(
        0.3, "with --metadata: the probability that each field of a training row is withheld (set to unknown)"
    )

    def __post_init__(self) -> None:
        self.input_size = tuple(self.input_size)
        self.split_fractions = tuple(self.split_fractions)
        if self.source_size is not None:
            self.source_size = tuple(self.source_size)
        for f in fields(self):
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"{f.name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be at least 1 and lr positive")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be from 0 to below 1; got {self.dropout}")
        if not 0 <= self.metadata_dropout <= 1:
            raise ValueError(f"metadata_dropout must be a probability from 0 to 1; got {self.metadata_dropout}")
        # The bounds every checkpoint is held to: a run must not write one that cannot be loaded.
        check_size("input_size", self.input_size)
        if self.source_size is not None:
            check_size("source_size", self.source_size)

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
        arch="mobilenet_v2",
        finetune="full",
        head="linear",
        imbalance="weighted_loss",
        class_weight_power=0.5,
        epochs=14,
        batch_size=32,
        optimizer="adamw",
        lr=3e-4,
        weight_decay=1e-4,
        label_smoothing=0.1,
        scheduler="cosine",
        warmup_epochs=1,
        input_size=(150, 200),
        source_size=(200, 150),
        augmentation="strong",
    ),
}
# A shorter recipe on the same backbone: six epochs of one cycle to lr 1e-3, lighter label smoothing and the last
# epoch kept rather than the best on validation. Kept beside the reference because a model trained this way drifts
# less under acquisition shifts, at the same test score and a lower validation one (MODEL_CARD.md, "Training
# recipes").
PRESETS["onecycle"] = replace(
    PRESETS["reference"],
    epochs=6,
    lr=1e-3,
    label_smoothing=0.05,
    scheduler="onecycle",
    warmup_epochs=0,
    select_metric="last",
)


METADATA_NEEDS_DECODED = (
    "metadata fusion reaches a network that trains on images only through the decoded-image cache "
    "(--input-pipeline decoded, which needs room on the disk for it), or trains the head on cached features "
    "(--finetune head)"
)


def check_metadata(cfg: TrainConfig) -> None:
    """Refuse, before a run folder exists, metadata with the JPEG input pipeline: its batches carry no metadata."""
    if cfg.metadata and not cfg.uses_feature_cache and cfg.input_pipeline != "decoded":
        raise ValueError(METADATA_NEEDS_DECODED)


def make_criterion(cfg: TrainConfig, train_labels: np.ndarray) -> nn.Module:
    return imbalance.get(cfg.imbalance).loss(train_labels, cfg)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # On CUDA a step of the per-tensor (foreach) update launches hundreds of small kernels; the fused one launches
    # a few. Measured on an H100, MobileNetV2 at batch 32: 34 -> 24 ms per training step (docs/BENCHMARKS.md).
    fused = bool(params) and all(p.is_cuda for p in params)
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Stepped once per batch, so warm-up and cosine decay are smooth; StepLR keeps its per-epoch meaning.
    ``onecycle`` is PyTorch's OneCycleLR to the peak ``lr`` (its own warm-up, so ``warmup_epochs`` is unused)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(1, total))
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


def make_sampler(cfg: TrainConfig, labels: np.ndarray, generator: torch.Generator) -> torch.utils.data.Sampler | None:
    return imbalance.get(cfg.imbalance).sampler(labels, generator)


# ---------------------------------------------------------------------------
# Run folder


def new_run_dir(cfg: TrainConfig) -> Path:
    """A new folder in ``cfg.out``; ValueError for a name that would leave it, before anything is created."""
    name = (
        check_run_name(cfg.name)
        if cfg.name
        else f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.arch}-{cfg.finetune}-{cfg.imbalance}"
    )
    run_dir = Path(cfg.out) / name
    if (run_dir / "last.pt").exists():
        raise FileExistsError(f"run folder {run_dir} already holds a run; resume it or choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ---------------------------------------------------------------------------
# Data for a run


def split_dataset(cfg: TrainConfig, index: DatasetIndex | None = None) -> pd.DataFrame:
    """The indexed images (optionally subsampled) with their split. ``index`` is ``cfg.data`` indexed
    already; raises :class:`DatasetError` for data a run cannot learn from (:func:`check_classes`,
    :func:`check_splits`)."""
    frame = (index or index_dataset(cfg.data)).frame
    if cfg.max_images and cfg.max_images < len(frame):
        # Stratified subsample: keeps rare classes present (at least two images each) in small experiments.
        fraction = cfg.max_images / len(frame)
        parts = [
            group.sample(max(2, round(len(group) * fraction)), random_state=cfg.seed) if len(group) > 2 else group
            for _, group in frame.groupby("dx", sort=True)
        ]
        frame = pd.concat(parts).reset_index(drop=True)
    check_classes(frame)
    frame = frame.assign(split=split_by_lesion(frame, cfg.split_fractions, cfg.split_seed).to_numpy())
    check_splits(frame)
    return frame


def prepare_data(cfg: TrainConfig, frame: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The split images (``frame``, or :func:`split_dataset`'s) and the training rows after the imbalance
    strategy's resampling (oversampling duplicates rows)."""
    frame = split_dataset(cfg) if frame is None else frame
    train = imbalance.get(cfg.imbalance).resample_rows(frame[frame["split"] == "train"], cfg.seed)
    return frame, train


def _classes_text(dx: pd.Series) -> str:
    return ", ".join(f"{code}: {n} images" for code, n in dx.value_counts().items())


def check_classes(frame: pd.DataFrame) -> None:
    """Refuse images of fewer than two classes, or fewer lesions than splits: a classifier trained on one
    class learns nothing, yet scores a perfect balanced accuracy on a test split of that class."""
    if frame["dx"].nunique() < 2:
        raise DatasetError(
            f"The dataset has images of one class only ({_classes_text(frame['dx'])}); a classifier needs "
            f"images of at least two of {', '.join(CLASSES)}. Check the metadata's dx column, or point --data "
            "at the whole dataset."
        )
    lesions = frame["lesion_id"].nunique()
    if lesions < len(SPLITS):
        raise DatasetError(
            f"The dataset has {lesions} lesion{'s' if lesions != 1 else ''}; the training, validation and test "
            "splits need at least one each (all images of a lesion go to one split). Add images."
        )


def check_splits(frame: pd.DataFrame) -> None:
    """Refuse a split with no images, or with images of one class only: the model would be trained,
    selected, calibrated or tested on nothing, and balanced accuracy on one class reads 1.000."""
    for split, name in zip(SPLITS, ("training", "validation", "test"), strict=True):
        dx = frame.loc[frame["split"] == split, "dx"]
        if dx.empty:
            raise DatasetError(
                f"The {name} split has no images. Give every split a share of the lesions "
                "(--split-fractions), or add images."
            )
        if dx.nunique() < 2:
            raise DatasetError(
                f"The {name} split holds images of one class only ({_classes_text(dx)}); it needs at least "
                "two classes. Add images of the rarer classes, or give the split a larger share "
                "(--split-fractions)."
            )


class SharedInputs:
    """What the runs of one process share: the split dataset and the backbone features, each made once for
    every distinct setting. The imbalance experiment's runs differ only in their strategy, so they index,
    split and load (or compute) features once."""

    def __init__(self) -> None:
        self._indexes: dict[str, DatasetIndex] = {}
        self._frames: dict[tuple, pd.DataFrame] = {}
        self._features: dict[tuple, tuple[torch.Tensor, list[str]]] = {}
        self._decoded: dict[tuple, DecodedImages | None] = {}

    def index(self, cfg: TrainConfig) -> DatasetIndex:
        if cfg.data not in self._indexes:
            self._indexes[cfg.data] = index_dataset(cfg.data)
        return self._indexes[cfg.data]

    def frame(self, cfg: TrainConfig) -> pd.DataFrame:
        key = (cfg.data, cfg.max_images, cfg.seed, cfg.split_fractions, cfg.split_seed)
        if key not in self._frames:
            self._frames[key] = split_dataset(cfg, self.index(cfg))
        return self._frames[key]

    def features(
        self, cfg: TrainConfig, backbone: nn.Module, paths: list[str], **options: Any
    ) -> tuple[torch.Tensor, list[str]]:
        """:meth:`core.features.FeatureCache.features` for ``cfg``'s backbone (the features and the damaged
        images' paths), memoised for this process."""
        prep = cfg.preprocessing
        key = backbone_key(cfg.arch, cfg.weights, prep)
        memo = (cfg.cache_dir, key, tuple(paths))
        if memo not in self._features:
            self._features[memo] = FeatureCache(cfg.cache_dir).features(backbone, key, paths, prep, **options)
        elif options.get("progress"):
            options["progress"](len(paths), len(paths))
        return self._features[memo]

    def decoded(
        self, cfg: TrainConfig, log: RunLog, should_stop: Callable[[], bool] | None = None
    ) -> DecodedImages | None:
        """The decoded-image cache of ``cfg``'s whole dataset (:func:`core.decoded.open_decoded`), built with
        its progress in ``log``, memoised for this process; None, said in the log and on stderr, when it
        cannot be stored: the run reads the JPEG files instead. ``should_stop`` is asked as it decodes."""
        memo = (cfg.decoded_dir, cfg.data, cfg.preprocessing)
        if memo in self._decoded:
            return self._decoded[memo]

        started = time.time()

        def report(done: int, total: int) -> None:
            log.phase("decoding", done, total, started)

        try:
            cache = open_decoded(
                self.index(cfg).frame["path"].tolist(),
                cfg.preprocessing,
                root=cfg.data,
                cache_dir=cfg.decoded_dir,
                progress=report,
                should_stop=should_stop,
            )
        except CacheUnavailable as exc:
            message = f"{exc}; reading the JPEG files instead (input pipeline jpeg)"
            log.event("input_pipeline", pipeline="jpeg", reason=message)
            print(f"note: {message}", file=sys.stderr, flush=True)
            cache = None
        self._decoded[memo] = cache
        return cache


# ---------------------------------------------------------------------------
# One epoch


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion,
    optimizer,
    scheduler,
    device: torch.device,
    *,
    epoch: int,
    cfg: TrainConfig,
    log: RunLog,
    should_stop: Callable[[], bool],
) -> dict:
    """One pass over the training data. ``model`` is the whole network, or only the head on cached features."""
    if isinstance(distributed.unwrap(model), LesionNet):
        train_mode(distributed.unwrap(model))
    else:
        model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    steps = len(loader)
    # Each step's loss and correct count stay on the device until a progress line needs them: reading them
    # every step would make the host wait for the device at every step.
    pending: list[tuple[torch.Tensor, int]] = []
    # A network that takes metadata and trains on images gets each batch's encoded rows after its labels.
    for step, (inputs, targets, *metadata) in enumerate(loader, 1):
        if not len(targets):
            continue  # every image of the batch was damaged (LesionDataset.collate left them out)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        metadata = [m.to(device, non_blocking=True) for m in metadata]
        if cfg.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            logits = model(inputs, *metadata)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        pending.append(
            (torch.stack((loss.detach().float(), (logits.argmax(1) == targets).sum().float())), len(targets))
        )
        seen += len(targets)
        if step == steps or log.progress_due():
            total_loss, correct = _settle(pending, total_loss, correct)
            elapsed = time.perf_counter() - start
            log.progress(
                force=True,
                epoch=epoch,
                step=step,
                steps=steps,
                loss=total_loss / seen,
                images_per_s=seen / elapsed if elapsed > 0 else 0.0,
                eta_s=(steps - step) * elapsed / step,
            )
        if should_stop():
            break
    total_loss, correct = _settle(pending, total_loss, correct)
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "images_per_s": seen / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
    }


def _settle(pending: list[tuple[torch.Tensor, int]], total_loss: float, correct: int) -> tuple[float, int]:
    """Add the pending steps' (loss, correct) pairs, read from the device at once, to the totals; empties
    ``pending``. The sums are those of reading each step's loss on its own."""
    if pending:
        values = torch.stack([v for v, _ in pending]).tolist()
        for (loss, right), (_, n) in zip(values, pending, strict=True):
            total_loss += loss * n
            correct += int(right)
        pending.clear()
    return total_loss, correct


def collect_logits(
    model: nn.Module, loader, device: torch.device, cfg: TrainConfig, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`core.inference.predict_logits` under the run's autocast setting."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        return predict_logits(model, loader, device, progress)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    pred = logits.argmax(1)
    return {
        "val_loss": loss,
        "val_acc": float((pred == labels).mean()),
        "val_balanced_acc": float(balanced_accuracy_score(labels, pred)),
    }


# ---------------------------------------------------------------------------
# The whole run


def _loaders(
    cfg: TrainConfig,
    model: LesionNet,
    frame: pd.DataFrame,
    train_rows: pd.DataFrame,
    device: torch.device,
    log: RunLog,
    generator: torch.Generator,
    shared: SharedInputs,
    should_stop: Callable[[], bool],
):
    """Training and evaluation loaders, the module they feed (the head on cached features in head-only
    mode, as batches sliced from the features in memory, on the device; the whole network otherwise), and
    the images that computing the features found damaged: they have no features, so they are left out of
    every split. With the decoded-image cache (``input_pipeline="decoded"``) batches come from it, augmented
    on the device, and the images it could not decode are left out the same way. On the JPEG path the loaders'
    datasets set damaged images aside as they meet them (see :class:`LesionDataset` and :func:`damaged_images`)."""
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    prep = cfg.preprocessing
    eval_bs = max(cfg.batch_size, 64)
    sampler = make_sampler(cfg, train_rows["label"].to_numpy(), generator)
    drop_last = len(train_rows) > cfg.batch_size
    sampler, batch_size = distributed.shard(sampler, len(train_rows), cfg.batch_size, generator, drop_last)
    if cfg.uses_feature_cache:
        paths = frame["path"].tolist()

        started = time.time()
        # Rank 0 computes (or loads) the features and hands them to the others: one writer of the cache. Its
        # images come from the decoded-image cache with that pipeline (opened, or built, by rank 0 alone too).
        feats, damaged = distributed.from_main(
            lambda: shared.features(
                cfg,
                model.backbone,
                paths,
                device=device,
                batch_size=eval_bs,
                num_workers=workers,
                progress=lambda done, total: log.phase("features", done, total, started),
                should_stop=should_stop,
                decoded=partial(shared.decoded, cfg, log, should_stop) if cfg.input_pipeline == "decoded" else None,
            )
        )
        decoded = frame[~frame["path"].isin(damaged)]
        if damaged:
            check_splits(decoded)
        row_of = {p: i for i, p in enumerate(decoded["path"])}
        encoding = model.metadata_encoding
        # A head that takes metadata trains on [features | encoded metadata] (core.metadata.MetadataHead).
        inputs = feats if encoding is None else model.head.join(feats, encoding.encode_frame(decoded))

        def batches(rows: pd.DataFrame, batch_size: int, **order) -> FeatureBatches:
            rows = rows[~rows["path"].isin(damaged)]
            idx = torch.as_tensor([row_of[p] for p in rows["path"]], dtype=torch.long)
            labels = torch.tensor(rows["label"].to_numpy())
            return FeatureBatches(inputs[idx].to(device), labels.to(device), batch_size, **order)

        train_loader = batches(
            train_rows,
            batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            drop_last=drop_last,
        )
        eval_loaders = {s: batches(frame[frame["split"] == s], eval_bs) for s in ("val", "test")}
        return model.head, train_loader, eval_loaders, damaged
    cache = None
    if cfg.input_pipeline == "decoded":
        # Rank 0 builds the cache (asking for a stop as it goes; from_main hands the stop to every rank) and the
        # others open it once it is there: two processes writing one folder would spoil each other's files.
        if distributed.from_main(lambda: shared.decoded(cfg, log, should_stop) is not None):
            cache = shared.decoded(cfg, log)
    if cache is not None:
        damaged = sorted(set(cache.damaged).intersection(frame["path"]))
        if damaged:
            check_splits(frame[~frame["path"].isin(damaged)])

        encoding = model.metadata_encoding

        def device_batches(rows: pd.DataFrame, batch_size: int, augmentation: str, **order) -> DeviceBatches:
            usable = rows[~rows["path"].isin(damaged)]
            cache_rows = torch.from_numpy(cache.rows(usable["path"].tolist()))
            if encoding is not None:
                order["metadata"] = torch.as_tensor(encoding.encode_frame(usable), dtype=torch.float32)
            # The cache rows are drawn in batches as a DataLoader with the run's sampler would draw images.
            batches = FeatureBatches(cache_rows, torch.tensor(usable["label"].to_numpy()), batch_size, **order)
            transform = batch_transform(prep, augmentation, cache.size)
            return DeviceBatches(cache, batches, transform, device, channels_last=cfg.channels_last)

        train_loader = device_batches(
            train_rows,
            batch_size,
            cfg.augmentation,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            drop_last=drop_last,
        )
        eval_loaders = {s: device_batches(frame[frame["split"] == s], eval_bs, "none") for s in ("val", "test")}
        return model, train_loader, eval_loaders, damaged
    if model.metadata_encoding is not None:
        raise ValueError(METADATA_NEEDS_DECODED)
    train_ds = LesionDataset.from_frame(train_rows, train_transform(prep, cfg.augmentation), prep, skip_damaged=True)
    # The collate function leaves damaged images out of their batch; any of the run's datasets' will do,
    # as it only needs the input size they share.
    options = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
        "collate_fn": train_ds.collate,
    }
    train_loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=drop_last,
        **options,
    )
    eval_loaders = {
        s: torch.utils.data.DataLoader(
            LesionDataset.from_frame(frame[frame["split"] == s], eval_transform(prep), prep, skip_damaged=True),
            batch_size=eval_bs,
            **options,
        )
        for s in ("val", "test")
    }
    return model, train_loader, eval_loaders, []


def damaged_images(loaders: Iterable, found: Iterable[str] = ()) -> list[str]:
    """Every image set aside so far because it could not be decoded: ``found`` (by the feature cache) and
    those the loaders' :class:`LesionDataset` flagged, sorted. Batches of cached features have no dataset."""
    flagged = {
        path
        for loader in loaders
        if isinstance(getattr(loader, "dataset", None), LesionDataset)
        for path in loader.dataset.damaged_paths()
    }
    return sorted(flagged.union(found))


def refuse_early(cfg: TrainConfig) -> None:
    """Refuse, before any writing, a global batch the processes cannot share and a compile this machine cannot
    do (ValueError)."""
    distributed.rank_batch_size(cfg.batch_size)
    if cfg.compile:
        problem = compile_problem(distributed.local_device(pick_device(cfg.device)))
        if problem:
            raise ValueError(f"torch.compile cannot compile on this machine ({problem}); train without --compile")


def train(
    cfg: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    shared: SharedInputs | None = None,
) -> Path:
    """Train according to ``cfg`` and return the run folder.

    ``resume=True`` continues the run in ``run_dir`` from its ``last.pt``.
    ``should_stop`` (and a ``STOP`` file in the run folder) end training after
    the current step; the best model so far is still evaluated and saved.
    ``shared`` holds the split dataset and features of earlier runs in this process (see :func:`train_many`).
    """
    tune_allocator()
    refuse_early(cfg)
    check_metadata(cfg)
    run_dir = Path(run_dir) if run_dir else distributed.from_main(lambda: new_run_dir(cfg))
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    log = distributed.run_log(run_dir)
    log.begin()
    try:
        state = _run(cfg, run_dir, log, resume, should_stop or (lambda: False), shared or SharedInputs())
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
        log.event("end", status="failed", error=message)
        log.status("failed", message)
        raise
    log.event("end", status=state)
    log.status(state)
    distributed.barrier()  # the next run, or the end of the process, waits for rank 0's evaluation
    return run_dir


def train_many(
    configs: Sequence[TrainConfig],
    *,
    should_stop: Callable[[], bool] | None = None,
    on_run_start: Callable[[Path], None] | None = None,
    on_run_end: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Train ``configs`` one after another in this process and return their run folders.

    The runs share the process's start-up, the dataset index and split and the backbone features wherever
    their settings agree; each writes its own run folder, with the numbers it would have on its own. A run
    ended by a ``STOP`` file (also one created just after it finished) or ``should_stop`` ends the sequence:
    the configs after it do not start. So does an error, raised once the failed run has recorded it.
    ``on_run_start`` and ``on_run_end`` are called with each run's folder as it starts and ends.
    """
    for cfg in configs:
        refuse_early(cfg)  # before the first run folder, as train() does
        check_metadata(cfg)
    shared = SharedInputs()
    run_dirs = []
    for cfg in configs:
        run_dir = distributed.from_main(partial(new_run_dir, cfg))
        if on_run_start is not None:
            on_run_start(run_dir)
        train(cfg, run_dir=run_dir, should_stop=should_stop, shared=shared)
        run_dirs.append(run_dir)
        if on_run_end is not None:
            on_run_end(run_dir)
        if distributed.agree((run_dir / STOP_FILE).exists() or (should_stop is not None and should_stop())):
            break
    return run_dirs


def _run(
    cfg: TrainConfig, run_dir: Path, log: RunLog, resume: bool, should_stop: Callable[[], bool], shared: SharedInputs
) -> str:
    device = distributed.local_device(pick_device(cfg.device))
    main = distributed.is_main()  # rank 0 alone writes the run folder
    if main:
        write_config(run_dir, cfg.to_dict())
    stop_file = run_dir / STOP_FILE
    local_stop = lambda: should_stop() or stop_file.exists()  # noqa: E731
    # Every process asks at the same step, so a stop seen by one ends that step everywhere.
    stop = lambda: distributed.agree(local_stop())  # noqa: E731
    # Read before anything is logged: the log is cut back to the epochs the checkpoint holds, so the epochs a
    # killed run logged but did not save, and its progress after them, are not there twice once they rerun.
    last = read_checkpoint(run_dir / "last.pt") if resume and (run_dir / "last.pt").is_file() else None
    log.truncate_to_epoch(last["epoch"] if last else 0)

    index = shared.index(cfg)
    frame, train_rows = prepare_data(cfg, shared.frame(cfg))
    if main:
        write_split(run_dir, frame)
    validation = {**index.report.to_dict(), "ok": index.report.ok, "summary": index.report.summary()}

    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.arch,
        cfg.weights,
        cfg.finetune,
        cfg.head,
        dropout=cfg.dropout,
        metadata=new_spec(cfg.metadata_dropout) if cfg.metadata else None,
    ).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(cfg.seed)
    # Only rank 0 computes the features, so it alone checks for a stop between their batches: a collective
    # there would wait for processes that never reach it. Its StopRequested reaches every process
    # (distributed.from_main), so all of them stop here.
    try:
        step_module, train_loader, eval_loaders, found = _loaders(
            cfg, model, frame, train_rows, device, log, generator, shared, local_stop
        )
    except StopRequested:  # computing the features (kept in their cache) or decoding the images took the stop
        return "stopped"
    if cfg.compile:
        # What trains, the head alone on cached features. In place: the module, its state dict and its
        # checkpoints stay as they are.
        step_module.compile()
    loaders = [train_loader, *eval_loaders.values()]

    def record_set_aside() -> None:
        if main:
            write_dataset_report(run_dir, validation, damaged_images(loaders, found))

    record_set_aside()
    criterion = distributed.global_mean(make_criterion(cfg, train_rows["label"].to_numpy()).to(device))
    optimizer = make_optimizer(cfg, step_module)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))

    start_epoch, best_score = 1, -math.inf
    if last is not None:
        model.load_state_dict(last["model_state"])
        optimizer.load_state_dict(last["optimizer_state"])
        scheduler.load_state_dict(last["scheduler_state"])
        start_epoch, best_score = last["epoch"] + 1, last["best_score"]
    train_module = distributed.wrap(step_module, device)

    log.event(
        "start",
        epochs=cfg.epochs,
        first_epoch=start_epoch,
        steps_per_epoch=len(train_loader),
        device=str(device),
        train_images=len(train_rows),
        cached_features=cfg.uses_feature_cache,
        split_sizes={s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")},
        dataset={"name": Path(cfg.data).resolve().name, "images": len(index.frame), "used": len(frame)},
    )
    log.status("running")
    prep = cfg.preprocessing
    stopped = False
    epoch_seconds: list[float] = []
    # The head on cached features runs best on one thread: see core.runtime.torch_threads.
    with torch_threads(1) if cfg.uses_feature_cache else nullcontext():
        for epoch in range(start_epoch, cfg.epochs + 1):
            # Seeding per epoch makes a resumed run draw the same batches and dropout masks as an uninterrupted one.
            torch.manual_seed(cfg.seed + epoch)
            generator.manual_seed(cfg.seed + epoch)
            lr = optimizer.param_groups[0]["lr"]
            epoch_start = time.perf_counter()
            stats = train_one_epoch(
                train_module,
                train_loader,
                criterion,
                optimizer,
                scheduler,
                device,
                epoch=epoch,
                cfg=cfg,
                log=log,
                should_stop=stop,
            )
            if stop():
                stopped = True
                break  # a partial epoch is not recorded; last.pt holds the previous complete one
            stats = distributed.combine_epoch(stats)
            if not main:
                continue
            stats.update(validation_metrics(*collect_logits(step_module, eval_loaders["val"], device, cfg)))
            log.event("epoch", epoch=epoch, lr=lr, **stats)
            if cfg.compile:
                epoch_seconds.append(time.perf_counter() - epoch_start)
                log_compile_cost(log, epoch_seconds)
            extra = {"config": cfg.to_dict(), "epoch": epoch, "metrics": stats}
            # "last" keeps every new epoch: its epoch number always beats the best so far.
            score = epoch if cfg.select_metric == "last" else stats[cfg.select_metric]
            if score > best_score:
                best_score = score
                atomic_save(checkpoint_dict(model, prep, head=cfg.head, **extra), run_dir / "best.pt")
            atomic_save(
                checkpoint_dict(
                    model,
                    prep,
                    head=cfg.head,
                    best_score=best_score,
                    optimizer_state=optimizer.state_dict(),
                    scheduler_state=scheduler.state_dict(),
                    **extra,
                ),
                run_dir / "last.pt",
            )
            record_set_aside()
        if main and (run_dir / "best.pt").is_file():
            finalize(run_dir, frame, cfg, model, step_module, eval_loaders, device, found, log=log)
            record_set_aside()
    return "stopped" if stopped else "finished"


def log_compile_cost(log: RunLog, epoch_seconds: list[float]) -> None:
    """After the first two epochs of a compiled model, what compiling cost: the first epoch (training and
    validation, compiling both) less the second; after the first alone, its time."""
    if len(epoch_seconds) == 1:
        log.event("compile", first_epoch_s=epoch_seconds[0])
        print(f"torch.compile: the first epoch, compiling included, took {epoch_seconds[0]:.1f} s", flush=True)
    elif len(epoch_seconds) == 2:
        first, second = epoch_seconds
        cost = max(0.0, first - second)
        log.event("compile", first_epoch_s=first, second_epoch_s=second, compile_cost_s=cost)
        print(f"torch.compile: the second epoch took {second:.1f} s, so compiling cost about {cost:.1f} s", flush=True)


def finalize(
    run_dir: Path,
    frame: pd.DataFrame,
    cfg: TrainConfig,
    model: LesionNet,
    step_module: nn.Module,
    eval_loaders: dict,
    device: torch.device,
    found: Iterable[str] = (),
    *,
    log: RunLog | None = None,
) -> dict:
    """Calibrate the best model on the validation split and evaluate it on the test split.

    ``step_module`` is the module the loaders feed (the head, on cached features, in head-only mode).
    The test images set aside as damaged (``found`` by the feature cache, or met by the test loader)
    have no output, so their rows are left out of the predictions table. ``log`` hears the progress through
    both splits (the "evaluate" phase).
    """
    best = read_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model_state"])
    total, started, before = int(frame["split"].isin(["val", "test"]).sum()), time.time(), 0
    logits = {}
    for split in ("val", "test"):

        def report(done: int, before: int = before) -> None:
            if log is not None:
                log.phase("evaluate", before + done, total, started)

        logits[split] = collect_logits(step_module, eval_loaders[split], device, cfg, report)
        before += len(logits[split][1])
    val_logits, val_labels = logits["val"]
    temperature = fit_temperature(val_labels, val_logits) if len(val_labels) else 1.0
    test_logits, test_labels = logits["test"]
    probs = softmax(test_logits, temperature)
    val_probs = softmax(val_logits, temperature)
    operating = operating_point_fields(val_labels, val_probs)
    evaluation = {
        "temperature": temperature,
        **operating,
        "epoch": best["epoch"],
        "test": compute_metrics(test_labels, probs, **operating),
        "test_uncalibrated": compute_metrics(test_labels, softmax(test_logits), **operating),
        "val": compute_metrics(val_labels, val_probs, **operating),
    }
    damaged = damaged_images([eval_loaders["test"]], found)
    test_rows = frame[(frame["split"] == "test") & ~frame["path"].isin(damaged)]
    write_evaluation(run_dir, evaluation, test_rows, probs, test_logits)
    best["temperature"] = temperature
    best.update(operating)
    atomic_save(best, run_dir / "best.pt")
    return evaluation


def config_with(base: str | TrainConfig = "seed", **overrides) -> TrainConfig:
    """A preset (by name) or config with some fields replaced, validated."""
    cfg = PRESETS[base] if isinstance(base, str) else base
    return TrainConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
