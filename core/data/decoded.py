"""The decoded-image cache: every image of a dataset decoded once, into one uint8 array on disk.

Decoding a JPEG costs more than a training step on a GPU, and the PIL pipeline decodes every image again in
every epoch. Here a dataset's images, brought to one source size as :func:`core.data.preprocessing.load_for_model`
brings them, lie in ``images.npy`` (N×H×W×3, memory-mapped, ~0.9 GB for HAM10000 at 200×150) beside
``index.json``: the files' paths, sizes and modification times, the damaged images, and the array's shape.
One folder per (dataset folder, source size); a change to the dataset's files rebuilds it. The index is
written last, so a build killed half-way leaves no cache that looks complete. Processes that need the same cache at
once (two runs started together) build it one at a time: the second waits on a file lock, then reads the first's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image

from core.common.files import write_json
from core.common.formatting import format_bytes
from core.common.runs import StopRequested
from core.common.schema import (
    Field,
    JsonFormat,
    SchemaError,
    closed_schema,
    list_of,
    one_of,
    read_json_file,
    text,
    whole,
)
from core.data.images import ImageError, open_image
from core.data.preprocessing import Preprocessing, load_for_model

ProgressFn = Callable[[int, int], None]
FORMAT = 1
# Room left on the disk after the cache is written, so that checkpoints and logs still fit.
KEEP_FREE_BYTES = 1 << 30


class CacheUnavailable(Exception):
    """The cache cannot be built (no room on the disk, a folder that cannot be written); the message says
    why, and that the images are read from their files instead."""


@dataclass(frozen=True)
class DecodedImages:
    """A built cache: ``images`` (N×H×W×3 uint8, read-only memory map) holds ``paths[i]`` in row ``i``; the
    rows of ``damaged`` images are blank and must not be used."""

    folder: Path
    paths: list[str]
    images: np.ndarray
    damaged: list[str]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[1])

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """The rows holding ``paths``; KeyError for a path the cache does not hold."""
        row = {p: i for i, p in enumerate(self.paths)}
        return np.fromiter((row[p] for p in paths), dtype=np.int64, count=len(paths))


def stamps(paths: Sequence[str]) -> list[list]:
    """Each file's [path, size, mtime in ns]: what tells a cache that a dataset's files changed."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([p, -1, -1])  # a vanished file is decoded (and reported damaged) on the rebuild
    return out


def cache_folder(cache_dir: str | Path, root: str | Path, size: tuple[int, int], fit: bool) -> Path:
    """One folder per dataset folder, source size (width, height) and way of reaching it (crop or stretch)."""
    ident = json.dumps([os.path.abspath(root), list(size), fit])
    return Path(cache_dir) / hashlib.sha1(ident.encode()).hexdigest()[:16]


def source_size(paths: Sequence[str], prep: Preprocessing) -> tuple[tuple[int, int], bool]:
    """The (width, height) the cache stores and whether images are centre-cropped to it (``fit``).

    With a recorded ``source_size`` that is it, reached as :func:`load_for_model` reaches it. Without, the
    images' own size (the first image that decodes): the PIL pipeline resizes each image straight to the input
    size, so an image of another size is stretched to it, as the input resize would have done.
    """
    if prep.source_size is not None:
        return tuple(prep.source_size), True
    draft = (prep.input_size[1], prep.input_size[0])
    for p in paths:
        try:
            return open_image(p, draft_size=draft).size, False
        except ImageError:
            continue
    raise CacheUnavailable("no image of the dataset could be decoded")


def _decode(path: str, size: tuple[int, int], fit: bool) -> np.ndarray | None:
    prep = Preprocessing(input_size=(size[1], size[0]), source_size=size if fit else None)
    try:
        img = load_for_model(path, prep)
    except ImageError:
        return None
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def _index_format(current: list[list]) -> JsonFormat:
    """``index.json`` of the cache of the files ``current`` (their stamps): at most as long as that index with every
    file damaged, three levels deep, and holding its four fields (``INDEX_SCHEMA``)."""
    largest = {"format": FORMAT, "shape": [2**31] * 3, "damaged": [p for p, *_ in current], "files": current}
    return JsonFormat(
        "a decoded-image cache's index",
        len(json.dumps(largest, indent=2).encode()) + 1024,
        3,
        8 * len(current) + 100,
        closed_schema(INDEX_SCHEMA, "a decoded-image cache's index"),
    )


# What index.json holds: the array's shape beside the files' stamps it was decoded from, and the damaged files.
INDEX_SCHEMA: dict[str, Field] = {
    "format": Field(True, one_of("format", (FORMAT,))),
    "shape": Field(True, list_of("shape", whole("shape[]", 1), length=3)),
    "damaged": Field(True, list_of("damaged", text("damaged[]"))),
    "files": Field(True, list_of("files", list_of("files[]", lambda _: None, length=3))),
}


def _load(folder: Path, paths: list[str], current: list[list]) -> DecodedImages | None:
    """The cache in ``folder`` when its index is sound and names exactly the files ``current``; None (build it again)
    otherwise."""
    try:
        index = read_json_file(folder / "index.json", _index_format(current))
    except (FileNotFoundError, SchemaError):
        return None
    if index["files"] != current or not set(index["damaged"]) <= set(paths):
        return None
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if images.shape != (len(paths), *index["shape"]) or images.dtype != np.uint8:
        return None
    return DecodedImages(folder, paths, images, list(index["damaged"]))


def _build(
    folder: Path,
    paths: list[str],
    current: list[list],
    size: tuple[int, int],
    fit: bool,
    progress: ProgressFn | None,
    keep_free: int,
    workers: int,
    should_stop: Callable[[], bool] | None,
) -> DecodedImages:
    shape = (len(paths), size[1], size[0], 3)
    needed = int(np.prod(shape))
    try:
        (folder / "index.json").unlink(missing_ok=True)  # the old cache is no longer valid from here on
        (folder / "images.npy").unlink(missing_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise CacheUnavailable(f"cannot write the decoded-image cache in {folder} ({exc.strerror or exc})") from None
    if free - needed < keep_free:
        raise CacheUnavailable(
            f"the decoded-image cache needs {format_bytes(needed)} in {folder} and {format_bytes(keep_free)} left "
            f"free after it, but the disk has {format_bytes(free)} free"
        )
    partial = folder / "images.npy.partial"
    damaged = []
    try:
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        # PIL releases the GIL while it decodes, so threads decode in parallel without worker processes.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = pool.map(lambda p: _decode(p, size, fit), paths)
            for i, (path, pixels) in enumerate(zip(paths, decoded, strict=True)):
                if pixels is None:
                    damaged.append(path)
                else:
                    images[i] = pixels
                done = i + 1
                if progress and (done % 256 == 0 or done == len(paths)):
                    progress(done, len(paths))
                if should_stop is not None and done % 64 == 0 and done < len(paths) and should_stop():
                    pool.shutdown(cancel_futures=True)
                    raise StopRequested(f"stopped after decoding {done} of {len(paths)} images")
        images.flush()
        del images
        os.replace(partial, folder / "images.npy")
        write_json(
            folder / "index.json", {"format": FORMAT, "shape": list(shape[1:]), "damaged": damaged, "files": current}
        )
    except StopRequested:  # a half-written cache is of no use: the next run decodes from the start
        partial.unlink(missing_ok=True)
        raise
    except OSError as exc:  # the disk filled up meanwhile, or the folder went away
        partial.unlink(missing_ok=True)
        raise CacheUnavailable(f"writing the decoded-image cache in {folder} failed ({exc.strerror or exc})") from None
    return DecodedImages(folder, paths, np.load(folder / "images.npy", mmap_mode="r"), damaged)


@contextmanager
def _building(folder: Path, should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Held while ``folder``'s cache is built: without it, two builders unlink and replace each other's files (one
    of them failing half-way). Waiting is checked against ``should_stop`` every second."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheUnavailable(f"cannot write the decoded-image cache in {folder} ({exc.strerror or exc})") from None
    lock = FileLock(folder / "build.lock")
    while True:
        try:
            lock.acquire(timeout=1)
            break
        except Timeout:
            if should_stop is not None and should_stop():
                raise StopRequested("stopped while another process built the decoded-image cache") from None
        except OSError as exc:
            raise CacheUnavailable(f"cannot lock the decoded-image cache in {folder} ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


def open_decoded(
    paths: Sequence[str],
    prep: Preprocessing,
    *,
    root: str | Path,
    cache_dir: str | Path,
    progress: ProgressFn | None = None,
    keep_free: int | None = None,
    workers: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    build: bool = True,
) -> DecodedImages:
    """The decoded images of ``paths`` (the dataset in ``root``) at ``prep``'s source size: the cache in
    ``cache_dir`` when its files are unchanged, else decoded now (``progress(done, total)`` as it goes) and
    stored, leaving ``keep_free`` bytes (default :data:`KEEP_FREE_BYTES`) free on the disk. Raises
    :class:`CacheUnavailable` when it cannot be stored, or, with ``build`` false, when no current cache is there;
    :class:`core.common.runs.StopRequested` when ``should_stop`` says so (asked every 64 images; nothing is kept)."""
    paths = [str(p) for p in paths]
    size, fit = source_size(paths, prep)
    folder = cache_folder(cache_dir, root, size, fit)
    current = stamps(paths)
    cache = _load(folder, paths, current)
    if cache is None and not build:
        raise CacheUnavailable(
            f"{cache_dir} holds no current decoded-image cache of these {len(paths)} images at {size[0]}×{size[1]} "
            "(training with the decoded input pipeline builds it)"
        )
    if cache is None:
        with _building(folder, should_stop):
            cache = _load(folder, paths, current)  # built by another process while this one waited
            if cache is None:
                room = KEEP_FREE_BYTES if keep_free is None else keep_free
                workers = workers or os.cpu_count() or 1
                return _build(folder, paths, current, size, fit, progress, room, workers, should_stop)
    if progress:
        progress(len(paths), len(paths))
    return cache
