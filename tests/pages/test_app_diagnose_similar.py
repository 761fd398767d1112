"""Diagnose with the bundled model on the bundled sample: similar confirmed cases (never the model's test images
unless asked), the unfamiliar-image warning with its reason, and the downloadable report."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import streamlit as st

from core.common.labels import CLASSES, DISPLAY_NAMES
from core.common.settings import CACHE_ENV, CHECKPOINTS_ENV, DATA_ENV, PUBLISHED_RUNS_ENV, RUNS_ENV
from core.data.dataset import index_dataset
from core.inference.opening import open_predictor
from core.inference.similar import NEIGHBOURS, REFERENCE_SPLITS, build_index, neighbours_disagree, vote
from core.inference.unfamiliar import detector_path
from tests.app_support import *  # noqa: F403
from tests.app_support import ROOT, app_test, no_exceptions, texts

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
SPLIT = ROOT / "docs" / "runs" / "reference-mnv2" / "split.csv"
REFERENCE = ROOT / "checkpoints" / "reference.pt"


@pytest.fixture
def diagnose(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(SAMPLE))
    monkeypatch.setenv(CHECKPOINTS_ENV, str(ROOT / "checkpoints"))
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(PUBLISHED_RUNS_ENV, raising=False)  # docs/runs holds the reference model's split
    at = app_test("diagnose", timeout=600)
    no_exceptions(at)
    return at


def sample_image(split: str):
    frame = index_dataset(SAMPLE).frame
    splits = dict(line.split(",")[0::3] for line in SPLIT.read_text().splitlines()[1:])
    row = frame[frame["image_id"].map(splits) == split].iloc[0]
    return row, splits


def case_captions(at) -> list[str]:
    return [c for img in at.get("image") for c in img.captions if " · similarity " in c]


def index_bars(at) -> list[str]:
    return [bar.proto.text for bar in at.get("progress") if "for similar cases" in bar.proto.text]


def indexed(at, timeout: float = 300):
    """Run the page again until the case index, built in the background, is ready (the page's fragment would)."""
    deadline = time.monotonic() + timeout
    while index_bars(at):
        assert time.monotonic() < deadline, index_bars(at)
        time.sleep(0.5)
        at.run()
        no_exceptions(at)
    return at


def test_the_answer_and_report_come_first_and_the_cases_when_indexed(diagnose, downloads):
    """The first Diagnose on a dataset indexes it in the background: the answer and the report come at once, beside
    a bar saying what is being done (with the rate and ETA once images are done); the cases follow, in the page and
    in the report."""
    st.cache_resource.clear()  # no index built by an earlier test of this process: this one is the first
    row, _ = sample_image("test")
    upload = ("lesion.jpg", open(row["path"], "rb").read(), "image/jpeg")
    at = diagnose.file_uploader(key="diag_upload").set_value(upload).run()
    no_exceptions(at)
    [bar] = index_bars(at)
    assert bar.startswith(f"Indexing {SAMPLE.name} under this model for similar cases (")
    assert [m.value for m in at.main.markdown if m.value.startswith("### ")]  # the answer
    assert at.get("download_button")[0].proto.label == "Download report" and not case_captions(at)
    html = [data.decode() for data, mime in downloads if mime.startswith("text/html")][-1]
    assert "Similar confirmed cases" not in html
    seen = []
    while index_bars(at):
        seen += index_bars(at)
        time.sleep(0.2)
        at.run()
        no_exceptions(at)
    assert any(f"/{len(index_dataset(SAMPLE).frame)} images · " in t and " · ETA " in t for t in seen), seen
    assert len(case_captions(at)) >= NEIGHBOURS
    html = [data.decode() for data, mime in downloads if mime.startswith("text/html")][-1]
    assert "Similar confirmed cases" in html


def test_similar_cases_report_and_no_test_neighbours(diagnose, downloads):
    row, splits = sample_image("test")
    upload = ("lesion.jpg", open(row["path"], "rb").read(), "image/jpeg")
    at = indexed(diagnose.file_uploader(key="diag_upload").set_value(upload).run())
    no_exceptions(at)
    assert "Similar confirmed cases" in [s.value for s in at.subheader]
    captions = case_captions(at)
    nearest = captions[:8]
    assert len(nearest) == 8 and all("confirmed by" in c for c in nearest)
    shown_ids = [c.rsplit(" · ", 1)[1] for c in captions]
    assert all(splits[i] == "val" for i in shown_ids)  # the sample's train/val images are its 14 val ones
    assert "The 8 nearest cases:" in texts(at)
    # The report: the seven classes in order with the page's probabilities.
    prediction = at.session_state["diag_result"][1]
    html = [data.decode() for data, mime in downloads if mime.startswith("text/html")][-1]
    rows = re.findall(r"<tr><td>(\w+)</td><td>([^<]+)</td><td>\w+</td><td class=\"p\">([\d.]+%)</td></tr>", html)
    assert [(c, n) for c, n, _ in rows] == [(c, DISPLAY_NAMES[c]) for c in CLASSES]
    assert [p for *_, p in rows] == [f"{prediction.probabilities[c]:.1%}" for c in CLASSES]
    assert all(i in html for i in shown_ids[:8]) and "data:image/jpeg;base64," in html
    assert at.get("download_button")[0].proto.label == "Download report"

    # Asked for, the test images are searched too, and the upload (a test image) finds itself.
    at.toggle(key="diag_similar_test").set_value(True).run()
    no_exceptions(at)
    first = case_captions(at)[0]
    assert first.endswith(row["image_id"]) and "similarity 1.00" in first


def test_unfamiliar_upload_says_why(diagnose):
    document = (ROOT / "tests" / "data" / "unfamiliar" / "held-out" / "document-skimage_page-0.jpg").read_bytes()
    at = diagnose.file_uploader(key="diag_upload").set_value(("page.jpg", document, "image/jpeg")).run()
    no_exceptions(at)
    warning = " ".join(w.value for w in at.warning)
    assert "does not look like a dermoscopic image" in warning
    if detector_path(ROOT / "checkpoints" / "reference.pt").is_file():
        assert "its unfamiliar-image score is" in warning  # the measured score says why
    else:
        assert "no measured unfamiliar-image detector" in texts(at)
    assert not [m.value for m in at.main.markdown if m.value.startswith("### ")]


def test_nearest_cases_that_disagree_are_said_beside_the_answer(diagnose, downloads, tmp_path):
    """When the most common diagnosis among the 8 nearest confirmed cases is not the model's answer, a warning says so
    beside it (and in the report); when it is, nothing is said. The sample's val images are the cases offered."""
    predictor = open_predictor(REFERENCE)
    frame = index_dataset(SAMPLE).frame
    _, splits = sample_image("test")
    # Into the page's own feature cache (the fixture's), so that its case index reuses these features.
    cases = build_index(REFERENCE, frame, frame["image_id"].map(splits), cache_dir=tmp_path / "cache" / "features")
    chosen = {}
    for path in frame.loc[frame["image_id"].map(splits) == "test", "path"]:
        prediction = predictor.predict(Path(path).read_bytes(), tta=True)
        nearest = cases.nearest(predictor.embed(prediction), NEIGHBOURS, REFERENCE_SPLITS)
        disagree = bool(neighbours_disagree(vote(nearest), prediction.top_index)[0])
        chosen.setdefault(disagree, (path, nearest))
        if len(chosen) == 2:
            break
    for disagree, (path, nearest) in chosen.items():
        upload = ("lesion.jpg", Path(path).read_bytes(), "image/jpeg")
        at = indexed(diagnose.file_uploader(key="diag_upload").set_value(upload).run())
        no_exceptions(at)
        said = [w.value for w in at.warning if "nearest confirmed cases disagree" in w.value]
        assert len(said) == int(disagree), (path, said)
        html = [data.decode() for data, mime in downloads if mime.startswith("text/html")][-1]
        assert ("nearest confirmed cases disagree" in html) == disagree
        if disagree:  # the counts said are those of the cases shown
            shown = [c.rsplit(" · ", 1)[1] for c in case_captions(at)[:NEIGHBOURS]]
            assert shown == [c.image_id for c in nearest]
            top = max(set(c.dx for c in nearest), key=[c.dx for c in nearest].count)
            assert f"{[c.dx for c in nearest].count(top)} {DISPLAY_NAMES[top]} ({top})" in said[0]
    assert set(chosen) == {True, False}
