"""How an image becomes a model input: the :class:`Preprocessing` a checkpoint records, and the
training and evaluation transforms built from it (as torchvision's classification ``presets.py``).

The trainer, the feature cache and the predictor all build their inputs here, so
an uploaded image reaches the model exactly as the training images did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from core.common.schema import is_finite_number
from core.data.images import ImageSource, fit_to_source, open_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Each training-image augmentation recipe and what it does, in words for the CLI and the Train page.
AUGMENTATION_HELP = {
    "none": "none: the image as evaluated",
    "seed": "seed: the course project's flips, rotation up to 20°, mild brightness/contrast jitter",
    "strong": "strong: flips, any rotation, scale 0.9–1.2, colour jitter",
    "wide": "wide: strong's flips, rotation and colour jitter over a wider scale and aspect: a random crop of "
    "25–100 % of the area, up to 4:3 narrower or wider, then scale 0.5–1 (the lesion from 2× to ½ its size and "
    "stretched, as other cameras and crops frame it)",
}
AUGMENTATIONS = tuple(AUGMENTATION_HELP)
# "wide": the crop's share of the image area, and how far its aspect may stray from the input's (a factor).
WIDE_CROP_AREA = (0.25, 1.0)
WIDE_ASPECT = 4 / 3
WIDE_SCALE = (0.5, 1.0)
# Colour constancy: each image's colours divided by an estimate of its illuminant, so that another camera's white
# balance or light reaches the model as the training images' did. "shades_of_gray" estimates the illuminant as each
# channel's Minkowski p-norm mean (Finlayson & Trezzi 2004), with p = 6, the choice of the ISIC 2018 entries that used
# it (Barata et al.); p = 1 is grey world, p = ∞ max-RGB.
COLOUR_CONSTANCY = ("none", "shades_of_gray")
SHADES_OF_GRAY_P = 6
COLOUR_CONSTANCY_HELP = (
    "colour constancy applied to every image before the model, in training and at every prediction: none, or "
    f"shades_of_gray (Shades of Gray, p = {SHADES_OF_GRAY_P}: each channel divided by its p-norm mean, so a colour "
    "cast from another camera or light is removed); recorded in the checkpoint"
)
# Bounds on each side of a checkpoint's ``input_size`` and ``source_size``, in pixels (uploads have their
# own, in core.data.images). Below 16 px the backbones' 32× downsampling leaves nothing to classify. Memory grows
# with the square of the side: about 260 MB per image at 1024×1024 through ResNet-50, while a checkpoint
# asking for 12000×12000 made prediction take 16 GB and evaluation die at 21 GB. HAM10000 is 600×450.
MIN_INPUT_SIDE = 16
MAX_INPUT_SIDE = 1024
# The normalisation of pixels scaled to [0, 1]: a channel's mean lies within it and its spread is at most 0.5.
# A checkpoint whose std was 1e-30 multiplied every pixel by 1e30 and called a nevus "vasc 50.5 %".
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (0.01, 1.0)
# Training images saved again as JPEG: clinics' software and uploads compress images, and a model that only saw our
# copies lost 0.11-0.13 balanced accuracy at quality 50 (MODEL_CARD.md, robustness). Off unless a run asks for it.
JPEG_QUALITY_HELP = (
    "save every training image again as JPEG at a quality drawn per image from this value to 100 (libjpeg, before "
    "colour constancy and any other augmentation; not on cached features), as other clinics' software and uploads "
    "compress images; 0 = off"
)


def check_jpeg_quality(lowest: int) -> int:
    """The lowest quality of the JPEG re-save augmentation: 0 (off) or 1-100."""
    if isinstance(lowest, bool) or not isinstance(lowest, int) or not 0 <= lowest <= 100:
        raise ValueError(f"jpeg_quality must be 0 (off) or a JPEG quality from 1 to 100; got {lowest!r}")
    return lowest


def check_size(name: str, size: object) -> None:
    """Refuse anything but two whole numbers of pixels, each from ``MIN_INPUT_SIDE`` to ``MAX_INPUT_SIDE``;
    the ValueError's message starts with ``name``."""
    sides = size if isinstance(size, list | tuple) else ()
    if len(sides) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and MIN_INPUT_SIDE <= v <= MAX_INPUT_SIDE for v in sides
    ):
        raise ValueError(
            f"{name} must be two whole numbers of pixels, each from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE}; got {size!r}"
        )


def _check_triple(name: str, values: object, bounds: tuple[float, float]) -> None:
    items = values if isinstance(values, list | tuple) else ()
    if len(items) != 3 or not all(is_finite_number(v) and bounds[0] <= v <= bounds[1] for v in items):
        raise ValueError(
            f"{name} must be three finite numbers from {bounds[0]:g} to {bounds[1]:g}, one per RGB channel; "
            f"got {values!r}"
        )


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
    colour_constancy: str = "none"

    def __post_init__(self) -> None:
        # Every Preprocessing is checked, whether the trainer, a checkpoint or a benchmark made it.
        check_size("input_size", self.input_size)
        if self.source_size is not None:
            check_size("source_size", self.source_size)
        _check_triple("mean", self.mean, MEAN_RANGE)
        _check_triple("std", self.std, STD_RANGE)
        if self.colour_constancy not in COLOUR_CONSTANCY:
            raise ValueError(
                f"colour_constancy must be one of {', '.join(COLOUR_CONSTANCY)}; got {self.colour_constancy!r}"
            )

    def to_dict(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        if self.colour_constancy == "none":
            # Left out, so a model without it records what every earlier checkpoint recorded, and the feature
            # caches keyed by this dict (core.inference.features.backbone_key) stay valid.
            del d["colour_constancy"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The inverse of :meth:`to_dict`; a ValueError naming the field for anything out of bounds."""
        if "input_size" not in d:
            raise ValueError("input_size is missing")

        def field(key: str, default: object = None) -> object:
            value = d.get(key, default)
            return tuple(value) if isinstance(value, list | tuple) else value  # other types fail the checks

        return cls(
            input_size=field("input_size"),
            source_size=field("source_size"),
            mean=field("mean", IMAGENET_MEAN),
            std=field("std", IMAGENET_STD),
            colour_constancy=field("colour_constancy", "none"),
        )


class ShadesOfGray(nn.Module):
    """Shades of Gray colour constancy on float images in [0, 1], (..., 3, H, W): each image's channels scaled so
    that their ``p``-norm means are equal, keeping the image's overall brightness (the gains' norm is √3, so a grey
    illuminant is left as it is); the result clipped to [0, 1]."""

    def __init__(self, p: int = SHADES_OF_GRAY_P):
        super().__init__()
        self.p = p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)  # a plain tensor: the gains below are not an image's geometry
        illuminant = images.clamp(min=0).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1 / self.p)
        unit = illuminant / illuminant.norm(dim=-3, keepdim=True).clamp(min=1e-6)
        return (images / (unit * math.sqrt(3)).clamp(min=1e-6)).clamp(0.0, 1.0)


def colour_constancy(prep: Preprocessing) -> list[nn.Module]:
    """The colour-constancy step of ``prep`` for a transform on float images in [0, 1]: none, or one module."""
    return [ShadesOfGray()] if prep.colour_constancy == "shades_of_gray" else []


def _to_tensor(prep: Preprocessing) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]


def _to_float(prep: Preprocessing) -> list:
    """With colour constancy, the image as floats with its illuminant removed, before any augmentation (a colour
    jitter then varies the corrected colours, and rotated corners do not count towards the illuminant)."""
    steps = colour_constancy(prep)
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *steps] if steps else []


def eval_transform(prep: Preprocessing) -> v2.Compose:
    return v2.Compose([v2.Resize(prep.input_size, antialias=True), *_to_float(prep), *_to_tensor(prep)])


def wide_crop_ratio(prep: Preprocessing) -> tuple[float, float]:
    """The width/height range of the "wide" recipe's crops: the input's own aspect, up to ``WIDE_ASPECT`` times
    narrower or wider (a crop at the input's aspect is resized without distortion)."""
    aspect = prep.input_size[1] / prep.input_size[0]
    return aspect / WIDE_ASPECT, aspect * WIDE_ASPECT


def jpeg_resave(jpeg_quality: int) -> list:
    """The JPEG re-save of ``JPEG_QUALITY_HELP`` (nothing at 0): torchvision's transform, which draws the quality
    each time it is called, on a PIL image or on one uint8 image tensor."""
    return [v2.JPEG((jpeg_quality, 100))] if check_jpeg_quality(jpeg_quality) else []


def train_transform(prep: Preprocessing, augmentation: str = "seed", jpeg_quality: int = 0) -> v2.Compose:
    """Training transform, one of ``AUGMENTATIONS`` (see ``AUGMENTATION_HELP``), after the JPEG re-save of
    ``JPEG_QUALITY_HELP`` when ``jpeg_quality`` is not 0."""
    if augmentation == "none" and not jpeg_quality:
        return eval_transform(prep)
    # Compression first, on the 8-bit pixels at the model's size: it happens to an image before anything we do.
    ops: list = [v2.Resize(prep.input_size, antialias=True), *jpeg_resave(jpeg_quality), *_to_float(prep)]
    if augmentation == "none":
        return v2.Compose([*ops, *_to_tensor(prep)])
    if augmentation == "wide":
        # After the resize, so the crop's aspect range is relative to the input's, as on the batched path.
        ops.append(v2.RandomResizedCrop(prep.input_size, scale=WIDE_CROP_AREA, ratio=wide_crop_ratio(prep)))
    ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if augmentation == "seed":
        ops += [v2.RandomRotation(20), v2.ColorJitter(brightness=0.1, contrast=0.1)]
    elif augmentation in ("strong", "wide"):
        # Dermoscopy has no canonical orientation, so any rotation is a valid view.
        ops += [
            v2.RandomAffine(degrees=180, scale=(0.9, 1.2) if augmentation == "strong" else WIDE_SCALE),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03),
        ]
    else:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose from {', '.join(AUGMENTATIONS)}")
    return v2.Compose([*ops, *_to_tensor(prep)])


def load_for_model(source: ImageSource, prep: Preprocessing, *, upload: bool = False) -> Image.Image:
    """Decode an image and bring it to the training images' source size (when recorded). ``upload`` holds it
    to the limits for an image someone asks about (see :func:`core.data.images.open_image`)."""
    draft = prep.source_size if prep.source_size else (prep.input_size[1], prep.input_size[0])
    img = open_image(source, draft_size=draft, upload=upload)
    return fit_to_source(img, prep.source_size) if prep.source_size else img
