"""End to end in a real headless Chromium, what a user does: an upload diagnosed on Diagnose, images and a
.zip predicted on Batch, a quiz taken to its summary, a training run started on Train whose curve grows, and
pages that follow a job without a reload while an idle tab costs nothing."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from playwright.sync_api import expect

from core.app import jobs as app_jobs
from core.common.labels import CLASSES, DISPLAY_NAMES
from core.common.procs import process_record
from core.common.runs import read_run
from core.inference.similar import NEIGHBOURS
from tests.app_support import (
    CHROMIUM,
    fake_job,
)
from tests.pages.browser_support import SAMPLE, choose, curve_points, idle, keep, new_page, settle, shot, visit

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at /usr/bin/chromium"),
]


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
    # Waited for, not read once: the page redraws when the similar-case index is ready, and an element between two
    # runs is briefly absent. Visible, not only present: a picture the model did not assess keeps them folded away.
    expect(page.get_by_text("Malignant (akiec + bcc + mel)", exact=True)).to_be_visible()
    expect(page.get_by_text("Grad-CAM for ", exact=False).first).to_be_visible()
    assert page.locator("[data-testid=stImage] img").count() >= 2  # upload + overlay
    shot(page, "diagnose", tmp_path)

    # Similar confirmed cases (indexed in the background, then the page redraws), and the report to keep: the seven
    # classes in order, the images inlined.
    page.get_by_text(f"The {NEIGHBOURS} nearest cases:").wait_for()
    settle(page, "Diagnose")
    with page.expect_download() as download:
        # Playwright finds this button "inert" and will not click it (cause not yet found); a script click
        # still goes through the browser's real download.
        page.get_by_role("button", name="Download report").evaluate("button => button.click()")
    report = Path(download.value.path()).read_text()
    positions = [report.index(f"<td>{DISPLAY_NAMES[c]}</td>") for c in CLASSES]
    assert positions == sorted(positions) and "data:image/jpeg;base64," in report
    settle(page, "Diagnose")  # the download's click reruns the page: its elements are drawn anew
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


def frames_sent(pg, sent: list, seconds: float) -> int:
    """How many messages the page sends the server in ``seconds`` (each rerun, a fragment's included, is one);
    ``sent`` is the list its websocket's frames are appended to."""
    before = len(sent)
    pg.wait_for_timeout(seconds * 1000)
    return len(sent) - before


def test_pages_follow_a_job_and_an_idle_tab_costs_nothing(browser, server, browser_env):
    """A page open while a job runs watches it once a second and shows its end in the sidebar and on the page
    within moments, with no reload; with no job an idle tab sends the server nothing at all (each watch was a
    rerun a second per tab); a job started elsewhere shows at the next interaction. The job is held by a
    stand-in process (the waits allow for a machine busy with other tests)."""
    runs = browser_env["runs"]
    assert app_jobs.wait_idle(runs, timeout=60)
    pg = new_page(browser)
    sent: list = []
    pg.on("websocket", lambda ws: ws.on("framesent", lambda frame: sent.append(frame)))
    visit(pg, server, "", "Lesion Lab")
    assert frames_sent(pg, sent, 3) == 0  # no job: no watch

    holder = fake_job(runs, "live-one")
    (runs / "live-one").mkdir()
    (runs / "live-one" / "status.json").write_text(json.dumps({"state": "running", **process_record(holder.pid)}))
    try:
        visit(pg, server, "", "Lesion Lab")
        assert "Training running: live-one" in pg.inner_text("[data-testid=stSidebar]")
        job_metric = pg.locator("[data-testid=stMetric]").filter(has_text="Training job")
        assert "running" in job_metric.inner_text()
        assert frames_sent(pg, sent, 3) >= 2  # a job: watched every second

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
        idle(pg)
        assert frames_sent(pg, sent, 3) == 0  # the job ended: the watch with it

        holder = fake_job(runs, "live-two", kind="experiment")
        pg.locator("[data-testid=stSidebarNav]").get_by_role("link", name="Dataset").click()
        pg.locator("[data-testid=stSidebar]").get_by_text("Imbalance experiment starting").wait_for(timeout=15000)
    finally:
        holder.kill()
        holder.wait()
        app_jobs.active_job(runs)  # releases the stand-in's lock
        shutil.rmtree(runs / "live-one")
        pg.context.close()
