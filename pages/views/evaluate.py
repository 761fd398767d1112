"""Evaluate: one run's test-split results — confusion matrix, per-class report, ROC, calibration,
the referral thresholds and the misclassified images with Grad-CAM — and any model on an external test set."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.app import plots
from core.common import settings
from core.common.labels import CLASSES, DISPLAY_NAMES, MELANOMA
from core.common.runs import RunState, locate_images
from core.common.schema import SchemaError
from core.data.archives import MAX_UNPACKED_BYTES, MAX_UPLOAD_MB, ArchiveError, unpack_upload
from core.data.dataset import DatasetError
from core.data.images import ImageError
from core.data.layouts import CLASS_FOLDERS, HAM10000, ISIC2018, ISIC_CLI
from core.evaluation.records import folder_operating_point, report_predictions
from core.metrics.calibration import reliability_curve, softmax, uncalibrated
from core.metrics.classification import (
    BALANCED_ACCURACY_UNDEFINED,
    MELANOMA_RULE,
    REFERRAL_RULES,
    balanced_accuracy_defined,
    operating_point,
    roc_curves,
)
from core.models.checkpoints import CheckpointError
from pages.views._shared import (
    WRAPPING_ROW_HEIGHT,
    WorkBar,
    cam_overlay,
    dark_theme,
    dataset_choice,
    evaluated_runs,
    is_published,
    lazy_tabs,
    load_dataset,
    no_runs_message,
    pick_model,
    predictions,
    progress_bar,
    run_label,
)

# Pixels for the longest diagnosis name in full, "Actinic keratosis / intraepithelial carcinoma" (cut at "medium").
DIAGNOSIS_WIDTH = 330
EXTERNAL_BOOTSTRAP = 200  # resamples for the external set's intervals: enough for a 95% CI, quick to draw
EXTERNAL_RESULT = "ext_result"  # (key, result) of the latest external evaluation, so reruns do not redo it
EXTERNAL_REQUEST = "ext_request"  # (checkpoint, folder, name shown) of the last evaluation asked for; survives reruns
FOLDER_SOURCE, UPLOAD_SOURCE = "Folder on the server", "Upload a .zip"
UPLOAD_CACHE = settings.cache_dir() / "external"  # an upload is unpacked once, by content
LAYOUTS = {
    HAM10000: "HAM10000 layout (metadata with image_id and dx)",
    ISIC2018: "ISIC 2018 Task 3 ground truth (one-hot CSV)",
    ISIC_CLI: "isic-cli export (metadata.csv with isic_id and diagnosis)",
    CLASS_FOLDERS: "one folder per class",
}


# ---------------------------------------------------------------------------
# What both sections show


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, fmt)


def headline_metrics(
    metrics: dict, intervals: dict | None = None, extra: Sequence[tuple[str, str, str | None]] = ()
) -> None:
    """Accuracy, balanced accuracy, macro F1 (with their bootstrap intervals when given), macro AUC and ECE,
    then the ``extra`` (label, value, help) metrics; at most six to a row."""
    intervals = intervals or {}

    def ci(key: str, what: str) -> str:
        if key not in intervals:
            return what
        low, high = intervals[key]
        return f"{what} 95% bootstrap interval: {low:.3f}–{high:.3f}."

    items = [
        ("Accuracy", _num(metrics["accuracy"]), ci("accuracy", "Share of images classified correctly.")),
        (
            "Balanced accuracy",
            _num(metrics["balanced_accuracy"]),
            ci("balanced_accuracy", "Mean recall over the classes."),
        )
        if balanced_accuracy_defined(metrics)
        else ("Balanced accuracy", "—", BALANCED_ACCURACY_UNDEFINED.capitalize() + "."),
        ("Macro F1", _num(metrics["macro"]["f1"]), ci("macro_f1", "Mean F1 over the classes.")),
        (
            "Macro ROC AUC",
            _num(metrics.get("roc_auc", {}).get("macro")),
            "Mean one-vs-rest AUC over the classes present.",
        ),
        ("ECE (calibrated)", _num(metrics.get("ece")), "Expected calibration error."),
        *extra,
    ]
    rows = -(-len(items) // 6)
    per_row = -(-len(items) // rows)
    for start in range(0, len(items), per_row):
        for col, (label, value, help_) in zip(st.columns(per_row), items[start : start + per_row], strict=False):
            col.metric(label, value, help=help_)
    names = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}
    shown = [f"{names[k]} {intervals[k][0]:.3f}–{intervals[k][1]:.3f}" for k in names if k in intervals]
    if shown:
        st.caption("95% bootstrap intervals: " + "; ".join(shown) + ".")


def per_class_report(metrics: dict) -> pd.DataFrame:
    """One row per class in ``CLASSES`` order: diagnosis name, precision, recall, F1, AUC and support."""
    report = pd.DataFrame(metrics["per_class"]).set_index("code").reindex(list(CLASSES))
    report.insert(0, "diagnosis", [DISPLAY_NAMES[c] for c in report.index])
    return report[["diagnosis", "precision", "recall", "f1", "auc", "support"]]


def confusion_and_report(metrics: dict, key: str) -> None:
    """The interactive confusion matrix (counts or row-normalised), then the per-class report below it: beside
    the matrix the report's seven columns did not fit, even at 1600 px."""
    mode = st.segmented_control(
        "Show", ["counts", "row-normalised"], default="counts", key=f"{key}_cm_mode", required=True
    )
    st.plotly_chart(
        plots.confusion_figure(np.array(metrics["confusion_matrix"]), normalize=mode != "counts"),
        width="stretch",
        key=f"{key}_cm",
    )
    st.markdown("**Per-class report**")
    number = st.column_config.NumberColumn(format="%.3f", width="small")
    st.dataframe(
        per_class_report(metrics),
        width="content",
        key=f"{key}_report",
        column_config={
            "diagnosis": st.column_config.TextColumn(width=DIAGNOSIS_WIDTH),
            **dict.fromkeys(("precision", "recall", "f1", "auc"), number),
            "support": st.column_config.NumberColumn(width="small"),
        },
    )
    st.caption("Recall is the sensitivity for that class; AUC is one class vs the rest.")


# ---------------------------------------------------------------------------
# A run's own test split


def internal_section() -> None:
    runs = evaluated_runs()
    if not runs:
        no_runs_message("evaluate")
        return

    names = [r.name for r in runs]
    chosen = st.selectbox("Run", names, format_func=lambda n: run_label(runs[names.index(n)]), key="eval_run")
    run = runs[names.index(chosen)]
    try:
        table, labels, probs, logits, evaluation = predictions(run.path)
    except ValueError as exc:
        st.error(str(exc), icon=":material/block:")
        return

    metrics = evaluation.get("test") or {}
    if not metrics:
        from core.metrics.classification import compute_metrics

        metrics = compute_metrics(labels, probs)
    temperature = float(evaluation.get("temperature", 1.0))

    st.caption(
        f"Test split of `{run.name}`: {len(labels)} images; "
        + (
            f"ensemble of {len(evaluation['members'])} models"
            if evaluation.get("members")
            else f"best epoch {evaluation.get('epoch', '?')}"
        )
        + "; "
        "probabilities calibrated by temperature scaling fitted on the validation split; one view of each image, "
        "as the trainer recorded it (`lesionlab evaluate` averages the four flips by default)."
    )
    headline_metrics(
        metrics, evaluation.get("confidence_intervals"), extra=[("Temperature", f"{temperature:.2f}", None)]
    )
    if len(labels) < 100:
        st.info(f"Only {len(labels)} test images: these numbers are very noisy.", icon=":material/info:")

    # Only the open view is computed (the Grad-CAM gallery alone takes seconds): the page paints at once.
    lazy_tabs(
        {
            "Confusion matrix & report": lambda: confusion_and_report(metrics, "eval"),
            "ROC curves": lambda: roc_view(labels, probs),
            "Calibration": lambda: calibration_view(
                labels, probs, None if logits is None else softmax(logits), temperature
            ),
            "Referral thresholds": lambda: referral_thresholds(run, labels, probs, evaluation),
            "Misclassified images": lambda: misclassified_gallery(run, table, labels, probs),
            "Robustness": lambda: robustness_view(run),
        },
        key="eval_view",
    )


def roc_view(labels: np.ndarray, probs: np.ndarray) -> None:
    st.plotly_chart(plots.roc_figure(roc_curves(labels, probs)), width="stretch")


def calibration_view(labels: np.ndarray, probs: np.ndarray, before: np.ndarray | None, temperature: float) -> None:
    """Reliability of the probabilities ``before`` temperature scaling and after it (``probs``)."""
    if before is None:
        st.info("These predictions carry no raw logits, so the uncalibrated curve is not available.")
        return
    curves = reliability_curve(labels, before), reliability_curve(labels, probs)
    st.plotly_chart(plots.reliability_figure(*curves, temperature), width="stretch")
    st.caption(
        "A point below the diagonal means the model is over-confident at that confidence. "
        "Temperature scaling divides the logits by T (fitted on the validation split); it never "
        "changes the predicted class, only how sure the model claims to be."
    )


def referral_thresholds(run: RunState, labels: np.ndarray, probs: np.ndarray, evaluation: dict) -> None:
    """One referral rule's sensitivity, specificity, PPV and NPV on the run's test predictions at any threshold,
    starting at the run's own (chosen on validation; what Diagnose, Batch and the report use), else 0.5."""
    keys = {rule.key: rule for rule in REFERRAL_RULES}
    rule = keys[st.segmented_control("Rule", list(keys), default=MELANOMA_RULE.key, key="eval_rule", required=True)]
    recorded = evaluation.get(rule.field)
    # The grid's hundredths plus the exact recorded threshold, so that the view opens on the operating point
    # itself: rounded to 0.16, the reference model's 0.1567 cleared 3 fewer test lesions than Diagnose quotes.
    grid = {round(t, 2) for t in np.arange(0.01, 1.0, 0.01)} | ({recorded} if recorded is not None else set())
    t = st.select_slider(
        f"Refer when {rule.label} ≥",
        sorted(grid),
        value=0.5 if recorded is None else recorded,
        format_func=lambda v: f"{v:.2%}" if v == recorded else f"{v:.0%}",
        key=f"eval_{rule.key}_t",
    )
    if recorded is not None:
        point = folder_operating_point([run.path], recorded, tta=True, rule=rule)
        flips = (
            f" Averaging the flips, as Diagnose does by default (`lesionlab evaluate`'s saved report), it found "
            f"{point['sensitivity']:.1%} and cleared {point['specificity']:.1%} there."
            if point is not None and point["tta"]
            else ""
        )
        st.caption(
            f"The model's operating point, chosen on the validation split to flag {rule.sensitivity:.0%} of "
            f"{rule.name}, is {rule.label} ≥ {recorded:.3f}; Diagnose's refer cue, Batch and the report use it. "
            f"The figures below are this page's: one view of each test image.{flips}"
        )
    else:
        st.caption(f"This run records no {rule.key} operating point; the view opens at 50 %.")
    op = operating_point(labels, probs, t, rule)
    fmt = lambda v: "—" if v is None else f"{v:.1%}"  # noqa: E731
    c = st.columns(4)
    c[0].metric("Sensitivity", fmt(op["sensitivity"]), help=f"Share of {rule.name} flagged.")
    c[1].metric("Specificity", fmt(op["specificity"]), help="Share of the other lesions not flagged.")
    c[2].metric("PPV", fmt(op["ppv"]), help=f"Share of flagged images that are {rule.name}.")
    c[3].metric("NPV", fmt(op["npv"]), help="Share of unflagged images that are not.")
    st.caption(
        f"{op['tp']} {rule.name} flagged, {op['fn']} missed; {op['fp']} false alarms, {op['tn']} "
        "correctly not flagged. Lowering the threshold trades specificity for sensitivity."
    )
    curve = plots.threshold_curve(
        rule.score(probs), rule.positives(labels), t, rule.label, rule.name.capitalize(), dark=dark_theme()
    )
    st.plotly_chart(curve, width="stretch")


def misclassified_gallery(run: RunState, table: pd.DataFrame, labels: np.ndarray, probs: np.ndarray) -> None:
    """The misclassified test images, most confident first, found by id in the dataset configured here."""
    preds = probs.argmax(axis=1)
    wrong = table.assign(pred=preds, confidence=probs.max(axis=1))[preds != labels]
    if wrong.empty:
        st.success("No test image is misclassified.", icon=":material/verified:")
        return
    index = load_dataset(show_help=False)
    choice = dataset_choice()
    files = locate_images(wrong["image_id"], index.frame) if index is not None else pd.Series(np.nan, wrong.index)
    trained_on = Path(str(run.config.get("data") or "?")).name
    missing = int(files.isna().sum())
    if missing:
        where = f"the configured dataset ({choice.describe()})"
        if index is None:
            problem = f"the dataset folder {choice.describe()} is not usable" if choice.configured else "no dataset"
            found = f"**The images are not available here**: {problem}."
        elif missing == len(wrong):
            found = f"**The images are not available here**: none of the {len(wrong)} misclassified is in {where}."
        else:
            found = (
                f"{missing} of the {len(wrong)} misclassified images are not in {where}; shown are the "
                f"{len(wrong) - missing} it holds."
            )
        st.info(
            f"{found} This run names its test images by their image id; to see them all, set **Dataset "
            f"folder** in the sidebar to a copy of the dataset it was trained on (`{trained_on}`, e.g. HAM10000 "
            "from **Get HAM10000** on the Dataset page).",
            icon=":material/image_not_supported:",
        )
        if missing == len(wrong):
            return
    wrong = wrong.assign(file=files)[files.notna()]
    f1, f2, f3 = st.columns(3)
    true_filter = f1.multiselect("True class", CLASSES, key="eval_err_true")
    pred_filter = f2.multiselect("Predicted class", CLASSES, key="eval_err_pred")
    show_cam = f3.toggle(
        "Grad-CAM overlay",
        value=True,
        key="eval_err_cam",
        help="For the predicted class: what made the model choose it.",
    )
    if true_filter:
        wrong = wrong[wrong["dx"].isin(true_filter)]
    if pred_filter:
        wrong = wrong[wrong["pred"].map(lambda i: CLASSES[i]).isin(pred_filter)]
    wrong = wrong.sort_values("confidence", ascending=False)
    per_page = 8
    pages = max(1, -(-len(wrong) // per_page))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="eval_err_page") if pages > 1 else 1
    st.caption(f"{len(wrong)} misclassified images, most confident mistakes first.")
    best = run.path / "best.pt"
    grid = st.columns(4)
    for i, row in enumerate(wrong.iloc[(page - 1) * per_page : page * per_page].itertuples()):
        caption = f"{row.image_id}: true {row.dx}, predicted {CLASSES[row.pred]} ({row.confidence:.0%})"
        image = cam_overlay(str(best), row.file, int(row.pred)) if show_cam and best.is_file() else None
        grid[i % 4].image(image if image is not None else row.file, caption=caption, width="stretch")
    st.caption(
        f"{DISPLAY_NAMES[MELANOMA]} missed as a benign class is the costliest mistake; filter with True class = mel."
    )


def robustness_view(run: RunState) -> None:
    """The run's saved robustness report (table and chart); when it has none, a button computes it on the
    configured dataset's test split, with progress, and saves it in the run folder."""
    from core.evaluation import robustness

    try:
        report = robustness.read_robustness(run.path)
    except SchemaError as exc:
        st.warning(f"The saved robustness report cannot be shown: {exc}. Computing it again replaces it.")
        report = None
    report = report or _compute_robustness(run)
    if report is None:
        return
    st.caption(f"{robustness.describe(report)}. Each shift is applied to the image file before the model's fitting.")
    if report.get("split_warning"):
        st.warning(report["split_warning"], icon=":material/warning:")
    # Widths in pixels so that every column is on screen in a 1600-pixel window (its last one ran off), rows high
    # enough that a long description wraps in its cell.
    interval, number = st.column_config.TextColumn(width=170), st.column_config.TextColumn(width=115)
    st.dataframe(
        pd.DataFrame(robustness.table_rows(report)),
        hide_index=True,
        key="eval_robust_table",
        row_height=WRAPPING_ROW_HEIGHT,
        column_config={
            "condition": st.column_config.TextColumn(width=110),
            "what": st.column_config.TextColumn(width=210),
            **dict.fromkeys(("balanced accuracy", "melanoma AUC"), number),
            "ECE": st.column_config.TextColumn(width=70),
            **dict.fromkeys(("drop (95% CI)", "AUC drop (95% CI)", "ECE change (95% CI)"), interval),
        },
    )
    st.plotly_chart(plots.robustness_figure(report, dark=dark_theme()), width="stretch", key="eval_robust_chart")
    st.caption(
        "Drop = clean minus shifted, with a paired bootstrap 95% interval (the same resampled images under both "
        "conditions); a positive ECE change means worse calibration. Same as `lesionlab evaluate "
        "--checkpoint CKPT --data DIR --shifts`."
    )


def _compute_robustness(run: RunState) -> dict | None:
    """The button that makes the missing report and saves it; the report once saved, else None. It predicts as
    the predictor does by default (``USE_TTA_BY_DEFAULT``), as ``lesionlab evaluate --shifts`` does."""
    from core.common.runtime import pick_device
    from core.data.shifts import SHIFTS
    from core.evaluation.robustness import checkpoint_for_run, evaluate_shifts, write_robustness
    from core.inference.forward import tta_description
    from core.inference.predictor import USE_TTA_BY_DEFAULT

    if is_published(run):  # its record stays as published; a local copy of the run can have one computed
        st.info("No robustness report was published with this run.", icon=":material/info:")
        return None
    checkpoint = checkpoint_for_run(run.path, settings.model_files())
    index = load_dataset(show_help=False)
    if checkpoint is None or index is None:
        missing = "no checkpoint of this run is available here" if checkpoint is None else "no dataset is configured"
        st.info(f"No robustness report has been saved for this run, and {missing}.", icon=":material/info:")
        return None
    offer = st.empty()  # the banner and its button go once clicked: the report they offered takes their place
    with offer.container():
        st.info(
            f"No robustness report has been saved for this run. It evaluates `{settings.model_label(checkpoint)}` "
            f"on the test split of {dataset_choice().describe()} as it is and under {len(SHIFTS)} shifts "
            f"({', '.join(SHIFTS)}): {len(SHIFTS) + 1} passes over the images, each with the views Diagnose and "
            f"`lesionlab evaluate` predict from by default (test-time augmentation: "
            f"{tta_description(USE_TTA_BY_DEFAULT)}).",
            icon=":material/info:",
        )
        go = st.button("Compute the robustness report", icon=":material/play_arrow:", key="eval_robust_go")
    if not go:
        return None
    offer.empty()
    bar, started = st.empty(), time.time()

    def progress(done: int, total: int) -> None:
        with bar:
            progress_bar("Clean and shifted test images", done, total, started)

    try:
        report = evaluate_shifts(
            checkpoint, index.root, tta=USE_TTA_BY_DEFAULT, device=str(pick_device()), progress=progress
        )
    except (DatasetError, CheckpointError, ImageError, ValueError, OSError) as exc:
        st.error(f"The robustness report cannot be computed:\n\n{exc}", icon=":material/block:")
        return None
    bar.empty()
    write_robustness(run.path, report)
    return report


# ---------------------------------------------------------------------------
# Any model on an external test set (the page's side of ``lesionlab evaluate --split all``)


def _external_evaluation(checkpoint: str, stamp: float, folder: str, folder_stamp: float) -> dict:
    """``evaluate_checkpoint`` on every image of ``folder``, with the layout and what the import set aside, and
    a progress bar while it runs. The session keeps the latest result, keyed by the checkpoint's path and mtime
    and the folder (and its mtime); errors are not kept. Not ``st.cache_data``: it would replay the bar."""
    from core.common.runtime import pick_device
    from core.data.layouts import detect_layout
    from core.evaluation.evaluate import evaluate_checkpoint

    key = (checkpoint, stamp, folder, folder_stamp)
    kept = st.session_state.get(EXTERNAL_RESULT)
    if kept is not None and kept[0] == key:
        return kept[1]
    # Drawing is also where a rerun (another click, leaving the page) ends the work between two steps.
    bar = WorkBar(f"Evaluating on {Path(folder).name}")
    bar.stage("recognising the folder's layout")
    layout = detect_layout(folder)  # fails fast, before the model loads, on a folder it cannot read
    try:
        result = evaluate_checkpoint(
            checkpoint,
            folder,
            split="all",
            bootstrap=EXTERNAL_BOOTSTRAP,
            device=str(pick_device()),
            progress=bar.progress,
            stage=bar.stage,
        )
    finally:
        bar.empty()
    validation = result["validation"]
    out = {
        "layout": layout.kind,
        "layout_source": str(layout.source),
        "report_ok": validation["ok"],
        "report": validation["summary"],
        "problems": pd.DataFrame(validation["problems"], columns=["problem", "where"]),
        "result": result,
    }
    st.session_state[EXTERNAL_RESULT] = (key, out)
    return out


def external_section() -> None:
    st.caption(
        "Evaluate a model on images from elsewhere — all of them, no split — with the same metrics as "
        "a run's test split, from a folder on the server or an uploaded .zip. It may hold an isic-cli export, "
        "one folder per class "
        f"({', '.join(CLASSES)}), the ISIC 2018 Task 3 ground truth with its images, or HAM10000-style "
        "metadata. Same as `lesionlab evaluate --checkpoint CKPT --data FOLDER --split all`."
    )
    # Outside the form: its "Show experimental models" switch changes the list at once.
    picked = pick_model("ext")
    if picked is None:
        return
    model, _ = picked  # no toggle: evaluated as `lesionlab evaluate` does by default (_external_evaluation)
    source = st.segmented_control(
        "Test set", [FOLDER_SOURCE, UPLOAD_SOURCE], default=FOLDER_SOURCE, key="ext_source", required=True
    )
    with st.form("ext_form", border=False):
        if source == UPLOAD_SOURCE:
            upload = st.file_uploader(
                f"A .zip of the test set, at most {MAX_UPLOAD_MB} MB",
                type="zip",
                key="ext_zip",
                max_upload_size=MAX_UPLOAD_MB,
                help="Any of the layouts above, at the top of the archive or in one folder inside it. It is "
                f"unpacked on the server (at most {MAX_UNPACKED_BYTES // 1024**3} GB) into "
                f"`{UPLOAD_CACHE}`; a larger set: unpack it there and give its "
                "folder.",
            )
        else:
            folder = st.text_input(
                "External test set folder",
                key="ext_folder",
                placeholder="data/ham10000-isic2018-test",
                help="Relative paths are taken from the project folder.",
            )
        go = st.form_submit_button("Evaluate on this test set", icon=":material/analytics:")
    if go:
        st.session_state.pop(EXTERNAL_REQUEST, None)
        if source == UPLOAD_SOURCE:
            if upload is None:
                st.error("Choose the .zip that holds the external test set.", icon=":material/block:")
                return
            try:
                with st.spinner(f"Unpacking {upload.name}…"):
                    unpacked = unpack_upload(upload, upload.name, UPLOAD_CACHE)
            except (ArchiveError, OSError) as exc:
                st.error(f"{upload.name} cannot be used:\n\n{exc}", icon=":material/block:")
                return
            st.session_state[EXTERNAL_REQUEST] = (str(model), str(unpacked), upload.name)
        elif not folder.strip():
            st.error("Enter the folder that holds the external test set.", icon=":material/block:")
            return
        else:
            resolved = str(settings.resolve_path(folder.strip()))
            st.session_state[EXTERNAL_REQUEST] = (str(model), resolved, resolved)
    request = st.session_state.get(EXTERNAL_REQUEST)
    if request is None:
        return
    checkpoint, folder, shown = request
    label = settings.model_label(Path(checkpoint))
    try:
        stamp = Path(checkpoint).stat().st_mtime
        folder_stamp = Path(folder).stat().st_mtime if Path(folder).is_dir() else 0.0
        out = _external_evaluation(checkpoint, stamp, folder, folder_stamp)
    except (DatasetError, CheckpointError, ImageError, ValueError, OSError) as exc:
        st.error(f"{label} cannot be evaluated on `{shown}`:\n\n{exc}", icon=":material/block:")
        return

    result = out["result"]
    metrics = result["metrics"]
    st.markdown(
        f"**{label}** ({result['arch']}, temperature {result['temperature']:.2f}) on `{shown}`: "
        f"{result['n_images']} images."
    )
    st.caption(f"Layout: {LAYOUTS.get(out['layout'], out['layout'])}, recognised by `{out['layout_source']}`.")
    if out["report_ok"]:
        st.success(f"Nothing was set aside. {out['report'].splitlines()[0]}", icon=":material/check_circle:")
    else:
        st.warning(
            f"Some files or rows were set aside and are not part of these numbers (below). "
            f"{out['report'].splitlines()[0]}",
            icon=":material/warning:",
        )
        with st.expander("What was set aside"):
            st.code(out["report"], language=None)
            st.dataframe(out["problems"], width="stretch", hide_index=True, key="ext_problems")

    mel = metrics["melanoma"]
    pct = lambda v: "—" if v is None else f"{v:.1%}"  # noqa: E731
    headline_metrics(
        metrics,
        result.get("confidence_intervals"),
        extra=[
            (
                "Melanoma sensitivity",
                pct(mel["sensitivity"]),
                f"Share of melanomas with P(mel) ≥ {mel['threshold']:g}: {mel['tp']} of {mel['tp'] + mel['fn']}.",
            ),
            (
                "Melanoma specificity",
                pct(mel["specificity"]),
                f"Share of non-melanomas with P(mel) < {mel['threshold']:g}: {mel['tn']} of {mel['tn'] + mel['fp']}.",
            ),
            ("Temperature", f"{result['temperature']:.2f}", "From the checkpoint: fitted on its own validation split."),
        ],
    )
    if result["n_images"] < 100:
        st.info(f"Only {result['n_images']} images: these numbers are very noisy.", icon=":material/info:")
    labels, probs = report_predictions(result)
    temperature = float(result["temperature"])
    lazy_tabs(
        {
            "Confusion matrix & report": lambda: confusion_and_report(metrics, "ext"),
            "ROC curves": lambda: roc_view(labels, probs),
            "Calibration": lambda: calibration_view(labels, probs, uncalibrated(probs, temperature), temperature),
        },
        key="ext_view",
    )
    st.download_button(
        "Download the report (JSON, with per-image predictions)",
        json.dumps(result, indent=2),
        file_name=f"external-{Path(shown).stem}-{Path(checkpoint).stem}.json",
        mime="application/json",
        icon=":material/download:",
        key="ext_download",
    )


st.title("Evaluate")
tab_internal, tab_external = st.tabs(
    ["Test split of a run", "External test set"], on_change="rerun", key="eval_section"
)
if tab_internal.open:
    with tab_internal:
        internal_section()
if tab_external.open:
    with tab_external:
        external_section()
