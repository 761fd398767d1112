"""Batched augmentation on the device means what the PIL path means: the distributions of flips, rotation,
scale, aspect and colour agree within their sampling error; and a real run on the sample trains through it."""

from __future__ import annotations

import json

import kornia.augmentation as K
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.data.augment import batch_transform
from core.data.preprocessing import Preprocessing, eval_transform, load_for_model, train_transform
from core.training.config import config_with
from core.training.loop import train
from tests.conftest import ROOT
from tests.core.data.test_decoded import run_events, sample_run

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
PREP = Preprocessing(input_size=(150, 200), source_size=(200, 150))
DRAWS = 600
MEAN = torch.tensor(PREP.mean).view(1, 3, 1, 1)
STD = torch.tensor(PREP.std).view(1, 3, 1, 1)


def probe() -> Image.Image:
    """A real lesion image with a pure red disc in its upper-left quadrant: where the disc lands tells the
    flips, the rotation and the scale; the central skin and lesion tell the colour jitter."""
    img = load_for_model(sorted((SAMPLE / "images").glob("*.jpg"))[0], PREP).copy()
    ImageDraw.Draw(img).ellipse((40, 20, 60, 40), fill=(255, 0, 0))  # centre (50, 30); image centre (100, 75)
    return img


def pil_path(img: Image.Image, augmentation: str) -> torch.Tensor:
    transform = train_transform(PREP, augmentation)
    return torch.stack([transform(img) for _ in range(DRAWS)])


def batched(img: Image.Image, transform: torch.nn.Module) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    with torch.no_grad():
        return torch.cat([transform(pixels.expand(100, -1, -1, -1).contiguous()) for _ in range(DRAWS // 100)])


def batch_path(img: Image.Image, augmentation: str) -> torch.Tensor:
    return batched(img, batch_transform(PREP, augmentation, img.size))


# Pixel coordinates of the 200×150 inputs, for the disc's moments.
XS, YS = torch.arange(200.0), torch.arange(150.0)


def statistics(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """One number per image and statistic."""
    rgb = batch.mul(STD).add_(MEAN).clamp_(0, 1)
    red = ((rgb[:, 0] > 0.8) & (rgb[:, 1] < 0.25) & (rgb[:, 2] < 0.25)).float()
    # The disc's moments from its pixel counts per column and per row, and their products with the coordinates:
    # whole numbers, exact in float32; a few numbers per image from there, in float64. (Products of the whole mask
    # with coordinate grids took most of this module's time.)
    columns, rows, xs, ys = red.sum(1).double(), red.sum(2).double(), XS.double(), YS.double()
    pixels = columns.sum(1)
    area = pixels.clamp(min=1)
    sx, sy, sxy = columns @ xs, rows @ ys, (red @ XS).double() @ ys
    mx, my = sx / area, sy / area
    dx, dy = mx - 99.5, my - 74.5
    # The disc's elongation, from the second moments of its pixels: rotation leaves a disc round, and only a
    # change of aspect makes it an ellipse (sqrt of the principal axes' ratio; 1 for a disc, or no disc).
    cxx = (columns @ xs**2 - 2 * mx * sx + mx**2 * pixels) / area
    cyy = (rows @ ys**2 - 2 * my * sy + my**2 * pixels) / area
    cxy = (sxy - my * sx - mx * sy + mx * my * pixels) / area
    spread = torch.sqrt(((cxx - cyy) / 2) ** 2 + cxy**2)
    major, minor = (cxx + cyy) / 2 + spread, ((cxx + cyy) / 2 - spread).clamp(min=1e-6)
    centre = rgb[:, :, 45:105, 70:130]
    return {
        "disc right of centre (horizontal flip)": (dx > 0).float(),
        "disc below centre (vertical flip)": (dy > 0).float(),
        "disc angle off the diagonal": torch.atan2(dy.abs(), dx.abs()),
        "disc distance from centre (scale)": torch.hypot(dx, dy),
        "disc area (scale)": area.float(),
        "disc elongation (aspect)": torch.where(pixels > 4, torch.sqrt(major / minor), 1.0).clamp(max=4),
        "black corners": (rgb.sum(1) < 0.01).float().mean((1, 2)),
        **{f"central mean {c}": centre[:, i].mean((1, 2)) for i, c in enumerate("RGB")},
        "central contrast": centre.mean(1).std((1, 2)),
        "central saturation": (centre.amax(1) - centre.amin(1)).mean((1, 2)),
    }


def disagreements(pil: dict[str, torch.Tensor], batched: dict[str, torch.Tensor]) -> list[str]:
    """The statistics whose mean or spread differ by more than sampling error allows."""
    found = []
    for name in pil:
        a, b = pil[name].double().numpy(), batched[name].double().numpy()
        # Four standard errors of the difference: two draws of one distribution differ by more once in ~16,000
        # comparisons. 1/255 more for the PIL path's rounding to 8 bits after each colour operation.
        mean_tol = 4 * np.sqrt(a.var() / len(a) + b.var() / len(b)) + 1 / 255
        # A standard deviation's standard error is about sd / sqrt(2n) for these near-normal or bounded spreads.
        sd_tol = 4 * np.sqrt((a.var() + b.var()) / (2 * len(a))) + 1 / 255
        if abs(a.mean() - b.mean()) > mean_tol or abs(a.std() - b.std()) > sd_tol:
            found.append(f"{name}: mean {a.mean():.4f} vs {b.mean():.4f}, sd {a.std():.4f} vs {b.std():.4f}")
    return found


RECIPES = ("seed", "strong", "wide")


@pytest.fixture(scope="session")
def drawn() -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Every recipe's statistics on both paths, ``{(path, recipe): statistics}``, drawn once per test run (600
    augmented images per path and recipe is most of this module's time)."""
    torch.manual_seed(0)
    img = probe()
    return {(path.__name__, r): statistics(path(img, r)) for r in RECIPES for path in (pil_path, batch_path)}


@pytest.mark.parametrize("augmentation", RECIPES)
def test_batched_augmentation_has_the_pil_paths_distribution(drawn, augmentation):
    assert disagreements(drawn["pil_path", augmentation], drawn["batch_path", augmentation]) == []


def area_spread(stats: dict[str, torch.Tensor]) -> float:
    """The 90th over the 10th percentile of the disc's area where it is in view (any rotation moves it out of
    view at times, under either recipe)."""
    area = stats["disc area (scale)"]
    shown = area[area > 4]
    return float(shown.quantile(0.9) / shown.quantile(0.1))


@pytest.mark.parametrize("path", ["pil_path", "batch_path"])
def test_the_wide_recipe_varies_scale_and_aspect_more_than_strong(drawn, path):
    """ "wide" is strong with wider scale and aspect: on both paths the disc's size spreads further and the disc
    becomes an ellipse, which strong's isotropic scaling never makes it."""
    strong, wide = drawn[path, "strong"], drawn[path, "wide"]
    assert area_spread(wide) > 2 * area_spread(strong)
    assert wide["disc elongation (aspect)"].mean() > strong["disc elongation (aspect)"].mean() + 0.05
    assert strong["disc elongation (aspect)"].median() < 1.1


def test_a_recipe_that_rotates_half_the_images_is_caught(drawn):
    """kornia rotates half the images by default, torchvision all of them: the comparison sees the difference."""
    torch.manual_seed(0)
    img = probe()
    recipe = batch_transform(PREP, "seed", img.size)
    rotating_half = K.AugmentationSequential(
        *(
            K.RandomRotation(20.0, resample="nearest", align_corners=False) if isinstance(op, K.RandomRotation) else op
            for op in recipe.children()
        )
    )
    found = disagreements(drawn["pil_path", "seed"], statistics(batched(img, rotating_half)))
    assert any(name.startswith("disc angle") or name.startswith("black corners") for name in found), found


def test_resizing_on_the_device_matches_the_pil_resize():
    img = probe()
    prep = Preprocessing(input_size=(224, 224))
    expected = eval_transform(prep)(img)
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)  # uint8, as the cache holds them
    got = batch_transform(prep, "none", img.size)(pixels)[0]
    difference = ((got - expected) * STD[0]).abs()  # in [0, 1] pixel units
    assert got.shape == expected.shape == (3, 224, 224)
    # The 8-bit resizes of torchvision and PIL differ by one step on a few values.
    assert difference.max() < 1.01 / 255 and (difference > 0.5 / 255).float().mean() < 0.01


def compression_changes(img: Image.Image, pil: bool, lowest: int, draws: int = 300) -> np.ndarray:
    """Each draw's mean absolute change from the uncompressed input (in 8-bit steps) under the JPEG re-save alone."""
    clean = eval_transform(PREP)(img)
    if pil:
        transform = train_transform(PREP, "none", lowest)
        out = torch.stack([transform(img) for _ in range(draws)])
    else:
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0).expand(draws, -1, -1, -1)
        out = batch_transform(PREP, "none", img.size, lowest)(pixels.contiguous())
    return ((out - clean) * STD).abs().mean((1, 2, 3)).mul(255).numpy()


def test_the_jpeg_resave_has_one_distribution_on_both_paths_with_a_quality_per_image():
    torch.manual_seed(0)
    img = probe()
    pil, batch = compression_changes(img, True, 20), compression_changes(img, False, 20)
    assert disagreements({"change": torch.from_numpy(pil)}, {"change": torch.from_numpy(batch)}) == []
    # One batch of one image repeated: a quality drawn per batch would change every copy alike.
    assert len(np.unique(batch.round(4))) > 20
    # Lower qualities change the image more; at 95-100 it is all but the input.
    light = compression_changes(img, False, 95, draws=50)
    assert batch.mean() > 2 * light.mean()
    assert light.max() < 1.5


def test_the_jpeg_quality_is_checked():
    for bad in (-1, 101, 50.5, True, "50"):
        with pytest.raises(ValueError, match="jpeg_quality"):
            config_with("reference", jpeg_quality=bad)
    assert config_with("reference", jpeg_quality=40).jpeg_quality == 40
    assert "JPEG" not in repr(train_transform(PREP, "strong")) and "JPEG" not in repr(
        batch_transform(PREP, "strong", (200, 150))
    )


@pytest.mark.parametrize("pipeline", ["decoded", "jpeg"])
def test_a_run_with_the_jpeg_resave_trains_on_either_pipeline(tmp_path, pipeline):
    cfg = sample_run(tmp_path, "reference", name=pipeline, input_size=(75, 100), epochs=1, jpeg_quality=30)
    cfg.input_pipeline = pipeline
    run_dir = train(cfg)
    assert json.loads((run_dir / "config.json").read_text())["jpeg_quality"] == 30
    assert (run_dir / "best.pt").is_file() and (run_dir / "evaluation.json").is_file()


def test_a_full_fine_tuning_run_on_the_sample_trains_through_the_cache(tmp_path):
    cfg = sample_run(tmp_path, "reference", name="decoded", input_size=(75, 100))
    assert cfg.input_pipeline == "decoded" and cfg.augmentation == "strong"
    run_dir = train(cfg)
    events = run_events(run_dir)
    decoding = [e for e in events if e.get("phase") == "decoding"]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert decoding and decoding[-1]["done"] == decoding[-1]["total"] == 140
    assert [e["epoch"] for e in epochs] == [1, 2] and all(np.isfinite(e["train_loss"]) for e in epochs)
    assert not [e for e in events if e["event"] == "input_pipeline"]  # no fall-back to the JPEG files
    assert (run_dir / "best.pt").is_file() and (run_dir / "evaluation.json").is_file()
    assert len(list((tmp_path / "decoded").glob("*/images.npy"))) == 1
