"""How an image becomes a model input: the :class:`Preprocessing` a checkpoint records, and the
training and evaluation transforms built from it (as torchvision's classification ``presets.py``).

The trainer, the feature cache and the predictor all build their inputs here, so
an uploaded image reaches the model exactly as the training images did.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

from core.images import ImageSource, fit_to_source, open_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "seed", "strong")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input. Saved in every checkpoint so that the
    predictor reproduces training exactly.

    ``input_size`` is (height, width). ``source_size`` is the (width, height) the
    training images had on disk, when they were downscaled copies (200×150 here):
    uploads are brought to that size first.
    """

    input_size: tuple[int, int] = (224, 224)
    source_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {k: (list(v) if v is not None else None) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        src = d.get("source_size")
        return cls(
            input_size=tuple(d["input_size"]),
            source_size=tuple(src) if src else None,
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
        )


def _to_tensor(prep: Preprocessing) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]


def eval_transform(prep: Preprocessing) -> v2.Compose:
    return v2.Compose([v2.Resize(prep.input_size, antialias=True), *_to_tensor(prep)])


def train_transform(prep: Preprocessing, augmentation: str = "seed") -> v2.Compose:
    """Training transform. "seed" is the course project's: flips, rotation(20°), mild colour jitter."""
    if augmentation == "none":
        return eval_transform(prep)
    ops: list = [v2.Resize(prep.input_size, antialias=True), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if augmentation == "seed":
        ops += [v2.RandomRotation(20), v2.ColorJitter(brightness=0.1, contrast=0.1)]
    elif augmentation == "strong":
        # Dermoscopy has no canonical orientation, so any rotation is a valid view.
        ops += [
            v2.RandomAffine(degrees=180, scale=(0.9, 1.2)),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03),
        ]
    else:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose from {', '.join(AUGMENTATIONS)}")
    return v2.Compose([*ops, *_to_tensor(prep)])


def load_for_model(source: ImageSource, prep: Preprocessing, *, upload: bool = False) -> Image.Image:
    """Decode an image and bring it to the training images' source size (when recorded). ``upload`` holds it
    to the limits for an image someone asks about (see :func:`core.images.open_image`)."""
    draft = prep.source_size if prep.source_size else (prep.input_size[1], prep.input_size[0])
    img = open_image(source, draft_size=draft, upload=upload)
    return fit_to_source(img, prep.source_size) if prep.source_size else img
