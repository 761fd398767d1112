"""A bookmarked /compare as a fresh server's first request (see pages/views/_entry.py)."""

from pages.views._entry import run_app

run_app()
