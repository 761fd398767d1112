"""End to end in a real headless Chromium, page by page: every page rendered and photographed, its heading
painted at once, tables that fit, the dark mode, and the dataset folder chosen in the sidebar and kept over
a reload. (The flows through the pages are in test_browser_flows.py: a second server, so the two files run
side by side.)"""

from __future__ import annotations

import shutil

import pytest

from tests.app_support import (
    CHROMIUM,
    ROOT,
    TITLES,
)
from tests.conftest import zip_bytes
from tests.pages.browser_support import TABLES, choose_run, new_page, set_dataset_folder, settle, shot, visit

PUBLISHED = ROOT / "docs" / "runs"
# A basal cell carcinoma the reference model is sure of (99.8 %).
CARCINOMA = ROOT / "sample_data" / "ham10000-sample" / "images" / "ISIC_0024632.jpg"

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


def test_tables_fit_at_1600_px_and_stay_on_screen_at_400(browser, server, browser_env, tmp_path):
    """The per-class report, the robustness table, the headline and per-class tables of every run (one with a long
    name) and Batch's table with its error rows show every column at 1600 px; at 400 px no table runs off the screen
    (a wide one scrolls inside its own frame) and the probability bars' labels stay whole."""
    long_name = browser_env["runs"] / "imbalance-20261127-101500-class_balanced"
    shutil.copytree(PUBLISHED / "reference-mnv2", long_name)
    pg = new_page(browser, width=1600)
    try:
        visit(pg, server, "evaluate", "Evaluate")
        choose_run(pg, "reference-mnv2")
        settle(pg, "Evaluate")
        pg.locator("[data-testid=stDataFrame]:visible").first.wait_for()
        [report] = pg.evaluate(TABLES)
        assert report["hidden"] <= 1, report
        pg.get_by_role("tab", name="Robustness").click()
        settle(pg, "Evaluate")
        pg.locator("[data-testid=stDataFrame]:visible").first.wait_for()
        [robust] = pg.evaluate(TABLES)
        assert robust["hidden"] <= 1, robust  # its last column ran 11 px off
        visit(pg, server, "compare", "Compare")
        pg.get_by_role("tab", name="Compare runs").click()
        settle(pg, "Compare")
        # Every run there is, a row each: the list's own "Select all" (clicks on the widget's frame, where the list
        # does not open, had left the runs it starts with). The published runs, the two demo runs and long_name.
        runs = pg.locator("[data-testid=stMultiSelect]").first
        runs.get_by_role("combobox").click()
        pg.get_by_role("option", name="Select all").click()
        pg.keyboard.press("Escape")  # the open list hides the rest of the page from its readers, the heading too
        settle(pg, "Compare")
        assert runs.locator("[data-tag]").count() == len(list(PUBLISHED.iterdir())) + 3
        pg.get_by_text("Per-class table").click()
        settle(pg, "Compare")
        headline, per_class = pg.evaluate(TABLES)[:2]
        assert headline["hidden"] <= 1 and per_class["hidden"] <= 1, (headline, per_class)

        visit(pg, server, "batch", "Batch")
        (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
        archive = tmp_path / "cases.zip"
        archive.write_bytes(
            zip_bytes({"set/a-long-file-name-from-a-clinic-export.jpg": CARCINOMA.read_bytes(), "set/x.jpg": b"no"})
        )
        pg.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(
            [str(CARCINOMA), str(tmp_path / "broken.jpg"), str(archive)]
        )
        pg.locator("[data-testid=stDataFrame]:visible").first.wait_for()
        settle(pg, "Batch")
        [batch] = pg.evaluate(TABLES)
        assert batch["hidden"] <= 1, batch  # its error and warning columns ran 900 px off
    finally:
        pg.context.close()
        shutil.rmtree(long_name)
    pg = new_page(browser, width=400)
    try:
        for name, title in (("evaluate", "Evaluate"), ("dataset", "Dataset")):
            visit(pg, server, name, title)
            assert pg.evaluate("() => document.documentElement.scrollWidth") <= 400, name
            assert all(t["right"] <= 400 for t in pg.evaluate(TABLES)), (name, pg.evaluate(TABLES))
        # A sure answer (basal cell carcinoma, 99.8 %): its bar's label whole, not "99." cut at the chart's edge.
        visit(pg, server, "diagnose", "Diagnose")
        pg.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(str(CARCINOMA))
        pg.locator(".js-plotly-plot .barlayer text").first.wait_for()
        settle(pg, "Diagnose")
        labels = pg.evaluate(BAR_LABELS)
        assert labels and all(t["right"] <= t["edge"] + 0.5 and t["text"].endswith("%") for t in labels), labels
    finally:
        pg.context.close()


# The switches' labels on the page that are cut short (an ellipsis in place of their end).
CUT_LABELS = """() => [...document.querySelectorAll('[data-testid=stMain] [data-testid=stCheckbox]')]
  .map(c => c.querySelector('[data-testid=stMarkdownContainer]'))
  .filter(m => m && m.scrollWidth > m.clientWidth + 1).map(m => m.innerText)"""


def test_the_model_pickers_switches_read_whole_at_1600_px(browser, server):
    """Diagnose's and Batch's "Show experimental models" switch read "Show experiment…" in a sixth of the row."""
    pg = new_page(browser, width=1600)
    try:
        for name, title in (("diagnose", "Diagnose"), ("batch", "Batch")):
            visit(pg, server, name, title)
            pg.get_by_text("Show experimental models").first.wait_for()
            assert pg.evaluate(CUT_LABELS) == [], name
    finally:
        pg.context.close()


# Each bar label of the first bar chart: its text, its right end and the right end of the chart it is drawn in.
BAR_LABELS = """() => { const plot = document.querySelector('.js-plotly-plot');
  const edge = plot.querySelector('svg.main-svg').getBoundingClientRect().right;
  return [...plot.querySelectorAll('.barlayer text')].map(t => ({text: t.textContent,
    right: t.getBoundingClientRect().right, edge})); }"""


def rgb(colour: str) -> tuple[int, ...]:
    return tuple(int(float(v)) for v in colour.split("(", 1)[1].rstrip(")").split(",")[:3])


def test_the_app_follows_the_dark_mode_preference(browser, server):
    pg = new_page(browser, color_scheme="dark")
    try:
        visit(pg, server, "", "Lesion Lab")
        background = pg.evaluate(
            "() => getComputedStyle(document.querySelector('[data-testid=stApp]')).backgroundColor"
        )
        assert max(rgb(background)) < 80, background
        # The robustness chart's error bars and its 0.03 line read on the dark background (a dark grey was faint).
        visit(pg, server, "evaluate", "Evaluate")
        choose_run(pg, "reference-mnv2")
        settle(pg, "Evaluate")
        pg.get_by_role("tab", name="Robustness").click()
        pg.locator(".js-plotly-plot .errorbar path").first.wait_for()
        settle(pg, "Evaluate")
        strokes = pg.evaluate(
            "() => [...document.querySelectorAll('.js-plotly-plot .errorbar path, .js-plotly-plot .shapelayer path')]"
            ".map(p => getComputedStyle(p).stroke)"
        )
        assert strokes and all(min(rgb(s)) > 180 for s in strokes), strokes
    finally:
        pg.context.close()


def test_typing_a_folder_then_clicking_a_page_link_goes_there(browser, server, tiny_root):
    """A folder typed but not entered, then a click on a page link: the page opens (the text box applied itself as it
    lost focus, and that rerun swallowed the click); Enter or the button uses the folder."""
    pg = new_page(browser)
    try:
        visit(pg, server, "dataset", "Dataset")
        pg.get_by_label("Dataset folder", exact=True).fill(str(tiny_root))
        pg.get_by_role("link", name="Home").click()
        settle(pg, "Lesion Lab")
        assert pg.url.rstrip("/").split("?")[0] == server.rstrip("/")
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
