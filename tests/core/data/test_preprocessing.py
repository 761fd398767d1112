"""Colour constancy (Shades of Gray) as a recorded preprocessing option: what it does to an image, how a
checkpoint records it, and that every transform built from a Preprocessing applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.augment import batch_transform
from core.data.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHADES_OF_GRAY_P,
    Preprocessing,
    ShadesOfGray,
    eval_transform,
    train_transform,
)
from tests.conftest import make_image

CAST = np.array([1.0, 0.85, 0.7])  # a warm light: green and blue weaker, as another camera's white balance


def p_means(images: torch.Tensor, p: int = SHADES_OF_GRAY_P) -> torch.Tensor:
    return images.pow(p).mean(dim=(-2, -1)).pow(1 / p)


def chromaticity(images: torch.Tensor) -> torch.Tensor:
    """Each pixel's colour without its brightness: what colour constancy keeps from a cast."""
    return images / images.sum(dim=-3, keepdim=True).clamp(min=1e-6)


def unnormalise(inputs: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return inputs * std + mean


@pytest.fixture(scope="module")
def images() -> tuple[Image.Image, Image.Image]:
    """A lesion-like image and the same under a warm cast, darkened only, so no channel clips."""
    image = make_image(2, np.random.default_rng(1), size=(80, 60))
    cast = Image.fromarray((np.asarray(image, dtype=float) * CAST).round().astype(np.uint8))
    return image, cast


def test_shades_of_gray_makes_the_illuminant_grey_and_removes_a_cast():
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.uniform(0.05, 0.5, size=(2, 3, 20, 30))).float()
    cast = batch * torch.tensor(CAST, dtype=torch.float32)[:, None, None]
    out, out_cast = ShadesOfGray()(batch), ShadesOfGray()(cast)
    means = p_means(out)
    assert torch.allclose(means, means.mean(dim=1, keepdim=True), rtol=1e-4)  # each image's illuminant is grey
    assert not torch.allclose(chromaticity(batch), chromaticity(cast), atol=0.01)
    assert torch.allclose(chromaticity(out), chromaticity(out_cast), atol=1e-5)  # the cast is gone
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(ShadesOfGray()(torch.zeros(3, 4, 4))).all()  # a black image does not divide by zero


def test_a_preprocessing_records_colour_constancy_and_old_records_read_as_without():
    plain = Preprocessing(input_size=(32, 32))
    assert "colour_constancy" not in plain.to_dict()  # what every checkpoint before it recorded
    assert Preprocessing.from_dict(plain.to_dict()) == plain and plain.colour_constancy == "none"
    corrected = Preprocessing(input_size=(32, 32), colour_constancy="shades_of_gray")
    assert corrected.to_dict()["colour_constancy"] == "shades_of_gray"
    assert Preprocessing.from_dict(corrected.to_dict()) == corrected != plain
    with pytest.raises(ValueError, match="colour_constancy must be one of none, shades_of_gray; got 'retinex'"):
        Preprocessing.from_dict({**plain.to_dict(), "colour_constancy": "retinex"})


@pytest.mark.parametrize("augmentation", ["none", "strong"])
def test_every_transform_applies_it_when_recorded(images, augmentation):
    """The PIL transforms (training and evaluation) and the decoded cache's batched one: under colour constancy an
    image and its cast copy become the same colours; without it they do not."""
    image, cast = images
    for cc, same in (("none", False), ("shades_of_gray", True)):
        prep = Preprocessing(input_size=(60, 80), colour_constancy=cc)
        torch.manual_seed(0)  # the same augmentation draw for both
        a = train_transform(prep, augmentation)(image) if augmentation != "none" else eval_transform(prep)(image)
        torch.manual_seed(0)
        b = train_transform(prep, augmentation)(cast) if augmentation != "none" else eval_transform(prep)(cast)
        pixels = torch.from_numpy(np.stack([np.asarray(image), np.asarray(cast)])).permute(0, 3, 1, 2)
        batched = batch_transform(prep, "none", image.size)(pixels)
        gap = (chromaticity(unnormalise(a)) - chromaticity(unnormalise(b))).abs().mean()
        batched_gap = (chromaticity(unnormalise(batched[0])) - chromaticity(unnormalise(batched[1]))).abs().mean()
        if augmentation == "none":
            # The cache's path is the files' path, colour constancy included (8-bit resizes differ by a step).
            assert (batched[0] - a).abs().max() < 0.05
        assert (gap < 0.01) == same and (batched_gap < 0.01) == same, (cc, float(gap), float(batched_gap))
