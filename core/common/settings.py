"""Where the app finds its dataset, runs and models. No Streamlit here.

The dataset folder is resolved, first match wins, from:

1. the sidebar setting of the running app (passed in as ``override``);
2. the ``LESIONLAB_DATA`` environment variable (set but empty means "no dataset");
3. ``[data] folder = "..."`` in ``.streamlit/lesionlab.toml`` (a file of its own, because
   Streamlit warns about unknown keys in ``.streamlit/config.toml``);
4. the sample shipped with the repository, ``sample_data/ham10000-sample``.

Relative paths are resolved against the project root. ``LESIONLAB_RUNS`` and
``LESIONLAB_CHECKPOINTS`` move the runs and reference-checkpoint folders (tests use them).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATASET = PROJECT_ROOT / "sample_data" / "ham10000-sample"
SETTINGS_FILE = PROJECT_ROOT / ".streamlit" / "lesionlab.toml"
DATA_ENV = "LESIONLAB_DATA"
RUNS_ENV = "LESIONLAB_RUNS"
CHECKPOINTS_ENV = "LESIONLAB_CHECKPOINTS"
PUBLISHED_RUNS_ENV = "LESIONLAB_PUBLISHED_RUNS"
CACHE_ENV = "LESIONLAB_CACHE"  # what the app can recompute: unpacked uploads, the case indexes' features
DATAVERSE_ENV = "LESIONLAB_DATAVERSE"  # another Dataverse server (a mirror; the tests' fake one)
DEFAULT_DOWNLOAD = PROJECT_ROOT / "data" / "ham10000"
REFERENCE_CHECKPOINT = "reference.pt"  # the bundled reference model, in the checkpoints folder (MODEL_CARD.md)

HOW_TO_GET_DATA = (
    "**No dataset is configured.** To get one:\n"
    "- download HAM10000 (about 2.8 GB) with **Get HAM10000** on the Dataset page or "
    "`lesionlab download --dest data/ham10000`, or copy a folder holding `HAM10000_metadata.csv` and "
    "the images;\n"
    "- then enter that folder in the sidebar under **Dataset folder**, set the environment variable "
    f'`{DATA_ENV}=/path/to/folder` before `streamlit run`, or write `[data]` / `folder = "/path"` in '
    "`.streamlit/lesionlab.toml`.\n\n"
    "The repository's small sample lives at `sample_data/ham10000-sample/` and is used by default when present. "
    "Diagnose works without any dataset."
)


@dataclass(frozen=True)
class DatasetChoice:
    """The folder to use (None: no dataset configured) and where that choice came from."""

    folder: Path | None
    source: str  # "sidebar", "environment", "settings file", "default sample", "none"

    @property
    def configured(self) -> bool:
        return self.folder is not None

    def describe(self) -> str:
        if self.folder is None:
            return "no dataset configured"
        return f"{self.folder} (from the {self.source})"


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded; a relative one is taken from the project root, not the working folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (PROJECT_ROOT / p)


def read_settings_file(path: Path = SETTINGS_FILE) -> dict:
    """The parsed ``.streamlit/lesionlab.toml``; an unreadable file counts as empty."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def dataset_choice(
    override: str | None = None,
    *,
    env: dict | None = None,
    settings_file: Path = SETTINGS_FILE,
    default: Path = DEFAULT_DATASET,
) -> DatasetChoice:
    env = os.environ if env is None else env
    if override is not None and str(override).strip():
        return DatasetChoice(resolve_path(str(override).strip()), "sidebar")
    if DATA_ENV in env:
        value = env[DATA_ENV].strip()
        return DatasetChoice(resolve_path(value), "environment") if value else DatasetChoice(None, "none")
    folder = read_settings_file(settings_file).get("data", {}).get("folder")
    if isinstance(folder, str) and folder.strip():
        return DatasetChoice(resolve_path(folder.strip()), "settings file")
    if default.is_dir():
        return DatasetChoice(default, "default sample")
    return DatasetChoice(None, "none")


def runs_dir(env: dict | None = None) -> Path:
    env = os.environ if env is None else env
    return resolve_path(env.get(RUNS_ENV) or "runs")


def published_runs_dir(env: dict | None = None) -> Path | None:
    """Read-only records of the runs behind MODEL_CARD.md (``docs/runs``), shown on Evaluate and Compare so
    a fresh clone has the reference model's evaluation and the imbalance comparison to look at.
    ``LESIONLAB_PUBLISHED_RUNS`` set but empty hides them."""
    env = os.environ if env is None else env
    value = env.get(PUBLISHED_RUNS_ENV)
    if value == "":
        return None
    return resolve_path(value or "docs/runs")


def cache_dir(env: dict | None = None) -> Path:
    """Where the app keeps what it can recompute: external test sets unpacked from uploads
    (``external/``) and the case indexes' features (``features/``)."""
    env = os.environ if env is None else env
    return resolve_path(env.get(CACHE_ENV) or ".cache")


def run_folders(env: dict | None = None) -> list[Path]:
    """Where a checkpoint's run record may be: the local runs, then the published ones."""
    published = published_runs_dir(env)
    return [runs_dir(env), *([published] if published else [])]


def checkpoints_dir(env: dict | None = None) -> Path:
    env = os.environ if env is None else env
    return resolve_path(env.get(CHECKPOINTS_ENV) or "checkpoints")


def model_files(env: dict | None = None) -> list[Path]:
    """The model pickers' choices: the bundled reference model (``checkpoints/reference.pt``), the other checkpoints,
    then each run's best.pt (newest first)."""
    refs = sorted(checkpoints_dir(env).glob("*.pt"), key=lambda p: (p.name != REFERENCE_CHECKPOINT, p.name))
    runs = [p for p in runs_dir(env).glob("*/best.pt") if p.is_file()]
    runs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in refs if p.is_file()] + runs


def model_label(path: Path, env: dict | None = None) -> str:
    """A short name for the picker: "reference" for checkpoints/reference.pt, "run: NAME" for runs/NAME/best.pt."""
    if path.name == "best.pt" and path.parent.parent == runs_dir(env):
        return f"run: {path.parent.name}"
    return f"checkpoint: {path.stem}"


def dataverse_server(env: dict | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get(DATAVERSE_ENV) or None
