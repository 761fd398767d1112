"""Batches from the decoded-image cache, augmented on the training device with per-sample random parameters.

:func:`batch_transform` is :func:`core.data.preprocessing.train_transform` (and ``eval_transform``) as
``kornia.augmentation`` on whole batches: the same operations with the same ranges, each drawn per image
(tests/core/data/test_augment.py compares the two paths' distributions). :class:`DeviceBatches` gathers a batch's
uint8 rows from the memory-mapped cache in a background thread (pinned, on CUDA), moves them while the
device works (non-blocking) and resizes, converts, augments and normalises them there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import kornia.augmentation as K
import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from core.data.decoded import DecodedImages
from core.data.preprocessing import (
    AUGMENTATIONS,
    WIDE_CROP_AREA,
    WIDE_SCALE,
    Preprocessing,
    colour_constancy,
    jpeg_resave,
    wide_crop_ratio,
)


def _augmentations(augmentation: str) -> list[nn.Module]:
    # torchvision rotates every image (p=1), with nearest-neighbour sampling and black corners; kornia's
    # defaults (p=0.5, bilinear) would mean a different recipe.
    geometry = {"resample": "nearest", "align_corners": False, "p": 1.0}
    flips = [K.RandomHorizontalFlip(), K.RandomVerticalFlip()]
    if augmentation == "none":
        return []
    if augmentation == "seed":
        return [*flips, K.RandomRotation(20.0, **geometry), K.ColorJitter(brightness=0.1, contrast=0.1)]
    if augmentation in ("strong", "wide"):
        scale = (0.9, 1.2) if augmentation == "strong" else WIDE_SCALE
        return [
            *flips,
            K.RandomAffine(180.0, scale=scale, padding_mode="zeros", **geometry),
            K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03),
        ]
    raise ValueError(f"unknown augmentation {augmentation!r}; choose from {', '.join(AUGMENTATIONS)}")


class JpegResave(nn.Module):
    """The JPEG re-save of :func:`core.data.preprocessing.jpeg_resave` on each uint8 image of a batch, through PIL
    on the host as on the other path: the quality is drawn per image, and torchvision's own tensor codec is
    deprecated (0.29)."""

    def __init__(self, jpeg_quality: int):
        super().__init__()
        self.transform = v2.Compose([v2.ToPILImage(), *jpeg_resave(jpeg_quality), v2.PILToTensor()])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        changed = [self.transform(image) for image in images.cpu()]
        return torch.stack(changed).to(images.device, non_blocking=True) if changed else images


def batch_transform(
    prep: Preprocessing, augmentation: str, source: tuple[int, int], jpeg_quality: int = 0
) -> nn.Module:
    """Batches of ``source`` (width, height) images, uint8 (or float in [0, 1]), to normalised model inputs:
    resized to ``prep.input_size``, saved again as JPEG when ``jpeg_quality`` is not 0 (uint8 batches only),
    converted to float, colour-corrected as ``prep`` says, augmented as ``augmentation``, normalised."""
    ops: list[nn.Module] = []
    if (source[1], source[0]) != tuple(prep.input_size):
        # On the 8-bit pixels with torchvision's antialiased resize, as the PIL path resizes them: the two agree
        # to 1/255 on one value in 4,000. Kornia's resize antialiases with a Gaussian blur (up to 40/255 apart),
        # and resizing floats skips PIL's rounding, which moved the reference model's probabilities by up to 0.12.
        ops.append(v2.Resize(tuple(prep.input_size), antialias=True))
    if jpeg_quality:
        # libjpeg, as on the other path (kornia's differentiable JPEG is another codec: its change to an image
        # differs from libjpeg's by as much as libjpeg's own change at quality 50).
        ops.append(JpegResave(jpeg_quality))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    ops += colour_constancy(prep)  # as train_transform and eval_transform: before any augmentation
    if augmentation == "wide":
        # After the resize, as in train_transform; bilinear on the half-pixel grid, as torchvision crops.
        size, ratio = tuple(prep.input_size), wide_crop_ratio(prep)
        ops.append(K.RandomResizedCrop(size, WIDE_CROP_AREA, ratio, align_corners=False))
    ops += _augmentations(augmentation)
    ops.append(K.Normalize(torch.tensor(prep.mean), torch.tensor(prep.std)))
    return K.AugmentationSequential(*ops)


def eval_batches(
    cache: DecodedImages,
    paths: Sequence[str],
    labels: Sequence[int],
    prep: Preprocessing,
    batch_size: int,
    device: torch.device,
    *,
    channels_last: bool = True,
) -> DeviceBatches:
    """The cached images of ``paths`` (none of them damaged), in order and with their ``labels``, as
    :func:`core.data.preprocessing.eval_transform` makes them from the files: resized and normalised, on ``device``."""
    rows, targets = torch.from_numpy(cache.rows(list(paths))), torch.as_tensor(labels, dtype=torch.long)
    batches = list(zip(rows.split(batch_size), targets.split(batch_size), strict=True)) if len(rows) else []
    transform = batch_transform(prep, "none", cache.size)
    return DeviceBatches(cache, batches, transform, device, channels_last=channels_last)


class DeviceBatches:
    """Model-ready batches from a :class:`DecodedImages` cache, on ``device``.

    ``batches`` yields (cache rows, labels) or (cache rows, labels, encoded metadata), e.g. a
    :class:`core.inference.features.FeatureBatches` over the rows, which draws them as a DataLoader with the run's
    sampler would. Each batch is gathered from the memory map one step ahead in a thread, so reading the disk
    overlaps the device's work.
    """

    def __init__(
        self,
        cache: DecodedImages,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        transform: nn.Module,
        device: torch.device,
        *,
        channels_last: bool = True,
    ):
        self.cache, self.batches, self.device = cache, batches, device
        self.transform = transform.to(device)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.batches)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        pixels = torch.from_numpy(np.take(self.cache.images, rows.numpy(), axis=0))
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    @torch.no_grad()
    def _finish(self, pixels: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = self.transform(pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, *(t.to(self.device, non_blocking=True) for t in others)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """(images, labels), or (images, labels, metadata) where the batches hold metadata."""
        with ThreadPoolExecutor(1) as pool:
            ahead = None
            for rows, *others in self.batches:
                gathered = pool.submit(self._gather, rows)
                if ahead is not None:
                    yield self._finish(ahead[0].result(), *ahead[1])
                ahead = (gathered, others)
            if ahead is not None:
                yield self._finish(ahead[0].result(), *ahead[1])
