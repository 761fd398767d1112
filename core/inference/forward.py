"""Running a model over batches: logits or calibrated probabilities, optionally averaged over several views
(test-time augmentation: flips, and zooms where they were measured to help).

The trainer, the evaluator and the predictor collect model outputs here; what is
computed from those outputs lives in :mod:`core.metrics.classification`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from core.common.labels import NUM_CLASSES

# The zooms whose four flips test-time augmentation averages (1.0: the image as it is), chosen on the reference
# model's validation split by bench/tta.py (docs/BENCHMARKS.md). The first stays 1.0: the first of an image's views is
# then the image itself, whose features a prediction keeps as its embedding (Predictor.predict_batch).
TTA_SCALES: tuple[float, ...] = (1.0,)


class PredictionError(ValueError):
    """A model's output is not a probability distribution, so no prediction or metric may be shown."""


def check_probabilities(probs: np.ndarray) -> None:
    """Raise :class:`PredictionError` unless every row of ``probs`` (n, classes) is finite and sums to 1.

    Broken weights (NaN or infinite) load without complaint and then give NaN, which would otherwise
    reach a diagnosis heading or a metric as if it were a number.
    """
    probs = np.asarray(probs, dtype=np.float64)
    valid = np.isfinite(probs).all(axis=1) & (np.abs(probs.sum(axis=1) - 1.0) < 1e-4) & (probs >= 0).all(axis=1)
    bad = int((~valid).sum())
    if bad:
        what = "this image" if len(probs) == 1 else f"{bad} of {len(probs)} images"
        raise PredictionError(
            f"the model gave no valid probabilities for {what} (NaN, infinite or not summing "
            "to 1): its weights or temperature are broken, so no result is shown"
        )


def flip_views(x: torch.Tensor) -> torch.Tensor:
    """The batch, then its horizontal, vertical and double flips, stacked along the batch axis.

    Dermoscopy has no canonical orientation, so all four are equally valid views.
    """
    return torch.cat([x, x.flip(-1), x.flip(-2), x.flip((-2, -1))])


def zoom(x: torch.Tensor, scale: float, fill: Sequence[float] | None = None) -> torch.Tensor:
    """The batch magnified ``scale`` times about each image's centre, at the same size (bilinear). Below 1 the
    border it uncovers takes ``fill`` per channel (0 without)."""
    if scale == 1.0:
        return x
    return TF.affine(
        x,
        angle=0.0,
        translate=[0.0, 0.0],
        scale=scale,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=None if fill is None else list(fill),
    )


def tta_views(x: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """The four flips (:func:`flip_views`) of the batch at each zoom of ``scales``, stacked along the batch axis:
    ``len(scales) * 4`` views of every image."""
    return torch.cat([flip_views(zoom(x, scale)) for scale in scales])


def view_count(tta: bool) -> int:
    """How many views of each image a forward pass holds: 1 without TTA."""
    return 4 * len(TTA_SCALES) if tta else 1


def tta_description(tta: bool) -> str:
    """Which views a result averaged, for its record: "none", or the flips and zooms."""
    if not tta:
        return "none"
    zooms = [s for s in TTA_SCALES if s != 1.0]
    return "4 flips" + (f" at zoom {', '.join(f'{s:g}' for s in TTA_SCALES)}" if zooms else "")


def class_probabilities(
    model: torch.nn.Module, x: torch.Tensor, temperature: float = 1.0, tta: bool = False
) -> torch.Tensor:
    """Softmax(logits / T) for a batch; with ``tta`` the mean over its views (:func:`tta_views`, one forward
    pass)."""
    return view_probabilities(model(prediction_views(x, tta)), len(x), temperature)


def prediction_views(x: torch.Tensor, tta: bool) -> torch.Tensor:
    """What one prediction pass feeds the model: the batch itself, or with ``tta`` its views (:func:`tta_views` at
    ``TTA_SCALES``), each image's first view being the image as it is."""
    return tta_views(x, TTA_SCALES) if tta else x


def view_probabilities(logits: torch.Tensor, n: int, temperature: float = 1.0) -> torch.Tensor:
    """Softmax(logits / T) for the views of ``n`` images stacked along the batch axis (as :func:`tta_views` stacks
    them; one view each without TTA), averaged per image."""
    probs = torch.softmax(logits.float() / temperature, dim=1)
    return probs.view(-1, n, probs.shape[1]).mean(dim=0)


def _eval_pass(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str,
    step: Callable[..., torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    # Restore each module's own mode afterwards: the trainer keeps frozen BatchNorm
    # layers in eval mode during training, which a blanket model.train() would undo.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    outputs, targets = [], []
    try:
        with torch.inference_mode():
            done = 0
            # A loader for a model that takes metadata may hand each batch's encoded rows after its labels.
            for inputs, labels, *metadata in loader:
                outputs.append(step(inputs.to(device), *(m.to(device) for m in metadata)).float().cpu())
                targets.append(torch.as_tensor(labels))
                done += len(labels)
                if progress is not None:
                    progress(done)
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not outputs:
        return np.zeros((0, NUM_CLASSES), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(outputs).numpy(), torch.cat(targets).cpu().numpy().astype(np.int64)


def predict_logits(
    model: torch.nn.Module, loader: Iterable, device: torch.device | str, progress: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, 7) and labels (n,) for every batch of ``loader`` ((inputs, labels) or (inputs, labels,
    metadata)), with the model in eval mode; ``progress`` hears the number of images done after every batch."""
    return _eval_pass(model, loader, device, model, progress)


def predict_probs(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str,
    *,
    temperature: float = 1.0,
    tta: bool = False,
    progress: Callable[[int], None] | None = None,
    metadata: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities (n, 7) and labels (n,), optionally averaged over flips; ``progress`` as for
    :func:`predict_logits`. ``metadata``, for a model that takes it (:mod:`core.models.metadata`), holds one encoded
    row per image in the loader's order."""
    if metadata is None:
        return _eval_pass(model, loader, device, lambda x: class_probabilities(model, x, temperature, tta), progress)
    done = 0

    def step(x: torch.Tensor) -> torch.Tensor:
        nonlocal done  # the batches arrive in order: each takes the next rows
        rows, done = metadata[done : done + len(x)], done + len(x)
        return class_probabilities(partial(model, metadata=rows), x, temperature, tta)

    return _eval_pass(model, loader, device, step, progress)


# A batch holds at most as many pixels as 64 images of 224×224, whatever input size the checkpoint asks
# for: a 1024×1024 image takes about 260 MB of activations in ResNet-50, so 64 of them would take 16 GB.
MAX_BATCH_PIXELS = 64 * 224 * 224


def bounded_batch_size(requested: int, input_size: Sequence[int], tta: bool = False) -> int:
    """``requested`` images, lowered so that a batch of ``input_size`` (height, width) images stays within
    ``MAX_BATCH_PIXELS``, with their test-time augmentation views when ``tta`` (they go through the model
    together); at least 1."""
    pixels = input_size[0] * input_size[1] * view_count(tta)
    return max(1, min(requested, MAX_BATCH_PIXELS // pixels))
