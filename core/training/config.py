"""What a training run is asked to do: ``TrainConfig`` (each field's help generates its command-line flag)
and the named presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from core.data.preprocessing import (
    AUGMENTATION_HELP,
    AUGMENTATIONS,
    COLOUR_CONSTANCY,
    COLOUR_CONSTANCY_HELP,
    JPEG_QUALITY_HELP,
    Preprocessing,
    check_jpeg_quality,
    check_size,
)
from core.data.splits import DEFAULT_FRACTIONS, DEFAULT_SEED, check_fractions
from core.models.architectures import ARCHITECTURES, FINETUNE_POLICIES, HEADS
from core.training import imbalance

SCHEDULERS = ("step", "cosine", "onecycle", "none")


OPTIMIZERS = ("adam", "adamw", "sgd")


INPUT_PIPELINES = ("decoded", "jpeg")


# Why a network that trains on images cannot take metadata from the JPEG pipeline: its batches carry none.
METADATA_NEEDS_DECODED = (
    "metadata fusion reaches a network that trains on images only through the decoded-image cache "
    "(--input-pipeline decoded, which needs room on the disk for it), or trains the head on cached features "
    "(--finetune head)"
)


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A TrainConfig field with its ``--help`` line and, for the command line, ``choices`` (also checked
    on every config) or a ``metavar`` per value of a tuple."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the seed (course project) pipeline.

    Each field's metadata is its command-line help (:mod:`core.cli.train` makes a flag of every field).
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
    colour_constancy: str = setting("none", COLOUR_CONSTANCY_HELP, choices=COLOUR_CONSTANCY)
    jpeg_quality: int = setting(0, JPEG_QUALITY_HELP)
    split_fractions: tuple[float, float, float] = setting(
        DEFAULT_FRACTIONS,
        "fractions of the lesions in the train, validation and test splits",
        metavar=("TRAIN", "VAL", "TEST"),
    )
    split_seed: int = setting(DEFAULT_SEED, "seed of the lesion-grouped split")
    holdout_source: str = setting(
        "",
        "validation away from home: train and validate on the other image sources (HAM10000_sources.csv) and test "
        "on this one (e.g. rosendahl); the other sources' images of its lesions are left out",
    )
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
        "the head also takes age, sex and body site (core/models/metadata.py): on cached features "
        "(--finetune head) or, for fine-tuning, through the decoded-image cache",
    )
    metadata_dropout: float = setting(
        0.3, "with --metadata: the probability that each field of a training row is withheld (set to unknown)"
    )

    def __post_init__(self) -> None:
        self.input_size = tuple(self.input_size)
        # Every check of a config is here, so the CLI, a job started from the app and a config file are refused
        # alike, before anything runs (checks against this machine, such as a compiler, are the trainer's).
        self.split_fractions = check_fractions(self.split_fractions)
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
        check_jpeg_quality(self.jpeg_quality)
        if self.source_size is not None:
            check_size("source_size", self.source_size)
        if self.metadata and not self.uses_feature_cache and self.input_pipeline != "decoded":
            raise ValueError(METADATA_NEEDS_DECODED)

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
        """The input sizes and colour constancy of this config, with the normalisation its backbone's
        pretrained weights expect."""
        arch = ARCHITECTURES[self.arch]
        return Preprocessing(
            input_size=self.input_size,
            source_size=self.source_size,
            mean=arch.mean,
            std=arch.std,
            colour_constancy=self.colour_constancy,
        )

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


def config_with(base: str | TrainConfig = "seed", **overrides: Any) -> TrainConfig:
    """A preset (by name) or config with some fields replaced, validated."""
    cfg = PRESETS[base] if isinstance(base, str) else base
    return TrainConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
