"""Lesion Lab — `streamlit run streamlit_app.py`.

The entry point: page setup, the sidebar's dataset setting shared by all pages, and navigation.
The page scripts live one level down, in ``pages/views/``: Streamlit runs any ``pages/*.py`` as a legacy
multipage app until ``st.navigation`` first runs, so a bookmarked deep link opened first after a server
start would bypass this entry point (no sidebar, no shared settings). It ignores subfolders of ``pages/``.
"""

from __future__ import annotations

import streamlit as st

from core.common import settings
from pages.views._pages import PAGES
from pages.views._shared import (
    DATASET_KEY,
    DATASET_PARAM,
    current_job,
    dataset_choice,
    job_sidebar,
    job_signature,
    warm_imports,
)

st.set_page_config(page_title="Lesion Lab", page_icon=":material/biotech:", layout="wide")

page = st.navigation([st.Page(p.script, title=p.title, icon=p.icon, default=p.default) for p in PAGES])

with st.sidebar:
    st.markdown("### :material/biotech: Lesion Lab")
    default = settings.dataset_choice(None)
    # The widget writes through to a plain session key, which (unlike widget state) survives page switches;
    # a new session (a reload, a bookmark) starts from the URL's query parameter, which every run keeps.
    st.session_state.setdefault(DATASET_KEY, st.query_params.get(DATASET_PARAM, ""))
    st.session_state["dataset_folder_input"] = st.session_state[DATASET_KEY]
    # A form: a plain text box applied itself when it lost focus, and that rerun swallowed the click on a page link
    # that took the focus away. Typed text is used on Enter or the button; a link click just navigates.
    with st.form("dataset_form", border=False, enter_to_submit=True):
        st.text_input(
            "Dataset folder",
            key="dataset_folder_input",
            placeholder=str(default.folder) if default.folder else "path/to/ham10000",
            help="The folder holding HAM10000_metadata.csv and the images (any layout below it); Enter uses it. "
            f"Leave empty to use ${settings.DATA_ENV}, .streamlit/lesionlab.toml or the bundled sample, in that "
            "order. It is kept in the page's address, so a reload or a bookmark keeps it.",
        )
        st.form_submit_button(
            "Use this folder",
            on_click=lambda: st.session_state.update({DATASET_KEY: st.session_state["dataset_folder_input"]}),
        )
    if st.session_state[DATASET_KEY]:
        st.query_params[DATASET_PARAM] = st.session_state[DATASET_KEY]
    else:
        st.query_params.pop(DATASET_PARAM, None)
    choice = dataset_choice()
    if choice.configured and not choice.folder.is_dir():  # "Using nowhere" read as if the folder were in use
        st.warning(f"**{choice.folder}** does not exist (set by the {choice.source}).", icon=":material/folder_off:")
    elif choice.configured:
        st.caption(f"Using **{choice.folder.name}** (set by the {choice.source})")
    else:
        st.caption("No dataset configured — Diagnose still works.")
    job_sidebar(job_signature(*current_job()))
    st.caption("Research and education only — **not a medical device**.")

page.run()
warm_imports()  # after the page, so that its first paint does not share the cores with the imports
