"""Plotly figure builders for the app. No Streamlit here, so every chart is testable on its own.

Every builder takes plain data (pandas / numpy) and returns a ``plotly.graph_objects.Figure``.
Class axes always follow ``CLASSES``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT, MELANOMA
from core.training.imbalance import STRATEGIES

# One colour per class everywhere in the app (Plotly's qualitative "Safe" palette, colour-blind friendly).
CLASS_COLOURS: dict[str, str] = dict(
    zip(CLASSES, ("#88CCEE", "#CC6677", "#DDCC77", "#117733", "#332288", "#AA4499", "#44AA99"), strict=True)
)
SPLIT_COLOURS = {"train": "#4C78A8", "val": "#F58518", "test": "#54A24B"}
# No template of our own: st.plotly_chart's Streamlit theme restyles every chart anyway (a "plotly_white" chart and a
# plain one render alike, light and dark), and copying a named template into each figure was half of its build time
# (about 30 ms of the 58 ms for Diagnose's bars), paid by every session.
_LAYOUT = dict(margin=dict(l=10, r=10, t=50, b=10), font=dict(size=13))


# Lines and marks drawn over the chart's background (error bars, target and threshold lines, the chosen bar's outline)
# in the page's text colour, light or dark theme: a fixed dark grey all but vanished on the dark background.
INK = {False: "#31333F", True: "#E8E8EC"}


def class_label(code: str) -> str:
    return f"{code} · {DISPLAY_NAMES[code]}"


def _finish(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.0, xanchor="left"), height=height, **_LAYOUT)
    return fig


# ---------------------------------------------------------------------------
# Dataset


def imbalance_ratio(counts: pd.Series) -> float:
    """Largest class count over the smallest non-empty one (HAM10000: nv/df = 58)."""
    nonzero = counts[counts > 0]
    return float(nonzero.max() / nonzero.min()) if len(nonzero) else float("nan")


def class_distribution(counts: pd.Series, log: bool = False) -> go.Figure:
    counts = counts.reindex(CLASSES, fill_value=0)
    total = max(int(counts.sum()), 1)
    fig = go.Figure(
        go.Bar(
            x=list(CLASSES),
            y=counts.values,
            marker_color=[CLASS_COLOURS[c] for c in CLASSES],
            text=[f"{n}" for n in counts.values],
            textposition="outside",
            customdata=[
                [DISPLAY_NAMES[c], 100 * n / total, "malignant" if c in MALIGNANT else "benign"]
                for c, n in counts.items()
            ],
            hovertemplate="<b>%{x}</b> · %{customdata[0]}<br>%{y} images (%{customdata[1]:.1f}%)<br>"
            "%{customdata[2]}<extra></extra>",
        )
    )
    fig.update_yaxes(type="log" if log else "linear", title="images" + (" (log scale)" if log else ""))
    fig.update_xaxes(title="diagnosis")
    return _finish(fig, f"Images per class — imbalance ratio {imbalance_ratio(counts):.1f} : 1")


def age_by_class(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for code in CLASSES:
        ages = frame.loc[frame["dx"] == code, "age"].dropna()
        if len(ages):
            fig.add_trace(
                go.Box(
                    y=ages,
                    name=code,
                    marker_color=CLASS_COLOURS[code],
                    boxmean=True,
                    hovertemplate=f"{code}: %{{y}}<extra></extra>",
                )
            )
    missing = int(frame["age"].isna().sum())
    fig.update_yaxes(title="age (years)")
    fig.update_layout(showlegend=False)
    return _finish(fig, "Age by class" + (f" ({missing} images without age)" if missing else ""))


def category_by_class(
    frame: pd.DataFrame, column: str, title: str, top: int | None = None, normalize: bool = False
) -> go.Figure:
    """Stacked bars: images per value of ``column`` (sex, localization, dx_type), split by class; with
    ``normalize`` every bar is scaled to 100 %, so a minority class shows as its share of that category."""
    table = pd.crosstab(frame[column].fillna("unknown"), frame["dx"]).reindex(columns=list(CLASSES), fill_value=0)
    table = table.loc[table.sum(axis=1).sort_values(ascending=False).index]
    if top is not None and len(table) > top:
        rest = table.iloc[top:].sum().rename("other")
        table = pd.concat([table.iloc[:top], rest.to_frame().T])
    fig = go.Figure()
    for code in CLASSES:
        fig.add_trace(
            go.Bar(
                x=table.index.astype(str),
                y=table[code],
                name=code,
                marker_color=CLASS_COLOURS[code],
                hovertemplate=f"{code}<br>%{{x}}: %{{y}} images<extra></extra>",
            )
        )
    fig.update_layout(barmode="stack", barnorm="percent" if normalize else None, legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(title="% of the category's images" if normalize else "images")
    return _finish(fig, title, height=420)


def split_counts_figure(table: pd.DataFrame) -> go.Figure:
    """Grouped bars of images per class and split (``core.data.splits.split_counts`` output)."""
    fig = go.Figure()
    for split in table.columns:
        fig.add_trace(
            go.Bar(
                x=list(table.index),
                y=table[split],
                name=str(split),
                marker_color=SPLIT_COLOURS.get(str(split)),
                hovertemplate=f"{split}<br>%{{x}}: %{{y}}<extra></extra>",
            )
        )
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    fig.update_yaxes(title="images")
    return _finish(fig, "Lesion-grouped split: images per class and split")


# ---------------------------------------------------------------------------
# Training


def training_curves(epochs: pd.DataFrame, running: pd.DataFrame | None = None) -> go.Figure:
    """Loss (left) and accuracy (right) per epoch, train vs validation.

    ``running`` (columns epoch, loss) is the running training loss reported every second within
    epochs, so a slow epoch on a CPU still shows the curve moving before it ends.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"), horizontal_spacing=0.1)
    if epochs is not None and len(epochs):
        x = epochs["epoch"]
        series = [
            (1, "train_loss", "train", "#4C78A8", "solid"),
            (1, "val_loss", "validation", "#F58518", "solid"),
            (2, "train_acc", "train", "#4C78A8", "solid"),
            (2, "val_acc", "validation", "#F58518", "solid"),
            (2, "val_balanced_acc", "validation (balanced)", "#E45756", "dot"),
        ]
        for col, key, name, colour, dash in series:
            if key in epochs and epochs[key].notna().any():
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=epochs[key],
                        name=name,
                        mode="lines+markers",
                        line=dict(color=colour, dash=dash),
                        legendgroup=name,
                        showlegend=col == 2,
                        hovertemplate=f"{name}<br>epoch %{{x}}: %{{y:.4f}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
    if running is not None and len(running):
        fig.add_trace(
            go.Scatter(
                x=running["epoch"],
                y=running["loss"],
                name="train (running, within epoch)",
                mode="lines",
                line=dict(color="#9ECAE9", width=1),
                hovertemplate="running train loss<br>epoch %{x:.2f}: %{y:.4f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    fig.update_xaxes(title="epoch", dtick=1 if epochs is None or len(epochs) <= 20 else None, rangemode="tozero")
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return _finish(fig, "", height=360)


# ---------------------------------------------------------------------------
# Evaluation


def confusion_figure(
    cm: np.ndarray, normalize: bool = False, title: str = "Confusion matrix", height: int = 480
) -> go.Figure:
    """Rows are the true class, columns the prediction; hover shows count and row share either way."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    z = share if normalize else cm
    text = [
        [f"{v:.2f}" if normalize else f"{int(c)}" for v, c in zip(rs, rc, strict=True)]
        for rs, rc in zip(share, cm, strict=True)
    ]
    custom = np.dstack([cm, share * 100])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(CLASSES),
            y=list(CLASSES),
            colorscale="Blues",
            text=text,
            texttemplate="%{text}",
            customdata=custom,
            zmin=0,
            zmax=1 if normalize else None,
            colorbar=dict(title="recall share" if normalize else "images"),
            hovertemplate="true <b>%{y}</b>, predicted <b>%{x}</b><br>%{customdata[0]:.0f} images<br>"
            "%{customdata[1]:.1f}% of true %{y}<extra></extra>",
        )
    )
    fig.update_yaxes(title="true class", autorange="reversed")
    fig.update_xaxes(title="predicted class", side="bottom")
    return _finish(fig, title + (" (row-normalised)" if normalize else " (counts)"), height=height)


def roc_figure(curves: Mapping[str, Mapping | None]) -> go.Figure:
    """One-vs-rest ROC per class from ``core.metrics.classification.roc_curves``: ``{code: {"fpr", "tpr", "auc"} |
    None}``."""
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#bbb", dash="dash"), name="chance", hoverinfo="skip"
        )
    )
    for code in CLASSES:
        if not curves.get(code):
            continue
        fpr, tpr, auc = curves[code]["fpr"], curves[code]["tpr"], curves[code]["auc"]
        fig.add_trace(
            go.Scatter(
                x=fpr,
                y=tpr,
                mode="lines",
                name=f"{code} (AUC {auc:.3f})",
                line=dict(color=CLASS_COLOURS[code], width=3 if code == "mel" else 2),
                hovertemplate=f"{code}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_xaxes(title="false positive rate (1 − specificity)", range=[0, 1])
    fig.update_yaxes(title="true positive rate (sensitivity)", range=[0, 1.02])
    return _finish(fig, "ROC curves, one class vs rest", height=460)


def _ece(bins: pd.DataFrame) -> float:
    used = bins[bins["count"] > 0]
    if used.empty:
        return float("nan")
    return float((used["count"] * (used["accuracy"] - used["confidence"]).abs()).sum() / used["count"].sum())


def reliability_figure(before: Sequence[Mapping], after: Sequence[Mapping], temperature: float) -> go.Figure:
    """Reliability diagrams before and after temperature scaling.

    ``before``/``after`` are ``core.metrics.calibration.reliability_curve`` outputs: per confidence bin
    ``lower``, ``upper``, ``count``, ``confidence`` and ``accuracy`` (None when empty).
    """
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            line=dict(color="#bbb", dash="dash"),
            name="perfect calibration",
            hoverinfo="skip",
        )
    )
    for bins, name, colour in (
        (before, "before (T = 1)", "#E45756"),
        (after, f"after temperature scaling (T = {temperature:.2f})", "#4C78A8"),
    ):
        frame = pd.DataFrame(list(bins))
        used = frame[frame["count"] > 0]
        fig.add_trace(
            go.Scatter(
                x=used["confidence"],
                y=used["accuracy"],
                mode="lines+markers",
                name=f"{name}, ECE {_ece(frame):.3f}",
                line=dict(color=colour),
                marker=dict(size=np.clip(np.sqrt(used["count"].to_numpy(dtype=float)) * 2.5, 6, 22)),
                customdata=used[["count", "lower", "upper"]].to_numpy(),
                hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata[0]} images with confidence in "
                "(%{customdata[1]:.2f}, %{customdata[2]:.2f}]<extra></extra>",
            )
        )
    fig.update_xaxes(title="mean confidence (top class)", range=[0, 1])
    fig.update_yaxes(title="accuracy", range=[0, 1.02])
    fig.update_layout(legend=dict(orientation="h", y=-0.22))
    return _finish(fig, "Reliability diagram (test split)", height=460)


def threshold_curve(
    scores: np.ndarray,
    positive: np.ndarray,
    threshold: float,
    score: str = "P(mel)",
    name: str = "Melanoma",
    dark: bool = False,
) -> go.Figure:
    """Sensitivity and specificity of "positive if ``score`` ≥ t" over t, with the chosen t marked (in :data:`INK`
    for the ``dark`` theme or the light one)."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    ts = np.linspace(0, 1, 101)
    sens = [float((scores[positive] >= t).mean()) if positive.any() else np.nan for t in ts]
    spec = [float((scores[~positive] < t).mean()) if (~positive).any() else np.nan for t in ts]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=ts,
            y=sens,
            name="sensitivity",
            line=dict(color="#E45756"),
            hovertemplate="t = %{x:.2f}<br>sensitivity %{y:.3f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=ts,
            y=spec,
            name="specificity",
            line=dict(color="#4C78A8"),
            hovertemplate="t = %{x:.2f}<br>specificity %{y:.3f}<extra></extra>",
        )
    )
    fig.add_vline(x=threshold, line=dict(color=INK[dark], dash="dot"), annotation_text=f"t = {threshold:.2f}")
    fig.update_xaxes(title=f"threshold on {score}", range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _finish(fig, f"{name}: sensitivity vs specificity", height=360)


# ---------------------------------------------------------------------------
# Diagnose


INSIDE_LABEL = 0.5  # probabilities from which the bar's label sits inside it (a bar over half the chart holds it)


def probability_bars(probs: Sequence[float], highlight: str | None = None, dark: bool = False) -> go.Figure:
    """Horizontal bars of the 7 class probabilities (largest on top), malignant classes marked, ``highlight``'s bar
    outlined in :data:`INK`."""
    probs = np.asarray(probs, dtype=float)
    order = np.argsort(probs)  # ascending: plotly draws the last bar on top
    codes = [CLASSES[i] for i in order]
    fig = go.Figure(
        go.Bar(
            x=probs[order] * 100,
            y=[class_label(c) + (" ⚠" if c in MALIGNANT else "") for c in codes],
            orientation="h",
            marker_color=[CLASS_COLOURS[c] for c in codes],
            marker_line=dict(color=[INK[dark] if c == highlight else "rgba(0,0,0,0)" for c in codes], width=2),
            text=[f"{p * 100:.1f}%" for p in probs[order]],
            # A long bar's label inside its end: outside, at 400 px wide, "99.9%" ran off the chart as "99.".
            textposition=["inside" if p >= INSIDE_LABEL else "outside" for p in probs[order]],
            insidetextanchor="end",
            cliponaxis=False,
            hovertemplate="%{y}<br>%{x:.2f}%<extra></extra>",
        )
    )
    fig.update_xaxes(title="probability (%)", range=[0, 112])
    return _finish(fig, "Calibrated class probabilities (⚠ = malignant class)", height=330)


# ---------------------------------------------------------------------------
# Compare


def per_class_comparison(table: pd.DataFrame, metric: str) -> go.Figure:
    """Grouped bars: ``table`` has columns run, class, and ``metric`` (recall, precision, f1; None or NaN where a
    class has no value). A bar of 0 and no bar look alike, so each bar carries its value ("0.00" is seen) and a class
    without any value says "no images" under its name."""
    fig = go.Figure()
    for run, part in table.groupby("run", sort=False):
        values = pd.to_numeric(part.set_index("class").reindex(CLASSES)[metric], errors="coerce")
        fig.add_trace(
            go.Bar(
                x=list(CLASSES),
                y=values,
                name=str(run),
                text=["" if np.isnan(v) else f"{v:.2f}" for v in values],
                textposition="outside",
                cliponaxis=False,
                hovertemplate=f"{run}<br>%{{x}}: %{{y:.3f}}<extra></extra>",
            )
        )
    valued = set(table.loc[pd.to_numeric(table[metric], errors="coerce").notna(), "class"])
    fig.update_xaxes(tickvals=list(CLASSES), ticktext=[c if c in valued else f"{c}<br>(no images)" for c in CLASSES])
    # Many runs make the bars too narrow for their numbers: then the numbers are left out, all alike.
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.22), uniformtext=dict(minsize=9, mode="hide"))
    fig.update_yaxes(title=metric, range=[0, 1.12])
    return _finish(fig, f"Per-class {metric}", height=400)


# ---------------------------------------------------------------------------
# The imbalance lesson (tables from core.app.lesson.strategy_table: a row per strategy, in the registry's order)

# Tableau 10, one colour per strategy by its place in the registry, so a strategy keeps its colour everywhere.
STRATEGY_PALETTE = (
    "#4C78A8",
    "#F58518",
    "#54A24B",
    "#E45756",
    "#72B7B2",
    "#B279A2",
    "#FF9DA6",
    "#9D755D",
    "#EECA3B",
    "#BAB0AC",
)


def strategy_colour(name: str) -> str:
    order = list(STRATEGIES)
    return STRATEGY_PALETTE[order.index(name) % len(STRATEGY_PALETTE)] if name in order else "#888888"


def _lesson_height(table: pd.DataFrame) -> int:
    """One height for the lesson's charts, which stand side by side: the heatmap needs two rows per strategy."""
    return max(420, 150 + 48 * len(table))


def strategy_heatmap(table: pd.DataFrame) -> go.Figure:
    """Recall (top) and precision (bottom) of every class (columns, ``CLASSES`` order) under every strategy
    (rows): stacked, so that each cell keeps room for its number however narrow the page."""
    fig = make_subplots(
        rows=2, cols=1, subplot_titles=("Recall", "Precision"), shared_xaxes=True, vertical_spacing=0.16
    )
    labels = list(table["label"])
    for row, metric in enumerate(("recall", "precision"), 1):
        z = table[[f"{metric}_{c}" for c in CLASSES]].to_numpy(dtype=float)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(CLASSES),
                y=labels,
                zmin=0,
                zmax=1,
                colorscale="Blues",
                showscale=False,
                text=[[f"{v:.2f}" for v in row] for row in z],
                texttemplate="%{text}",
                textfont=dict(size=12),
                hovertemplate=f"%{{y}}<br>{metric} of %{{x}}: %{{z:.3f}}<extra></extra>",
            ),
            row=row,
            col=1,
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=0, showticklabels=True)
    return _finish(fig, "Recall and precision of each class", height=_lesson_height(table))


def melanoma_precision_recall(table: pd.DataFrame, curves: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Melanoma recall (x) and precision (y): each strategy's point as the model predicts (the most probable
    class) and its curve as the P(mel) threshold varies (``curves``: core.app.lesson.melanoma_curve per strategy)."""
    fig = go.Figure()
    for name, row in table.iterrows():
        colour, label = strategy_colour(name), row["label"]
        if name in curves:
            curve = curves[name].dropna()
            fig.add_trace(
                go.Scatter(
                    x=curve["recall"],
                    y=curve["precision"],
                    mode="lines",
                    line=dict(color=colour, width=1.5),
                    legendgroup=name,
                    showlegend=False,
                    customdata=curve["threshold"],
                    hovertemplate=f"{label}<br>P(mel) ≥ %{{customdata:.2f}}<br>recall %{{x:.3f}}<br>"
                    "precision %{y:.3f}<extra></extra>",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=[row[f"recall_{MELANOMA}"]],
                y=[row[f"precision_{MELANOMA}"]],
                mode="markers",
                name=label,
                legendgroup=name,
                marker=dict(color=colour, size=13, line=dict(color="white", width=1.5)),
                hovertemplate=f"{label}, most probable class<br>recall %{{x:.3f}}<br>"
                "precision %{y:.3f}<extra></extra>",
            )
        )
    fig.update_xaxes(title="recall (sensitivity)", range=[0, 1.02])
    fig.update_yaxes(title="precision (PPV)", range=[0, 1.02])
    fig = _finish(fig, "Melanoma recall vs precision", height=_lesson_height(table))
    # At the foot of the figure, below the axis title, however many lines the legend wraps to.
    fig.update_layout(
        legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"),
        margin=dict(b=40 + 22 * -(-len(table) // 2)),
    )
    return fig


def accuracy_pairs(table: pd.DataFrame) -> go.Figure:
    """Accuracy and balanced accuracy side by side for each strategy, a row per strategy as in the heatmap."""
    fig = go.Figure()
    for column, name, colour in (
        ("accuracy", "accuracy", "#BAB0AC"),
        ("balanced_accuracy", "balanced accuracy", "#E45756"),
    ):
        fig.add_trace(
            go.Bar(
                y=list(table["label"]),
                x=table[column],
                name=name,
                marker_color=colour,
                orientation="h",
                text=[f"{v:.2f}" for v in table[column]],
                textposition="outside",
                cliponaxis=False,
                hovertemplate=f"%{{y}}<br>{name} %{{x:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.12))
    fig.update_xaxes(range=[0, 1.15])
    fig.update_yaxes(autorange="reversed")
    return _finish(fig, "Accuracy vs balanced accuracy", height=_lesson_height(table))


# ---------------------------------------------------------------------------
# Robustness


def robustness_figure(report: Mapping, dark: bool = False) -> go.Figure:
    """Balanced accuracy's drop from clean under each shift of a robustness report (:mod:`core.evaluation.robustness`),
    with its paired 95% bootstrap interval as error bars; the dotted line is the 0.03 the issue allows. Both in
    :data:`INK` for the ``dark`` theme or the light one."""
    shifted = [c for c in report["conditions"] if c.get("drop")]
    drops = [c["drop"]["balanced_accuracy"] for c in shifted]
    values = [d["value"] for d in drops]
    cis = [d["ci"] or [d["value"], d["value"]] for d in drops]
    fig = go.Figure(
        go.Bar(
            x=[c["name"] for c in shifted],
            y=values,
            marker_color=["#E45756" if v > 0 else "#54A24B" for v in values],
            error_y=dict(
                type="data",
                symmetric=False,
                array=[hi - v for v, (_, hi) in zip(values, cis, strict=True)],
                arrayminus=[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                color=INK[dark],
                thickness=2,
            ),
            customdata=[[c["description"], lo, hi] for c, (lo, hi) in zip(shifted, cis, strict=True)],
            hovertemplate="%{customdata[0]}<br>drop %{y:+.3f} (95% CI %{customdata[1]:+.3f} to "
            "%{customdata[2]:+.3f})<extra></extra>",
        )
    )
    fig.add_hline(
        y=0.03, line=dict(color=INK[dark], dash="dot", width=2), annotation=dict(text="0.03", font_color=INK[dark])
    )
    fig.update_yaxes(title="drop in balanced accuracy (clean − shifted)", zeroline=True)
    return _finish(fig, "Balanced accuracy lost under each shift", height=360)
