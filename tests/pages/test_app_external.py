"""Evaluate page, "External test set": any model on an imported folder, through the UI (AppTest)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.common.labels import CLASSES, DISPLAY_NAMES
from core.common.settings import CACHE_ENV
from core.data.layouts import diagnosis_code
from tests.app_support import AppEnv, app_test, no_exceptions, save_tiny_checkpoint, texts
from tests.conftest import make_image

# Folder name -> images in it. Folders may be named by code in any case or by diagnosis name; "scar" is no
# class, so its image is set aside (and reported), never counted.
FOLDERS = {"MEL": 4, "nv": 6, "Dermatofibroma": 2, "bcc": 3, "scar": 1}
EXPECTED = {"mel": 4, "nv": 6, "df": 2, "bcc": 3, "akiec": 0, "bkl": 0, "vasc": 0}


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> tuple[AppEnv, Path]:
    """A checkpoint but no runs (the external section works without any), and a class-per-folder set."""
    base = tmp_path_factory.mktemp("app_external")
    env = AppEnv(data=None, runs=base / "runs", checkpoints=base / "checkpoints")
    save_tiny_checkpoint(env.checkpoints / "reference.pt")
    folder = base / "external"
    rng = np.random.default_rng(1)
    for name, n in FOLDERS.items():
        (folder / name).mkdir(parents=True)
        label = CLASSES.index(diagnosis_code(name) or "nv")  # scar/ gets nv-coloured images
        for i in range(n):
            make_image(label, rng).save(folder / name / f"{name.lower()}_{i:02d}.jpg", quality=90)
    return env, folder


def _open(at):
    at.session_state["eval_section"] = "External test set"  # what a click on the tab does
    at.run()
    return at


def _evaluate(at, folder: str):
    at.text_input(key="ext_folder").set_value(folder)
    next(b for b in at.button if b.label == "Evaluate on this test set").click().run()
    return at


def _report(at):
    frames = [d.value for d in at.dataframe if "support" in d.value.columns]
    assert len(frames) == 1, "expected one per-class report"
    return frames[0]


def test_external_set_shows_per_class_supports(external, monkeypatch):
    env, folder = external
    env.apply(monkeypatch)
    at = app_test("evaluate", timeout=120)
    no_exceptions(at)
    assert "no finished run to evaluate" in texts(at)  # the internal tab says so; the external one still works
    _open(at)
    assert at.selectbox(key="ext_model").value.name == "reference.pt"

    _evaluate(at, str(folder))
    no_exceptions(at)
    text = texts(at)
    assert "one folder per class" in text
    assert "15 images" in text  # 4 + 6 + 2 + 3; the image in scar/ is set aside
    assert "set aside" in text and "scar" in "\n".join(str(c.value) for c in at.code)

    report = _report(at)
    assert list(report.index) == list(CLASSES)
    for code in CLASSES:
        assert report.loc[code, "support"] == EXPECTED[code], code
        assert report.loc[code, "diagnosis"] == DISPLAY_NAMES[code]
    labels = {m.label for m in at.metric}
    assert {
        "Accuracy",
        "Balanced accuracy",
        "Macro F1",
        "Macro ROC AUC",
        "ECE (calibrated)",
        "Melanoma sensitivity",
        "Melanoma specificity",
    } <= labels
    assert "95% bootstrap intervals" in text
    assert len(at.get("plotly_chart")) == 1  # the confusion matrix

    # The result stays on reruns (the cached evaluation, not a new one) while the view changes.
    at.segmented_control(key="ext_cm_mode").set_value("row-normalised").run()
    no_exceptions(at)
    assert _report(at).loc["nv", "support"] == 6
    assert len(at.get("plotly_chart")) == 1


def test_external_set_with_a_missing_folder_is_a_clear_error(external, tmp_path, monkeypatch):
    env, _ = external
    env.apply(monkeypatch)
    at = _open(app_test("evaluate", timeout=120))
    _evaluate(at, str(tmp_path / "nowhere"))
    no_exceptions(at)
    errors = "\n".join(str(e.value) for e in at.error)
    assert "does not exist" in errors and "nowhere" in errors
    assert not [d for d in at.dataframe if "support" in d.value.columns]

    _evaluate(at, "   ")
    no_exceptions(at)
    assert "Enter the folder" in "\n".join(str(e.value) for e in at.error)


def _zip(folder: Path, top: str) -> bytes:
    """The external set as a .zip, its folders inside one top folder, as a user zips a folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*.jpg")):
            zf.write(path, f"{top}/{path.relative_to(folder)}")
    return buf.getvalue()


def _chart_titles(at) -> list[str]:
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]


def test_external_set_from_an_uploaded_zip_with_roc_and_calibration(external, tmp_path, monkeypatch):
    env, folder = external
    env.apply(monkeypatch)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    at = _open(app_test("evaluate", timeout=120))
    at.segmented_control(key="ext_source").set_value("Upload a .zip").run()
    no_exceptions(at)
    uploader = at.get("file_uploader")[0]
    assert "at most 200 MB" in uploader.proto.label and uploader.proto.type == [".zip"]
    uploader.set_value(("testset.zip", _zip(folder, "testset"), "application/zip"))
    next(b for b in at.button if b.label == "Evaluate on this test set").click().run()
    no_exceptions(at)
    text = texts(at)
    assert "testset.zip" in text and "15 images" in text and "one folder per class" in text
    assert _report(at).loc["mel", "support"] == 4
    assert list((tmp_path / "cache" / "external").iterdir())  # unpacked under the cache folder, not elsewhere

    # The same views as a run's test split: ROC curves and reliability before/after temperature scaling.
    at.session_state["ext_view"] = "ROC curves"
    at.run()
    no_exceptions(at)
    assert any("ROC" in t for t in _chart_titles(at))
    at.session_state["ext_view"] = "Calibration"
    at.run()
    no_exceptions(at)
    [spec] = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert "Reliability" in spec["layout"]["title"]["text"] and len(spec["data"]) >= 3


def test_an_unsafe_zip_is_refused_with_a_message(external, tmp_path, monkeypatch):
    env, _ = external
    env.apply(monkeypatch)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("mel/a.jpg", b"\xff\xd8\xff")
        zf.writestr("../../escaped.jpg", b"\xff\xd8\xff")
    at = _open(app_test("evaluate", timeout=120))
    at.segmented_control(key="ext_source").set_value("Upload a .zip").run()
    at.get("file_uploader")[0].set_value(("evil.zip", buf.getvalue(), "application/zip"))
    next(b for b in at.button if b.label == "Evaluate on this test set").click().run()
    no_exceptions(at)
    errors = "\n".join(str(e.value) for e in at.error)
    assert "evil.zip cannot be used" in errors and "unsafe path" in errors
    assert not list(tmp_path.rglob("*.jpg"))
