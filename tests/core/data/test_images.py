"""core.data.images: the decoded size is bounded before decoding, memory while decoding, and an image to
diagnose must be big and square enough to mean something."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data.images import ImageError, fit_margins, fit_to_source, open_image, upright_size
from tests.conftest import ROOT, write_png

# What one upload may take from decode to 8-bit RGB, the child's interpreter, numpy and Pillow included.
MEMORY_BUDGET_MB = 500
TARGET = (200, 150)  # the reference model's source size: the draft size uploads are decoded for

_CHILD = """
import json, resource, sys
# A regression must fail the test, not take gigabytes from the machine running it.
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from core.data.images import ImageError, fit_margins, fit_to_source, open_image, upright_size

def peak_mb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024

result = {"before_mb": peak_mb()}
try:
    result["size"] = open_image(sys.argv[1], draft_size=(200, 150)).size
except ImageError as exc:
    result["error"] = str(exc)
result["peak_mb"] = peak_mb()
print(json.dumps(result))
"""


def open_in_child(path: Path) -> dict:
    """Decode ``path`` as an upload is decoded, in a fresh process: its size or error, and its peak memory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# (width, height, PNG bit depth, PNG colour type) and what the refusal says. The first two are the files
# from the issue: a 171 KB 16-bit PNG that took 3.6 GB to decode, a 370 KB RGBA one that took 2.9 GB.
REFUSED = {
    "16-bit grey 9400x9400": ((9400, 9400, 16, 0), "is too large (88.4 megapixels)"),
    "RGBA 9400x9400": ((9400, 9400, 8, 6), "is too large (88.4 megapixels)"),
    "16-bit grey 6000x4000": ((6000, 4000, 16, 0), "is too large: 6000×4000 pixels (24.0 megapixels, mode I;16)"),
    "RGB 8000x6000": ((8000, 6000, 8, 2), "is too large: 8000×6000 pixels (48.0 megapixels, mode RGB)"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(REFUSED))
def test_huge_images_are_refused_before_decoding(tmp_path, case):
    (width, height, depth, colour), expected = REFUSED[case]
    path = write_png(tmp_path / "huge.png", width, height, bit_depth=depth, colour_type=colour)
    assert path.stat().st_size < 600_000
    result = open_in_child(path)
    assert expected in result.get("error", ""), result
    assert "at most 40 megapixels are accepted (20 for 16-bit, floating-point or transparent" in result["error"]
    assert result["peak_mb"] < MEMORY_BUDGET_MB, result


# Just under the limit of their kind: each is decoded and converted within the budget.
ACCEPTED = {
    "16-bit grey": (5000, 3990, 16, 0),
    "16-bit grey with alpha": (5000, 3990, 16, 4),
    "RGBA": (5000, 3990, 8, 6),
    "8-bit grey": (7300, 5470, 8, 0),
    "48-bit RGB": (7300, 5470, 16, 2),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(ACCEPTED))
def test_images_at_the_limit_decode_within_the_memory_budget(tmp_path, case):
    width, height, depth, colour = ACCEPTED[case]
    result = open_in_child(write_png(tmp_path / "big.png", width, height, bit_depth=depth, colour_type=colour))
    assert "error" not in result, result
    # Reduced right after decoding to at least twice the target, not kept at full size.
    w, h = result["size"]
    assert 2 * TARGET[0] <= w < 4 * TARGET[0] and 2 * TARGET[1] <= h < 4 * TARGET[1], result
    assert result["peak_mb"] < MEMORY_BUDGET_MB, result


@pytest.mark.integration
def test_a_palette_image_with_transparency_at_the_limit_stays_within_the_budget(tmp_path):
    palette = Image.new("P", (7300, 5470), 1)
    palette.putpalette([0, 0, 0, 200, 150, 120] * 128)
    palette.save(tmp_path / "palette.png", transparency=0)
    del palette
    result = open_in_child(tmp_path / "palette.png")
    assert "error" not in result and result["peak_mb"] < MEMORY_BUDGET_MB, result


@pytest.mark.integration
def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    path = tmp_path / "photo.jpg"
    # Written by another process: the full-size image needs 160 MB, which this one need not hold.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from PIL import Image; "
            "Image.new('RGB', (7300, 5470), (200, 150, 120)).save(sys.argv[1], quality=50)",
            str(path),
        ],
        check=True,
        timeout=120,
    )
    result = open_in_child(path)
    assert result["size"] == [457, 342], result  # DCT-scaled to 1/8, then halved
    # A full decode holds 7300×5470×4 bytes = 160 MB; the drafted one a sixty-fourth of that.
    assert result["peak_mb"] - result["before_mb"] < 50, result


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((8, 8), "only 8×8 pixels, too small"),
        ((1, 1), "only 1×1 pixels, too small"),
        ((10000, 10), "only 10000×10 pixels, too small"),
        ((31, 200), "at least 32 pixels on its shorter side"),
        ((129, 32), "129×32 pixels, 4.0:1; a dermoscopy image is never more elongated than 4:1"),
        ((60, 300), "60×300 pixels, 5.0:1"),
    ],
)
def test_uploads_too_small_or_elongated_to_diagnose_are_refused(size, expected):
    image = Image.new("RGB", size, (200, 150, 120))
    with pytest.raises(ImageError) as refused:
        open_image(image_bytes(image), upload=True)
    assert str(refused.value).startswith("the uploaded file is") and expected in str(refused.value)
    # Dataset images are taken as their dataset has them.
    assert open_image(image_bytes(image)).size == size


@pytest.mark.parametrize("size", [(32, 32), (128, 32), (32, 128), (200, 150)])
def test_uploads_at_the_size_limits_are_accepted(size):
    assert open_image(image_bytes(Image.new("RGB", size, (200, 150, 120))), upload=True).size == size


def image_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_transparency_becomes_white_exactly_as_alpha_compositing_does():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 4), dtype=np.uint8)
    rgba = Image.fromarray(pixels, "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    for image in (rgba, rgba.convert("LA"), rgba.convert("P")):
        reference = (
            expected
            if image.mode == "RGBA"
            else np.asarray(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
        )
        np.testing.assert_array_equal(np.asarray(open_image(image_bytes(image))), reference)


def test_exif_orientation_is_applied_before_the_reduction(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (2000, 1200), (200, 150, 120)).save(tmp_path / "phone.png", exif=exif)
    # Upright 1200×2000, reduced by 3 (the most that keeps 2 × 200×150): had the reduction come first,
    # it would have been by 4 (2000 // 400, 1200 // 300) and the result 300×500.
    assert open_image(tmp_path / "phone.png", draft_size=TARGET).size == (400, 667)


def test_upright_size_reads_the_header_and_its_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1200)).save(buffer, "JPEG", exif=exif)
    assert upright_size(buffer.getvalue()) == (1200, 2000) == open_image(buffer.getvalue()).size
    assert upright_size(b"not an image") is None


@pytest.mark.parametrize("size", [(600, 450), (450, 450), (450, 600), (1000, 450), (200, 150)])
def test_fit_margins_says_what_fitting_did(size):
    # A picture whose every pixel differs from its neighbours: what fitting cut or mirrored shows in its output.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    fitted = np.asarray(fit_to_source(image, (200, 150), "scale")).astype(int)
    said = fit_margins(size, (200, 150), "scale")
    # Reflect padding repeats column p + 1 at p - 1 around the image's edge column p; noise never does.
    mirrored_sides = any(np.array_equal(fitted[:, c - 1], fitted[:, c + 1]) for c in range(1, fitted.shape[1] - 1))
    assert ("sides filled by mirroring" in said) == mirrored_sides
    # The shorter side is brought to 150: a portrait image loses its top and bottom, a wide one its sides.
    assert ("top and bottom cut off" in said) == (size[1] > size[0])
    assert ("sides cut off" in said) == (size[0] / size[1] > 4 / 3 + 0.01)
    assert (said == "") == (size[0] * 3 == size[1] * 4)
