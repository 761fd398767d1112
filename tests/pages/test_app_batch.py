"""Batch page: several uploads and a .zip through the bundled reference model, a table with a row per file that
agrees with the Predictor one image at a time, bad files as rows with their error, and the CSV."""

from __future__ import annotations

import csv
import io

import pytest

from core.app.plots import class_label
from core.common.labels import DISPLAY_NAMES
from core.inference.batch import CSV_COLUMNS
from core.inference.opening import open_predictor
from tests.app_support import *  # noqa: F403
from tests.app_support import ROOT, AppEnv, app_test, no_exceptions, table_fits_1600, texts
from tests.conftest import zip_bytes

SAMPLE = sorted((ROOT / "sample_data" / "ham10000-sample" / "images").glob("*.jpg"))
REFERENCE = ROOT / "checkpoints" / "reference.pt"
# A basal cell carcinoma the reference model is sure of, with almost no melanoma probability.
CARCINOMA = ROOT / "sample_data" / "ham10000-sample" / "images" / "ISIC_0024632.jpg"
# A greyscale photograph the unfamiliar check flags.
CAMERAMAN = ROOT / "tests" / "data" / "unfamiliar" / "held-out" / "grey-camera-0.jpg"


@pytest.fixture
def batch_page(tmp_path, monkeypatch):
    AppEnv(data=None, runs=tmp_path / "runs", checkpoints=REFERENCE.parent).apply(monkeypatch)
    at = app_test("batch")
    no_exceptions(at)
    return at


def test_uploads_and_a_zip_give_a_table_and_its_csv(batch_page):
    at = batch_page
    assert "Upload several dermoscopic images" in texts(at)
    images = {p.name: p.read_bytes() for p in [*SAMPLE[::40][:2], CARCINOMA]}
    inside = {f"set/{p.name}": p.read_bytes() for p in SAMPLE[1:3]}
    archive = zip_bytes({**inside, "set/broken.jpg": b"not a jpeg", "../../up.jpg": SAMPLE[5].read_bytes()})
    uploads = [(name, data, "image/jpeg") for name, data in images.items()]
    uploads.append(("cases.zip", archive, "application/zip"))
    at.file_uploader(key="batch_upload").set_value(uploads).run(timeout=180)
    no_exceptions(at)

    table = at.dataframe[0].value
    table_fits_1600(at.dataframe[0])  # the error and warning columns ran off a 1600-px window
    assert list(table["file"]) == [
        *images,
        *(f"cases.zip/{n}" for n in inside),
        "cases.zip/set/broken.jpg",
        "cases.zip/../../up.jpg",
    ]
    predictor = open_predictor(REFERENCE)
    expected = {**images, **{f"cases.zip/{n}": data for n, data in inside.items()}}
    tta = at.toggle(key="batch_tta").value
    for _, row in table.iterrows():
        if row["file"] not in expected:
            continue
        single = predictor.predict(expected[row["file"]], tta=tta)
        assert row["top_class"] == single.top_class and not row["error"]
        assert row["p_melanoma"] == pytest.approx(single.probabilities["mel"], abs=1e-4)
        assert row["thumbnail"].startswith("data:image/jpeg;base64,")
    errors = dict(zip(table["file"], table["error"], strict=True))
    assert "not an image PIL can read" in errors["cases.zip/set/broken.jpg"]
    assert "unsafe path" in errors["cases.zip/../../up.jpg"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Assessed"] == "5" and metrics["Not assessed"] == "0" and metrics["Could not be used"] == "2"
    # Each referral rule: a count of the files at or above the model's threshold and a column naming the rules met.
    predicted = table[table["error"] == ""]
    for referral in predictor.referrals:
        rule = referral.rule
        above = predicted[f"p_{rule.key}"] >= referral.threshold
        assert metrics[f"{rule.label} ≥ {referral.threshold:.1%}"] == str(int(above.sum()))
        assert list(predicted["refer"].str.contains(rule.key)) == list(above)
    carcinoma = table.set_index("file").loc[CARCINOMA.name]
    assert carcinoma["top_class"] == "bcc" and carcinoma["refer"] == "malignant"  # P(melanoma) is near 0

    assert at.get("download_button")[0].proto.label == "Download the table (CSV)"
    rows = list(csv.DictReader(io.StringIO(at.session_state["batch_result"][2])))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["file"] for r in rows] == list(table["file"])
    assert [r["top_class"] for r in rows] == list(table["top_class"])

    # Another rerun (here: the page re-run by hand) reuses the result rather than predicting again.
    first = at.session_state["batch_result"]
    at.run()
    assert at.session_state["batch_result"] is first


def test_a_picture_not_assessed_names_no_class(batch_page):
    """As on Diagnose, a photograph unlike dermoscopy gets no diagnosis in the table (it read "nv · Melanocytic
    nevus" beside the warning that it was not assessed), no probability, and no place in the counts of results: the
    page counts it as not assessed; its CSV row says why. A lesion beside it keeps its own."""
    uploads = [(p.name, p.read_bytes(), "image/jpeg") for p in (CAMERAMAN, CARCINOMA)]
    at = batch_page.file_uploader(key="batch_upload").set_value(uploads).run(timeout=180)
    no_exceptions(at)
    table = at.dataframe[0].value.set_index("file")
    photo = table.loc[CAMERAMAN.name]
    assert photo["diagnosis"].startswith("not assessed") and photo["refer"] == "" and photo["top_class"] == ""
    assert not [name for name in DISPLAY_NAMES.values() if name in photo["diagnosis"]]
    assert photo[["p_malignant", "p_melanoma", "confidence"]].isna().all()  # its bars empty, not "nv 40 %"
    assert photo["warnings"].startswith("unlike the dermoscopy") and "low confidence" not in photo["warnings"]
    assert table.loc[CARCINOMA.name, "diagnosis"] == class_label("bcc")

    predictor = open_predictor(REFERENCE)
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Assessed"], metrics["Not assessed"], metrics["Could not be used"]) == ("1", "1", "0")
    for referral in predictor.referrals:  # the carcinoma's alone, whatever the photograph's output was
        carcinoma_refers = table.loc[CARCINOMA.name, f"p_{referral.rule.key}"] >= referral.threshold
        assert metrics[f"{referral.rule.label} ≥ {referral.threshold:.1%}"] == str(int(carcinoma_refers))

    rows = {r["file"]: r for r in csv.DictReader(io.StringIO(at.session_state["batch_result"][2]))}
    check = predictor.unfamiliar(predictor.predict(CAMERAMAN, tta=at.toggle(key="batch_tta").value))
    assert rows[CAMERAMAN.name]["not_assessed"] == " | ".join(check.reasons)
    assert rows[CAMERAMAN.name]["diagnosis"] == "not assessed" and rows[CAMERAMAN.name]["p_melanoma"] == ""
    assert rows[CARCINOMA.name]["not_assessed"] == "" and rows[CARCINOMA.name]["top_class"] == "bcc"


def test_flip_averaging_off_repredicts_and_a_model_that_cannot_load_says_so(batch_page, tmp_path):
    at = batch_page
    at.file_uploader(key="batch_upload").set_value([(SAMPLE[0].name, SAMPLE[0].read_bytes(), "image/jpeg")]).run()
    no_exceptions(at)
    first = at.session_state["batch_result"]
    at.toggle(key="batch_tta").set_value(not at.toggle(key="batch_tta").value).run()
    no_exceptions(at)
    second = at.session_state["batch_result"]
    assert second is not first and second[1][0].file == SAMPLE[0].name
    assert not at.error
