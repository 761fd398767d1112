"""External dataset layouts: image sets not laid out like HAM10000, read mainly as external test sets.

Three layouts besides HAM10000's own (``core.data.dataset.index_dataset``):

* an ``isic-cli`` export (``isic image download``): images named ``<isic_id>.jpg``
  and a ``metadata.csv`` with ``isic_id`` and the ISIC archive's diagnosis, either
  the legacy ``diagnosis`` column or the ``diagnosis_1`` … ``diagnosis_5`` hierarchy;
* one folder per class, named by class code (``mel``, ``MEL``, …) or diagnosis name;
* the ISIC 2018 Task 3 ground-truth CSV (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one-hot)
  next to a folder of images.

Each importer returns a :class:`core.data.dataset.DatasetIndex` with the same frame
columns as ``index_dataset`` and a ``ValidationReport`` naming everything set
aside. :func:`index_any` picks the importer from what a folder holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.common.labels import CLASSES, DISPLAY_NAMES, ISIC2018_COLUMNS, code_from_onehot
from core.data.dataset import (
    DatasetError,
    DatasetIndex,
    ValidationReport,
    find_metadata,
    finish_index,
    index_dataset,
    pair_with_images,
    read_header,
    read_table,
    tidy_metadata,
    walk_files,
    walk_images,
)

HAM10000, ISIC2018, ISIC_CLI, CLASS_FOLDERS = "ham10000", "isic2018", "isic-cli", "class-folders"
_TABLE_SUFFIXES = (".csv", ".tab", ".tsv")

# ISIC archive diagnosis names, legacy and hierarchical, that fall in one of the seven HAM10000 classes.
# Anything else (scar, verruca, invasive squamous cell carcinoma, …) is reported, never guessed at.
_ARCHIVE_NAMES = {
    "melanoma": "mel",
    "melanoma, nos": "mel",
    "melanoma invasive": "mel",
    "melanoma in situ": "mel",
    "melanoma metastasis": "mel",
    "malignant melanocytic proliferations (melanoma)": "mel",
    "nevus": "nv",
    "benign melanocytic proliferations": "nv",
    "basal cell carcinoma": "bcc",
    "actinic keratosis": "akiec",
    "solar or actinic keratosis": "akiec",
    # akiec is "actinic keratoses and intraepithelial carcinoma (Bowen's disease)", i.e. SCC in situ.
    # The archive files HAM10000's own akiec images partly under "Squamous cell carcinoma, NOS", and the
    # legacy "squamous cell carcinoma" is just as unspecific; only an explicitly invasive SCC is excluded.
    "squamous cell carcinoma in situ": "akiec",
    "squamous cell carcinoma in situ, bowens disease": "akiec",
    "bowen's disease": "akiec",
    "bowens disease": "akiec",
    "squamous cell carcinoma, nos": "akiec",
    "squamous cell carcinoma": "akiec",
    "pigmented benign keratosis": "bkl",
    "seborrheic keratosis": "bkl",
    "solar lentigo": "bkl",
    "lentigo nos": "bkl",
    "lichenoid keratosis": "bkl",
    "lichen planus like keratosis": "bkl",
    "dermatofibroma": "df",
    "vascular lesion": "vasc",
    "benign soft tissue proliferations - vascular": "vasc",
    "angioma": "vasc",
    "hemangioma": "vasc",
    "angiokeratoma": "vasc",
    "pyogenic granuloma": "vasc",
    "hemorrhage": "vasc",
}
# Most specific first: the deepest level that names a class decides.
_DIAGNOSIS_COLUMNS = ("diagnosis_5", "diagnosis_4", "diagnosis_3", "diagnosis_2", "diagnosis_1", "diagnosis")


_NAMES = {**{code: code for code in CLASSES}, **{d.lower(): c for c, d in DISPLAY_NAMES.items()}, **_ARCHIVE_NAMES}


def diagnosis_code(name: str) -> str | None:
    """The class code for a class code, ISIC 2018 column, display name or ISIC archive diagnosis; else None."""
    return _NAMES.get(" ".join(name.replace("_", " ").split()).lower())


@dataclass(frozen=True)
class Layout:
    """What a folder holds: ``kind`` is HAM10000, ISIC2018, ISIC_CLI or CLASS_FOLDERS; ``source`` is the
    metadata or ground-truth file it was recognised by (the folder itself for class folders)."""

    kind: str
    source: Path


def detect_layout(root: str | Path) -> Layout:
    """Recognise the layout of ``root``, in the order HAM10000 metadata, ISIC 2018 ground truth,
    isic-cli metadata, class folders. Raises :class:`DatasetError` saying what was expected."""
    root = _existing_dir(root)
    try:
        return Layout(HAM10000, find_metadata(root))
    except DatasetError:
        pass
    tables = [(path, _header(path)) for path in _tables(root)]
    for path, header in tables:
        if "image" in header and all(col.lower() in header for col in ISIC2018_COLUMNS):
            return Layout(ISIC2018, path)
    for path, header in tables:
        if "isic_id" in header and any(col in header for col in _DIAGNOSIS_COLUMNS):
            return Layout(ISIC_CLI, path)
    if _class_folders(root):
        return Layout(CLASS_FOLDERS, root)
    subfolders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    raise DatasetError(
        f"{root} holds no dataset layout this app recognises (tables: "
        f"{', '.join(p.name for p, _ in tables) or 'none'}; subfolders: {', '.join(subfolders[:10]) or 'none'}). "
        "Use one of: HAM10000 metadata (image_id and dx columns) with the images; the ISIC 2018 Task 3 "
        "ground-truth CSV (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC) with the images; an isic-cli export "
        f"(metadata.csv with isic_id and diagnosis columns); or one folder per class named {', '.join(CLASSES)}."
    )


def index_any(root: str | Path) -> DatasetIndex:
    """Index ``root`` whatever its layout (see :func:`detect_layout`)."""
    layout = detect_layout(root)
    if layout.kind == HAM10000:
        return index_dataset(root, metadata=layout.source)
    if layout.kind == ISIC2018:
        return import_isic2018_ground_truth(root, layout.source)
    if layout.kind == ISIC_CLI:
        return import_isic_cli(root, layout.source)
    return import_class_folders(root)


# ---------------------------------------------------------------------------
# Importers


def import_isic_cli(root: str | Path, metadata: str | Path | None = None) -> DatasetIndex:
    """An ``isic image download`` folder: ``metadata.csv`` (``isic_id``, diagnosis columns) and ``<isic_id>.jpg``."""
    root = _existing_dir(root)
    path = Path(metadata) if metadata else _find_table(root, lambda h: "isic_id" in h, "an isic-cli metadata.csv")
    images = sorted(walk_images(root))
    table = read_table(path, images=len(images))
    if "isic_id" not in table.columns or not any(c in table.columns for c in _DIAGNOSIS_COLUMNS):
        raise DatasetError(f"{path} has no isic_id and diagnosis columns; it is not an isic-cli metadata.csv.")
    levels = [c for c in _DIAGNOSIS_COLUMNS if c in table.columns]
    dx, most_specific = [], []
    for _, r in table.iterrows():
        # A deeper level may be finer than the classes ("Nevus, Spitz"); the deepest one that names a class decides.
        names = [r[c] for c in levels if r[c]]
        dx.append(next((code for code in map(diagnosis_code, names) if code), ""))
        most_specific.append(names[0] if names else "no diagnosis")
    frame = pd.DataFrame(
        {
            "row": table["row"],
            "lesion_id": table.get("lesion_id", ""),
            "image_id": table["isic_id"],
            "dx": dx,
            "dx_type": table.get("diagnosis_confirm_type", ""),
            "age": table.get("age_approx", ""),
            "sex": table.get("sex", ""),
            "localization": table.get("anatom_site_general", table.get("anatom_site_general_challenge", "")),
        }
    )
    report = ValidationReport(metadata_path=str(path), rows_read=len(frame))
    for i in np.flatnonzero(frame["dx"] == ""):
        report.unknown_diagnoses.append(
            f"row {frame['row'].iat[i]}: {frame['image_id'].iat[i]} has diagnosis {most_specific[i]!r}"
        )
    return pair_with_images(
        root,
        images,
        tidy_metadata(frame),
        report,
        "Check that the image files are named by the image ids in isic-cli's metadata.csv.",
    )


def import_isic2018_ground_truth(root: str | Path, ground_truth: str | Path | None = None) -> DatasetIndex:
    """The ISIC 2018 Task 3 one-hot ground-truth CSV and the images it names, anywhere below ``root``."""
    root = _existing_dir(root)
    columns = [c.lower() for c in ISIC2018_COLUMNS]
    path = (
        Path(ground_truth)
        if ground_truth
        else _find_table(root, lambda h: "image" in h and all(c in h for c in columns), "an ISIC 2018 ground-truth CSV")
    )
    images = sorted(walk_images(root))
    table = read_table(path, images=len(images))
    missing = [c.upper() for c in ["image", *columns] if c not in table.columns]
    if missing:
        raise DatasetError(f"{path} lacks the column(s) {', '.join(missing)} of an ISIC 2018 Task 3 ground truth.")
    report = ValidationReport(metadata_path=str(path), rows_read=len(table))
    dx = []
    for _, r in table.iterrows():
        try:
            dx.append(code_from_onehot({col: r[col.lower()] for col in ISIC2018_COLUMNS}))
        except ValueError as exc:  # also raised for non-numeric cells
            report.unknown_diagnoses.append(f"row {r['row']}: {r['image']} ({exc})")
            dx.append("")
    frame = pd.DataFrame({"row": table["row"], "lesion_id": "", "image_id": table["image"], "dx": dx})
    return pair_with_images(
        root,
        images,
        tidy_metadata(frame),
        report,
        "Check that the image files are named by the image ids in the ISIC 2018 ground-truth CSV.",
    )


def import_class_folders(root: str | Path) -> DatasetIndex:
    """One subfolder of ``root`` per class; images may sit deeper inside it. Each image is its own lesion."""
    root = _existing_dir(root)
    report = ValidationReport(metadata_path=f"class folders in {root}")
    records: list[dict] = []
    seen: dict[str, Path] = {}
    for path in sorted(walk_images(root)):
        report.images_found += 1
        rel = path.relative_to(root)
        if len(rel.parts) == 1:
            report.images_without_metadata.append(f"{path} (not inside a class folder)")
            continue
        folder = rel.parts[0]
        code = diagnosis_code(folder)
        if code is None:
            report.unknown_diagnoses.append(f"{path}: folder {folder!r} is not one of {', '.join(CLASSES)}")
        elif path.stem in seen:
            report.duplicate_image_ids.append(f"{path.stem}: {seen[path.stem]} and {path}")
        else:
            seen[path.stem] = path
            records.append({"row": len(records) + 1, "image_id": path.stem, "dx": code, "path": str(path)})
    report.rows_read = report.images_found
    frame = tidy_metadata(pd.DataFrame(records, columns=["row", "image_id", "dx", "path"]))
    hint = f"Put the images in folders named {', '.join(CLASSES)} directly in {root}."
    return finish_index(root, frame, report, hint)


# ---------------------------------------------------------------------------
# Shared steps


def _existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Folder {root} does not exist. Choose the folder that holds the images and their labels.")
    return root


def _tables(root: Path) -> list[Path]:
    # walk_files leaves out hidden folders: they hold partial downloads and tool state, not data.
    return sorted(walk_files(root, lambda name: os.path.splitext(name)[1].lower() in _TABLE_SUFFIXES))


def _header(path: Path) -> list[str]:
    try:
        return read_header(path)
    except DatasetError:  # an unreadable table matches no layout
        return []


def _class_folders(root: Path) -> list[Path]:
    return [d for d in sorted(root.iterdir()) if d.is_dir() and diagnosis_code(d.name)]


def _find_table(root: Path, matches: Callable[[list[str]], bool], what: str) -> Path:
    for path in _tables(root):
        if matches(_header(path)):
            return path
    raise DatasetError(f"No {what} found below {root}.")
