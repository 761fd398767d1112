"""Acquisition shifts a real upload has, each a function of the decoded image (before the model's fitting,
:func:`core.data.images.fit_to_source`): the robustness report (:mod:`core.evaluation.robustness`) evaluates a model
under each one.

They stand for what differs between our 200×150 HAM10000 copies and an image someone uploads: public
dermoscopy sets ship square crops of the field of view, images come at other resolutions, through heavier
JPEG compression, under another white balance, and in any orientation.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image
from torchvision.transforms.v2 import functional as F

Shift = Callable[[Image.Image], Image.Image]

JPEG_QUALITY = 50
# A warm cast, as a camera left on daylight white balance gives under tungsten light: red ×1.15, green
# unchanged, blue ×0.85 (clipped at 255).
WARM_CAST = (1.15, 1.0, 0.85)


def square_crop(img: Image.Image) -> Image.Image:
    """The largest centred square of the field, as ISIC archive exports often ship."""
    side = min(img.size)
    return F.center_crop(img, [side, side])


def scale_up(img: Image.Image) -> Image.Image:
    """The same field at twice the resolution."""
    return img.resize((2 * img.width, 2 * img.height), Image.Resampling.LANCZOS)


def scale_down(img: Image.Image) -> Image.Image:
    """The same field at half the resolution."""
    return img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS)


def jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    """The image saved as a JPEG of ``quality`` and decoded again, as a messaging app or a web form sends it."""
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def colour_cast(img: Image.Image, gains: tuple[float, float, float] = WARM_CAST) -> Image.Image:
    """Each channel multiplied by its gain in ``gains`` (red, green, blue): another white balance."""
    red, green, blue = gains
    return img.convert("RGB", (red, 0, 0, 0, 0, green, 0, 0, 0, 0, blue, 0))


def rotate_90(img: Image.Image) -> Image.Image:
    """A quarter turn counter-clockwise: a landscape field becomes a portrait one."""
    return img.transpose(Image.Transpose.ROTATE_90)


SHIFTS: dict[str, Shift] = {
    "square_crop": square_crop,
    "scale_2x": scale_up,
    "scale_half": scale_down,
    f"jpeg_q{JPEG_QUALITY}": jpeg,
    "warm_cast": colour_cast,
    "rotate_90": rotate_90,
}
DESCRIPTIONS = {
    "clean": "the images as they are",
    "square_crop": "square centre crop of the field of view",
    "scale_2x": "the image at 2× its size",
    "scale_half": "the image at ½ its size",
    f"jpeg_q{JPEG_QUALITY}": f"saved again as JPEG quality {JPEG_QUALITY}",
    "warm_cast": "warm colour cast: red ×{:g}, green ×{:g}, blue ×{:g}".format(*WARM_CAST),
    "rotate_90": "rotated 90° (portrait)",
}
