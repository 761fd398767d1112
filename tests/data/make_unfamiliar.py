"""Write tests/data/unfamiliar/: images that are not dermoscopy, for measuring the "unfamiliar image" warning.

    python tests/data/make_unfamiliar.py

Everything comes from this machine, without a download: photographs and graphics that ship inside installed
packages (scikit-learn's sample images, Matplotlib's sample data), cut into several views, and generated
pictures of the kinds people upload by mistake: documents, app screenshots, clinical photos of skin taken
without a dermatoscope (a mole small in a frame of unevenly lit skin and background) and histology-like
H&E textures. The file name's prefix is its kind. The same seed writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import sklearn.datasets
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent / "unfamiliar"
SIZE = (300, 225)  # 4:3 like HAM10000, larger than the model's 200×150
rng = np.random.default_rng(11)


def save(image: Image.Image, name: str) -> None:
    image.convert("RGB").resize(SIZE, Image.Resampling.LANCZOS).save(OUT / f"{name}.jpg", quality=85)


def packaged() -> None:
    """Natural photographs and graphics shipped with scikit-learn and Matplotlib, whole and in crops."""
    sk = Path(sklearn.datasets.__file__).parent / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    for path in (sk / "china.jpg", sk / "flower.jpg", mpl / "grace_hopper.jpg"):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        save(image, f"photo-{path.stem}")
        for i in range(3):
            cw, ch = int(w * rng.uniform(0.3, 0.6)), int(h * rng.uniform(0.3, 0.6))
            x, y = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
            save(image.crop((x, y, x + cw, y + ch)), f"photo-{path.stem}-crop{i}")
    for path in (mpl / "logo2.png", mpl / "Minduka_Present_Blue_Pack.png"):
        rgba = Image.open(path).convert("RGBA")
        image = Image.new("RGB", rgba.size, "white")
        image.paste(rgba, mask=rgba)
        save(image, f"graphic-{path.stem.lower()}")


def words(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, fill, size: int) -> None:
    """A line of grey-box "words" with real letters, as text looks at thumbnail scale."""
    while x < width:
        n = int(rng.integers(2, 9))
        draw.text((x, y), "".join(chr(int(c)) for c in rng.integers(97, 123, n)), fill=fill, font_size=size)
        x += int(n * size * 0.6) + size


def document(i: int) -> None:
    page = Image.new("RGB", (600, 450), (255, 255, 255) if i % 2 else (246, 244, 236))
    draw = ImageDraw.Draw(page)
    y, size = 30, int(rng.integers(12, 22))
    draw.text((40, y), "Patient report" if i % 3 else "Invoice", fill="black", font_size=size + 10)
    y += size + 30
    while y < 420:
        words(draw, 40, y, 540, (20, 20, 20), size)
        y += int(size * 1.6)
        if i % 3 == 0 and y < 300 and rng.random() < 0.3:  # a table
            for row in range(4):
                for col in range(4):
                    draw.rectangle((40 + col * 130, y + row * 24, 170 + col * 130, y + 24 + row * 24), outline="black")
            y += 110
    save(page, f"document-{i}")


def screenshot(i: int) -> None:
    palette = [(33, 37, 41), (248, 249, 250), (13, 110, 253), (108, 117, 125), (25, 135, 84), (255, 255, 255)]
    dark = i % 2 == 0
    shot = Image.new("RGB", (800, 600), palette[0] if dark else palette[1])
    draw = ImageDraw.Draw(shot)
    draw.rectangle((0, 0, 800, 50), fill=palette[2] if i % 3 else palette[3])
    draw.text((20, 12), "Dashboard", fill="white", font_size=24)
    draw.rectangle((0, 50, 180, 600), fill=(52, 58, 64) if dark else (233, 236, 239))
    for k in range(8):
        draw.text((20, 80 + k * 40), f"Menu item {k}", fill="white" if dark else "black", font_size=16)
    for k in range(int(rng.integers(3, 7))):
        x, y = int(rng.integers(200, 600)), int(rng.integers(80, 500))
        draw.rounded_rectangle((x, y, x + 170, y + 70), 8, fill=palette[int(rng.integers(2, 6))], outline="grey")
        draw.text((x + 12, y + 22), "Button" if k % 2 else "OK", fill="black", font_size=18)
    words(draw, 200, 560, 780, "white" if dark else "black", 14)
    save(shot, f"screenshot-{i}")


def skin_photo(i: int) -> None:
    """Skin photographed with a phone: uneven light, background at the edges, a small lesion, some hair."""
    w, h = 640, 480
    tones = [(224, 172, 138), (198, 134, 66), (241, 194, 160), (141, 85, 36), (255, 219, 172), (176, 120, 90)]
    tone = np.array(tones[i % len(tones)], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 0.75 + 0.35 * np.cos((xx / w - rng.uniform(0.2, 0.8)) * 2.5) * np.cos((yy / h - 0.5) * 2.0)
    skin = tone * light[..., None] + rng.normal(0, 6, (h, w, 1))
    # The body's outline: background (a wall or a sheet) beyond a curved edge.
    edge = w * rng.uniform(0.6, 0.9) + 40 * np.sin(yy / h * 3 + i)
    background = np.array([(90, 110, 140), (235, 235, 230), (60, 60, 60), (150, 170, 120)][i % 4], np.float32)
    pixels = np.where((xx > edge)[..., None], background, skin)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = int(rng.integers(150, 350)), int(rng.integers(150, 330)), int(rng.integers(8, 30))
    draw.ellipse((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=(90, 55, 35) if i % 3 else (60, 35, 30))
    for _ in range(int(rng.integers(0, 40))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.line((x, y, x + int(rng.integers(-30, 30)), y + int(rng.integers(10, 40))), fill=(50, 35, 25), width=1)
    save(image.filter(ImageFilter.GaussianBlur(1.2)), f"clinical-{i}")


def histology(i: int) -> None:
    """H&E-like tissue: pink stroma with fibres and purple nuclei."""
    w, h = 600, 450
    base = np.array([(236, 170, 200), (225, 150, 190), (245, 200, 215)][i % 3], np.float32)
    pixels = base + rng.normal(0, 10, (h, w, 1))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.line((x, y, x + int(rng.integers(-80, 80)), y + int(rng.integers(-30, 30))), fill=(210, 110, 160), width=3)
    for _ in range(int(rng.integers(250, 600))):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(3, 8))
        shade = int(rng.integers(60, 120))
        draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=(shade, 40, shade + 80))
    if i % 2:
        for _ in range(5):  # empty lumen spaces
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(20, 50))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 245, 250))
    save(image.filter(ImageFilter.GaussianBlur(0.8)), f"histology-{i}")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    packaged()
    for i in range(6):
        document(i)
        screenshot(i)
        histology(i)
    for i in range(8):
        skin_photo(i)


if __name__ == "__main__":
    main()
