"""Image-side helpers for the app's Diagnose and Evaluate pages. No Streamlit here.

- :func:`dermoscopy_check`: a cheap colour heuristic that flags uploads which do not look
  like dermoscopy (screenshots, documents, greyscale scans, photos of other things);
- :func:`feature_map_grid`: a tiled picture of a layer's most active channels.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from core.common.labels import NUM_CLASSES
from core.models.architectures import LesionNet


def _colourise(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to RGB with a perceptual map (viridis-like, via OpenCV)."""
    import cv2

    u8 = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def top_channels(maps: np.ndarray, n: int = 16) -> np.ndarray:
    """Indices of the ``n`` channels with the largest mean activation, strongest first."""
    means = maps.reshape(len(maps), -1).mean(axis=1)
    return np.argsort(-means, kind="stable")[:n]


def feature_map_grid(maps: np.ndarray, n: int = 16, cols: int = 4, cell: int = 96, gap: int = 4) -> Image.Image:
    """The ``n`` most active channels of a (C, h, w) activation, each scaled to [0, 1], tiled in a grid."""
    if maps.ndim != 3 or len(maps) == 0:
        raise ValueError(f"expected (C, h, w) feature maps, got shape {maps.shape}")
    chosen = top_channels(maps, n)
    rows = -(-len(chosen) // cols)
    canvas = np.full((rows * (cell + gap) - gap, cols * (cell + gap) - gap, 3), 255, dtype=np.uint8)
    for k, ch in enumerate(chosen):
        m = maps[ch].astype(np.float32)
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        tile = np.asarray(Image.fromarray(_colourise(m)).resize((cell, cell), Image.Resampling.NEAREST))
        y, x = divmod(k, cols)
        canvas[y * (cell + gap) : y * (cell + gap) + cell, x * (cell + gap) : x * (cell + gap) + cell] = tile
    return Image.fromarray(canvas, "RGB")


CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcampp": GradCAMPlusPlus,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,  # class-agnostic: the first principal component of the activations
}


CAM_METHOD_NAMES: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcampp": "Grad-CAM++",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM",
}


def _as_grad_leaf(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.detach().requires_grad_(True)


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    # Per module, because the trainer keeps frozen BatchNorm layers in eval mode while training.
    for module, mode in modes.items():
        module.training = mode


def gradcam(
    model: LesionNet, input_tensor: torch.Tensor, target_class: int | None = None, method: str = "gradcam"
) -> np.ndarray:
    """A class activation map of shape (H, W) with values in [0, 1] for one preprocessed image.

    ``input_tensor`` is (3, H, W) or (1, 3, H, W), normalised as the model expects;
    ``target_class`` is an index into ``CLASSES`` (``None``: the predicted class).
    The model's hooks, requires_grad flags and train/eval modes are left as they were; parameter
    ``.grad`` is cleared (the library zeroes it before its backward pass anyway). Not thread-safe
    for one model: the library's hooks would see other threads' passes.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    if target_class is not None and not 0 <= int(target_class) < NUM_CLASSES:
        raise ValueError(f"target_class must be 0..{NUM_CLASSES - 1}, got {target_class}")
    x = input_tensor.unsqueeze(0) if input_tensor.ndim == 3 else input_tensor
    if x.ndim != 4 or len(x) != 1:
        raise ValueError(f"expected one image as (3, H, W) or (1, 3, H, W), got {tuple(input_tensor.shape)}")
    if x.is_inference():
        x = x.clone()  # tensors made under inference_mode cannot enter an autograd graph
    layer = model.cam_layer()
    modes = _module_modes(model)
    # Registered before the library's own hooks so that they see the grad-requiring output.
    leaf_hook = layer.register_forward_hook(_as_grad_leaf)
    # The library registers its hooks when constructed and keeps them until released; a cached
    # instance would record activations on every plain prediction, so one lives per call.
    cam = CAM_METHODS[method](model=model, target_layers=[layer])
    try:
        targets = None if target_class is None else [ClassifierOutputTarget(int(target_class))]
        # Callers may be inside no_grad or inference_mode; CAMs need autograd regardless.
        with torch.inference_mode(False), torch.enable_grad():
            heat = cam(input_tensor=x, targets=targets)
    finally:
        cam.activations_and_grads.release()
        leaf_hook.remove()
        _restore_modes(modes)
        model.zero_grad(set_to_none=True)
    return np.nan_to_num(heat[0]).clip(0.0, 1.0).astype(np.float32)


def overlay(rgb_image: Image.Image | np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> Image.Image:
    """The heatmap in the jet colour map blended over the image; ``alpha`` is the heatmap's weight.

    The heatmap is resized to the image, so a map computed at the model's input
    size lays over the uploaded (un-resized) image directly.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    if isinstance(rgb_image, Image.Image):
        rgb_image = np.asarray(rgb_image.convert("RGB"))
    rgb = np.asarray(rgb_image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    mask = cv2.resize(np.asarray(heatmap, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(255 * mask.clip(0.0, 1.0)), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    # A plain blend: the library's show_cam_on_image divides by the brightest pixel afterwards,
    # which would brighten a dark dermoscopy photo and misrepresent its colours.
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour.astype(np.float32)
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


class _Captured(Exception):
    """Raised from the hook to skip the layers after the one asked for."""


def feature_maps(model: LesionNet, input_tensor: torch.Tensor, layer: str) -> np.ndarray:
    """The activations (C, h, w) of the module called ``layer`` for one preprocessed image.

    Not thread-safe for one model: while it runs, the capture hook ends every pass through
    ``layer``, whichever thread makes it (:class:`core.inference.predictor.Predictor` serialises them).
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"model has no layer {layer!r}; try one of {', '.join(model.feature_layers())}")
    x = input_tensor.unsqueeze(0) if input_tensor.ndim == 3 else input_tensor
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, inputs, output: torch.Tensor) -> None:
        captured.append(output)
        raise _Captured

    modes = _module_modes(model)
    handle = modules[layer].register_forward_hook(grab)
    model.eval()
    try:
        with torch.inference_mode():
            model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
        _restore_modes(modes)
    if not captured or captured[0].ndim != 4:
        raise ValueError(f"layer {layer!r} does not produce (C, h, w) feature maps")
    return captured[0][0].float().cpu().numpy()
