"""HAM10000 on disk: metadata, image discovery, validation, lesion-grouped splits,
oversampling and the torch ``Dataset`` with its transforms.

Indexing never decodes an image: it reads the metadata and walks the folder
tree, so all 10015 images index in well under a second.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.common.labels import CLASSES
from core.data.images import ImageError
from core.data.preprocessing import Preprocessing, load_for_model

METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata")


# Which camera or clinic took each image (vidir_modern, vidir_molemax, rosendahl, vienna_dias): a ``dataset``
# column of the metadata itself, else this file beside it (image_id, dataset). The index calls it ``source``.
SOURCES_NAME = "HAM10000_sources.csv"


UNKNOWN_SOURCE = "unknown"


HAM10000_IMAGES = 10_015  # the published dataset's images: a folder with as many usable ones holds all of it


# Magic bytes let the index flag empty and non-image files without decoding them.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


# Looking through a folder is bounded: a HAM10000 folder is two levels and about 10,000 files deep, so
# these only stop a wrong choice ("/", "/proc", a home folder) before it costs minutes and memory.
MAX_WALK_DEPTH = 6


MAX_WALK_ENTRIES = 200_000


MAX_WALK_SECONDS = 20.0


# A table describes the images beside it: one far longer than that is not their metadata, and is refused
# after reading at most this many rows rather than parsed whole.
METADATA_ROWS_PER_IMAGE = 10


METADATA_ROWS_SLACK = 1_000


MAX_METADATA_ROWS = 200_000


# A header line longer than this is not a metadata header (and must not be read whole to find out), nor is one of
# more columns: HAM10000's has 7, an isic-cli export's a few dozen. pandas took 93-138 s to read a table of
# 20,000 columns, and 15 minutes for 200,000.
MAX_HEADER_BYTES = 64 * 1024
MAX_COLUMNS = 1_000


class DatasetError(Exception):
    """A problem that stops the dataset from being used; the message says what to do."""


def _first_line(path: Path) -> str:
    """The header line, once it is within ``MAX_HEADER_BYTES`` and ``MAX_COLUMNS``; DatasetError otherwise."""
    try:
        with path.open("r", encoding="utf-8-sig", errors="replace") as fh:
            line = fh.readline(MAX_HEADER_BYTES)
            longer = not line.endswith("\n") and fh.read(1) != ""
    except OSError as exc:
        raise DatasetError(f"Cannot read {path}: {exc.strerror}.") from None
    if longer:
        raise DatasetError(
            f"{path} has a header line longer than {MAX_HEADER_BYTES // 1024} KiB, so it is not a metadata table."
        )
    columns = line.count(_separator(line)) + 1
    if columns > MAX_COLUMNS:
        raise DatasetError(
            f"{path} has {columns:,} columns in its header; a metadata table has at most {MAX_COLUMNS:,}."
        )
    return line


def _separator(line: str) -> str:
    return "\t" if line.count("\t") > line.count(",") else ","


def read_header(path: str | Path) -> list[str]:
    """A CSV or TSV's column names as :func:`read_table` gives them, from its first line only."""
    line = _first_line(Path(path))
    return [c.strip().strip('"').strip().lower() for c in next(csv.reader([line], delimiter=_separator(line)), [])]


def metadata_row_limit(images: int) -> int:
    """The most rows a table describing ``images`` image files may have."""
    return min(METADATA_ROWS_PER_IMAGE * images + METADATA_ROWS_SLACK, MAX_METADATA_ROWS)


def read_table(path: str | Path, *, images: int | None = None) -> pd.DataFrame:
    """A CSV or TSV (sniffed from the header) as stripped strings, with lower-case column names and a
    ``row`` column holding the line number a user sees in an editor. Handles CRLF and Dataverse's quoting.

    ``images``, the number of image files the table describes, bounds the rows read
    (:func:`metadata_row_limit`); a longer table is refused without being read to its end.
    """
    path = Path(path)
    limit = None if images is None else metadata_row_limit(images)
    try:
        table = pd.read_csv(
            path,
            sep=_separator(_first_line(path)),
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            encoding_errors="replace",
            nrows=None if limit is None else limit + 1,
        )
    except OSError as exc:
        raise DatasetError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"{path} is not a readable CSV/TSV file ({exc}).") from None
    if limit is not None and len(table) > limit:
        raise DatasetError(
            f"{path} has more than {limit:,} rows for the {images:,} image files found beside it, so it is not "
            f"their metadata (a table may have at most {METADATA_ROWS_PER_IMAGE} rows per image file plus "
            f"{METADATA_ROWS_SLACK:,}, and never more than {MAX_METADATA_ROWS:,}). Check that the images are in "
            "the folder and that this is the right table."
        )
    table.columns = [c.strip().strip('"').strip().lower() for c in table.columns]
    for col in table.columns:
        table[col] = table[col].astype(str).str.strip().str.strip('"').str.strip()
    table.insert(0, "row", np.arange(2, len(table) + 2))
    return table


def tidy_metadata(frame: pd.DataFrame) -> pd.DataFrame:
    """Bring a table to the metadata conventions: every column present, dx lower-case, ages numeric
    (80, 80.0 or missing), "unknown" for missing sex and site, and an image without a lesion id as its own lesion."""
    frame = frame.copy()
    for col in METADATA_COLUMNS:
        if col not in frame.columns:
            frame[col] = ""
        elif col != "age":
            frame[col] = frame[col].fillna("").astype(str)
    frame["dx"] = frame["dx"].str.lower()
    frame["age"] = pd.to_numeric(frame["age"].astype(str).replace({"": None, "NA": None, "nan": None}), errors="coerce")
    frame["sex"] = frame["sex"].str.lower().replace({"": "unknown", "nan": "unknown", "na": "unknown"})
    frame["localization"] = frame["localization"].replace({"": "unknown"})
    # A lesion id is what keeps splits honest; an image without one is its own lesion.
    no_lesion = frame["lesion_id"] == ""
    frame.loc[no_lesion, "lesion_id"] = "image:" + frame.loc[no_lesion, "image_id"]
    source = frame["dataset"] if "dataset" in frame.columns else pd.Series("", index=frame.index)
    frame["source"] = source.fillna("").astype(str).str.strip().str.lower().replace({"": UNKNOWN_SOURCE})
    return frame[["row", *METADATA_COLUMNS, "source", *(["path"] if "path" in frame.columns else [])]]


def read_sources(path: str | Path, *, images: int | None = None) -> pd.Series:
    """Each image's source (the ``dataset`` column of a table with ``image_id``), by image id."""
    header = read_header(path)
    if "image_id" not in header or "dataset" not in header:
        raise DatasetError(f"{path} has no image_id or dataset column; expected image_id,dataset per image.")
    table = read_table(path, images=images).drop_duplicates("image_id")
    return pd.Series(table["dataset"].to_numpy(), index=table["image_id"].to_numpy())


def read_metadata(path: str | Path, *, images: int | None = None) -> pd.DataFrame:
    """Read HAM10000 metadata as published: the CSV (CRLF) or Dataverse's tab-separated export, with each
    image's ``source`` from its ``dataset`` column or from :data:`SOURCES_NAME` beside it ("unknown" without).

    Ages may be written 80 or 80.0 or be missing; they become a float column with NaN.
    ``sex`` keeps "unknown" as its own value and fills missing ones with it. The header is checked
    before the rows are read; ``images`` bounds the rows (see :func:`read_table`).
    """
    header = read_header(path)
    missing = [c for c in ("image_id", "dx") if c not in header]
    if missing:
        raise DatasetError(
            f"{path} has no {' or '.join(missing)} column. Expected the HAM10000 metadata with columns "
            f"{', '.join(METADATA_COLUMNS)}."
        )
    table = read_table(path, images=images)
    sources = Path(path).parent / SOURCES_NAME
    if "dataset" not in table.columns and sources.is_file():
        table["dataset"] = table["image_id"].map(read_sources(sources, images=images))
    return tidy_metadata(table)


def _is_metadata_candidate(name: str) -> bool:
    return name in METADATA_NAMES or os.path.splitext(name)[1].lower() in (".csv", ".tab")


def find_metadata(root: Path) -> Path:
    """The metadata file below ``root``: the published name first, then any CSV/TAB with image_id and dx."""
    candidates = sorted(walk_files(root, _is_metadata_candidate))
    for name in METADATA_NAMES:
        hits = [p for p in candidates if p.name == name]
        if hits:
            return hits[0]
    for candidate in candidates:
        try:
            header = read_header(candidate)
        except DatasetError:  # an unreadable table is not the metadata
            continue
        if "image_id" in header and "dx" in header:
            return candidate
    raise DatasetError(
        f"No HAM10000 metadata found below {root}. Put HAM10000_metadata.csv (or the Dataverse "
        "HAM10000_metadata.tab) in that folder, or download the dataset with `lesionlab download`."
    )


@dataclass
class ValidationReport:
    """Everything that did not line up between metadata and files. Nothing is dropped silently:
    each entry names the file or the metadata row it is about."""

    metadata_path: str = ""
    images_found: int = 0
    rows_read: int = 0
    images_without_metadata: list[str] = field(default_factory=list)
    rows_without_images: list[str] = field(default_factory=list)
    unknown_diagnoses: list[str] = field(default_factory=list)
    duplicate_image_ids: list[str] = field(default_factory=list)
    unreadable_files: list[str] = field(default_factory=list)

    CATEGORIES = (
        ("images_without_metadata", "Images without a metadata row (not used)"),
        ("rows_without_images", "Metadata rows without an image (not used)"),
        ("unknown_diagnoses", "Rows with an unknown diagnosis code (not used)"),
        ("duplicate_image_ids", "Image ids found more than once (first file used)"),
        ("unreadable_files", "Files that are not readable images (not used)"),
    )

    @property
    def ok(self) -> bool:
        return not any(getattr(self, key) for key, _ in self.CATEGORIES)

    def problems(self) -> pd.DataFrame:
        """One row per problem: category, and the file or row it names."""
        rows = [(title, item) for key, title in self.CATEGORIES for item in getattr(self, key)]
        return pd.DataFrame(rows, columns=["problem", "where"])

    def summary(self) -> str:
        lines = [f"{self.rows_read} metadata rows ({self.metadata_path}), {self.images_found} image files."]
        for key, title in self.CATEGORIES:
            items = getattr(self, key)
            if items:
                shown = "; ".join(items[:5]) + (f"; … {len(items) - 5} more" if len(items) > 5 else "")
                lines.append(f"{title}: {len(items)} — {shown}")
        if self.ok:
            lines.append("No problems found.")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DatasetIndex:
    """The usable images (``frame``: metadata columns + ``path`` + ``label``) and what was set aside."""

    root: Path
    frame: pd.DataFrame
    report: ValidationReport

    def class_counts(self) -> pd.Series:
        return self.frame["dx"].value_counts().reindex(CLASSES, fill_value=0)

    @property
    def has_sources(self) -> bool:
        """Whether any image's source is known (:data:`SOURCES_NAME`, or a ``dataset`` column)."""
        return bool((self.frame["source"] != UNKNOWN_SOURCE).any())

    def source_counts(self) -> pd.DataFrame:
        """Images per source (rows, largest first) and class (columns, in ``CLASSES`` order)."""
        table = pd.crosstab(self.frame["source"], self.frame["dx"]).reindex(columns=list(CLASSES), fill_value=0)
        return table.loc[table.sum(axis=1).sort_values(ascending=False).index].rename_axis(index="source", columns="dx")


def _listing(folder: Path) -> Iterator[os.DirEntry]:
    """The entries of ``folder``; none, or only those read so far, when it cannot be listed or vanishes
    meanwhile (as /proc's folders do)."""
    try:
        with os.scandir(folder) as entries:
            yield from entries
    except OSError:
        return


def walk_files(
    root: Path,
    keep: Callable[[str], bool],
    *,
    max_depth: int = MAX_WALK_DEPTH,
    max_entries: int = MAX_WALK_ENTRIES,
    max_seconds: float = MAX_WALK_SECONDS,
) -> Iterator[Path]:
    """Regular files below ``root`` whose name ``keep`` accepts, hidden files and folders left out.

    Raises :class:`DatasetError` when a folder lies more than ``max_depth`` levels below ``root``, or the
    walk meets more than ``max_entries`` files and folders or takes longer than ``max_seconds``. Folders
    below ``root`` that cannot be listed are skipped; links to folders are not followed (no loops).
    """
    if not os.access(root, os.R_OK | os.X_OK):
        raise DatasetError(f"Cannot read the folder {root}; check that it exists and that you may open it.")
    deadline = time.monotonic() + max_seconds
    seen = 0
    pending = [(Path(root), 0)]
    while pending:
        folder, depth = pending.pop()
        for entry in _listing(folder):
            seen += 1
            if seen > max_entries:
                raise DatasetError(
                    f"{root} holds more than {max_entries:,} files and folders; a dataset folder has far "
                    "fewer (HAM10000: about 10,000). Choose the folder that holds the dataset itself."
                )
            if time.monotonic() >= deadline:
                raise DatasetError(
                    f"Looking through {root} took more than {max_seconds:g} s ({seen:,} files and folders "
                    "so far). Choose the folder that holds the dataset itself, on a local disk."
                )
            if entry.name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
                wanted = not is_folder and keep(entry.name) and entry.is_file()  # no FIFOs or devices
            except OSError:  # vanished meanwhile
                continue
            if is_folder:
                if depth == max_depth:
                    raise DatasetError(
                        f"{root} has folders more than {max_depth} levels deep ({entry.path}); a dataset keeps "
                        "its images a level or two down. Choose the folder that holds the dataset itself."
                    )
                pending.append((Path(entry.path), depth + 1))
            elif wanted:
                yield Path(entry.path)


def walk_images(root: Path) -> Iterator[Path]:
    """JPEG and PNG files (by suffix) below ``root``, within the bounds of :func:`walk_files`."""
    return walk_files(root, lambda name: os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)


def looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return any(head.startswith(sig) for sig in _SIGNATURES)


def index_dataset(root: str | Path, *, metadata: str | Path | None = None) -> DatasetIndex:
    """Pair metadata rows with image files found anywhere below ``root``.

    Raises :class:`DatasetError` only when nothing usable remains; every other
    mismatch goes into the returned report.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"Dataset folder {root} does not exist. Point the app or --data at the folder holding "
            "HAM10000_metadata.csv and the images, or download it with `lesionlab download`."
        )
    images = sorted(walk_images(root))
    meta_path = Path(metadata) if metadata else find_metadata(root)
    meta = read_metadata(meta_path, images=len(images))
    report = ValidationReport(metadata_path=str(meta_path), rows_read=len(meta))
    return pair_with_images(
        root,
        images,
        meta,
        report,
        "Check that the image files are named by their image_id "
        "(e.g. ISIC_0024306.jpg) and that the metadata's dx column uses the HAM10000 codes.",
    )


def pair_with_images(
    root: Path, images: list[Path], meta: pd.DataFrame, report: ValidationReport, hint: str
) -> DatasetIndex:
    """Match metadata rows to ``images`` (the sorted image files below ``root``) named ``<image_id>.<ext>``.

    Every mismatch goes into ``report``. Rows whose ``dx`` is not a class code are
    reported as unknown diagnoses, except an empty ``dx``, which marks a row its
    importer already reported; the images of both are set aside with their rows.
    """
    files: dict[str, Path] = {}
    for path in images:
        image_id = path.stem
        if image_id in files:
            report.duplicate_image_ids.append(f"{image_id}: {files[image_id]} and {path}")
            continue
        files[image_id] = path
    report.images_found = len(files) + len(report.duplicate_image_ids)

    # zip over columns rather than iterrows: a long table is reported in seconds, not minutes.
    dup_rows = meta["image_id"].duplicated(keep="first")
    dups = meta[dup_rows]
    report.duplicate_image_ids.extend(
        f"row {row}: image_id {image_id} already listed"
        for row, image_id in zip(dups["row"], dups["image_id"], strict=True)
    )
    meta = meta[~dup_rows]
    listed = set(meta["image_id"])  # set-aside rows' files are not "without metadata"

    known = meta["dx"].isin(CLASSES)
    unknown = meta[~known & (meta["dx"] != "")]
    report.unknown_diagnoses.extend(
        f"row {row}: {image_id} has dx {dx!r}"
        for row, image_id, dx in zip(unknown["row"], unknown["image_id"], unknown["dx"], strict=True)
    )
    meta = meta[known]

    has_file = meta["image_id"].isin(files.keys())
    orphans = meta[~has_file]
    report.rows_without_images.extend(
        f"row {row}: {image_id}" for row, image_id in zip(orphans["row"], orphans["image_id"], strict=True)
    )
    meta = meta[has_file].copy()
    report.images_without_metadata.extend(str(p) for i, p in files.items() if i not in listed)
    meta["path"] = [str(files[i]) for i in meta["image_id"]]
    return finish_index(root, meta, report, hint)


def finish_index(root: Path, frame: pd.DataFrame, report: ValidationReport, hint: str) -> DatasetIndex:
    """Set aside files that are not JPEG/PNG (by signature, without decoding) and add the integer label."""
    readable = np.array([looks_like_image(Path(p)) for p in frame["path"]], dtype=bool)
    report.unreadable_files.extend(frame.loc[~readable, "path"].tolist())
    frame = frame[readable].copy()
    if frame.empty:
        raise DatasetError(f"No usable images below {root}: {report.summary()}\n{hint}")
    frame["label"] = frame["dx"].map(CLASSES.index).astype(int)
    return DatasetIndex(root=root, frame=frame.reset_index(drop=True), report=report)


class LesionDataset(torch.utils.data.Dataset):
    """Images and integer labels (indices into ``CLASSES``).

    Indexing checks only a file's first bytes, so a JPEG cut short by an interrupted copy passes it and
    fails only when decoded. With ``skip_damaged`` such an image does not stop a training run:

    1. :meth:`__getitem__` returns ``None`` for it instead of ``(image, label)`` and raises its flag in
       ``damaged``, one flag per image. The flags live in shared memory, so a flag raised in a
       DataLoader worker process is seen by the trainer, which reads them with :meth:`damaged_paths`.
    2. :meth:`collate`, the loader's ``collate_fn``, leaves the ``None`` samples out of the batch, so the
       epoch goes on with a slightly smaller batch.
    3. A flagged image stays aside for the rest of the run without being decoded again. So a pass over
       the data returns exactly the images whose flag is down afterwards, in order, and the trainer
       drops the flagged rows from the table it pairs with the outputs (the test predictions).

    Without ``skip_damaged`` (the evaluator, which reports the file) decoding errors propagate as
    :class:`core.data.images.ImageError`.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable,
        prep: Preprocessing,
        *,
        skip_damaged: bool = False,
    ):
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = list(paths)
        self.labels = [int(x) for x in labels]
        self.transform = transform
        self.prep = prep
        self.skip_damaged = skip_damaged
        self.damaged = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, transform: Callable, prep: Preprocessing, *, skip_damaged: bool = False
    ) -> LesionDataset:
        return cls(frame["path"].tolist(), frame["label"].tolist(), transform, prep, skip_damaged=skip_damaged)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.damaged[i]:
            return None
        try:
            image = load_for_model(self.paths[i], self.prep)
        except ImageError:
            if not self.skip_damaged:
                raise
            self.damaged[i] = True
            return None
        return self.transform(image), self.labels[i]

    def damaged_paths(self) -> list[str]:
        """The images set aside so far because they could not be decoded, in dataset order."""
        return [self.paths[i] for i in self.damaged.nonzero().flatten().tolist()]

    def collate(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        """A DataLoader ``collate_fn`` that leaves out the damaged images (``None`` samples).

        A batch of nothing but damaged images comes out empty, shaped as the transform's output
        (``prep.input_size``), so that evaluation passes need no special case; training skips it.
        """
        kept = [s for s in samples if s is not None]
        if not kept:
            return torch.empty(0, 3, *self.prep.input_size), torch.empty(0, dtype=torch.long)
        return torch.utils.data.default_collate(kept)
