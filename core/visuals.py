"""Image-side helpers for the app's Diagnose and Evaluate pages. No Streamlit here.

- :func:`dermoscopy_check`: a cheap colour heuristic that flags uploads which do not look
  like dermoscopy (screenshots, documents, greyscale scans, photos of other things);
- :func:`feature_map_grid`: a tiled picture of a layer's most active channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Calibrated on 3000 HAM10000 images: 1 % have fewer warm pixels than this, none are mostly grey or white.
MIN_WARM_FRACTION = 0.25
MAX_GREY_FRACTION = 0.7
MAX_WHITE_FRACTION = 0.4
LOW_CONFIDENCE = 0.5


@dataclass(frozen=True)
class ImageCheck:
    looks_dermoscopic: bool
    reasons: tuple[str, ...]
    warm_fraction: float
    grey_fraction: float
    white_fraction: float


def dermoscopy_check(image: Image.Image) -> ImageCheck:
    """Whether ``image`` has the colour make-up of a dermoscopy photo.

    Dermoscopy shows skin filling the frame: reddish-brown hues dominate, few pixels are
    colourless and almost none are paper-white. The check cannot tell a lesion from other
    skin; it only catches inputs that are clearly something else, and says why.
    """
    small = np.asarray(image.convert("RGB").resize((64, 48), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    hi, lo = small.max(axis=-1), small.min(axis=-1)
    warm = float(((r >= g) & (r >= b)).mean())
    grey = float(((hi - lo) < 0.04).mean())
    white = float((lo > 0.92).mean())
    reasons = []
    if grey > MAX_GREY_FRACTION:
        reasons.append(f"it is almost colourless ({grey:.0%} grey pixels); dermoscopy is in colour")
    if white > MAX_WHITE_FRACTION:
        reasons.append(f"{white:.0%} of it is plain white, like a document or a screenshot")
    if warm < MIN_WARM_FRACTION and grey <= MAX_GREY_FRACTION:
        reasons.append(f"only {warm:.0%} of its pixels have skin-like (reddish) hues")
    return ImageCheck(not reasons, tuple(reasons), warm, grey, white)


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
