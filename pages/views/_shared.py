"""Streamlit helpers shared by the pages: settings, cached loading, and the common notices.

Only glue lives here; the work is done in ``core``.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from core.app import jobs as app_jobs
from core.common import runs, settings
from core.common.formatting import format_bytes, progress_fraction, progress_text
from core.inference.opening import open_predictor

if (
    TYPE_CHECKING
):  # core.data.dataset brings torch (~1.5 s on 2 cores): imported where used, after a page's title is drawn
    from core.data.dataset import DatasetIndex

NOTICE = (
    "**Research and education only — not a medical device.** Lesion Lab does not diagnose. "
    "Never use it to decide on care; see a dermatologist about any skin lesion that worries you."
)
# Pixels: Streamlit's tables wrap a cell's text only in rows taller than 4rem (64 px); 72 holds three lines.
WRAPPING_ROW_HEIGHT = 72
DATASET_KEY = "dataset_folder"
DATASET_PARAM = "data"  # the URL's query parameter that keeps the sidebar's dataset folder across reloads


# What the pages import beyond the entry point's own (torch with core.data.dataset, torchvision models, kornia,
# grad-cam).
WARM_MODULES = (
    "core.data.dataset",
    "core.training.config",
    "core.cli.predict",
    "core.inference.explain",
    "core.cli.evaluate",
)


@st.cache_resource(show_spinner=False)
def warm_imports() -> threading.Thread:
    """Import the trainer and the predictor in the background once per server, after its first page is drawn:
    on 2 cores they take about a second, which the first visit to Train, Compare or Diagnose would wait for."""
    thread = threading.Thread(target=lambda: [importlib.import_module(m) for m in WARM_MODULES], daemon=True)
    thread.start()
    return thread


def dark_theme() -> bool:
    """Whether the browser shows the dark theme (the app follows its preference): charts draw their lines and marks
    in :data:`core.app.plots.INK` for it."""
    return st.context.theme.type == "dark"


def research_notice() -> None:
    st.warning(NOTICE, icon=":material/medical_information:")


def dataset_choice() -> settings.DatasetChoice:
    return settings.dataset_choice(st.session_state.get(DATASET_KEY))


def metadata_stamp(folder: Path) -> float:
    """Changes when the folder or its metadata file changes, so the cached index refreshes."""
    stamps = [folder.stat().st_mtime] if folder.is_dir() else [0.0]
    for name in ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata"):
        p = folder / name
        if p.is_file():
            stamps.append(p.stat().st_mtime)
    return max(stamps)


@st.cache_data(show_spinner="Indexing the dataset…", max_entries=4)
def _index(folder: str, stamp: float) -> DatasetIndex:
    from core.data.dataset import index_dataset

    return index_dataset(folder)


def load_dataset(show_help: bool = True) -> DatasetIndex | None:
    """The configured dataset's index, or None after telling the user what is missing and how to fix it."""
    choice = dataset_choice()
    if not choice.configured:
        if show_help:
            st.info(settings.HOW_TO_GET_DATA, icon=":material/folder_open:")
        return None
    from core.data.dataset import DatasetError

    try:
        return _index(str(choice.folder), metadata_stamp(choice.folder))
    except DatasetError as exc:
        if show_help:
            st.error(f"The dataset folder {choice.describe()} cannot be used:\n\n{exc}", icon=":material/block:")
            st.info(settings.HOW_TO_GET_DATA, icon=":material/folder_open:")
        return None


def runs_dir() -> Path:
    return settings.runs_dir()


def list_runs() -> list[runs.RunState]:
    folder = runs_dir()
    return runs.list_runs(folder, app_jobs.active_job(folder))


def evaluated_runs() -> list[runs.RunState]:
    """Finished runs with a test evaluation: this machine's, then the published ones of the same name not
    trained here (a local run of the same name wins). Runs whose records are damaged are left out, and the page
    says which and why (:func:`damaged_notice`)."""
    local = list_runs()
    published_dir = settings.published_runs_dir()
    published = runs.list_runs(published_dir) if published_dir else []
    names = {r.name for r in local}
    found = [r for r in local + [r for r in published if r.name not in names] if r.has_evaluation]
    damaged_notice({r.name: r.error or "" for r in found if r.state == runs.DAMAGED})
    return [r for r in found if r.state != runs.DAMAGED]


def damaged_notice(reasons: dict[str, str]) -> None:
    """Say which runs (name -> why) are left out because a record of theirs is damaged."""
    if reasons:
        st.warning(
            "Left out, their records damaged:\n\n" + "\n".join(f"- **{name}**: {why}" for name, why in reasons.items()),
            icon=":material/report:",
        )


def is_published(run: runs.RunState) -> bool:
    published_dir = settings.published_runs_dir()
    return published_dir is not None and run.path.parent == published_dir


def no_runs_message(what: str = "evaluate") -> None:
    st.info(
        f"There is no finished run to {what} yet. Train one on the **Train** page (a few epochs of the "
        "`seed` preset is enough to see everything), or from a terminal: "
        "`lesionlab train --preset seed --data DATASET --epochs 3`.",
        icon=":material/science:",
    )


def run_label(run: runs.RunState) -> str:
    cfg = run.config
    bits = [cfg.get("arch"), cfg.get("finetune"), cfg.get("imbalance")]
    desc = ", ".join(str(b) for b in bits if b)
    label = f"{run.name} ({desc}; data: {run.dataset})" if desc else f"{run.name} (data: {run.dataset})"
    return f"{label} — published with the model card" if is_published(run) else label


def progress_bar(label: str, done: float, total: float | None, started: float, **text) -> None:
    """A long step's bar with its count, rate and ETA (``text``: :func:`core.common.formatting.progress_text`'s
    ``unit`` and ``amount``)."""
    st.progress(progress_fraction(done, total), text=progress_text(label, done, total, started=started, **text))


class WorkBar:
    """A long step's bar that says from its first second what is being done (:meth:`stage`: "loading the model",
    "reading x.jpg (3 of 40)") beside the count, rate and ETA of what is done (:meth:`progress`)."""

    def __init__(self, label: str, total: int | None = None, unit: str = "images") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done, self.doing, self.started = 0, "starting", time.time()
        self._slot = st.empty()
        self._draw()

    def progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self._draw()

    def stage(self, doing: str) -> None:
        self.doing = doing
        self._draw()

    def _draw(self) -> None:
        # Streamlit sends only the last of an element's updates that are waiting to go: a stage per file is cheap.
        text = progress_text(self.label, self.done, self.total, started=self.started, unit=self.unit)
        self._slot.progress(progress_fraction(self.done, self.total), text=f"{text} · now {self.doing}")

    def empty(self) -> None:
        self._slot.empty()


def run_progress(run: runs.RunState) -> None:
    """A run's bar: through the current phase (features, …) or the epochs, with images/s and ETA."""
    st.progress(run.fraction_done(), text=run.progress_text())


# ---------------------------------------------------------------------------
# The training job, as the job and run files say


def current_job() -> tuple[app_jobs.Job | None, runs.RunState | None]:
    """The active job and the run it is on (None before its first run folder exists)."""
    folder = runs_dir()
    job = app_jobs.active_job(folder)
    name = job.current_run if job is not None else None
    return job, (runs.read_run(folder / name, job) if name else None)


def job_signature(job: app_jobs.Job | None, run: runs.RunState | None) -> tuple | None:
    """What a page drawn for this job depends on: which job, whether it was asked to stop, and the run it is
    on and that run's state. Progress within a run is left out: the live parts follow it on their own."""
    if job is None:
        return None
    return job.id, job.stop_requested, job.current_run, run.state if run else None


def while_a_job_runs(job_exists: bool, body: Callable[..., None], *args: object) -> None:
    """Draw ``body`` as a fragment that redraws itself every second while a job exists (``job_exists``, as the
    page has just read it), and once otherwise.

    Every watching tab costs the server a rerun a second (docs/BENCHMARKS.md, "Idle tabs": a quarter of a core
    per tab when the sidebar watched always), so a tab left open with no job costs nothing. A job started from
    a page redraws that page; one started elsewhere shows at the tab's next interaction; its end is seen by
    the sidebar's watch, which redraws the whole page and so this fragment without its timer."""
    st.fragment(body, run_every=1 if job_exists else None)(*args)


def _job_line(drawn: tuple | None) -> None:
    job, run = current_job()
    if job_signature(job, run) != drawn:
        st.rerun()
    if job is None:
        return
    what = "Imbalance experiment" if job.kind == "experiment" else "Training"
    if run is None:
        st.info(f"{what} starting…", icon=":material/hourglass_top:")
        return
    if run.done:  # its trainer has said how it ended while the job's processes exit: not "running" beside "stopped"
        later = job.runs[job.runs.index(run.name) + 1 :] if run.name in job.runs else []
        goes_on = later and run.state == "finished" and not job.stop_requested
        st.info(
            f"{what}: **{run.name}** {run.state}; {'the next run is starting' if goes_on else 'the job is ending'}…",
            icon=":material/hourglass_bottom:",
        )
        return
    state = "stopping" if job.stop_requested else run.state
    st.info(f"{what} running: **{run.name}** ({state})", icon=":material/hourglass_top:")


def job_sidebar(drawn: tuple | None) -> None:
    """The sidebar's line about the training job, and the watch every page relies on: ``drawn`` is the
    job's signature when the page was drawn; once the job files say otherwise (its next run, a stop, its
    end) the whole page is drawn again, within a second and without a reload."""
    while_a_job_runs(drawn is not None, _job_line, drawn)


def fmt_seconds(s: float | None) -> str:
    return "—" if s is None else runs.format_duration(s)


def lazy_tabs(views: dict[str, Callable[[], object]], key: str) -> None:
    """Tabs of which only the open one is computed (a click reruns the page): a page with a slow view
    (a Grad-CAM gallery, four metadata charts) paints as fast as its first one."""
    for tab, draw in zip(st.tabs(list(views), on_change="rerun", key=key), views.values(), strict=True):
        if tab.open:
            with tab:
                draw()


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _predictor(path: str, stamp: float):
    """One Predictor per checkpoint file version, shared by all sessions: loaded once, never on reruns."""
    from core.models.checkpoints import CheckpointError

    try:
        return open_predictor(path), None
    except (CheckpointError, OSError, RuntimeError, ValueError, KeyError) as exc:
        return None, str(exc)


def get_predictor(path: Path):
    """(Predictor, None) or (None, message)."""
    try:
        stamp = Path(path).stat().st_mtime
    except OSError as exc:
        return None, f"{path} cannot be read ({exc.strerror})"
    return _predictor(str(path), stamp)


@st.cache_resource(max_entries=2, show_spinner=False)
def _case_index(checkpoint: str, stamp: float, folder: str, data_stamp: float, _checkpoint: dict, _frame):
    """One case index per (checkpoint version, dataset version), shared by all sessions and built in a background
    thread (:func:`core.inference.similar.index_in_background`); its features are also cached on disk, so a restart
    only reads them back."""
    from core.inference.similar import index_in_background

    return index_in_background(checkpoint, _checkpoint, _frame, settings.run_folders())


def case_index(path: Path, checkpoint: dict, index: DatasetIndex):
    """The :class:`core.common.background.BackgroundTask` that builds (or has built) the dataset's case index under
    the model: its ``result`` a CaseIndex once ``finished``, or its ``error``."""
    stamp = Path(path).stat().st_mtime
    return _case_index(str(path), stamp, str(index.root), metadata_stamp(index.root), checkpoint, index.frame)


def pick_model(prefix: str, *, tta: bool = False) -> tuple[Path, bool] | None:
    """The model picker of every page that takes any model (Diagnose, Batch, Quiz, Evaluate's external test set), so
    that a model reads the same everywhere: each labelled with its measured test balanced accuracy, the reference model
    first, experimental ones listed only with the "Show experimental models" switch on (:mod:`core.app.model_picker`).
    Keyed ``{prefix}_model`` and ``{prefix}_experimental``, and with ``tta`` a flip-averaging toggle ``{prefix}_tta``.
    Returns (checkpoint path, flip averaging: False without the toggle), or None after saying what to do when no
    model can be offered."""
    from core.app.model_picker import MIN_BALANCED_ACCURACY, MIN_TRAIN_IMAGES, model_choices
    from core.inference.predictor import TTA_HELP, USE_TTA_BY_DEFAULT

    choices = model_choices()
    if not choices:
        st.info(
            "No model is available. Lesion Lab uses `checkpoints/*.pt` (the repository ships "
            "`checkpoints/reference.pt`) and the `best.pt` of every finished training run: train one on the "
            "**Train** page, or copy a Lesion Lab checkpoint into `checkpoints/`.",
            icon=":material/neurology:",
        )
        return None
    # Wide enough for each switch's whole label at 1600 px: in a sixth of the row "Show experimental models" was cut.
    if tta:
        c_model, c_tta, c_experimental = st.columns([3, 1.1, 1.4])
    else:
        c_model, c_experimental = st.columns([4.1, 1.4])
    rule = (
        f"stopped or unfinished, trained on fewer than {MIN_TRAIN_IMAGES:,} images, or below a test balanced "
        f"accuracy of {MIN_BALANCED_ACCURACY:.0%}"
    )
    experimental = c_experimental.toggle(
        "Show experimental models",
        key=f"{prefix}_experimental",
        help=f"Runs whose records say they are not for patients' images: {rule}. For study and comparison.",
    )
    offered = {c.path: c for c in choices if experimental or not c.experimental}
    hidden = len(choices) - len(offered)
    if not offered:
        st.info(
            f"Every model here is experimental ({rule}). Turn on **Show experimental models** to use one, or train a "
            "model on the full dataset on the **Train** page.",
            icon=":material/science:",
        )
        return None
    path = c_model.selectbox("Model", list(offered), format_func=lambda p: offered[p].label, key=f"{prefix}_model")
    averaged = (
        c_tta.toggle("Flip averaging (TTA)", value=USE_TTA_BY_DEFAULT, key=f"{prefix}_tta", help=TTA_HELP)
        if tta
        else False
    )
    if hidden:
        st.caption(
            f"{hidden} experimental model{'s' if hidden > 1 else ''} not listed ({rule}): **Show experimental "
            "models** lists them."
        )
    if offered[path].experimental:
        st.warning(
            f"Experimental model: {'; '.join(offered[path].why_experimental)}. Not for decisions about patients.",
            icon=":material/science:",
        )
    return path, averaged


def model_choice(prefix: str):
    """Diagnose's and Batch's :func:`pick_model` with its flip-averaging toggle, the model loaded: (Predictor,
    checkpoint path, tta). Stops the page with what to do when no model can be used."""
    picked = pick_model(prefix, tta=True)
    if picked is None:
        st.stop()
    path, tta = picked
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
    from core.inference.explain import overlay

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
# Get HAM10000 (a background download job; see core.app.jobs.start_download)


def _use_folder(folder: str) -> None:
    st.session_state[DATASET_KEY] = folder


def _download_body(active: app_jobs.Job | None) -> None:
    folder = runs_dir()
    status = app_jobs.download_status(folder)
    if active is not None:
        stage = {"download": "Downloading", "verify": "Verifying", "extract": "Extracting"}.get(
            (status or {}).get("stage"), "Starting"
        )
        status = status or {}
        progress_bar(
            f"{stage} {status.get('file', '')}",
            status.get("done", 0),
            status.get("total"),
            status.get("started") or active.started,
            base=status.get("base", 0),
            unit="",
            amount=format_bytes,
        )
        st.button(
            "Cancel download",
            icon=":material/cancel:",
            on_click=app_jobs.cancel_download,
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
        "Same as `lesionlab download --dest FOLDER`."
    )
    if go:
        try:
            app_jobs.start_download(
                settings.resolve_path(dest), folder, include_external=external, server=settings.dataverse_server()
            )
        except app_jobs.JobError as exc:
            st.error(str(exc))
        except OSError as exc:
            st.error(f"The download could not start: {exc}")
        else:
            st.rerun()


@st.fragment(run_every=1)
def _download_live(started_id: str) -> None:
    active = app_jobs.active_download(runs_dir())
    if active is None or active.id != started_id:
        st.rerun()  # finished: redraw the whole page with the result (and the new dataset)
    _download_body(active)


def download_panel(expanded: bool = False) -> None:
    """The Dataset page's "Get HAM10000": start, follow and use a background download."""
    active = app_jobs.active_download(runs_dir())
    with st.expander("Get HAM10000", expanded=expanded or active is not None, icon=":material/download:"):
        if active is not None:
            _download_live(active.id)
        else:
            _download_body(None)
