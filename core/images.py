"""Decoding user and dataset images into the RGB the models expect.

Uploads come from phones, dermatoscopes and image editors: rotated by EXIF, with
alpha, palettes, CMYK or 16-bit depth. Everything is normalised to 8-bit RGB
here so the data pipeline and the predictor decode identically.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes | BinaryIO

# A 200-megapixel photo is already far beyond any dermatoscope; beyond that it is
# most likely a decompression bomb, which would exhaust memory when decoded.
MAX_PIXELS = 200_000_000


class ImageError(ValueError):
    """An image that cannot be used, with a message meant for the person who supplied it."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: rescale the actual range to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry no skin; white keeps them from looking like dark pigment.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, 1


def open_image(source: ImageSource, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``source`` to an upright 8-bit RGB image or raise :class:`ImageError`.

    ``draft_size`` lets the JPEG decoder skip detail that a later downscale would
    discard (DCT scaling), which makes large photos several times faster to load.
    """
    name = str(source) if isinstance(source, (str, Path)) else "the uploaded file"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(
                        f"{name} is {img.width}×{img.height} pixels, more than the "
                        f"{MAX_PIXELS // 1_000_000} megapixels accepted; downscale it first."
                    )
                if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
                    raise ImageError(f"{name} is an animation ({img.n_frames} frames); upload a single still image.")
                if draft_size is not None and img.format == "JPEG":
                    img.draft("RGB", draft_size)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name} is too large to decode safely ({exc}).") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image PIL can read; use a JPEG or PNG file.") from None
    except FileNotFoundError:
        raise ImageError(f"{name} does not exist.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated and corrupt data as OSError ("image file is truncated").
        raise ImageError(f"{name} is damaged or truncated and cannot be decoded ({exc}).") from None


def fit_to_source(img: Image.Image, source_size: tuple[int, int]) -> Image.Image:
    """Bring an image to the (width, height) its model's training images had.

    The reference model learnt from 600×450 dermoscopy downscaled to 200×150; a
    full-resolution photo must get the same treatment or it is out of distribution.
    Other aspect ratios are centre-cropped to the source ratio first, as a
    dermatoscope's field of view is centred on the lesion.
    """
    if img.size == tuple(source_size):
        return img
    return ImageOps.fit(img, tuple(source_size), method=Image.Resampling.LANCZOS)
