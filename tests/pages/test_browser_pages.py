"""End to end in a real headless Chromium, page by page: every page rendered and photographed, its heading
painted at once, tables that fit, the dark mode, and the dataset folder chosen in the sidebar and kept over
a reload. (The flows through the pages are in test_browser_flows.py: a second server, so the two files run
side by side.)"""

from __future__ import annotations

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.app_support import (
    CHROMIUM,
    TITLES,
)
from tests.pages.browser_support import TABLES, choose_run, new_page, set_dataset_folder, settle, shot, visit

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at /usr/bin/chromium"),
]


def test_pages_render_and_are_photographed(page, server, tmp_path):
    # A deep link as the server's very first request still goes through the entry point (sidebar, settings).
    visit(page, server, "dataset", "Dataset")
    sidebar = page.inner_text("[data-testid=stSidebar]")
    assert "Dataset folder" in sidebar and "Diagnose" in sidebar and "_shared" not in sidebar
    assert "page not found" not in page.inner_text("body").lower()  # Streamlit's dialog for an unknown page

    visit(page, server, "", "Lesion Lab")
    assert "not a medical device" in page.inner_text("[data-testid=stSidebar]")
    shot(page, "home", tmp_path)

    visit(page, server, "dataset", "Dataset")
    page.locator(".js-plotly-plot").first.wait_for()
    shot(page, "dataset", tmp_path)

    visit(page, server, "evaluate", "Evaluate")
    page.locator(".js-plotly-plot").first.wait_for()
    assert "Balanced accuracy" in page.inner_text("body")
    # The reference model's record, published with the model card, is on offer on a fresh clone too.
    page.locator("[data-testid=stSelectbox]").first.click()
    page.get_by_role("option").filter(has_text="reference-mnv2").first.click()
    settle(page, "Evaluate")
    page.get_by_text("1498 images").first.wait_for()
    shot(page, "evaluate", tmp_path)

    visit(page, server, "compare", "Compare")
    page.locator(".js-plotly-plot").first.wait_for()
    shot(page, "compare", tmp_path)
    # The sidebar (dataset setting, notice) is on every page, not only the first one visited.
    assert "not a medical device" in page.inner_text("[data-testid=stSidebar]")


def test_every_page_paints_its_heading(browser, server):
    """Each page, opened by its address in a fresh session, shows its main heading and finishes its run
    without an error (how fast is bench/page_loads.py's to measure)."""
    for name, title in TITLES.items():
        pg = new_page(browser)
        try:
            visit(pg, server, "" if name == "home" else name, title)
        finally:
            pg.context.close()


def test_tables_fit_at_1600_px_and_stay_on_screen_at_400(browser, server):
    """The per-class report and the headline table of six runs show every column at 1600 px; at 400 px no
    table runs off the screen (a wide one scrolls inside its own frame)."""
    pg = new_page(browser, width=1600)
    try:
        visit(pg, server, "evaluate", "Evaluate")
        choose_run(pg, "reference-mnv2")
        settle(pg, "Evaluate")
        pg.locator("[data-testid=stDataFrame]:visible").first.wait_for()
        [report] = pg.evaluate(TABLES)
        assert report["hidden"] <= 1, report
        visit(pg, server, "compare", "Compare")
        pg.get_by_role("tab", name="Compare runs").click()
        settle(pg, "Compare")
        runs = pg.locator("[data-testid=stMultiSelect]").first
        while True:  # every run there is: the list offers no more
            runs.click()
            try:
                pg.get_by_role("option").first.wait_for(timeout=5_000)
            except PlaywrightTimeout:
                break
            pg.get_by_role("option").first.click()
            settle(pg, "Compare")
        pg.keyboard.press("Escape")
        settle(pg, "Compare")
        pg.locator("[data-testid=stDataFrame]:visible").first.wait_for()
        headline = pg.evaluate(TABLES)[0]
        assert headline["hidden"] <= 1, headline
    finally:
        pg.context.close()
    pg = new_page(browser, width=400)
    try:
        for name, title in (("evaluate", "Evaluate"), ("dataset", "Dataset")):
            visit(pg, server, name, title)
            assert pg.evaluate("() => document.documentElement.scrollWidth") <= 400, name
            assert all(t["right"] <= 400 for t in pg.evaluate(TABLES)), (name, pg.evaluate(TABLES))
    finally:
        pg.context.close()


def test_the_app_follows_the_dark_mode_preference(browser, server):
    pg = new_page(browser, color_scheme="dark")
    try:
        visit(pg, server, "", "Lesion Lab")
        background = pg.evaluate(
            "() => getComputedStyle(document.querySelector('[data-testid=stApp]')).backgroundColor"
        )
        red, green, blue = (int(v) for v in background.removeprefix("rgb(").rstrip(")").split(","))
        assert max(red, green, blue) < 80, background
    finally:
        pg.context.close()


def test_sidebar_dataset_folder_on_the_full_dataset(browser, server, tmp_path, ham_root):
    """Typing a folder in the sidebar switches every page to it (photographed on the full HAM10000)."""
    pg = new_page(browser)
    try:
        set_dataset_folder(pg, server, ham_root)
        pg.get_by_text("10,015").first.wait_for()
        settle(pg, "Dataset")
        pg.locator(".js-plotly-plot").first.wait_for()
        assert ham_root.name in pg.inner_text("[data-testid=stSidebar]")
        shot(pg, "dataset", tmp_path)
        pg.get_by_role("tab", name="Metadata").click()
        pg.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 4")  # only the open tab's
        shot(pg, "dataset-metadata", tmp_path)
        pg.get_by_role("tab", name="Split preview").click()
        pg.get_by_text("No lesion appears in more than one split").wait_for()
        # The setting follows the user to the other pages.
        pg.get_by_role("link", name="Home").click()
        settle(pg, "Lesion Lab")
        pg.get_by_text("10,015").first.wait_for()
    finally:
        pg.context.close()


def test_the_dataset_folder_survives_a_reload(browser, server, tiny_root):
    pg = new_page(browser)
    try:
        set_dataset_folder(pg, server, tiny_root)
        pg.locator("[data-testid=stSidebar]").get_by_text(tiny_root.name).wait_for()
        pg.reload()
        settle(pg, "Dataset")
        assert pg.get_by_label("Dataset folder", exact=True).input_value() == str(tiny_root)
        assert f"Using {tiny_root.name} (set by the sidebar)" in pg.inner_text("[data-testid=stSidebar]")
    finally:
        pg.context.close()
