"""Dataset: class balance, metadata, a filterable gallery, the validation report and the split preview."""

import pandas as pd
import streamlit as st

from core.app import plots
from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT
from core.data.dataset import HAM10000_IMAGES
from core.data.splits import split_by_lesion, split_counts
from core.training.config import TrainConfig
from pages.views._shared import dataset_choice, download_panel, lazy_tabs, load_dataset

GALLERY_COLUMNS = 6

st.title("Dataset")
index = load_dataset()
if index is None:
    download_panel(expanded=True)
    st.stop()

frame = index.frame
counts = index.class_counts()
st.caption(f"Folder: `{dataset_choice().folder}`")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Images", f"{len(frame):,}")
c2.metric("Lesions", f"{frame['lesion_id'].nunique():,}")
c3.metric(
    "Imbalance ratio",
    f"{plots.imbalance_ratio(counts):.1f} : 1",
    help="Images in the largest class divided by images in the smallest non-empty class.",
)
c4.metric(
    "Malignant share",
    f"{frame['dx'].isin(MALIGNANT).mean():.1%}",
    help="akiec, bcc and mel are malignant or pre-malignant.",
)


def distribution() -> None:
    scale = st.radio("Scale", ["linear", "log"], horizontal=True, key="dist_scale")
    st.plotly_chart(plots.class_distribution(counts, log=scale == "log"), width="stretch")
    table = pd.DataFrame(
        {
            "diagnosis": [DISPLAY_NAMES[c] for c in CLASSES],
            "images": counts.values,
            "share": (counts / max(counts.sum(), 1)).values,
            "malignant": [c in MALIGNANT for c in CLASSES],
        },
        index=list(CLASSES),
    )
    st.dataframe(table, width="stretch", column_config={"share": st.column_config.NumberColumn(format="percent")})


def metadata() -> None:
    share = st.toggle(
        "Share of each class within each bar",
        key="meta_share",
        help="Every bar scaled to 100 %: the small classes stay visible beside the large ones.",
    )

    def bars(column: str, title: str, top: int | None = None):
        return plots.category_by_class(frame, column, title, top=top, normalize=share)

    left, right = st.columns(2)
    left.plotly_chart(plots.age_by_class(frame), width="stretch")
    right.plotly_chart(bars("sex", "Sex"), width="stretch")
    left, right = st.columns(2)
    left.plotly_chart(bars("localization", "Localization", top=12), width="stretch")
    right.plotly_chart(bars("dx_type", "How the diagnosis was confirmed (dx_type)"), width="stretch")
    if index.has_sources:
        # Where an image was taken changes what a model learns from it (MODEL_CARD.md: results by source).
        left, right = st.columns(2)
        left.plotly_chart(bars("source", "Image source (camera or clinic)"), width="stretch")
        right.dataframe(index.source_counts(), width="stretch")


def gallery() -> None:
    f1, f2, f3, f4 = st.columns(4)
    code = f1.selectbox("Class", CLASSES, format_func=plots.class_label, key="gallery_class")
    subset = frame[frame["dx"] == code]
    sexes = f2.multiselect("Sex", sorted(subset["sex"].unique()), key="gallery_sex")
    places = f3.multiselect("Localization", sorted(subset["localization"].unique()), key="gallery_loc")
    types = f4.multiselect("dx_type", sorted(subset["dx_type"].unique()), key="gallery_dxtype")
    ages = subset["age"].dropna()
    if len(ages) and ages.min() < ages.max():
        lo, hi = st.slider(
            "Age", int(ages.min()), int(ages.max()), (int(ages.min()), int(ages.max())), step=5, key="gallery_age"
        )
        keep_unknown = st.checkbox("Include images without an age", value=True, key="gallery_age_na")
        in_range = subset["age"].between(lo, hi) | (subset["age"].isna() & keep_unknown)
        subset = subset[in_range]
    for col, chosen in (("sex", sexes), ("localization", places), ("dx_type", types)):
        if chosen:
            subset = subset[subset[col].isin(chosen)]
    per_page = 4 * GALLERY_COLUMNS
    pages = max(1, -(-len(subset) // per_page))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="gallery_page") if pages > 1 else 1
    st.caption(f"{len(subset)} images of {DISPLAY_NAMES[code]} match.")
    shown = subset.iloc[(page - 1) * per_page : page * per_page]
    # A row of columns per row of images: a long caption pushes its own row down, not one column of the grid.
    for start in range(0, len(shown), GALLERY_COLUMNS):
        row_of_images = shown.iloc[start : start + GALLERY_COLUMNS].itertuples()
        for cell, row in zip(st.columns(GALLERY_COLUMNS), row_of_images, strict=False):  # the last row may be short
            age = "?" if pd.isna(row.age) else f"{row.age:.0f}"
            cell.image(row.path, caption=f"{row.image_id} · {row.sex}, {age} · {row.localization}", width="stretch")


def validation_report() -> None:
    report = index.report
    if report.ok:
        st.success(
            f"No problems: {report.rows_read} metadata rows, {report.images_found} image files, all paired.",
            icon=":material/check_circle:",
        )
    else:
        st.warning("Some files or rows were set aside (nothing is dropped silently):", icon=":material/warning:")
        st.text(report.summary())
        st.dataframe(report.problems(), width="stretch", hide_index=True)
    st.caption(
        f"Metadata: `{report.metadata_path}`. Indexing checks file signatures only; the trainer reports "
        "images that fail to decode."
    )


def split_preview() -> None:
    trainer = TrainConfig(data="")
    _, trainer_val, trainer_test = trainer.split_fractions
    st.markdown(
        "Images are split **by lesion** (HAM10000 has several photos of many lesions), stratified by "
        "diagnosis, so no lesion appears in two splits."
    )
    s1, s2, s3 = st.columns(3)
    val = s1.slider("Validation fraction", 0.05, 0.4, trainer_val, 0.05, key="split_val")
    test = s2.slider("Test fraction", 0.05, 0.4, trainer_test, 0.05, key="split_test")
    seed = s3.number_input("Split seed", 0, 10_000, trainer.split_seed, key="split_seed")
    default = f"{', '.join(f'{f:.0%}' for f in trainer.split_fractions)} with split seed {trainer.split_seed}"
    if (round(val, 2), round(test, 2), int(seed)) == (trainer_val, trainer_test, trainer.split_seed):
        st.caption(
            f"This is the split every run trained from the app uses ({default}), on this dataset. The Train page "
            "does not change it; `lesionlab train --split-fractions TRAIN VAL TEST --split-seed N` does."
        )
    else:
        st.caption(
            f"A preview only: runs trained from the app use {default}. To train on this split, use "
            f"`lesionlab train --split-fractions {1 - val - test:.2f} {val:.2f} {test:.2f} "
            f"--split-seed {int(seed)}`."
        )
    if val + test >= 0.9:
        st.error("Leave at least 10 % of the images for training.")
        return
    split = split_by_lesion(frame, (1 - val - test, val, test), seed=int(seed))
    table = split_counts(frame, split)
    st.plotly_chart(plots.split_counts_figure(table), width="stretch")
    shown = table.copy()
    shown.loc["total"] = shown.sum()
    st.dataframe(shown, width="stretch")
    leaks = (frame.assign(split=split).groupby("lesion_id")["split"].nunique() > 1).sum()
    if leaks:
        st.error(f"{leaks} lesions appear in more than one split.")
    else:
        st.success("No lesion appears in more than one split.", icon=":material/check_circle:")


# Only the open tab is computed: the metadata charts and the gallery's images wait for their click.
lazy_tabs(
    {
        "Class distribution": distribution,
        "Metadata": metadata,
        "Gallery": gallery,
        "Validation report": validation_report,
        "Split preview": split_preview,
    },
    key="dataset_view",
)

if len(frame) < HAM10000_IMAGES:  # the whole of HAM10000 is here already: nothing to get
    download_panel()
