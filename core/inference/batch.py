"""Batch prediction: many files, a folder or .zip archives through one :class:`~core.inference.predictor.Predictor`, one
row per file. The Batch page and ``lesionlab predict CKPT DIR_OR_ZIP --csv OUT`` both run :func:`predict_files`.

A file that cannot be used (not an image, damaged, too large, an unsafe name in an archive) gets a row with its
error and the batch goes on. What a folder or an archive may hold is bounded before anything is decoded:
the folder walk by :func:`core.data.dataset.walk_files`, an archive by its member count and declared sizes here,
and each image by :func:`core.data.images.open_image`'s pixel limits.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from core.common.formatting import format_bytes
from core.common.labels import CLASSES
from core.data.archives import ArchiveError, file_members, member_path, open_zip, read_member
from core.data.dataset import IMAGE_SUFFIXES, DatasetError, walk_files
from core.data.images import ImageError, ImageSource
from core.inference.forward import bounded_batch_size, view_count
from core.inference.prediction import LOW_CONFIDENCE, Prediction
from core.inference.predictor import Predictor
from core.inference.unfamiliar import UnfamiliarCheck

# One image file may be as large as one upload on the Diagnose page: a 24-megapixel dermatoscope JPEG is
# about 8 MiB. An archive is bounded by what it declares before a byte is inflated: its member count, and
# the sum of its members' sizes (a few kilobytes of zip can declare terabytes). 2 GiB is 8,000 full-size
# dermoscopy JPEGs, far more than a batch someone waits for.
MAX_FILE_BYTES = 10 * 2**20
MAX_FILES = 10_000
MAX_ARCHIVE_BYTES = 2 * 2**30
# Views per forward pass: large enough that the per-call overhead vanishes, small enough (with
# core.evaluation.evaluate's pixel bound) that the activations stay in a few hundred MB.
BATCH_SIZE = 32
THUMBNAIL_SIZE = (96, 72)
CSV_COLUMNS = (
    "file",
    "top_class",
    "diagnosis",
    "not_assessed",
    "p_melanoma",
    "confidence",
    "p_malignant",
    "refer",
    "warnings",
    "error",
    *(f"p_{code}" for code in CLASSES),
)


class BatchError(ValueError):
    """An input that cannot be used at all (a folder or an archive); the message says why and what to do."""


@dataclass(frozen=True)
class BatchFile:
    """One file of a batch: its name as shown in the table, and how to get its image (a path or bytes).
    ``load`` raises :class:`ImageError` or :class:`BatchError` for a file that cannot be used."""

    name: str
    load: Callable[[], ImageSource]


# What became of a file (BatchRow.outcome): the summaries count each apart, so that an image that was not assessed
# never adds to a count of results.
ASSESSED = "assessed"
NOT_ASSESSED = "not assessed"
FAILED = "could not be used"
# Why an image the unfamiliar check flags was not assessed, in a row's warning and on the command line.
UNLIKE_DERMOSCOPY = "unlike the dermoscopy the model learnt from"


@dataclass(frozen=True)
class BatchRow:
    """One file's result: a prediction; for an image unlike dermoscopy, why it was not assessed (``not_assessed``)
    and, as on Diagnose, no class, probability or referral; or the error that stopped it (``error`` set, the rest
    empty)."""

    file: str
    top_class: str | None = None
    diagnosis: str | None = None
    p_melanoma: float | None = None
    confidence: float | None = None
    p_malignant: float | None = None
    refer: tuple[str, ...] = ()  # the referral rules at or above their threshold ("malignant", "melanoma")
    not_assessed: tuple[str, ...] = ()  # the unfamiliar-image check's reasons for an image it flags
    warnings: tuple[str, ...] = ()
    error: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    thumbnail: str | None = None  # a JPEG data URL

    @property
    def outcome(self) -> str:
        """:data:`ASSESSED`, :data:`NOT_ASSESSED` or :data:`FAILED`."""
        if self.error is not None:
            return FAILED
        return NOT_ASSESSED if self.not_assessed else ASSESSED

    @property
    def assessed(self) -> bool:
        return self.outcome == ASSESSED

    def record(self) -> dict[str, object]:
        """The row as :data:`CSV_COLUMNS` name them (no thumbnail): empty cells for what a failed file lacks, and
        for an image that was not assessed its diagnosis reads "not assessed" beside the reasons, its class and
        probabilities left empty."""
        return {
            "file": self.file,
            "top_class": self.top_class,
            "diagnosis": NOT_ASSESSED if self.not_assessed else self.diagnosis,
            "not_assessed": " | ".join(self.not_assessed),
            "p_melanoma": self.p_melanoma,
            "confidence": self.confidence,
            "p_malignant": self.p_malignant,
            "refer": " | ".join(self.refer),
            "warnings": " | ".join(self.warnings),
            "error": self.error,
            **{f"p_{code}": self.probabilities.get(code) for code in CLASSES},
        }


def write_csv(rows: Iterable[BatchRow], out: TextIO) -> Counter[str]:
    """Write a header and each row as it comes (flushed, so a long batch cut short keeps what was done);
    returns how many rows had each :attr:`BatchRow.outcome`."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    outcomes: Counter[str] = Counter()
    for row in rows:
        outcomes[row.outcome] += 1
        writer.writerow(row.record())
        out.flush()
    return outcomes


def image_warnings(check: UnfamiliarCheck, prediction: Prediction) -> tuple[str, ...]:
    """What the Diagnose page warns about for this image, in a line each: unfamiliar (``check``, the predictor's
    measured check, the same one Diagnose shows) or, for an image it assessed, low confidence."""
    found = []
    if check.unfamiliar:  # not assessed: no result to call undecided
        found.append(f"{UNLIKE_DERMOSCOPY}: " + "; ".join(check.reasons))
    elif prediction.confidence < LOW_CONFIDENCE:
        found.append(f"low confidence: the most likely class has only {prediction.confidence:.0%}")
    return tuple(found)


def thumbnail(prediction: Prediction, size: tuple[int, int] = THUMBNAIL_SIZE) -> str:
    """The image the model saw, shrunk into ``size``, as a data URL a table's image column shows."""
    small = prediction.image.copy()
    small.thumbnail(size)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------
# What a batch holds


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _not_an_image(name: str) -> ImageError:
    return ImageError(f"{name} is not a JPEG or PNG file (by its name); only images are predicted.")


def _too_large(name: str, size: int) -> ImageError:
    return ImageError(f"{name} is {format_bytes(size)}; an image may be at most {format_bytes(MAX_FILE_BYTES)}.")


def _image_file(path: Path, name: str) -> Callable[[], ImageSource]:
    def load() -> ImageSource:
        if not _is_image_name(path.name):
            raise _not_an_image(name)
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _too_large(name, size)
        return path

    return load


def image_bytes(name: str, data: bytes) -> BatchFile:
    """An uploaded image file."""

    def load() -> ImageSource:
        if not _is_image_name(name):
            raise _not_an_image(name)
        if len(data) > MAX_FILE_BYTES:
            raise _too_large(name, len(data))
        return data

    return BatchFile(name, load)


def failed(name: str, message: str) -> BatchFile:
    """A file known to be unusable before it is read (an upload's archive that does not open, say)."""

    def load() -> ImageSource:
        raise BatchError(message)

    return BatchFile(name, load)


def folder_files(root: str | Path) -> list[BatchFile]:
    """Every file below ``root`` (hidden ones left out), named relative to it, in name order; raises
    :class:`BatchError` when the folder cannot be walked within :func:`core.data.dataset.walk_files`' bounds."""
    root = Path(root)
    try:
        paths = sorted(walk_files(root, lambda name: True))
    except DatasetError as exc:
        raise BatchError(str(exc)) from None
    if len(paths) > MAX_FILES:
        raise BatchError(f"{root} holds {len(paths):,} files; a batch takes at most {MAX_FILES:,}.")
    return [BatchFile(str(p.relative_to(root)), _image_file(p, str(p.relative_to(root)))) for p in paths]


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> Callable[[], ImageSource]:
    def load() -> ImageSource:
        try:
            member_path(info.filename, name)
        except ArchiveError:
            raise BatchError(
                f"{name} has an unsafe path (absolute or with ..) that could write outside a folder; it is "
                "not read. The archive may have been made to attack the computer it is opened on."
            ) from None
        if not _is_image_name(info.filename):
            raise _not_an_image(name)
        if info.file_size > MAX_FILE_BYTES:
            raise _too_large(name, info.file_size)
        data = read_member(archive, info, name, MAX_FILE_BYTES)
        if len(data) > MAX_FILE_BYTES:
            raise _too_large(name, len(data))
        return data

    return load


def archive_files(source: str | Path | bytes | BinaryIO, name: str) -> list[BatchFile]:
    """The files of a .zip archive, named ``name/member``, in the archive's order; folders, hidden files and
    macOS resource forks left out. Raises :class:`BatchError` for an archive that does not open or declares
    more than :data:`MAX_FILES` files or :data:`MAX_ARCHIVE_BYTES` in all. Members are read one at a time
    when predicted, never extracted to disk."""
    try:
        # Entries, not files: folders and a macOS archive's __MACOSX twin of every file count too.
        archive = open_zip(io.BytesIO(source) if isinstance(source, bytes) else source, name, max_members=3 * MAX_FILES)
    except ArchiveError as exc:
        raise BatchError(str(exc)) from None
    # Hidden files (.DS_Store and the like) are not the user's images.
    members = [info for info in file_members(archive) if not os.path.basename(info.filename).startswith(".")]
    if len(members) > MAX_FILES:
        raise BatchError(f"{name} holds {len(members):,} files; a batch takes at most {MAX_FILES:,}.")
    declared = sum(info.file_size for info in members)
    if declared > MAX_ARCHIVE_BYTES:
        raise BatchError(
            f"{name} unpacks to {format_bytes(declared)}; a batch archive may hold at most "
            f"{format_bytes(MAX_ARCHIVE_BYTES)}. Split it into smaller archives."
        )
    return [BatchFile(f"{name}/{info.filename}", _member(archive, info, f"{name}/{info.filename}")) for info in members]


def gather(paths: Iterable[str | Path]) -> list[BatchFile]:
    """The files a command line names: image files as given, folders walked, .zip archives opened."""
    files: list[BatchFile] = []
    for item in map(Path, paths):
        if item.is_dir():
            files += folder_files(item)
        elif item.suffix.lower() == ".zip":
            if not item.is_file():
                raise BatchError(f"{item} does not exist.")
            files += archive_files(item, item.name)
        else:
            files.append(BatchFile(str(item), _image_file(item, str(item))))
    if len(files) > MAX_FILES:
        raise BatchError(f"{len(files):,} files were given; a batch takes at most {MAX_FILES:,}.")
    return files


def upload_files(uploads: Iterable[tuple[str, bytes]]) -> list[BatchFile]:
    """The files of a batch upload, given as (name, bytes): images as they are, .zip archives opened (one that
    does not open becomes a row with its error). Raises :class:`BatchError` beyond :data:`MAX_FILES`."""
    files: list[BatchFile] = []
    for name, data in uploads:
        if name.lower().endswith(".zip"):
            try:
                files += archive_files(data, name)
            except BatchError as exc:
                files.append(failed(name, str(exc)))
        else:
            files.append(image_bytes(name, data))
    if len(files) > MAX_FILES:
        raise BatchError(f"The uploads hold {len(files):,} files; a batch takes at most {MAX_FILES:,}.")
    return files


# ---------------------------------------------------------------------------
# Predicting


def _row(predictor: Predictor, name: str, prediction: Prediction, with_thumbnail: bool) -> BatchRow:
    check = predictor.unfamiliar(prediction)
    shown = thumbnail(prediction) if with_thumbnail else None
    if check.unfamiliar:
        # As on Diagnose, an image unlike dermoscopy is not assessed: its class, probabilities and referrals would
        # read as findings about a lesion (sorted by P(melanoma), a table would rank a photograph among the lesions).
        return BatchRow(
            file=name, not_assessed=check.reasons, warnings=image_warnings(check, prediction), thumbnail=shown
        )
    return BatchRow(
        file=name,
        top_class=prediction.top_class,
        diagnosis=prediction.top_name,
        p_melanoma=prediction.probabilities["mel"],
        confidence=prediction.confidence,
        p_malignant=prediction.malignant_probability,
        refer=tuple(r.rule.key for r in predictor.referrals if r.refers(prediction)),
        warnings=image_warnings(check, prediction),
        probabilities=prediction.probabilities,
        thumbnail=shown,
    )


def _decode(predictor: Predictor, file: BatchFile):
    try:
        return predictor.preprocess(file.load(), upload=True)
    except (ImageError, BatchError, ArchiveError) as exc:
        return BatchRow(file.name, error=str(exc))
    except FileNotFoundError:
        return BatchRow(file.name, error=f"{file.name} does not exist.")
    except OSError as exc:
        return BatchRow(file.name, error=f"{file.name} cannot be read ({exc.strerror or exc}).")
    except Exception as exc:  # noqa: BLE001 — any decoder surprise must end in a row, not stop the batch
        return BatchRow(file.name, error=f"{file.name} could not be read as an image ({type(exc).__name__}).")


def predict_files(
    predictor: Predictor,
    files: Sequence[BatchFile],
    *,
    tta: bool = False,
    thumbnails: bool = True,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> Iterator[BatchRow]:
    """One :class:`BatchRow` per file, in order, as each batch of images finishes; ``progress(done, total)``
    after each batch. The images of a batch go through the model in one forward pass. ``stage(text)`` hears what is
    being done before each step ("decoding NAME (3 of 40)", "running the model on files 1–16 of 40"), so that a
    page says so from the first second, before a batch is done. Raises
    :class:`~core.inference.forward.PredictionError` when the model's output is not a probability distribution (broken
    weights), which no other file would escape either."""
    size = bounded_batch_size(batch_size, predictor.largest_input_size, tta)
    say = stage or (lambda text: None)
    for start in range(0, len(files), size):
        chunk = files[start : start + size]
        decoded = []
        for i, file in enumerate(chunk):
            say(f"reading and decoding {file.name} ({start + i + 1} of {len(files)})")
            decoded.append(_decode(predictor, file))
        ready = [(i, item) for i, item in enumerate(decoded) if not isinstance(item, BatchRow)]
        ahead = len(predictor.line)  # one model serves every session: another's pass may come first
        say(
            f"running the model on files {start + 1}–{start + len(chunk)} of {len(files)}"
            + (f" ({view_count(tta)} views each)" if tta else "")
            + (f", after {ahead} other {'analysis' if ahead == 1 else 'analyses'} ahead" if ahead else "")
        )
        predictions = predictor.predict_batch([item for _, item in ready], tta)
        for (i, _), prediction in zip(ready, predictions, strict=True):
            decoded[i] = _row(predictor, chunk[i].name, prediction, thumbnails)
        yield from decoded
        if progress is not None:
            progress(start + len(chunk), len(files))
