"""Write tests/data/unfamiliar/: pictures that are not dermoscopy, for fitting and measuring the unfamiliar-image check.

    python tests/data/make_unfamiliar.py

Everything comes from this machine, without a download: photographs and graphics that ship inside installed
packages (scikit-image's ``skimage.data``, scikit-learn's sample images, Matplotlib's sample data), cut into
several views, and generated pictures of the kinds people upload by mistake. Each file is
``KIND-INSTANCE-VIEW.jpg`` (300×225 JPEG): the kind (greyscale photo, document, fundus photograph, …), the picture
it was cut from and which view of it.

The pictures of a kind are split by instance, not by file, so that no view of a held-out picture is ever fitted
on: within each kind the instances are taken in a fixed order and every second one (the 2nd, 4th, …) goes to
``held-out/``, the others to ``fit/``. ``bench/similar.py`` fits the check's combined score on ``fit/`` and
reports on ``held-out/``. The same seed writes the same files.
"""

from __future__ import annotations

import gzip
import itertools
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import matplotlib
import numpy as np
import skimage.data
import sklearn.datasets
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LightSource
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFilter, ImageOps

OUT = Path(__file__).resolve().parent / "unfamiliar"
PARTS = ("fit", "held-out")
SIZE = (300, 225)  # 4:3 like HAM10000, larger than the model's 200×150
QUALITY = 80
W, H = 600, 450  # what the generated pictures are drawn at before they are cut and shrunk
SKLEARN = Path(sklearn.datasets.__file__).parent / "images"
MPL = Path(matplotlib.get_data_path()) / "sample_data"
rng = np.random.default_rng(11)

Views = list[Image.Image]


def four_three(image: Image.Image) -> Image.Image:
    """The largest centred 4:3 part of ``image`` at :data:`SIZE`, as a phone or screenshot tool would frame it."""
    return ImageOps.fit(image.convert("RGB"), SIZE, Image.Resampling.LANCZOS)


def crop(image: Image.Image, low: float = 0.45, high: float = 0.8) -> Image.Image:
    """A random 4:3 part covering ``low`` to ``high`` of the shorter side, mirrored half of the time."""
    w, h = image.size
    side = rng.uniform(low, high) * min(w, h * 4 / 3)
    cw, ch = int(side), int(side * 3 / 4)
    x, y = int(rng.uniform(0, w - cw + 1)), int(rng.uniform(0, h - ch + 1))
    part = image.crop((x, y, x + cw, y + ch))
    return ImageOps.mirror(part) if rng.random() < 0.5 else part


def alternate(
    generated: Iterable[tuple[str, Views]], photographs: Iterable[tuple[str, Views]]
) -> Iterator[tuple[str, Views]]:
    """Generated pictures and packaged photographs taken in turn, the photographs second: they fall on the held-out
    places, so the real pictures of a kind (the ones issue 24 named: a clock, text, cells, the moon, a fundus, a
    colour wheel, a temple by a lake) are never fitted on."""
    for pair in itertools.zip_longest(generated, photographs):
        yield from (item for item in pair if item is not None)


def views(image: Image.Image, n: int = 3) -> Views:
    """The whole picture and ``n - 1`` random parts of it."""
    image = image.convert("RGB")
    return [image, *(crop(image) for _ in range(n - 1))]


def packaged(name: str) -> Image.Image:
    """An image that ships with scikit-image (``skimage.data``), as an RGB PIL image (transparency on white)."""
    pixels = getattr(skimage.data, name)()
    if pixels.dtype != np.uint8:
        pixels = (pixels * 255).astype(np.uint8) if pixels.max() <= 1 else pixels.astype(np.uint8)
    image = Image.fromarray(pixels)
    return on_white(image) if image.mode in ("RGBA", "LA") else image.convert("RGB")


def on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba)
    return flat


def noise(image: Image.Image, sigma: float) -> Image.Image:
    """Sensor noise: what a generated flat picture lacks next to a photograph."""
    pixels = np.asarray(image, np.float32) + rng.normal(0, sigma, (image.height, image.width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    return xx, yy


def figure_image(fig: Figure) -> Image.Image:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


# --- greyscale photographs ----------------------------------------------------------------------------------------


def grey() -> Iterator[tuple[str, Views]]:
    """Black-and-white photographs, a third of the views toned like an old print or a warm screen."""
    # A photograph that other kinds show in colour falls on the same side here (china, rocket, astronaut and chelsea
    # held out; flower, coffee, the motorcycle and Grace Hopper fitted), so no held-out picture is fitted in grey.
    sources = {
        "coins": packaged("coins"),
        "camera": packaged("camera"),
        "flower": Image.open(SKLEARN / "flower.jpg"),
        "clock": packaged("clock"),
        "coffee": packaged("coffee"),
        "china": Image.open(SKLEARN / "china.jpg"),
        "motorcycle": Image.open(skimage_file("motorcycle_left.png")),
        "rocket": packaged("rocket"),
        "hopper": Image.open(MPL / "grace_hopper.jpg"),
        "astronaut": packaged("astronaut"),
        "motorcycle_right": Image.open(skimage_file("motorcycle_right.png")),
        "chelsea": packaged("chelsea"),
    }
    for name, image in sources.items():
        shown = views(ImageOps.grayscale(image).convert("RGB"))
        shown[-1] = ImageOps.colorize(ImageOps.grayscale(shown[-1]), (40, 26, 14), (250, 236, 210))
        yield name, shown


def skimage_file(name: str) -> Path:
    return Path(skimage.data.__file__).parent / name


# --- documents and text ---------------------------------------------------------------------------------------------


def words(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, fill, size: int) -> None:
    """A line of random lower-case words."""
    while x < width:
        n = int(rng.integers(2, 9))
        draw.text((x, y), "".join(chr(int(c)) for c in rng.integers(97, 123, n)), fill=fill, font_size=size)
        x += int(n * size * 0.6) + size


def page(i: int) -> Image.Image:
    """A letter, invoice or form: text, headings, sometimes a table or a logo."""
    paper = [(255, 255, 255), (246, 244, 236), (250, 250, 245), (255, 253, 240)][i % 4]
    sheet = Image.new("RGB", (W, H), paper)
    draw = ImageDraw.Draw(sheet)
    ink = [(20, 20, 20), (20, 30, 90), (60, 60, 60)][i % 3]
    y, size = 30, int(rng.integers(11, 20))
    draw.text(
        (40, y), ["Patient report", "Invoice", "Referral letter", "Lab results"][i % 4], fill=ink, font_size=size + 10
    )
    if i % 2:
        draw.rectangle((480, 20, 560, 60), fill=[(200, 40, 40), (20, 100, 180), (30, 140, 80)][i % 3])
    y += size + 30
    while y < H - 30:
        words(draw, 40, y, W - 60, ink, size)
        y += int(size * 1.6)
        if i % 3 == 0 and y < 300 and rng.random() < 0.3:
            for row in range(4):
                for col in range(4):
                    draw.rectangle((40 + col * 130, y + row * 24, 170 + col * 130, y + 24 + row * 24), outline=ink)
            y += 110
    return sheet


def photographed(sheet: Image.Image) -> Image.Image:
    """A page photographed on a desk: tilted, shaded, on a darker background."""
    desk = Image.new("RGB", (W, H), tuple(int(c) for c in rng.integers(60, 160, 3)))
    small = sheet.resize((int(W * 0.8), int(H * 0.8))).rotate(
        float(rng.uniform(-12, 12)), expand=True, fillcolor=(0, 0, 0)
    )
    mask = small.convert("L").point(lambda v: 255 if v > 0 else 0)
    desk.paste(small, (int((W - small.width) / 2), int((H - small.height) / 2)), mask)
    xx, yy = grid()
    shade = 0.75 + 0.25 * (xx / W) * (1 - 0.5 * yy / H)
    return noise(Image.fromarray((np.asarray(desk) * shade[..., None]).astype(np.uint8)), 4)


def document() -> Iterator[tuple[str, Views]]:
    def pages() -> Iterator[tuple[str, Views]]:
        for i in range(8):
            sheet = page(i)
            yield f"page{i}", [sheet, crop(sheet), photographed(sheet)]

    yield from alternate(
        pages(), [("skimage_text", views(packaged("text"))), ("skimage_page", views(packaged("page")))]
    )


# --- screenshots ------------------------------------------------------------------------------------------------------


def screenshot() -> Iterator[tuple[str, Views]]:
    accents = [(13, 110, 253), (108, 117, 125), (220, 53, 69), (25, 135, 84), (255, 75, 75), (111, 66, 193)]
    for i in range(8):
        dark = i % 2 == 0
        shot = Image.new("RGB", (W, H), (33, 37, 41) if dark else (248, 249, 250))
        draw = ImageDraw.Draw(shot)
        accent = accents[i % len(accents)]
        draw.rectangle((0, 0, W, 40), fill=accent)
        draw.text((16, 10), ["Dashboard", "Inbox", "Settings", "Chat"][i % 4], fill="white", font_size=20)
        if i % 4 != 3:
            draw.rectangle((0, 40, 140, H), fill=(52, 58, 64) if dark else (233, 236, 239))
            for k in range(8):
                draw.text((14, 60 + k * 32), f"Menu item {k}", fill="white" if dark else "black", font_size=13)
        else:  # a chat: bubbles left and right
            for k in range(7):
                left = k % 2 == 0
                x = 20 if left else 260
                draw.rounded_rectangle(
                    (x, 60 + k * 52, x + 300, 100 + k * 52), 14, fill=(229, 229, 234) if left else accent
                )
        for k in range(int(rng.integers(3, 7))):
            x, y = int(rng.integers(160, 420)), int(rng.integers(60, 380))
            draw.rounded_rectangle((x, y, x + 160, y + 54), 8, fill=accents[int(rng.integers(0, 6))], outline="grey")
            draw.text((x + 12, y + 16), "Button" if k % 2 else "OK", fill="white", font_size=15)
        if i % 3 == 1:  # a picture in the page
            x, y = int(rng.integers(160, 400)), int(rng.integers(60, 260))
            photo = four_three(Image.open(SKLEARN / ("china.jpg" if i % 2 else "flower.jpg"))).resize((180, 135))
            shot.paste(photo, (x, y))
        words(draw, 160, H - 30, W - 20, "white" if dark else "black", 12)
        yield f"app{i}", views(shot)


# --- charts and maps --------------------------------------------------------------------------------------------------


def chart() -> Iterator[tuple[str, Views]]:
    def figure(draw: Callable[[Figure], None], style_dark: bool = False) -> Image.Image:
        fig = Figure(figsize=(6, 4.5), dpi=100, facecolor="black" if style_dark else "white")
        draw(fig)
        return figure_image(fig)

    x = np.linspace(0, 10, 200)

    def lines(fig: Figure) -> None:
        ax = fig.add_subplot()
        for k in range(4):
            ax.plot(x, np.sin(x + k) * (k + 1) + rng.normal(0, 0.2, x.size), label=f"series {k}")
        ax.legend()
        ax.set_title("Training loss")

    def bars(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.bar(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], rng.integers(50, 600, 7), color="tab:orange")
        ax.set_ylabel("images")

    def scatter(fig: Figure) -> None:
        ax = fig.add_subplot()
        pts = rng.normal(size=(300, 2))
        ax.scatter(pts[:, 0], pts[:, 1], c=pts[:, 0] * pts[:, 1], cmap="plasma")
        ax.grid(True)

    def pie(fig: Figure) -> None:
        fig.add_subplot().pie(rng.integers(5, 30, 5), labels=list("ABCDE"), autopct="%1.0f%%")

    def heatmap(fig: Figure) -> None:
        ax = fig.add_subplot()
        ax.imshow(np.load(MPL / "axes_grid" / "bivariate_normal.npy"), cmap="inferno")
        fig.colorbar(ax.images[0])

    def stocks(fig: Figure) -> None:
        ax = fig.add_subplot()
        prices = np.load(MPL / "goog.npz")["price_data"]
        ax.plot(prices["date"][-250:], prices["adj_close"][-250:], color="tab:blue")
        ax.fill_between(prices["date"][-250:], prices["adj_close"][-250:], alpha=0.3)
        ax.set_title("GOOG")

    def eeg(fig: Figure) -> None:
        ax = fig.add_subplot()
        data = np.fromfile(MPL / "eeg.dat", dtype=float).reshape(-1, 4)[:800]
        for k in range(4):
            ax.plot(data[:, k] + k * 3, color="lime" if k % 2 else "cyan", lw=0.8)
        ax.set_facecolor("black")

    def relief(cmap: str, name: str) -> Callable[[Figure], None]:
        def draw(fig: Figure) -> None:
            ax = fig.add_axes((0, 0, 1, 1))
            with np.load(MPL / name) as dem:
                z = dem["elevation"] if "elevation" in dem else dem["topo"]
            ax.imshow(LightSource(315, 45).shade(z, cmap=matplotlib.colormaps[cmap], vert_exag=0.05, blend_mode="soft"))
            ax.set_axis_off()

        return draw

    yield "lines", views(figure(lines))
    yield "bars", views(figure(bars))
    yield "scatter", views(figure(scatter))
    yield "pie", views(figure(pie))
    yield "heatmap", views(figure(heatmap))
    yield "stocks", views(figure(stocks))
    yield "eeg", views(figure(eeg, style_dark=True))
    yield "topobathy", views(figure(relief("gist_earth", "topobathy.npz")))
    yield "jacksboro", views(figure(relief("copper", "jacksboro_fault_dem.npz")))


# --- cells and tissue -------------------------------------------------------------------------------------------------


def histology(i: int) -> Image.Image:
    """H&E-like tissue: pink stroma with fibres and purple nuclei, sometimes empty lumens."""
    base = np.array([(236, 170, 200), (225, 150, 190), (245, 200, 215), (230, 160, 175)][i % 4], np.float32)
    image = Image.fromarray(np.clip(base + rng.normal(0, 10, (H, W, 1)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        draw.line((x, y, x + int(rng.integers(-80, 80)), y + int(rng.integers(-30, 30))), fill=(210, 110, 160), width=3)
    for _ in range(int(rng.integers(250, 600))):
        x, y, r = int(rng.integers(0, W)), int(rng.integers(0, H)), int(rng.integers(3, 8))
        shade = int(rng.integers(60, 120))
        draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=(shade, 40, shade + 80))
    if i % 2:
        for _ in range(5):
            x, y, r = int(rng.integers(0, W)), int(rng.integers(0, H)), int(rng.integers(20, 50))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 245, 250))
    return image.filter(ImageFilter.GaussianBlur(0.8))


def fluorescence(i: int) -> Image.Image:
    """Fluorescence microscopy: glowing nuclei and filaments on black."""
    image = Image.new("RGB", (W, H), "black")
    draw = ImageDraw.Draw(image)
    colours = [(40, 120, 255), (60, 255, 90), (255, 60, 60)]
    for _ in range(120):
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        draw.line(
            (x, y, x + int(rng.integers(-60, 60)), y + int(rng.integers(-60, 60))), fill=colours[(i + 1) % 3], width=1
        )
    for _ in range(int(rng.integers(40, 120))):
        x, y, r = int(rng.integers(0, W)), int(rng.integers(0, H)), int(rng.integers(6, 14))
        draw.ellipse((x - r, y - r * 0.8, x + r, y + r * 0.8), fill=colours[i % 3])
    return image.filter(ImageFilter.GaussianBlur(1.5))


def blood_smear() -> Image.Image:
    """Red cells with pale centres on a pale background, a few purple white cells."""
    image = Image.new("RGB", (W, H), (238, 226, 222))
    draw = ImageDraw.Draw(image)
    for _ in range(260):
        x, y, r = int(rng.integers(0, W)), int(rng.integers(0, H)), int(rng.integers(12, 17))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(214, 120, 122), outline=(190, 90, 95), width=2)
        draw.ellipse((x - r // 3, y - r // 3, x + r // 3, y + r // 3), fill=(230, 170, 168))
    for _ in range(4):
        x, y, r = int(rng.integers(0, W)), int(rng.integers(0, H)), 22
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(110, 60, 150))
    return noise(image.filter(ImageFilter.GaussianBlur(1.0)), 3)


def cells() -> Iterator[tuple[str, Views]]:
    generated = [(f"he{i}", views(histology(i))) for i in range(4)]
    generated += [(f"fluorescence{i}", views(fluorescence(i))) for i in range(3)] + [("smear", views(blood_smear()))]
    yield from alternate(
        generated, [("skimage_cell", views(packaged("cell"))), ("skimage_ihc", views(packaged("immunohistochemistry")))]
    )


# --- astronomy --------------------------------------------------------------------------------------------------------


def body(colour: tuple[int, int, int], radius: int, craters: int, bands: bool = False) -> Image.Image:
    """A moon or planet: a shaded disc on a black sky, with craters or cloud bands."""
    xx, yy = grid()
    cx, cy = W / 2 + rng.uniform(-60, 60), H / 2 + rng.uniform(-30, 30)
    d = np.hypot(xx - cx, yy - cy) / radius
    light = np.clip(1.1 - 0.6 * ((xx - cx + radius * 0.4) / radius) ** 2 - 0.4 * d**2, 0, 1)
    surface = np.array(colour, np.float32) * light[..., None]
    if bands:
        surface *= (0.85 + 0.15 * np.sin((yy - cy) / radius * 12))[..., None]
    pixels = np.where((d < 1)[..., None], surface, 0) + rng.normal(0, 3, (H, W, 1))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(craters):
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.85) * radius
        x, y, s = cx + r * math.cos(a), cy + r * math.sin(a), rng.uniform(4, 20)
        draw.ellipse((x - s, y - s, x + s, y + s), outline=tuple(int(c * 0.5) for c in colour), width=2)
    for _ in range(60):
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        if math.hypot(x - cx, y - cy) > radius:
            draw.point((x, y), fill=(255, 255, 255))
    return image.filter(ImageFilter.GaussianBlur(0.7))


def starfield() -> Image.Image:
    pixels = rng.normal(8, 3, (H, W, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(400):
        x, y, s = int(rng.integers(0, W)), int(rng.integers(0, H)), float(rng.exponential(1.0))
        tint = [(255, 255, 255), (200, 210, 255), (255, 230, 200)][int(rng.integers(0, 3))]
        draw.ellipse((x - s, y - s, x + s, y + s), fill=tint)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def nebula() -> Image.Image:
    xx, yy = grid()
    glow = np.zeros((H, W, 3), np.float32)
    for colour in ((255, 80, 160), (80, 120, 255), (255, 160, 60)):
        cx, cy, s = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(80, 200)
        glow += np.array(colour, np.float32) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s**2))[..., None] * 0.7
    image = Image.fromarray(np.clip(glow, 0, 255).astype(np.uint8))
    return Image.blend(image, starfield(), 0.4)


def astronomy() -> Iterator[tuple[str, Views]]:
    yield "moon", views(body((200, 200, 195), 190, 40))
    yield "skimage_moon", views(packaged("moon"))
    yield "mars", views(body((200, 100, 50), 170, 12))
    yield "hubble", views(packaged("hubble_deep_field"))
    yield "jupiter", views(body((215, 180, 140), 200, 0, bands=True))
    yield "stars", views(starfield())
    yield "nebula", views(nebula())
    yield "sun", views(body((255, 170, 40), 180, 0))


# --- fundus photographs -----------------------------------------------------------------------------------------------


def vessels(draw: ImageDraw.ImageDraw, x: float, y: float, angle: float, length: float, width: float, fill) -> None:
    """A branching vessel tree from (x, y)."""
    if length < 15 or width < 1:
        return
    steps = int(length / 10)
    for _ in range(steps):
        angle += rng.normal(0, 0.15)
        nx, ny = x + 10 * math.cos(angle), y + 10 * math.sin(angle)
        draw.line((x, y, nx, ny), fill=fill, width=int(round(width)))
        x, y = nx, ny
    for turn in (-0.5, 0.5):
        vessels(draw, x, y, angle + turn + rng.normal(0, 0.2), length * 0.7, width * 0.7, fill)


def fundus(i: int) -> Image.Image:
    """A retina photograph: an orange-red disc with a bright optic disc, a dark macula and branching vessels, on
    black."""
    xx, yy = grid()
    cx, cy, radius = W / 2, H / 2, H * rng.uniform(0.46, 0.52)
    tone = np.array([(215, 95, 40), (200, 70, 30), (230, 120, 60), (180, 80, 50), (225, 105, 35)][i % 5], np.float32)
    d = np.hypot(xx - cx, yy - cy) / radius
    side = 1 if i % 2 else -1
    ox, oy = cx + side * radius * 0.45, cy + rng.uniform(-20, 20)
    mx, my = cx - side * radius * 0.15, cy
    optic = np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * 22**2))
    macula = np.exp(-((xx - mx) ** 2 + (yy - my) ** 2) / (2 * 40**2))
    shade = np.clip(1.05 - 0.45 * d**2, 0, 1) * (1 - 0.35 * macula)
    retina = tone * shade[..., None] + np.array([60, 110, 90], np.float32) * optic[..., None]
    pixels = np.where((d < 1)[..., None], retina + rng.normal(0, 4, (H, W, 1)), 0)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for k in range(4):
        angle = (-0.6 + 1.2 * (k % 2)) + (math.pi if side > 0 else 0) + rng.normal(0, 0.1)
        vessels(draw, ox, oy, angle, 140, 5, (150, 30, 25) if k < 2 else (120, 20, 20))
    ring = Image.fromarray(((d < 1) * 255).astype(np.uint8))
    black = Image.new("RGB", (W, H), "black")
    return Image.composite(image.filter(ImageFilter.GaussianBlur(1.2)), black, ring)


def fundus_kind() -> Iterator[tuple[str, Views]]:
    yield from alternate(
        ((f"retina{i}", views(fundus(i))) for i in range(8)),
        [("skimage_retina", views(packaged("retina"))), ("microaneurysms", views(packaged("microaneurysms")))],
    )


# --- colour wheels and charts -----------------------------------------------------------------------------------------


def hsv_image(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> Image.Image:
    stack = np.stack([hue % 1.0, np.clip(sat, 0, 1), np.clip(val, 0, 1)], axis=-1)
    return Image.fromarray((stack * 255).astype(np.uint8), "HSV").convert("RGB")


def wheel(rings: bool, background: int) -> Image.Image:
    xx, yy = grid()
    dx, dy = xx - W / 2, yy - H / 2
    r = np.hypot(dx, dy) / (H * 0.45)
    hue = (np.arctan2(dy, dx) / (2 * np.pi) + rng.uniform(0, 1)) % 1
    sat = np.floor(r * 4) / 4 + 0.25 if rings else r
    image = np.asarray(hsv_image(hue, sat, np.ones_like(r)))
    pixels = np.where((r <= 1)[..., None], image, background)
    return Image.fromarray(pixels.astype(np.uint8))


def checker() -> Image.Image:
    """A colour-checker chart: 24 patches on black."""
    image = Image.new("RGB", (W, H), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    for k in range(24):
        row, col = divmod(k, 6)
        colour = tuple(int(c) for c in rng.integers(20, 240, 3)) if row < 3 else (int(240 - (k - 18) * 42),) * 3
        draw.rectangle((20 + col * 95, 20 + row * 105, 100 + col * 95, 110 + row * 105), fill=colour)
    return noise(image, 2)


def test_card() -> Image.Image:
    """A television test card: colour bars above a grey ramp."""
    image = Image.new("RGB", (W, H))
    draw = ImageDraw.Draw(image)
    bars = [(192, 192, 192), (192, 192, 0), (0, 192, 192), (0, 192, 0), (192, 0, 192), (192, 0, 0), (0, 0, 192)]
    for k, colour in enumerate(bars):
        draw.rectangle((k * W / 7, 0, (k + 1) * W / 7, H * 0.7), fill=colour)
    for x in range(W):
        draw.line((x, H * 0.7, x, H), fill=(int(255 * x / W),) * 3)
    return image


def gradient() -> Image.Image:
    xx, yy = grid()
    return hsv_image(xx / W * rng.uniform(0.5, 1) + rng.uniform(0, 1), 0.4 + 0.6 * yy / H, np.full_like(xx, 0.95))


def dot_plate(warm: bool) -> Image.Image:
    """A colour-vision test plate: dots of two families of colour, a digit in one of them."""
    image = Image.new("RGB", (W, H), "white")
    figure = Image.new("L", (W, H), 0)
    ImageDraw.Draw(figure).text((W / 2 - 90, H / 2 - 140), str(int(rng.integers(2, 10))), fill=255, font_size=280)
    mask = np.asarray(figure) > 0
    draw = ImageDraw.Draw(image)
    inside = [(230, 140, 60), (240, 170, 80), (210, 110, 50)] if warm else [(90, 170, 90), (120, 190, 100)]
    outside = [(150, 170, 80), (170, 180, 110), (130, 150, 70)] if warm else [(230, 120, 100), (240, 150, 120)]
    for _ in range(2500):
        x, y, r = int(rng.integers(0, W)), int(rng.integers(0, H)), int(rng.integers(3, 9))
        if math.hypot(x - W / 2, y - H / 2) < H * 0.48:
            family = inside if mask[y, x] else outside
            draw.ellipse((x - r, y - r, x + r, y + r), fill=family[int(rng.integers(0, len(family)))])
    return image


def colour() -> Iterator[tuple[str, Views]]:
    yield "wheel", views(wheel(False, 255))
    yield "skimage_color", views(packaged("colorwheel"))
    yield "wheel_rings", views(wheel(True, 0))
    yield "checker", views(checker())
    yield "test_card", views(test_card())
    yield "gradient", views(gradient())
    yield "plate_warm", views(dot_plate(True))
    yield "plate_green", views(dot_plate(False))


# --- landscapes and buildings -----------------------------------------------------------------------------------------


def landscape(i: int) -> Image.Image:
    """Sky, hills or mountains, water or fields: day, sunset and desert light."""
    xx, yy = grid()
    light = i % 3  # day, sunset, desert
    top, low = [((70, 130, 220), (190, 220, 250)), ((60, 40, 120), (255, 150, 60)), ((120, 170, 230), (240, 220, 190))][
        light
    ]
    horizon = H * rng.uniform(0.45, 0.65)
    t = np.clip(yy / horizon, 0, 1)[..., None]
    sky = np.array(top, np.float32) * (1 - t) + np.array(low, np.float32) * t
    ground_colour = [(60, 120, 50), (70, 50, 40), (210, 170, 110)][light]
    ridge = horizon - 60 * np.abs(np.sin(xx / W * rng.uniform(2, 6) + i)) - rng.uniform(0, 40)
    ground = np.array(ground_colour, np.float32) * (0.7 + 0.3 * (yy - ridge) / (H - ridge + 1))[..., None]
    pixels = np.where((yy > ridge)[..., None], ground, sky)
    if i % 2 == 0:  # a lake mirroring the sky
        lake = yy > H * 0.8
        pixels = np.where(
            lake[..., None], sky[(2 * int(H * 0.8) - yy.astype(int)).clip(0, H - 1), xx.astype(int)] * 0.85, pixels
        )
    image = Image.fromarray(np.clip(pixels + rng.normal(0, 4, (H, W, 1)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if light == 1:
        draw.ellipse((W * 0.6, horizon - 80, W * 0.6 + 70, horizon - 10), fill=(255, 200, 90))
    for _ in range(int(rng.integers(0, 25)) if light == 0 else 0):  # trees
        x, y = int(rng.integers(0, W)), int(rng.integers(int(horizon), H))
        draw.polygon([(x, y - 40), (x - 14, y), (x + 14, y)], fill=(30, 80, 35))
    return image.filter(ImageFilter.GaussianBlur(0.8))


def building(i: int) -> Image.Image:
    """A facade of windows: brick, concrete or glass."""
    wall = [(160, 80, 60), (180, 180, 175), (90, 120, 150), (210, 190, 150)][i % 4]
    image = Image.new("RGB", (W, H), (140, 190, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, W - 40, H), fill=wall)
    if i % 4 == 0:  # bricks
        for y in range(40, H, 12):
            for x in range(40 + (y // 12 % 2) * 15, W - 40, 30):
                draw.rectangle((x, y, x + 28, y + 10), outline=(120, 60, 45))
    for row in range(6):
        for col in range(7):
            x, y = 60 + col * 72, 60 + row * 66
            draw.rectangle((x, y, x + 40, y + 44), fill=(60, 80, 110), outline=(240, 240, 240), width=3)
    return noise(image, 5).filter(ImageFilter.GaussianBlur(0.6))


def landscape_kind() -> Iterator[tuple[str, Views]]:
    generated = [(f"land{i}", views(landscape(i))) for i in range(6)]
    generated += [(f"building{i}", views(building(i))) for i in range(4)]
    yield from alternate(
        generated, [("china", views(Image.open(SKLEARN / "china.jpg"))), ("rocket", views(packaged("rocket")))]
    )


# --- everyday photographs ---------------------------------------------------------------------------------------------


def photo() -> Iterator[tuple[str, Views]]:
    yield "flower", views(Image.open(SKLEARN / "flower.jpg"), 4)
    yield "chelsea", views(packaged("chelsea"), 4)
    yield "coffee", views(packaged("coffee"), 4)
    yield "astronaut", views(packaged("astronaut"), 4)
    yield "motorcycle", views(Image.open(skimage_file("motorcycle_left.png")), 4)
    yield "horse", views(packaged("horse"), 3)


# --- faces ------------------------------------------------------------------------------------------------------------


def cartoon_face(i: int) -> Image.Image:
    """A face filling the frame: skin, hair, eyes, brows and mouth, a plain background."""
    tones = [(224, 172, 138), (198, 134, 66), (241, 194, 160), (141, 85, 36), (255, 219, 172)]
    image = Image.new("RGB", (W, H), [(200, 210, 220), (90, 90, 100), (230, 225, 215)][i % 3])
    draw = ImageDraw.Draw(image)
    hair = [(40, 30, 20), (120, 80, 40), (200, 170, 100), (20, 20, 20)][i % 4]
    draw.ellipse((140, -20, 460, 380), fill=hair)
    draw.ellipse((170, 30, 430, 430), fill=tones[i % 5])
    for x in (240, 360):
        draw.ellipse((x - 24, 170, x + 24, 196), fill="white")
        draw.ellipse((x - 10, 173, x + 10, 193), fill=[(70, 50, 30), (60, 110, 150), (40, 120, 60)][i % 3])
        draw.line((x - 28, 150, x + 28, 146), fill=hair, width=7)
    draw.line((300, 200, 290, 270), fill=tuple(int(c * 0.8) for c in tones[i % 5]), width=4)
    draw.chord((250, 290, 350, 350), 0, 180, fill=(170, 70, 70))
    return noise(image, 5).filter(ImageFilter.GaussianBlur(1.5))


def face() -> Iterator[tuple[str, Views]]:
    hopper = Image.open(MPL / "grace_hopper.jpg")
    yield "hopper", [hopper, hopper.crop((100, 40, 420, 280)), crop(hopper)]
    astronaut = packaged("astronaut")
    yield "astronaut_face", [astronaut.crop((140, 20, 300, 140)), astronaut.crop((100, 0, 340, 180))]
    lfw = skimage.data.lfw_subset()  # 200 greyscale faces, 25×25
    for k in range(4):
        faces = [Image.fromarray((lfw[int(j)] * 255).astype(np.uint8)) for j in rng.choice(len(lfw), 12, replace=False)]
        sheet = Image.new("L", (100, 75))
        for j, f in enumerate(faces):
            sheet.paste(f, ((j % 4) * 25, (j // 4) * 25))
        yield f"lfw{k}", [faces[0].convert("RGB"), sheet.convert("RGB")]
    for i in range(5):
        yield f"drawn{i}", views(cartoon_face(i), 2)


# --- clinical photographs of skin (no dermatoscope) -------------------------------------------------------------------


def smooth_noise(scale: int) -> np.ndarray:
    """Noise in [-1, 1] that varies over about ``scale`` pixels (blotches, shading, texture)."""
    coarse = rng.uniform(-1, 1, (H // scale + 2, W // scale + 2)).astype(np.float32)
    up = Image.fromarray(coarse, "F").resize((W + 2 * scale, H + 2 * scale), Image.Resampling.BICUBIC)
    return np.asarray(up)[scale : scale + H, scale : scale + W]


def skin_photo(i: int) -> Image.Image:
    """Skin photographed with a phone, no dermatoscope: uneven light and redness, pores, a small mole, some hair;
    half of them with clothing or a sheet at one edge."""
    tones = [(224, 172, 138), (198, 134, 96), (241, 194, 160), (141, 85, 56), (255, 219, 182), (176, 120, 90)]
    tone = np.array(tones[i % len(tones)], dtype=np.float32)
    xx, yy = grid()
    light = 0.8 + 0.25 * np.cos((xx / W - rng.uniform(0.2, 0.8)) * 2.5) * np.cos((yy / H - 0.5) * 2.0)
    redness = np.clip(smooth_noise(90), 0, 1)[..., None] * np.array([10, -18, -14], np.float32)
    skin = tone * light[..., None] * (1 + 0.05 * smooth_noise(25))[..., None] + redness + rng.normal(0, 4, (H, W, 1))
    highlight = np.exp(-((xx - rng.uniform(100, 500)) ** 2 + (yy - rng.uniform(80, 370)) ** 2) / (2 * 70**2))
    pixels = skin + 45 * highlight[..., None]
    if i % 2:
        edge = W * rng.uniform(0.65, 0.9) + 40 * np.sin(yy / H * 3 + i)
        cloth = [(70, 90, 130), (230, 230, 225), (50, 50, 55), (140, 160, 110)][i % 4]
        cloth = np.array(cloth, np.float32) * (1 + 0.08 * smooth_noise(6))[..., None]
        pixels = np.where((xx > edge)[..., None], cloth, pixels)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(300, 900))):  # pores
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        draw.point((x, y), fill=tuple(int(c * 0.8) for c in tones[i % len(tones)]))
    cx, cy, r = int(rng.integers(120, 380)), int(rng.integers(120, 330)), int(rng.integers(6, 26))
    mole = [(cx + r * rng.uniform(0.7, 1.1) * math.cos(a), cy + r * 0.8 * rng.uniform(0.7, 1.1) * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 12, endpoint=False)]  # fmt: skip
    draw.polygon(mole, fill=(90, 55, 35) if i % 3 else (60, 35, 30))
    for _ in range(int(rng.integers(0, 40))):
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        draw.line((x, y, x + int(rng.integers(-30, 30)), y + int(rng.integers(10, 40))), fill=(50, 35, 25), width=1)
    return image.filter(ImageFilter.GaussianBlur(1.0))


def clinical() -> Iterator[tuple[str, Views]]:
    for i in range(12):
        yield f"skin{i}", [skin_photo(i), skin_photo(i + 12)]


# --- medical scans ----------------------------------------------------------------------------------------------------


def xray() -> Image.Image:
    """A chest radiograph's look: dark lungs in a bright body, ribs."""
    xx, yy = grid()
    body = np.exp(-(((xx - W / 2) / (W * 0.35)) ** 4)) * 200
    lungs = sum(np.exp(-(((xx - W / 2 - s * 95) / 70) ** 2 + ((yy - H * 0.5) / 150) ** 2)) for s in (-1, 1))
    ribs = 25 * (np.sin(yy / 18 + np.abs(xx - W / 2) / 60) > 0.7)
    pixels = np.clip(body - 140 * lungs + ribs * lungs + rng.normal(0, 6, (H, W)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8)).convert("RGB").filter(ImageFilter.GaussianBlur(2))


def ultrasound() -> Image.Image:
    """A fan of speckle on black, with a dark cyst."""
    xx, yy = grid()
    angle, r = np.arctan2(xx - W / 2, yy + 40), np.hypot(xx - W / 2, yy + 40)
    fan = (np.abs(angle) < 0.6) & (r > 60) & (r < H + 20)
    speckle = rng.gamma(2, 40, (H, W)) * np.exp(-r / 500)
    cyst = np.hypot(xx - W / 2 - 40, yy - H * 0.55) < 45
    pixels = np.where(fan & ~cyst, speckle, np.where(fan, 10, 0))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB").filter(ImageFilter.GaussianBlur(1))


def scan() -> Iterator[tuple[str, Views]]:
    with gzip.open(MPL / "s1045.ima.gz") as f:
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    yield "mri", views(Image.fromarray((mri / mri.max() * 255).astype(np.uint8)))
    yield "phantom", views(packaged("shepp_logan_phantom"))
    yield "xray", views(xray())
    yield "ultrasound", views(ultrasound())


# --- textures ---------------------------------------------------------------------------------------------------------


def wood() -> Image.Image:
    xx, yy = grid()
    rings = np.sin((xx / 9 + 6 * np.sin(yy / 80) + rng.normal(0, 0.3, (H, W))) * 1.3)
    colour = np.array((150, 95, 50), np.float32) * (0.8 + 0.2 * rings)[..., None]
    return Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))


def fabric(i: int) -> Image.Image:
    xx, yy = grid()
    weave = (np.sin(xx / 3) * np.sin(yy / 3) > 0).astype(np.float32)
    colours = [(180, 40, 60), (40, 80, 160), (60, 140, 90)]
    check = ((xx // 60 + yy // 60) % 2).astype(np.float32)
    base = np.array(colours[i % 3], np.float32) * (0.6 + 0.4 * check)[..., None] * (0.85 + 0.15 * weave)[..., None]
    return noise(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), 6)


def texture() -> Iterator[tuple[str, Views]]:
    yield "brick", views(packaged("brick"))
    yield "grass", views(packaged("grass"))
    yield "gravel", views(packaged("gravel"))
    yield "wood", views(wood())
    yield "fabric0", views(fabric(0))
    yield "fabric1", views(fabric(1))


# --- graphics ---------------------------------------------------------------------------------------------------------


def emoji(i: int) -> Image.Image:
    image = Image.new("RGB", (W, H), ["white", (30, 30, 30), (230, 240, 255)][i % 3])
    draw = ImageDraw.Draw(image)
    draw.ellipse((150, 75, 450, 375), fill=(255, 205, 50), outline=(200, 140, 0), width=6)
    draw.ellipse((230, 160, 260, 220), fill=(60, 40, 20))
    draw.ellipse((340, 160, 370, 220), fill=(60, 40, 20))
    draw.arc((220, 200, 380, 320), 20, 160, fill=(60, 40, 20), width=10)
    return image


def graphic() -> Iterator[tuple[str, Views]]:
    yield "mpl_logo", views(on_white(Image.open(MPL / "logo2.png")))
    yield "minduka", views(on_white(Image.open(MPL / "Minduka_Present_Blue_Pack.png")))
    yield "skimage_logo", views(packaged("logo"))
    yield "chessboard", views(Image.open(skimage_file("chessboard_RGB.png")))
    for i in range(3):
        yield f"emoji{i}", views(emoji(i), 2)


# --- blank and failed photographs -------------------------------------------------------------------------------------


def blank() -> Iterator[tuple[str, Views]]:
    """What a camera gives with its lens covered, pointed at a wall or badly out of focus."""
    yield "black", [noise(Image.new("RGB", (W, H), (6, 6, 8)), 3)]
    yield "white", [noise(Image.new("RGB", (W, H), (245, 245, 245)), 2)]
    yield "wall", [noise(Image.new("RGB", (W, H), (205, 200, 190)), 4)]
    yield "blue", [noise(Image.new("RGB", (W, H), (60, 90, 160)), 4)]
    for i in range(4):
        source = four_three(Image.open(SKLEARN / ("china.jpg" if i % 2 else "flower.jpg")))
        blurred = source.filter(ImageFilter.GaussianBlur(12 + 6 * i))
        yield f"blur{i}", [blurred if i < 2 else Image.eval(blurred, lambda v: min(255, int(v * 1.8) + 60))]


KINDS: dict[str, Callable[[], Iterator[tuple[str, Views]]]] = {
    "grey": grey,
    "document": document,
    "screenshot": screenshot,
    "chart": chart,
    "cells": cells,
    "astronomy": astronomy,
    "fundus": fundus_kind,
    "colour": colour,
    "landscape": landscape_kind,
    "photo": photo,
    "face": face,
    "clinical": clinical,
    "scan": scan,
    "texture": texture,
    "graphic": graphic,
    "blank": blank,
}


def main() -> None:
    for part in PARTS:
        shutil.rmtree(OUT / part, ignore_errors=True)
        (OUT / part).mkdir(parents=True)
    for old in OUT.glob("*.jpg"):  # the flat folder of the first version
        old.unlink()
    for kind, make in KINDS.items():
        for n, (instance, shown) in enumerate(make()):
            part = PARTS[n % 2]
            for v, image in enumerate(shown):
                four_three(image).save(OUT / part / f"{kind}-{instance}-{v}.jpg", quality=QUALITY)


if __name__ == "__main__":
    main()
