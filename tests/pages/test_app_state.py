"""State that stays true (issue 12, items 1, 5 and 6): the pages follow the job and run files, long steps
report a bar with images/s and ETA and end at a Stop between batches, and the dataset is kept across reloads
and named beside every run (AppTest, real runs on the tiny dataset, real processes as job holders)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from core.common.formatting import progress_text
from core.common.procs import process_record
from core.common.runs import read_events, read_run
from core.inference.features import FeatureCache, backbone_key
from core.training.config import TrainConfig
from core.training.loop import train
from tests.app_support import *  # noqa: F403
from tests.app_support import AppEnv, app_test, fake_job, no_exceptions, texts, tiny_config, use_folder


def write_run(runs: Path, name: str, status: dict, *events: dict) -> Path:
    run = runs / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"epochs": 3, "arch": "resnet18"}))
    (run / "status.json").write_text(json.dumps(status))
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


@pytest.fixture
def state_env(tmp_path, tiny_root, monkeypatch) -> AppEnv:
    env = AppEnv(data=tiny_root, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints")
    env.apply(monkeypatch)
    return env


@pytest.fixture
def holders():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------
# 1. The job's true state


@pytest.mark.integration
def test_after_stop_the_text_the_bar_and_the_buttons_agree(state_env, holders):
    """The run has stopped (0 of 3 epochs) while its job's process is still ending: no bar 28 % full beside
    "stopped", and no "Stopping…"/"Force stop now" for a run that has already stopped."""
    holder = fake_job(state_env.runs, "r1", stop=True)
    holders.append(holder)
    write_run(
        state_env.runs,
        "r1",
        {"state": "stopped"},
        {"event": "start", "epochs": 3, "time": "2026-01-01T00:00:00+00:00"},
        {"event": "progress", "epoch": 1, "step": 5, "steps": 18, "eta_s": 10.0, "time": "2026-01-01T00:00:00+00:00"},
        {"event": "end", "status": "stopped", "time": "2026-01-01T00:00:10+00:00"},
    )
    at = app_test("train")
    no_exceptions(at)
    bar = at.get("progress")[0].proto
    assert "stopped: 0/3 epochs" in bar.text and bar.value == 0
    labels = [b.label for b in at.button]
    assert "Force stop now" not in labels and "Stop training" not in labels
    assert "Stopping" not in texts(at)
    # The sidebar agrees: not "Training running" beside "Stopped on request" while the job's processes exit.
    [line] = [i.value for i in at.sidebar.info]
    assert line == "Training: **r1** stopped; the job is ending…"

    holder.kill()
    holder.wait()
    at.run()
    assert not next(b for b in at.button if b.label == "Start training").disabled


# ---------------------------------------------------------------------------
# 5. Progress of long steps


def test_a_phase_reports_its_rate_and_eta():
    text = progress_text("computing backbone features", 768, 10015, started=100.0, now=120.0)
    assert text == "computing backbone features: 768/10,015 images · 38 images/s · ETA 4 min 01 s"
    assert progress_text("indexing", 0, None, started=100.0, now=100.0) == "indexing: 0 images"


@pytest.mark.integration
def test_a_running_experiment_says_where_it_is_and_the_time_left_measured_here(state_env, holders):
    """Compare's estimate before the click came from an idle benchmark (3 min 39 s said, 27 min taken under load):
    while the experiment runs, the run it is on and the time left, from the speed measured here, stand above its
    table (whose detail column a narrow window cuts)."""
    holders.append(fake_job(state_env.runs, "exp-none", kind="experiment", experiment="exp"))
    base = {k: v for k, v in tiny_config(state_env.data, "", epochs=2).items() if k != "name"}
    manifest = {"name": "exp", "runs": ["exp-none", "exp-oversample"], "strategies": ["none", "oversample"]}
    (state_env.runs / ".experiments").mkdir()
    (state_env.runs / ".experiments" / "exp.json").write_text(json.dumps({**manifest, "created": 1, "base": base}))
    write_run(
        state_env.runs,
        "exp-none",
        {"state": "running", **process_record(holders[0].pid)},
        {
            "event": "progress",
            "phase": "features",
            "epoch": 0,
            "done": 40,
            "total": 84,
            "started": time.time() - 20,
            "time": "2026-01-01T00:00:00+00:00",
        },
    )
    at = app_test("compare")
    no_exceptions(at)
    text = texts(at)
    assert "Run 1 of 2: none** — computing backbone features once: 40/84 images" in text
    assert "left for the whole experiment" in text
    assert "feature extraction 2 images/s (this experiment's features so far)" in text


@pytest.mark.integration
def test_the_feature_phase_shows_a_bar_with_rate_and_eta(state_env, holders):
    holders.append(fake_job(state_env.runs, "r1"))
    started = time.time() - 20
    write_run(
        state_env.runs,
        "r1",
        {"state": "starting", **process_record(holders[0].pid)},
        {
            "event": "progress",
            "phase": "features",
            "epoch": 0,
            "done": 768,
            "total": 10015,
            "started": started,
            "time": "2026-01-01T00:00:00+00:00",
        },
    )
    at = app_test("train")
    no_exceptions(at)
    bar = at.get("progress")[0].proto
    assert bar.value == 7  # percent, as Streamlit keeps it: 768 of 10,015 is 7.7 %
    assert "768/10,015 images" in bar.text and "images/s" in bar.text and "ETA" in bar.text


def test_a_stop_during_feature_extraction_ends_the_run_between_batches(tiny_root, tmp_path):
    """The trainer asks after every batch of 64 images (the tiny dataset has 84) and ends the run at the first
    yes; what was computed before the stop stays cached."""
    asked = []

    def should_stop() -> bool:
        asked.append(time.monotonic())
        return True

    # From the files: with the decoded-image cache the first ask comes while it is built
    # (tests/core/data/test_decoded.py).
    config = tiny_config(
        tiny_root, "stopped-early", out=str(tmp_path), cache_dir=str(tmp_path / "cache"), input_pipeline="jpeg"
    )
    cfg = TrainConfig.from_dict(config)
    run_dir = train(cfg, should_stop=should_stop)
    run = read_run(run_dir)
    assert len(asked) == 1
    assert run.state == "stopped" and not run.epochs and not run.has_model
    phase = [e for e in read_events(run_dir / "metrics.jsonl") if e.get("phase") == "features"]
    assert phase and phase[0]["done"] == 64 and phase[0]["total"] == 84 and phase[0]["started"] > 0
    cached = torch.load(
        FeatureCache(cfg.cache_dir).path(backbone_key(cfg.arch, cfg.weights, cfg.preprocessing)), weights_only=True
    )
    assert len(cached["keys"]) == 64


def test_the_final_evaluation_reports_its_progress_and_the_run_its_dataset(tiny_root, tmp_path):
    cfg = TrainConfig.from_dict(
        tiny_config(tiny_root, "evaluated", out=str(tmp_path), cache_dir=str(tmp_path / "cache"), epochs=1)
    )
    run = read_run(train(cfg))
    phase = [e for e in read_events(run.path / "metrics.jsonl") if e.get("phase") == "evaluate"]
    sizes = run.start["split_sizes"]
    assert phase and phase[-1]["done"] == phase[-1]["total"] == sizes["val"] + sizes["test"]
    assert run.dataset == f"{tiny_root.name}, 84 images"


# ---------------------------------------------------------------------------
# 6. The dataset, kept and named


def test_the_dataset_folder_survives_a_reload_through_the_url(state_env, tmp_path, tiny_root):
    at = app_test()
    use_folder(at, str(tiny_root))
    no_exceptions(at)
    assert at.query_params["data"] == [str(tiny_root)] or at.query_params["data"] == str(tiny_root)

    # A reload is a new session with the same URL.
    from streamlit.testing.v1 import AppTest

    from tests.app_support import APP

    again = AppTest.from_file(str(APP), default_timeout=60)
    again.query_params["data"] = str(tiny_root)
    again.run()
    no_exceptions(again)
    assert again.sidebar.text_input(key="dataset_folder_input").value == str(tiny_root)
    assert "set by the sidebar" in texts(again)


@pytest.mark.parametrize("page", ["evaluate", "compare", "home"])
def test_each_run_names_its_dataset(full_env, monkeypatch, page):  # noqa: F811
    full_env.apply(monkeypatch)
    monkeypatch.delenv("LESIONLAB_PUBLISHED_RUNS")  # docs/runs too: recorded before runs named their dataset
    at = app_test(page)
    no_exceptions(at)
    # Run pickers' options, tables and text: wherever the page lists runs.
    options = [o for kind in ("selectbox", "multiselect") for w in at.get(kind) for o in w.options]
    shown = "\n".join([texts(at), *options, *(d.value.to_string() for d in at.dataframe)])
    tiny = Path(full_env.data).name
    assert f"{tiny}, 84 images" in shown
    assert "ham10000-200x150, 10,015 images" in shown
