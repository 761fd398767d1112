"""Evaluate page, "Robustness" tab: a run's saved robustness report, and the button that computes a missing one
(AppTest, the real reference checkpoint on the bundled sample)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from core.data.shifts import SHIFTS
from core.evaluation import robustness
from core.evaluation.evaluate import evaluate_checkpoint
from core.evaluation.robustness import CLEAN
from core.inference.forward import tta_description
from core.inference.predictor import USE_TTA_BY_DEFAULT
from tests.app_support import AppEnv, app_test, no_exceptions, table_fits_1600, texts
from tests.conftest import ROOT
from tests.pages.test_app_pages import open_view

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
RUN = "reference-mnv2"


@pytest.fixture(scope="module")
def half_sample(tmp_path_factory) -> Path:
    """Every other image of the bundled sample (10 of each class) with their metadata rows: the button's report, every
    shift through the four flips, on half the images."""
    root = tmp_path_factory.mktemp("half_sample")
    meta = pd.read_csv(SAMPLE / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    half = meta.groupby("dx", sort=False).nth(slice(None, None, 2))
    (root / "images").mkdir()
    for image_id in half["image_id"]:
        shutil.copy(SAMPLE / "images" / f"{image_id}.jpg", root / "images")
    half.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


@pytest.fixture
def env(tmp_path, monkeypatch, half_sample) -> AppEnv:
    """The published reference run as a local run without a robustness report, its checkpoint, half the sample."""
    env = AppEnv(data=half_sample, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints")
    shutil.copytree(ROOT / "docs" / "runs" / RUN, env.runs / RUN, ignore=shutil.ignore_patterns("robustness.json"))
    env.checkpoints.mkdir()
    shutil.copy(ROOT / "checkpoints" / "reference.pt", env.checkpoints / "reference.pt")
    env.apply(monkeypatch)
    return env


def _robustness_tab():
    at = app_test("evaluate", timeout=300)
    no_exceptions(at)
    assert at.selectbox(key="eval_run").value == RUN
    open_view(at, "Robustness")
    return at


def _shown_table(at):
    tables = [d.value for d in at.dataframe if "condition" in d.value.columns]
    assert len(tables) == 1, "expected one robustness table"
    return tables[0]


def test_missing_report_is_computed_with_a_button_and_saved(env):
    at = _robustness_tab()
    assert "No robustness report has been saved for this run" in texts(at)
    assert f"(test-time augmentation: {tta_description(USE_TTA_BY_DEFAULT)})" in texts(at)
    assert not at.get("plotly_chart")
    next(b for b in at.button if b.label == "Compute the robustness report").click().run()
    no_exceptions(at)
    # The offer and its button have gone: the report they offered stands in their place.
    assert "No robustness report has been saved" not in texts(at)
    assert not [b for b in at.button if b.label == "Compute the robustness report"]
    saved = json.loads((env.runs / RUN / "robustness.json").read_text())
    assert [c["name"] for c in saved["conditions"]] == [CLEAN, *SHIFTS]
    assert Path(saved["checkpoint"]).name == "reference.pt" and Path(saved["data"]) == env.data
    table = _shown_table(at)
    assert list(table["condition"]) == [CLEAN, *SHIFTS]
    assert len(at.get("plotly_chart")) == 1
    # With the predictor's default views, as core.evaluation.evaluate and Diagnose predict: its clean row is their
    # result.
    assert saved["tta"] is USE_TTA_BY_DEFAULT and saved["tta_views"] == tta_description(USE_TTA_BY_DEFAULT)
    assert robustness.views(saved) in texts(at)
    evaluated = evaluate_checkpoint(env.checkpoints / "reference.pt", env.data, bootstrap=0)
    assert evaluated["tta"] is USE_TTA_BY_DEFAULT
    clean = saved["conditions"][0]
    assert clean["metrics"]["confusion_matrix"] == evaluated["metrics"]["confusion_matrix"]
    assert clean["ece"] == pytest.approx(evaluated["metrics"]["ece"], abs=1e-6)


def test_saved_report_is_shown_without_recomputing(env):
    """The table is read from robustness.json: a number changed there is the number shown."""
    report = robustness.evaluate_shifts(
        env.checkpoints / "reference.pt", SAMPLE, shifts=["rotate_90"], bootstrap=50, max_images=10
    )
    assert report["n_images"] == 10 and report["sampled_from"] > 10
    report["conditions"][0]["balanced_accuracy"] = 0.123456
    (env.runs / RUN / "robustness.json").write_text(json.dumps(report))
    at = _robustness_tab()
    assert not [b for b in at.button if b.label == "Compute the robustness report"]
    table = _shown_table(at)
    assert table["balanced accuracy"][0] == "0.123"
    table_fits_1600(next(d for d in at.dataframe if "condition" in d.value.columns))  # its last column ran off
    assert table.to_dict("records") == robustness.table_rows(report)
    assert robustness.describe(report) in texts(at)
    assert len(at.get("plotly_chart")) == 1


def test_a_damaged_report_is_named_and_can_be_computed_again(env):
    (env.runs / RUN / "robustness.json").write_text('{"split": "val", "conditions": [{"name": "fisheye"}]}')
    at = _robustness_tab()
    shown = texts(at)
    assert "The saved robustness report cannot be shown: robustness.json is not a robustness report" in shown
    assert "Compute the robustness report" in [b.label for b in at.button]
