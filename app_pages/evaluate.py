"""Evaluate: one run's test-split results — confusion matrix, per-class report, ROC, calibration,
the melanoma threshold and the misclassified images with Grad-CAM."""
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app_pages._shared import cam_overlay, evaluated_runs, no_runs_message, predictions, run_label
from core import plots
from core.evaluation import melanoma_operating_point, reliability_curve, roc_curves, softmax
from core.labels import CLASSES, DISPLAY_NAMES, MELANOMA

st.title("Evaluate")
runs = evaluated_runs()
if not runs:
    no_runs_message("evaluate")
    st.stop()

names = [r.name for r in runs]
chosen = st.selectbox("Run", names, format_func=lambda n: run_label(runs[names.index(n)]), key="eval_run")
run = runs[names.index(chosen)]
try:
    table, labels, probs, logits, evaluation = predictions(run.path)
except ValueError as exc:
    st.error(str(exc), icon=":material/block:")
    st.stop()

metrics = evaluation.get("test") or {}
if not metrics:
    from core.evaluation import compute_metrics

    metrics = compute_metrics(labels, probs)
temperature = float(evaluation.get("temperature", 1.0))
preds = probs.argmax(axis=1)

st.caption(f"Test split of `{run.name}`: {len(labels)} images; best epoch {evaluation.get('epoch', '?')}; "
           "probabilities calibrated by temperature scaling fitted on the validation split.")
m = st.columns(6)
m[0].metric("Accuracy", f"{metrics['accuracy']:.3f}")
m[1].metric("Balanced accuracy", f"{metrics['balanced_accuracy']:.3f}", help="Mean recall over the classes.")
m[2].metric("Macro F1", f"{metrics['macro']['f1']:.3f}")
auc = metrics.get("roc_auc", {}).get("macro")
m[3].metric("Macro ROC AUC", "—" if auc is None else f"{auc:.3f}")
m[4].metric("ECE (calibrated)", f"{metrics.get('ece', float('nan')):.3f}", help="Expected calibration error.")
m[5].metric("Temperature", f"{temperature:.2f}")
if len(labels) < 100:
    st.info(f"Only {len(labels)} test images: these numbers are very noisy.", icon=":material/info:")

tab_cm, tab_roc, tab_cal, tab_mel, tab_err = st.tabs(
    ["Confusion matrix & report", "ROC curves", "Calibration", "Melanoma threshold", "Misclassified images"])

with tab_cm:
    mode = st.segmented_control("Show", ["counts", "row-normalised"], default="counts", key="eval_cm_mode",
                                required=True)
    left, right = st.columns([5, 4])
    left.plotly_chart(plots.confusion_figure(np.array(metrics["confusion_matrix"]), normalize=mode != "counts"),
                      width="stretch")
    report = pd.DataFrame(metrics["per_class"]).set_index("code")[["precision", "recall", "f1", "auc", "support"]]
    right.markdown("**Per-class report**")
    right.dataframe(report, width="stretch", column_config={
        c: st.column_config.NumberColumn(format="%.3f") for c in ("precision", "recall", "f1", "auc")})
    right.caption("Recall is the sensitivity for that class; AUC is one class vs the rest.")

with tab_roc:
    st.plotly_chart(plots.roc_figure(roc_curves(labels, probs)), width="stretch")

with tab_cal:
    if logits is None:
        st.info("This run's predictions carry no raw logits, so the uncalibrated curve is not available.")
    else:
        before = reliability_curve(softmax(logits), labels)
        after = reliability_curve(probs, labels)
        st.plotly_chart(plots.reliability_figure(before, after, temperature), width="stretch")
        st.caption("A point below the diagonal means the model is over-confident at that confidence. Temperature "
                   "scaling divides the logits by T (fitted on the validation split); it never changes the "
                   "predicted class, only how sure the model claims to be.")

with tab_mel:
    t = st.slider("Flag melanoma when P(mel) ≥", 0.01, 0.99, 0.5, 0.01, key="eval_mel_t")
    op = melanoma_operating_point(labels, probs, t)
    fmt = lambda v: "—" if v is None else f"{v:.1%}"  # noqa: E731
    c = st.columns(4)
    c[0].metric("Sensitivity", fmt(op["sensitivity"]), help="Share of melanomas flagged.")
    c[1].metric("Specificity", fmt(op["specificity"]), help="Share of non-melanomas not flagged.")
    c[2].metric("PPV", fmt(op["ppv"]), help="Share of flagged images that are melanoma.")
    c[3].metric("NPV", fmt(op["npv"]), help="Share of unflagged images that are not melanoma.")
    st.caption(f"{op['tp']} melanomas flagged, {op['fn']} missed; {op['fp']} false alarms, {op['tn']} correctly "
               "not flagged. Lowering the threshold trades specificity for sensitivity.")
    mel = CLASSES.index(MELANOMA)
    st.plotly_chart(plots.threshold_curve(probs[:, mel], labels == mel, t), width="stretch")

with tab_err:
    wrong = table.assign(pred=preds, confidence=probs.max(axis=1))[preds != labels]
    if wrong.empty:
        st.success("No test image is misclassified.", icon=":material/verified:")
    else:
        f1, f2, f3 = st.columns(3)
        true_filter = f1.multiselect("True class", CLASSES, key="eval_err_true")
        pred_filter = f2.multiselect("Predicted class", CLASSES, key="eval_err_pred")
        show_cam = f3.toggle("Grad-CAM overlay", value=True, key="eval_err_cam",
                             help="For the predicted class: what made the model choose it.")
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
        for i, row in enumerate(wrong.iloc[(page - 1) * per_page: page * per_page].itertuples()):
            cell = grid[i % 4]
            caption = (f"{row.image_id}: true {row.dx}, predicted {CLASSES[row.pred]} ({row.confidence:.0%})")
            if not Path(row.path).is_file():
                cell.warning(f"{row.image_id}: image file not found ({row.path}).")
                continue
            image = cam_overlay(str(best), row.path, int(row.pred)) if show_cam and best.is_file() else None
            cell.image(image if image is not None else row.path, caption=caption, width="stretch")
        st.caption(f"{DISPLAY_NAMES[MELANOMA]} missed as a benign class is the costliest mistake; filter with "
                   "True class = mel.")
