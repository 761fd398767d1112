"""Home: what Lesion Lab is, and what is ready to use right now."""

from collections import Counter

import pandas as pd
import streamlit as st

from core.app import jobs as app_jobs
from core.common import runs, settings
from pages.views._pages import PAGES
from pages.views._shared import dataset_choice, list_runs, load_dataset, research_notice

st.title("Lesion Lab")
st.markdown(
    "Decision-support dashboard for **pigmented skin lesions**, built on the HAM10000 dermoscopy dataset "
    "(7 diagnoses). Explore the data, train and evaluate classifiers, and see what a model looks at."
)
research_notice()

choice = dataset_choice()
index = load_dataset(show_help=False)
models = settings.model_files()
local = list_runs()
states = Counter(r.state for r in local)
published_dir = settings.published_runs_dir()
published = [r for r in runs.list_runs(published_dir) if r.state == "finished"] if published_dir else []
job = app_jobs.active_job(settings.runs_dir())

c1, c2, c3, c4, c5 = st.columns(5)
c1.metric("Dataset images", f"{len(index.frame):,}" if index is not None else "—", help=choice.describe())
c2.metric("Models for Diagnose", len(models))
c3.metric("Training runs", states["finished"], help=f"Finished runs in {settings.runs_dir()}.")
c4.metric(
    "Published runs",
    len(published),
    help="The finished runs behind MODEL_CARD.md (docs/runs), shown on Evaluate and Compare.",
)
c5.metric("Training job", "running" if job else "idle")
others = {
    "failed": states["failed"] + states["interrupted"],
    "stopped": states["stopped"],
    runs.DAMAGED: states[runs.DAMAGED],
}
if any(others.values()):
    st.caption(
        "Not counted as training runs: "
        + ", ".join(f"{n} {state}" for state, n in others.items() if n)
        + " (see the Train page)."
    )
listed = [(r, "here") for r in local] + [(r, "published") for r in published]
if listed:
    with st.expander(f"Runs ({len(listed)})", icon=":material/list:"):
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "run": r.name,
                        "state": r.state,
                        "dataset": r.dataset,
                        "where": where,
                        "why": r.error if r.state == runs.DAMAGED else "",
                    }
                    for r, where in listed
                ]
            ),
            hide_index=True,
            width="stretch",
        )

if index is None:
    if choice.configured:
        st.error(
            f"The dataset folder {choice.describe()} is not usable; the Dataset page says why.", icon=":material/block:"
        )
    else:
        st.info(settings.HOW_TO_GET_DATA, icon=":material/folder_open:")
if not models:
    st.info(
        "No model yet: Diagnose needs a checkpoint in `checkpoints/` (the repository ships "
        "`checkpoints/reference.pt`) or a finished training run.",
        icon=":material/neurology:",
    )

st.subheader("Pages")
cols = st.columns(3)
for i, info in enumerate(p for p in PAGES if not p.default):  # the default page is this one
    with cols[i % 3].container(border=True):
        st.page_link(info.script, label=f"**{info.title}**", icon=info.icon)
        st.caption(info.description)

st.caption(
    "HAM10000: Tschandl P., Rosendahl C., Kittler H., *Sci. Data* 5, 180161 (2018), CC BY-NC-SA 4.0. "
    "Models trained on the 200×150 downscaled copy see less detail than on the full-resolution release."
)
