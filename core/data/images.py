"""Decoding user and dataset images into the RGB the models expect.

Uploads come from phones, dermatoscopes and image editors: rotated by EXIF, with
alpha, palettes, CMYK or 16-bit depth. Everything is normalised to 8-bit RGB
here so the data pipeline and the predictor decode identically.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes | BinaryIO

# Decoded size, checked from the header before any pixel is decoded. A 24-megapixel dermatoscope photo is
# the largest real input; beyond 40 megapixels a file is most likely a decompression bomb (a few kilobytes
# of PNG can declare gigapixels). The limits keep one image under about 500 MB from decode to 8-bit RGB:
# Pillow holds 8-bit RGB in 4 bytes a pixel, and 16-bit, float and transparent images need a second
# full-size buffer to become RGB, so they get half the pixels.
MAX_PIXELS = 40_000_000
MAX_PIXELS_DEEP = 20_000_000
_DEEP_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
DEEP_MODES = _DEEP_GREY | {"RGBA", "RGBa", "LA", "La", "PA"}
# What an image someone asks about (an upload, a file given to the CLI) must have to be worth a diagnosis:
# below 32 pixels a lesion has no visible structure (HAM10000's are 600×450), and dermoscopy is never
# more elongated than 4:1. Dataset images are not held to these (see open_image's ``upload``).
MIN_SIDE = 32
MAX_ASPECT = 4.0

# Pillow's own decompression-bomb guard (a warning above MAX_IMAGE_PIXELS, an error above twice that, with
# its own wording) follows the same limit, so no Pillow user in the process decodes more than we would.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """An image that cannot be used, with a message meant for the person who supplied it."""


def _pixel_limit(mode: str) -> int:
    return MAX_PIXELS_DEEP if mode in DEEP_MODES else MAX_PIXELS


def _limits_text() -> str:
    return (
        f"at most {MAX_PIXELS // 1_000_000} megapixels are accepted ({MAX_PIXELS_DEEP // 1_000_000} for "
        "16-bit, floating-point or transparent images); downscale it first"
    )


def _check_size(name: str, width: int, height: int, mode: str, upload: bool) -> None:
    pixels = width * height
    if pixels > _pixel_limit(mode):
        raise ImageError(
            f"{name} is too large: {width}×{height} pixels ({pixels / 1e6:.1f} megapixels, "
            f"mode {mode}); {_limits_text()}."
        )
    if not upload:
        return
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{name} is only {width}×{height} pixels, too small to show a lesion: an image needs "
            f"at least {MIN_SIDE} pixels on its shorter side. Use the original photo, not a thumbnail."
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            f"{name} is {width}×{height} pixels, {max(width, height) / min(width, height):.1f}:1; "
            f"a dermoscopy image is never more elongated than {MAX_ASPECT:.0f}:1. "
            "Crop it around the lesion."
        )


def _bomb_message(name: str, exc: Exception) -> str:
    # Pillow refuses beyond twice MAX_IMAGE_PIXELS before handing over the header; its message has the count.
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f" ({int(found.group(1)) / 1e6:.1f} megapixels)" if found else ""
    return f"{name} is too large{size}; {_limits_text()}."


def _stretch_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale to 8-bit "L", rescaling the actual range instead of clipping.

    In place in float32 (exact for 16-bit values): one buffer of 4 bytes a pixel besides the source.
    """
    lo, hi = img.getextrema()
    arr = np.array(img, dtype=np.float32)
    if hi > lo:
        arr -= lo
        arr *= 255.0 / (hi - lo)
        np.rint(arr, out=arr)
    else:
        arr[...] = 0
    return Image.fromarray(arr.astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _DEEP_GREY:
        return _stretch_to_8bit(img).convert("RGB")
    if img.mode in ("P", "PA", "RGBa", "La"):
        img = img.convert("RGBA")  # a palette's transparency becomes alpha
    if img.mode in ("RGBA", "LA"):
        # Transparent pixels carry no skin; white keeps them from looking like dark pigment. Pasting through
        # the alpha blends exactly as alpha_composite onto white would, without full-size RGBA copies.
        rgb = Image.new("RGB", img.size, (255, 255, 255))
        rgb.paste(img, mask=img)
        return rgb
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, 1


def _shrink(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Box-average by an integer factor while the result stays at least twice ``target`` (width, height):
    the later LANCZOS resize then sees no difference, and the full-size image is released at once."""
    factor = min(img.width // (2 * target[0]), img.height // (2 * target[1]))
    return img.reduce(factor) if factor >= 2 else img


def open_image(source: ImageSource, *, draft_size: tuple[int, int] | None = None, upload: bool = False) -> Image.Image:
    """Decode ``source`` to an upright 8-bit RGB image or raise :class:`ImageError`.

    The header's size is checked before decoding (:data:`MAX_PIXELS`, :data:`MAX_PIXELS_DEEP`). With
    ``upload`` the image must also be big and square enough to diagnose (:data:`MIN_SIDE`,
    :data:`MAX_ASPECT`); dataset images are taken as their dataset has them.

    ``draft_size`` (width, height) is the size the image is headed for: the JPEG decoder skips detail a
    later downscale would discard (DCT scaling), and other images are reduced to twice that size right
    after decoding, which makes large photos fast to load and small in memory.
    """
    name = str(source) if isinstance(source, (str, Path)) else "the uploaded file"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            # Pillow warns from its limit (ours) up to twice it; _check_size says the same with the real size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            _check_size(name, img.width, img.height, img.mode, upload)
            if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
                raise ImageError(f"{name} is an animation ({img.n_frames} frames); upload a single still image.")
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no full-size copy when already upright
            rgb = _to_rgb(img)
        return _shrink(rgb, draft_size) if draft_size is not None else rgb
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(name, exc)) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image PIL can read; use a JPEG or PNG file.") from None
    except FileNotFoundError:
        raise ImageError(f"{name} does not exist.") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated and corrupt data as OSError ("image file is truncated").
        raise ImageError(f"{name} is damaged or truncated and cannot be decoded ({exc}).") from None


# How an image of another shape or size is brought to a model's source size: each rule is the one scale factor
# applied to both sides (never a stretch), after which the image is centre-cropped and/or padded to the source
# size. "crop" covers the source size (the longer relative side is cut), "pad" fits inside it, "scale" brings
# the shorter side to the source's shorter side. FIT_RULE is "scale": it keeps the lesion at the size the model
# learnt, and on the whole validation split with flip TTA it lost least under a square crop of the field and a 90°
# turn (balanced accuracy 0.730 and 0.728, against "crop"'s 0.709 and 0.730, which enlarges a square upload by a
# third; bench/fitting.py, MODEL_CARD.md).
FIT_RULES = ("crop", "pad", "scale")
FIT_RULE = "scale"


def _centre_on(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre-crop each side longer than ``size`` (width, height), then reflect-pad each shorter one: the margin
    looks like the skin at the image's edge, not like a black frame the model never saw in training."""
    width, height = min(img.width, size[0]), min(img.height, size[1])
    left, top = (img.width - width) // 2, (img.height - height) // 2
    arr = np.asarray(img.crop((left, top, left + width, top + height)))
    pad_w, pad_h = size[0] - width, size[1] - height
    if pad_w or pad_h:
        arr = np.pad(arr, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), "reflect")
    return Image.fromarray(arr)


def fit_to_source(img: Image.Image, source_size: tuple[int, int], rule: str = FIT_RULE) -> Image.Image:
    """Bring an image to the (width, height) its model's training images had, by ``rule`` (see
    :data:`FIT_RULES`).

    The reference model learnt from 600×450 dermoscopy downscaled to 200×150; a
    full-resolution photo must get the same treatment or it is out of distribution.
    """
    size = tuple(source_size)
    if img.size == size:
        return img
    return _centre_on(img.resize(_scaled_size(img.size, size, rule), Image.Resampling.LANCZOS), size)


def _scaled_size(image_size: tuple[int, int], size: tuple[int, int], rule: str) -> tuple[int, int]:
    """The (width, height) ``rule`` scales an image of ``image_size`` to before it is centred on ``size``."""
    width, height = image_size
    if rule == "crop":
        factor = max(size[0] / width, size[1] / height)
    elif rule == "pad":
        factor = min(size[0] / width, size[1] / height)
    elif rule == "scale":
        factor = min(size) / min(width, height)
    else:
        raise ValueError(f"unknown fitting rule {rule!r}; choose from {', '.join(FIT_RULES)}")
    return max(1, round(width * factor)), max(1, round(height * factor))


def fit_margins(image_size: tuple[int, int], source_size: tuple[int, int], rule: str = FIT_RULE) -> str:
    """What :func:`fit_to_source` cuts off or mirrors of an image of ``image_size`` (width, height), in words for
    the person who uploaded it; "" when scaling alone fits it (same shape)."""
    size = tuple(source_size)
    scaled = _scaled_size(image_size, size, rule)
    said = []
    for axis, sides in ((0, "sides"), (1, "top and bottom")):
        if scaled[axis] > size[axis] + 1:
            said.append(f"its {sides} cut off")
        elif scaled[axis] < size[axis] - 1:
            said.append(f"its {sides} filled by mirroring the image's edges")
    return " and ".join(said)


def upright_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) an encoded image has once turned upright by its EXIF orientation, read from its header
    alone; None when the header cannot be read (decoding says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            turned = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return (height, width) if turned else (width, height)
