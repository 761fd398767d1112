"""Batch: many uploaded images, or .zip archives of them, through one model; a sortable table and its CSV.
Uploads stay in memory; nothing is written to disk."""

import io
import time

import pandas as pd
import streamlit as st

from core.app.plots import class_label
from core.app.referral import REFER, threshold_origin
from core.common.formatting import format_bytes
from core.inference.batch import (
    ASSESSED,
    FAILED,
    MAX_FILE_BYTES,
    NOT_ASSESSED,
    BatchError,
    predict_files,
    upload_files,
    write_csv,
)
from core.inference.forward import PredictionError, tta_description
from pages.views._shared import WRAPPING_ROW_HEIGHT, WorkBar, model_choice, research_notice

NOT_ASSESSED_CELL = f"{NOT_ASSESSED}: unlike dermoscopy (see its warning)"
# Streamlit's max_upload_size counts MiB per file: an archive of a few hundred full-size dermoscopy JPEGs.
MAX_UPLOAD_MIB = 200

st.title("Batch")
research_notice()
predictor, model_path, tta = model_choice("batch")

uploads = st.file_uploader(
    f"Dermoscopy images (JPEG or PNG, at most {format_bytes(MAX_FILE_BYTES)} each) or .zip archives of them "
    f"(at most {MAX_UPLOAD_MIB} MiB each)",
    type=["jpg", "jpeg", "png", "zip"],
    accept_multiple_files=True,
    max_upload_size=MAX_UPLOAD_MIB,
    key="batch_upload",
)
if not uploads:
    st.info(
        "Upload several dermoscopic images, or .zip archives of them, to get one row per image: the most likely "
        "class, P(melanoma), the confidence and the warnings the Diagnose page would show. As on Diagnose, an image "
        "unlike dermoscopy is not assessed, and files that cannot be used get a row saying why. Same as "
        "`lesionlab predict CHECKPOINT FOLDER_OR_ZIP --csv out.csv`.",
        icon=":material/upload:",
    )
    st.stop()

# One batch result per (files, model, TTA), kept in the session only: sorting and downloading reuse it.
key = (tuple(u.file_id for u in uploads), str(model_path), tta)
cached = st.session_state.get("batch_result")
if cached is None or cached[0] != key:
    try:
        files = upload_files((u.name, u.getvalue()) for u in uploads)
    except BatchError as exc:
        st.error(str(exc), icon=":material/block:")
        st.stop()
    bar, start = WorkBar("Predicted", len(files), unit="files"), time.perf_counter()
    try:
        rows = list(predict_files(predictor, files, tta=tta, progress=bar.progress, stage=bar.stage))
    except PredictionError as exc:
        st.error(f"No predictions from this model: {exc}. Choose another model.", icon=":material/block:")
        st.stop()
    bar.empty()
    csv_text = io.StringIO()
    outcomes = write_csv(rows, csv_text)
    seconds = time.perf_counter() - start
    st.session_state["batch_result"] = cached = (key, rows, csv_text.getvalue(), seconds, outcomes)
_, rows, csv_text, seconds, outcomes = cached

# Counts of results are over the images assessed: one unlike dermoscopy has no result to count (as on Diagnose).
assessed = [r for r in rows if r.assessed]
metrics = st.columns(4 + len(predictor.referrals))
metrics[0].metric("Assessed", outcomes[ASSESSED])
metrics[1].metric(
    "Not assessed",
    outcomes[NOT_ASSESSED],
    help="Images unlike the dermoscopy the model learnt from (the unfamiliar-image check, as on Diagnose): no class, "
    "probability or referral; their warning says why.",
)
metrics[2].metric("Could not be used", outcomes[FAILED])
for col, referral in zip(metrics[3:], predictor.referrals, strict=False):
    rule = referral.rule
    col.metric(
        f"{rule.label} ≥ {referral.threshold:.1%}",
        sum(rule.key in r.refer for r in assessed),
        help=f"At or above the model's operating threshold ({threshold_origin(referral)}): {REFER}.",
    )
metrics[-1].metric(
    "With warnings", sum(bool(r.warnings) for r in assessed), help="Images assessed with low confidence."
)
st.caption(
    f"{len(rows)} files in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.1f} images/s) with "
    f"{predictor.arch}{', TTA: ' + tta_description(True) if tta else ''}. Click a column's header to sort by it."
)

# Text cells of a file that could not be used stay empty rather than reading "None"; the error sits before the
# warnings so that a failed file says why without scrolling.
table = pd.DataFrame(
    {
        "thumbnail": [r.thumbnail or "" for r in rows],
        "file": [r.file for r in rows],
        "top_class": [r.top_class or "" for r in rows],
        "diagnosis": [
            NOT_ASSESSED_CELL if r.not_assessed else class_label(r.top_class) if r.top_class else "" for r in rows
        ],
        "refer": [", ".join(r.refer) for r in rows],
        "p_malignant": pd.Series([r.p_malignant for r in rows], dtype=float),
        "p_melanoma": pd.Series([r.p_melanoma for r in rows], dtype=float),
        "confidence": pd.Series([r.confidence for r in rows], dtype=float),
        "error": [r.error or "" for r in rows],
        "warnings": [" | ".join(r.warnings) for r in rows],
    }
)
# Every column within a 1600-pixel window (widths in pixels, the sidebar open): at their natural widths the error and
# warning columns ran off to the right. Rows high enough that a long error or warning wraps in its cell.
st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    row_height=WRAPPING_ROW_HEIGHT,
    placeholder="",
    column_order=[c for c in table.columns if c != "top_class"],  # its code is in "Most likely" beside its name
    column_config={
        "thumbnail": st.column_config.ImageColumn("Image", width=64),
        "file": st.column_config.TextColumn("File", width=170),
        "diagnosis": st.column_config.TextColumn("Most likely", width=180),
        "refer": st.column_config.TextColumn(
            "Refer", width=90, help=f"The referral rules at or above the model's operating threshold: {REFER}."
        ),
        **{
            f"p_{referral.rule.key}": st.column_config.ProgressColumn(
                referral.rule.label,
                width=115,
                min_value=0.0,
                max_value=1.0,
                format="percent",
                help=f"Calibrated; the model's operating threshold is {referral.threshold:.1%}.",
            )
            for referral in predictor.referrals
        },
        "confidence": st.column_config.NumberColumn("Confidence", width=85, format="percent"),
        "error": st.column_config.TextColumn("Error", width=160),
        "warnings": st.column_config.TextColumn("Warnings", width=160),
    },
)
st.download_button(
    "Download the table (CSV)",
    csv_text,
    file_name="lesionlab-batch.csv",
    mime="text/csv",
    icon=":material/download:",
    help="Every row with all seven calibrated probabilities (none for an image not assessed: its not_assessed "
    "column says why); no thumbnails.",
    key="batch_csv",
)
