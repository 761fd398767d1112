"""Train and Compare pages driving real background jobs through their forms (AppTest)."""

from __future__ import annotations

import shutil
import time

import pandas as pd
import pytest

from core.app import jobs as app_jobs
from core.common.runs import read_evaluation, read_run
from core.inference.opening import open_predictor
from core.models.architectures import weights_file
from core.training.imbalance import STRATEGIES
from tests.app_support import *  # noqa: F403
from tests.app_support import AppEnv, app_test, no_exceptions, texts
from tests.core.data.test_download import dataset, server  # noqa: F401 — the fake Dataverse fixtures


@pytest.fixture
def train_env(tmp_path, tiny_root, monkeypatch) -> AppEnv:
    env = AppEnv(data=tiny_root, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints")
    env.apply(monkeypatch)
    yield env
    if app_jobs.active_job(env.runs) is not None:
        app_jobs.kill_job(env.runs)
        app_jobs.wait_idle(env.runs, timeout=20)


def fill_tiny(at, name: str, epochs: int) -> None:
    at.text_input(key="run_name_seed").set_value(name)
    at.selectbox(key="weights_seed").set_value("none")
    at.selectbox(key="imbalance_seed").set_value("none")
    at.number_input(key="epochs_seed").set_value(epochs)
    at.number_input(key="h_seed").set_value(32)
    at.number_input(key="w_seed").set_value(32)


def start_button(at):
    return next(b for b in at.button if b.label == "Start training")


@pytest.mark.integration
def test_start_watch_and_stop_a_run_from_the_page(train_env):
    at = app_test("train")
    no_exceptions(at)
    fill_tiny(at, "ui-run", epochs=200)
    # Full fine-tuning makes every epoch run the network, so 200 epochs outlast the Stop click on any machine.
    at.selectbox(key="finetune_seed").set_value("full")
    start_button(at).click().run()
    no_exceptions(at)
    job = app_jobs.active_job(train_env.runs)
    assert job is not None and job.runs == ["ui-run"]

    # While it runs: the form is locked, the monitor shows the run and a Stop button.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        at.run()
        no_exceptions(at)
        if at.get("plotly_chart"):
            break
        time.sleep(1)
    assert at.get("plotly_chart"), "the training curves never appeared"
    assert start_button(at).disabled
    assert "Only one job runs at a time" in texts(at)
    assert any("ui-run" in s.value for s in at.subheader)
    progress = at.get("progress")
    assert progress and "epoch" in progress[0].proto.text
    stop = next(b for b in at.button if b.label == "Stop training")
    stop.click().run()
    no_exceptions(at)
    assert app_jobs.wait_idle(train_env.runs, timeout=60)
    at.run()
    no_exceptions(at)
    assert not start_button(at).disabled
    assert "Stopped on request" in texts(at)
    assert read_run(train_env.runs / "ui-run").state == "stopped"


@pytest.mark.integration
def test_a_failed_run_shows_its_error(train_env, tmp_path):
    at = app_test("train")
    # Point the run at a copy of the dataset that vanishes before the trainer (still importing) reads it.
    gone = tmp_path / "gone"
    shutil.copytree(train_env.data, gone)
    at.session_state["dataset_folder"] = str(gone)
    at.run()
    # Fill the form after that rerun: values set before it did not reach the submit, and the preset's ImageNet
    # weights are refused where they are not on this computer.
    fill_tiny(at, "will-fail", epochs=1)
    at.selectbox(key="arch_seed").set_value("mobilenet_v2")
    start_button(at).click().run()
    no_exceptions(at)
    shutil.rmtree(gone)
    assert app_jobs.wait_idle(train_env.runs, timeout=60)
    at.run()
    no_exceptions(at)
    errors = " ".join(e.value for e in at.error)
    assert "Training failed" in errors and "does not exist" in errors


@pytest.mark.integration
def test_compare_starts_the_imbalance_experiment(train_env):
    at = app_test("compare")
    no_exceptions(at)
    at.selectbox(key="exp_weights").set_value("none")
    at.number_input(key="exp_epochs").set_value(1)
    at.number_input(key="exp_size").set_value(32)
    next(b for b in at.button if b.label == "Run the imbalance experiment").click().run()
    no_exceptions(at)
    job = app_jobs.active_job(train_env.runs)
    assert job is not None and job.kind == "experiment" and len(job.runs) == len(STRATEGIES)
    # The status table lists the strategies while they run; stop after the first to keep this quick.
    # The lesson shows the experiment just started, whatever was picked before.
    assert at.session_state["cmp_experiment_pick"] == job.experiment
    table = at.dataframe[0].value
    assert list(table["strategy"]) == [s.label for s in STRATEGIES.values()]
    assert table["strategy"].iloc[3] == "weighted loss"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (train_env.runs / job.runs[0] / "status.json").is_file():
        time.sleep(0.5)
    app_jobs.stop_job(train_env.runs)
    assert app_jobs.wait_idle(train_env.runs, timeout=60)
    at.run()
    no_exceptions(at)
    # A one-epoch run of 32 images can finish before the stop lands, so the stop may catch run 0 or the next one:
    # whichever it caught reads "stopped" (or finished in time), those before it "finished", the rest "not run".
    states = list(at.dataframe[0].value["state"])
    ran = len(states) - states.count("not run")
    assert 1 <= ran < len(STRATEGIES), states
    assert states[: ran - 1] == ["finished"] * (ran - 1) and states[ran - 1] in ("finished", "stopped"), states
    assert states[ran:] == ["not run"] * (len(STRATEGIES) - ran), states


@pytest.mark.integration
def test_dataset_page_downloads_ham10000_and_uses_it(tmp_path, monkeypatch, server):  # noqa: F811
    """'Get HAM10000' against test_download's fake Dataverse on loopback, then 'Use this folder'."""
    env = AppEnv(data=None, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints")
    env.apply(monkeypatch)
    monkeypatch.setenv("LESIONLAB_DATAVERSE", server.url)
    at = app_test("dataset")
    no_exceptions(at)
    assert "No dataset is configured" in texts(at)
    at.text_input(key="download_dest").set_value(str(tmp_path / "ham"))
    next(b for b in at.button if b.label == "Download HAM10000").click().run()
    no_exceptions(at)
    deadline = time.monotonic() + 60
    while app_jobs.active_download(env.runs) is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    at.run()
    no_exceptions(at)
    assert any("HAM10000 is ready" in s.value for s in at.success), texts(at)
    next(b for b in at.button if b.label == "Use this folder").click().run()
    no_exceptions(at)
    assert {m.label: m.value for m in at.metric}["Images"] == "14"


@pytest.mark.integration
def test_a_failed_download_is_explained(tmp_path, monkeypatch):
    env = AppEnv(data=None, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints")
    env.apply(monkeypatch)
    monkeypatch.setenv("LESIONLAB_DATAVERSE", "http://127.0.0.1:9")
    at = app_test("dataset")
    at.text_input(key="download_dest").set_value(str(tmp_path / "ham"))
    next(b for b in at.button if b.label == "Download HAM10000").click().run()
    deadline = time.monotonic() + 90
    while app_jobs.active_download(env.runs) is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    at.run()
    no_exceptions(at)
    assert any("The download did not finish" in e.value for e in at.error)


@pytest.mark.integration
def test_a_run_that_learns_from_metadata_starts_from_the_form_under_a_name_of_its_architecture(train_env):
    at = app_test("train")
    fill_tiny(at, "", epochs=1)
    at.selectbox(key="arch_seed").set_value("mobilenet_v2")
    at.selectbox(key="finetune_seed").set_value("full")
    assert at.checkbox(key="metadata_seed").value is False
    at.checkbox(key="metadata_seed").check()
    start_button(at).click().run()
    no_exceptions(at)
    assert not at.error
    job = app_jobs.active_job(train_env.runs)
    # The preset is ResNet-18; the automatic name used to come from it before the architecture was chosen.
    assert job is not None and "mobilenet_v2" in job.runs[0] and "resnet18" not in job.runs[0]
    assert app_jobs.wait_idle(train_env.runs, timeout=120)
    run = read_run(train_env.runs / job.runs[0])
    assert run.state == "finished" and run.config["metadata"] is True and run.config["finetune"] == "full"
    predictor = open_predictor(train_env.runs / job.runs[0] / "best.pt")
    assert predictor.uses_metadata


@pytest.mark.integration
def test_a_run_for_other_clinics_starts_from_the_form(tmp_path, sourced_root, monkeypatch):
    """Colour constancy, the JPEG re-save and a held-out image source reach the trainer from the form, and the held-out
    source's images are the run's test split."""
    env = AppEnv(data=sourced_root, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints")
    env.apply(monkeypatch)
    at = app_test("train")
    no_exceptions(at)
    holdout = at.selectbox(key="holdout_seed")
    assert not holdout.disabled and holdout.options[0] == "none (the usual split)"
    assert sorted(label.split(" (")[0] for label in holdout.options[1:]) == ["far", "home"]
    fill_tiny(at, "away", epochs=1)
    at.selectbox(key="finetune_seed").set_value("full")  # the re-save applies to images, not to cached features
    at.selectbox(key="colour_seed").set_value("shades_of_gray")
    at.number_input(key="jpeg_seed").set_value(40)
    holdout.set_value("far")
    start_button(at).click().run()
    no_exceptions(at)
    assert not at.error
    assert app_jobs.wait_idle(env.runs, timeout=120)
    run = read_run(env.runs / "away")
    assert run.state == "finished", run.error
    assert (run.config["colour_constancy"], run.config["jpeg_quality"], run.config["holdout_source"]) == (
        "shades_of_gray",
        40,
        "far",
    )
    sources = pd.read_csv(sourced_root / "HAM10000_sources.csv")["dataset"]
    assert read_evaluation(env.runs / "away")["test"]["n"] == (sources == "far").sum()
    assert open_predictor(env.runs / "away" / "best.pt").prep.colour_constancy == "shades_of_gray"
    at.run()
    no_exceptions(at)
    assert "colour constancy shades_of_gray · JPEG re-save from 40 · held out far" in texts(at)


def test_a_dataset_without_image_sources_offers_no_source_to_hold_out(train_env):
    at = app_test("train")
    no_exceptions(at)
    holdout = at.selectbox(key="holdout_seed")
    assert holdout.disabled and holdout.value == ""
    assert "image sources are not known" in holdout.help


def test_the_form_starts_with_an_architecture_whose_imagenet_file_is_here(train_env, imagenet_weights):
    # imagenet_weights: a TORCH_HOME holding only MobileNetV2's file; the seed preset is ResNet-18 on ImageNet.
    at = app_test("train")
    no_exceptions(at)
    assert at.selectbox(key="arch_seed").value == "mobilenet_v2"
    assert "instead of the preset's resnet18" in texts(at)


@pytest.mark.parametrize("weights", ["/nowhere/resnet18.pth", "imagenet"])
def test_weights_that_are_not_on_this_computer_are_refused(train_env, tmp_path, monkeypatch, weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # a closed network: nothing cached
    at = app_test("train")
    fill_tiny(at, "no-weights", epochs=1)
    if weights == "imagenet":
        # The form starts with a backbone whose weights ship with the app; the preset's ResNet-18 has no file here.
        at.selectbox(key="arch_seed").set_value("resnet18")
        at.selectbox(key="weights_seed").set_value("imagenet")
        why = ["ImageNet weights for resnet18 are not on this computer", str(weights_file("resnet18"))]
    else:
        at.text_input(key="weights_path_seed").set_value(weights)
        why = [f"{weights} does not exist"]
    start_button(at).click().run()
    no_exceptions(at)
    errors = " ".join(e.value for e in at.error)
    assert all(w in errors for w in why), errors
    assert app_jobs.active_job(train_env.runs) is None and not (train_env.runs / "no-weights").exists()


@pytest.mark.integration
def test_the_default_settings_train_from_imagenet_with_nothing_in_torchvisions_cache(train_env, tmp_path, monkeypatch):
    # A fresh clone with no internet access: torchvision's cache is empty (the job the page starts inherits it).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    at = app_test("train")
    no_exceptions(at)
    arch = at.selectbox(key="arch_seed").value
    assert arch != "resnet18" and at.selectbox(key="weights_seed").value == "imagenet"
    assert f"starts with **{arch}** instead of the preset's resnet18" in texts(at)
    assert "shipped in the package" in texts(at)  # which backbone, and why: its weights come with the app
    fill_tiny(at, "offline", epochs=1)
    at.selectbox(key="weights_seed").set_value("imagenet")
    start_button(at).click().run()
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    assert app_jobs.wait_idle(train_env.runs, timeout=180)
    run = read_run(train_env.runs / "offline")
    assert run.state == "finished", run.error
    assert (run.config["arch"], run.config["weights"]) == (arch, "imagenet")


@pytest.mark.integration
def test_the_imbalance_experiment_starts_from_imagenet_with_nothing_in_torchvisions_cache(
    train_env, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    at = app_test("compare")
    no_exceptions(at)
    arch = at.selectbox(key="exp_arch").value
    assert arch != "resnet18" and at.selectbox(key="exp_weights").value == "imagenet"
    assert f"starts with **{arch}** instead of the seed pipeline's resnet18" in texts(at)
    at.number_input(key="exp_epochs").set_value(1)
    at.number_input(key="exp_size").set_value(32)
    next(b for b in at.button if b.label == "Run the imbalance experiment").click().run()
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    job = app_jobs.active_job(train_env.runs)
    assert job is not None and job.kind == "experiment"
    # The first strategy's run is enough to show the weights were found; the others would only repeat it.
    first = train_env.runs / job.runs[0]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and read_run(first).state not in ("finished", "failed", "stopped"):
        time.sleep(1)
    app_jobs.stop_job(train_env.runs)
    assert app_jobs.wait_idle(train_env.runs, timeout=60)
    run = read_run(first)
    assert run.state == "finished", run.error
    assert (run.config["arch"], run.config["weights"]) == (arch, "imagenet")
