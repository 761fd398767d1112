"""Which models Diagnose and Batch offer, and how they are labelled: real runs from tests.app_support.picker_env."""

from __future__ import annotations

import shutil

import pytest

from core.app.model_picker import MIN_BALANCED_ACCURACY, MIN_TRAIN_IMAGES, model_choice, model_choices
from core.common.runs import read_evaluate_report, read_evaluation, read_run, write_status
from core.common.settings import CHECKPOINTS_ENV, PUBLISHED_RUNS_ENV, REFERENCE_CHECKPOINT
from tests.app_support import *  # noqa: F403 — picker_env, the session's runs
from tests.conftest import ROOT


@pytest.fixture
def choices(picker_env, monkeypatch):
    picker_env.apply(monkeypatch)
    return {c.name: c for c in model_choices()}


def test_the_reference_model_comes_first_then_the_checkpoints_then_the_runs_newest_first(picker_env, choices):
    runs = sorted(picker_env.runs.iterdir(), key=lambda d: (d / "best.pt").stat().st_mtime, reverse=True)
    assert list(choices) == ["checkpoint: reference", "checkpoint: copied", *(f"run: {d.name}" for d in runs)]


def test_a_finished_run_on_enough_images_is_offered_with_its_measured_balanced_accuracy(picker_env, choices):
    clinical = choices["run: clinical"]
    measured = read_evaluation(picker_env.runs / "clinical")["test"]["balanced_accuracy"]
    assert read_run(picker_env.runs / "clinical").start["split_sizes"]["train"] >= MIN_TRAIN_IMAGES
    assert measured >= MIN_BALANCED_ACCURACY and not clinical.experimental
    assert clinical.balanced_accuracy == measured and not clinical.tta  # the trainer's one-view evaluation
    assert clinical.label == f"run: clinical — test balanced accuracy {measured:.1%}"


def test_a_run_trained_on_few_images_is_experimental_and_says_how_many(picker_env, choices):
    train = read_run(picker_env.runs / "small").start["split_sizes"]["train"]
    assert train < MIN_TRAIN_IMAGES
    assert choices["run: small"].why_experimental == (f"trained on {train:,} images (fewer than 1,000)",)
    assert choices["run: small"].label.endswith(f"— experimental: trained on {train:,} images (fewer than 1,000)")


def test_a_run_below_the_floor_is_experimental(picker_env, choices):
    measured = read_evaluation(picker_env.runs / "weak")["test"]["balanced_accuracy"]
    assert measured < MIN_BALANCED_ACCURACY  # one epoch at lr 1e-6 learns nothing
    weak = choices["run: weak"]
    assert weak.balanced_accuracy == measured and weak.why_experimental == ("test balanced accuracy below 50%",)


def test_a_stopped_run_is_experimental_even_when_evaluated(picker_env, choices):
    assert read_run(picker_env.runs / "stopped").state == "stopped"
    stopped = choices["run: stopped"]
    assert stopped.balanced_accuracy is not None and "stopped before its last epoch" in stopped.why_experimental


def test_a_model_without_records_says_not_evaluated(choices):
    # clinical's model copied into the checkpoints folder: its run records stay behind, so nothing measured it there.
    copied = choices["checkpoint: copied"]
    assert copied.balanced_accuracy is None and not copied.experimental
    assert copied.label == "checkpoint: copied — not evaluated"
    assert choices["checkpoint: reference"].label == "checkpoint: reference — not evaluated"


def test_damaged_run_records_make_a_model_experimental(picker_env, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "clinical"
    shutil.copytree(picker_env.runs / "clinical", run)
    (run / "status.json").write_text('{"state": "done well"}')
    choice = model_choice(run / "best.pt")
    assert choice.why_experimental == ("its run records are damaged",)
    write_status(run, "failed", "out of memory")
    assert model_choice(run / "best.pt").why_experimental == ("its training failed",)


def test_the_bundled_reference_model_shows_its_flip_averaged_test_balanced_accuracy(monkeypatch):
    # The shipped checkpoint and its published records (docs/runs/reference-mnv2), as a fresh clone has them.
    monkeypatch.setenv(CHECKPOINTS_ENV, str(ROOT / "checkpoints"))
    monkeypatch.delenv(PUBLISHED_RUNS_ENV, raising=False)
    reference = model_choice(ROOT / "checkpoints" / REFERENCE_CHECKPOINT)
    measured = read_evaluate_report(ROOT / "docs" / "runs" / "reference-mnv2")["metrics"]["balanced_accuracy"]
    assert reference.balanced_accuracy == measured and reference.tta and not reference.experimental
    assert reference.label == f"checkpoint: reference — test balanced accuracy {measured:.1%} (flip-averaged)"
