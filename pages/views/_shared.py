"""Streamlit helpers shared by the pages: settings, cached loading, and the common notices.

Only glue lives here; the work is done in ``core``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from core import jobs, runs, settings
from core.data import DatasetError, DatasetIndex, index_dataset
from core.formatting import format_bytes

NOTICE = (
    "**Research and education only — not a medical device.** Lesion Lab does not diagnose. "
    "Never use it to decide on care; see a dermatologist about any skin lesion that worries you."
)
DATASET_KEY = "dataset_folder"


def research_notice() -> None:
    st.warning(NOTICE, icon=":material/medical_information:")


def dataset_choice() -> settings.DatasetChoice:
    return settings.dataset_choice(st.session_state.get(DATASET_KEY))


def _metadata_stamp(folder: Path) -> float:
    """Changes when the folder or its metadata file changes, so the cached index refreshes."""
    stamps = [folder.stat().st_mtime] if folder.is_dir() else [0.0]
    for name in ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata"):
        p = folder / name
        if p.is_file():
            stamps.append(p.stat().st_mtime)
    return max(stamps)


@st.cache_data(show_spinner="Indexing the dataset…", max_entries=4)
def _index(folder: str, stamp: float) -> DatasetIndex:
    return index_dataset(folder)


def load_dataset(show_help: bool = True) -> DatasetIndex | None:
    """The configured dataset's index, or None after telling the user what is missing and how to fix it."""
    choice = dataset_choice()
    if not choice.configured:
        if show_help:
            st.info(settings.HOW_TO_GET_DATA, icon=":material/folder_open:")
        return None
    try:
        return _index(str(choice.folder), _metadata_stamp(choice.folder))
    except DatasetError as exc:
        if show_help:
            st.error(f"The dataset folder {choice.describe()} cannot be used:\n\n{exc}", icon=":material/block:")
            st.info(settings.HOW_TO_GET_DATA, icon=":material/folder_open:")
        return None


def runs_dir() -> Path:
    return settings.runs_dir()


def list_runs() -> list[runs.RunState]:
    folder = runs_dir()
    return runs.list_runs(folder, jobs.active_job(folder))


def evaluated_runs() -> list[runs.RunState]:
    """Finished runs with a test evaluation: this machine's, then the published ones of the same name not
    trained here (a local run of the same name wins)."""
    local = list_runs()
    published_dir = settings.published_runs_dir()
    published = runs.list_runs(published_dir) if published_dir else []
    names = {r.name for r in local}
    found = local + [r for r in published if r.name not in names]
    return [r for r in found if r.has_evaluation]


def is_published(run: runs.RunState) -> bool:
    published_dir = settings.published_runs_dir()
    return published_dir is not None and run.path.parent == published_dir


def no_runs_message(what: str = "evaluate") -> None:
    st.info(
        f"There is no finished run to {what} yet. Train one on the **Train** page (a few epochs of the "
        "`seed` preset is enough to see everything), or from a terminal: "
        "`python -m core.train --preset seed --data DATASET --epochs 3`.",
        icon=":material/science:",
    )


def run_label(run: runs.RunState) -> str:
    cfg = run.config
    bits = [cfg.get("arch"), cfg.get("finetune"), cfg.get("imbalance")]
    desc = ", ".join(str(b) for b in bits if b)
    label = f"{run.name} ({desc})" if desc else run.name
    return f"{label} — published with the model card" if is_published(run) else label


def fmt_seconds(s: float | None) -> str:
    return "—" if s is None else runs.format_duration(s)


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _predictor(path: str, stamp: float):
    """One Predictor per checkpoint file version, shared by all sessions: loaded once, never on reruns."""
    from core.checkpoints import CheckpointError
    from core.predict import Predictor

    try:
        return Predictor(path), None
    except (CheckpointError, OSError, RuntimeError, ValueError, KeyError) as exc:
        return None, str(exc)


def get_predictor(path: Path):
    """(Predictor, None) or (None, message)."""
    try:
        stamp = Path(path).stat().st_mtime
    except OSError as exc:
        return None, f"{path} cannot be read ({exc.strerror})"
    return _predictor(str(path), stamp)


def model_choice(prefix: str):
    """The Diagnose page's model picker and flip-averaging toggle, keyed ``{prefix}_model`` and ``{prefix}_tta``:
    (Predictor, checkpoint path, tta). Stops the page with what to do when no model can be used."""
    from core.predict import TTA_HELP, USE_TTA_BY_DEFAULT

    models = settings.model_files()
    if not models:
        st.info(
            "No model is available. Lesion Lab uses `checkpoints/*.pt` (the repository ships "
            "`checkpoints/reference.pt`) and the `best.pt` of every finished training run: train one on the "
            "**Train** page, or copy a Lesion Lab checkpoint into `checkpoints/`.",
            icon=":material/neurology:",
        )
        st.stop()
    c_model, c_tta = st.columns([3, 1])
    path = c_model.selectbox("Model", models, format_func=settings.model_label, key=f"{prefix}_model")
    tta = c_tta.toggle("Flip averaging (TTA)", value=USE_TTA_BY_DEFAULT, key=f"{prefix}_tta", help=TTA_HELP)
    predictor, error = get_predictor(path)
    if predictor is None:
        st.error(f"This model cannot be used: {error}", icon=":material/block:")
        st.stop()
    return predictor, path, tta


@st.cache_data(max_entries=8, show_spinner=False)
def _predictions(run_dir: str, stamp: float):
    return runs.read_predictions(Path(run_dir))


def predictions(run_dir: Path):
    """``runs.read_predictions`` cached per file version; raises ValueError with a readable message."""
    path = Path(run_dir) / "test_predictions.csv"
    try:
        stamp = path.stat().st_mtime
    except OSError:
        raise ValueError(f"{Path(run_dir).name} has no test predictions yet") from None
    return _predictions(str(run_dir), stamp)


@st.cache_data(max_entries=256, show_spinner=False)
def _cam_overlay(checkpoint: str, stamp: float, image_path: str, target: int, method: str, alpha: float):
    from core.explain import overlay

    predictor, _ = get_predictor(Path(checkpoint))
    if predictor is None:
        return None
    try:
        prediction = predictor.predict(image_path, upload=False)  # a dataset image, evaluated as it is
        return overlay(prediction.image, predictor.explain(prediction, method, target), alpha)
    except Exception:  # noqa: BLE001 — a missing or broken image shows without its overlay
        return None


def cam_overlay(checkpoint: str, image_path: str, target: int, method: str = "gradcam", alpha: float = 0.45):
    """A Grad-CAM overlay of a dataset image for class ``target`` (cached), or None when it cannot be made."""
    try:
        stamp = Path(checkpoint).stat().st_mtime
    except OSError:
        return None
    return _cam_overlay(checkpoint, stamp, image_path, target, method, alpha)


# ---------------------------------------------------------------------------
# Get HAM10000 (a background download job; see core.jobs.start_download)


def _use_folder(folder: str) -> None:
    st.session_state[DATASET_KEY] = folder


def _download_body(active: jobs.Job | None) -> None:
    folder = runs_dir()
    status = jobs.download_status(folder)
    if active is not None:
        stage = {"download": "Downloading", "verify": "Verifying", "extract": "Extracting"}.get(
            (status or {}).get("stage"), "Starting"
        )
        done, total = (status or {}).get("done", 0), (status or {}).get("total")
        of = f" of {format_bytes(total)}" if total else ""
        text = f"{stage} {(status or {}).get('file', '')}: {format_bytes(done)}{of}"
        st.progress(min(1.0, done / total) if total else 0.0, text=text)
        st.button(
            "Cancel download",
            icon=":material/cancel:",
            on_click=jobs.cancel_download,
            args=(folder,),
            help="Verified files stay; a partial file resumes when you start again.",
        )
        return
    if status is not None and status["state"] == "finished":
        st.success(f"HAM10000 is ready in `{status['dest']}`.", icon=":material/check_circle:")
        with st.expander("Download report"):
            st.code(status.get("summary", ""), language=None)
        st.button("Use this folder", type="primary", on_click=_use_folder, args=(status["dest"],))
    elif status is not None and status["state"] == "failed":
        st.error(
            f"The download did not finish: {status.get('error')}\n\nStart it again to resume.",
            icon=":material/cloud_off:",
        )
    with st.form("download_form", border=False):
        dest = st.text_input("Download into", value=str(settings.DEFAULT_DOWNLOAD), key="download_dest")
        external = st.checkbox(
            "Also the ISIC 2018 Task 3 test set (an external test set, into its own folder)", key="download_external"
        )
        go = st.form_submit_button("Download HAM10000", icon=":material/download:")
    st.caption(
        "From the Harvard Dataverse (doi:10.7910/DVN/DBW86T, CC BY-NC-SA 4.0): about 2.8 GB, resumable, "
        "every file checked against its published checksum, then validated. "
        "Same as `python -m core.download --dest FOLDER`."
    )
    if go:
        try:
            jobs.start_download(
                settings.resolve_path(dest), folder, include_external=external, server=settings.dataverse_server()
            )
        except jobs.JobError as exc:
            st.error(str(exc))
        except OSError as exc:
            st.error(f"The download could not start: {exc}")
        else:
            st.rerun()


@st.fragment(run_every=1)
def _download_live(started_id: str) -> None:
    active = jobs.active_download(runs_dir())
    if active is None or active.id != started_id:
        st.rerun()  # finished: redraw the whole page with the result (and the new dataset)
    _download_body(active)


def download_panel(expanded: bool = False) -> None:
    """The Dataset page's "Get HAM10000": start, follow and use a background download."""
    active = jobs.active_download(runs_dir())
    with st.expander("Get HAM10000", expanded=expanded or active is not None, icon=":material/download:"):
        if active is not None:
            _download_live(active.id)
        else:
            _download_body(None)
