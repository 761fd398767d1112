"""The `streamlit run` server itself, as users start it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.app_support import clean_env, streamlit_server


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's mapped libraries from /proc")
def test_the_server_runs_on_streamlits_performance_extra(tmp_path):
    """uvloop's event loop and httptools' HTTP parser (requirements.txt) serve the app: with them a room of 30 students
    costs the server about a seventh less CPU each (docs/BENCHMARKS.md, "A classroom"). Streamlit and uvicorn fall
    back to asyncio and h11 without a word when they are missing or cannot be imported."""
    with streamlit_server(clean_env(), tmp_path / "server.log") as server:  # healthy: it has answered HTTP
        libraries = Path(f"/proc/{server.pid}/maps").read_text()
    assert "/uvloop/" in libraries and "/httptools/" in libraries
