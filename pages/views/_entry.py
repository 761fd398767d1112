"""The app's entry point, run from a bookmarked page's stand-in in ``pages/``.

Streamlit decides once per server, at its first session, whether the app is a legacy multipage app: it is
when a ``pages/`` folder sits beside the entry point, until the first ``st.navigation`` call. So a fresh
server's very first request, if it is a deep link such as ``/quiz``, is looked up among ``pages/*.py`` instead
of our navigation: with nothing there, the user gets a "Page not found" dialog. ``pages/<url path>.py`` is
found instead and runs the real entry point, whose ``st.navigation`` shows the page with the sidebar and
settings every page has; from then on Streamlit ignores ``pages/*.py``.
"""

import runpy
from pathlib import Path

ENTRY = Path(__file__).resolve().parents[2] / "streamlit_app.py"


def run_app() -> None:
    runpy.run_path(str(ENTRY))
