"""Ensembles: a real 2-member ensemble built through ``lesionlab train --ensemble`` on the bundled sample,
combined exactly as documented, refused clearly when its file is wrong, and used by every door a single
checkpoint goes through (Predictor, core.evaluation.evaluate, the batch CLI, similar cases, Diagnose)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cli import ensemble as ensemble_cli
from core.cli import operating_point as operating_point_cli
from core.cli import predict as predict_cli
from core.common import runs
from core.common.labels import CLASSES
from core.common.settings import RUNS_ENV, model_files
from core.evaluation.evaluate import evaluate_checkpoint
from core.inference.batch import BATCH_SIZE, image_bytes, predict_files
from core.inference.ensemble import EnsemblePredictor
from core.inference.forward import bounded_batch_size
from core.inference.opening import open_predictor
from core.inference.unfamiliar import dermoscopy_check, detector_path, file_digest, fit_detector, load_detector
from core.metrics.calibration import fit_temperature, softmax
from core.metrics.classification import MALIGNANT_RULE, MEL_SENSITIVITY
from core.models.checkpoints import ENSEMBLE_FORMAT, CheckpointError, atomic_save, file_format, read_checkpoint
from core.models.ensemble_file import ensemble_dict, lead_model, read_ensemble
from tests.app_support import *  # noqa: F403
from tests.app_support import AppEnv, app_test, jpeg_bytes, lesion_image, no_exceptions, pick_model, texts
from tests.conftest import ROOT, run_cli

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
MEMBER_FLAGS = [
    "--data", str(SAMPLE), "--arch", "mobilenet_v2", "--weights", "imagenet", "--finetune", "head",
    "--head", "linear", "--imbalance", "none", "--epochs", "2", "--batch-size", "16", "--input-size", "64", "64",
    "--source-size", "200", "150", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory, torch_home, one_thread):
    """Runs folder with the ensemble ``ens`` (members ens-seed3, ens-seed4) trained through the CLI, and the
    mixed ensemble ``mixed`` combined with ``lesionlab ensemble`` from ens-seed3 and a run at another
    input size."""
    from core.cli import train

    base = tmp_path_factory.mktemp("ensemble")
    out, cache = base / "runs", base / "features"
    common = [*MEMBER_FLAGS, "--out", str(out), "--cache-dir", str(cache)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        assert train.main([*common, "--name", "ens", "--seed", "3", "--ensemble", "2"]) == 0
        assert train.main([*common, "--name", "narrow", "--input-size", "48", "80"]) == 0
    assert ensemble_cli.main([str(out / "ens-seed3"), str(out / "narrow"), "--name", "mixed"]) == 0
    return out


def sample_images(n: int = 6) -> list[Path]:
    return sorted((SAMPLE / "images").glob("*.jpg"))[:n]


def test_the_cli_trains_the_members_and_writes_an_ensemble_run(built):
    ens = built / "ens"
    assert [m["run"] for m in runs.read_config(ens)["members"]] == ["ens-seed3", "ens-seed4"]
    assert [runs.read_config(built / f"ens-seed{s}")["seed"] for s in (3, 4)] == [3, 4]
    assert file_format(ens / "best.pt") == ENSEMBLE_FORMAT
    # A plain weights_only load: nothing in the file needs code to be run.
    payload = torch.load(ens / "best.pt", weights_only=True)
    assert payload["member_names"] == ["ens-seed3", "ens-seed4"] and len(payload["members"]) == 2
    listed = {r.name: r for r in runs.list_runs(built)}
    assert listed["ens"].state == "finished" and listed["ens"].has_evaluation
    assert listed["ens"].dataset.startswith("ham10000-sample, 140 images")
    evaluation = runs.read_evaluation(ens)
    assert evaluation["temperature"] == pytest.approx(payload["temperature"])
    assert [m["run"] for m in evaluation["members"]] == ["ens-seed3", "ens-seed4"]
    _, labels, probs, logits, _ = runs.read_predictions(ens)
    assert len(labels) == evaluation["test"]["n"] and np.allclose(probs, softmax(logits, payload["temperature"]))
    assert (runs.read_split(ens)["split"] == runs.read_split(built / "ens-seed3")["split"]).all()


def test_the_app_lists_the_ensemble_with_the_models(built, monkeypatch):
    monkeypatch.setenv(RUNS_ENV, str(built))
    assert built / "ens" / "best.pt" in model_files()


def test_the_temperature_is_fitted_on_the_validation_split(built):
    predictor = open_predictor(built / "ens" / "best.pt")
    split = runs.read_split(built / "ens")
    from core.data.dataset import index_dataset

    frame = index_dataset(SAMPLE).frame
    val = frame[frame["image_id"].isin(split.loc[split["split"] == "val", "image_id"])].reset_index(drop=True)
    member_probs, labels = predictor.frame_probabilities(val)
    assert member_probs.shape == (2, len(val), len(CLASSES))
    mean = member_probs.mean(axis=0)
    assert predictor.temperature == pytest.approx(fit_temperature(labels, np.log(mean)), rel=1e-6)


@pytest.mark.parametrize("tta", [False, True])
def test_probabilities_are_the_members_mean_with_the_ensemble_temperature(built, tta):
    predictor = open_predictor(built / "ens" / "best.pt")
    assert isinstance(predictor, EnsemblePredictor) and predictor.arch == "ensemble of 2 (2 × mobilenet_v2)"
    members = [open_predictor(built / f"ens-seed{s}" / "best.pt") for s in (3, 4)]
    for image in sample_images():
        got = predictor.predict(image, tta=tta)
        own = np.stack([m.predict(image, tta=tta).probs for m in members])  # each with its own temperature
        expected = softmax(np.log(own.mean(axis=0)), predictor.temperature)
        assert np.abs(got.probs - expected).max() < 1e-5
        assert np.abs(got.members.probs - own).max() < 1e-6
        assert got.top_class == CLASSES[int(own.mean(axis=0).argmax())]


def test_agreement_and_melanoma_spread_follow_the_members_own_predictions(built):
    predictor = open_predictor(built / "ens" / "best.pt")
    members = [open_predictor(built / f"ens-seed{s}" / "best.pt") for s in (3, 4)]
    seen = set()
    for image in sample_images(20):
        got = predictor.predict(image)
        own = [m.predict(image) for m in members]
        agreeing = sum(p.top_class == got.top_class for p in own)
        mel = np.array([p.probabilities["mel"] for p in own])
        votes = got.members
        assert votes.agreeing == agreeing and votes.count == 2
        assert got.to_dict()["members"]["p_melanoma_min"] == pytest.approx(mel.min(), abs=1e-6)
        assert got.to_dict()["members"]["p_melanoma_max"] == pytest.approx(mel.max(), abs=1e-6)
        assert got.to_dict()["members"]["p_melanoma_std"] == pytest.approx(mel.std(), abs=1e-6)
        assert votes.agreement_text().startswith(f"{agreeing} of 2 models agree on ")
        assert f"{mel.min():.1%} to {mel.max():.1%}" in votes.spread_text()
        seen.add(agreeing)
    assert seen  # at least one image; the two members are different models
    assert not np.allclose(members[0].predict(sample_images(1)[0]).probs, members[1].predict(sample_images(1)[0]).probs)


def test_members_with_other_input_sizes_keep_their_own_preprocessing(built):
    predictor = open_predictor(built / "mixed" / "best.pt")
    assert [tuple(m.prep.input_size) for m in predictor.members] == [(64, 64), (48, 80)]
    members = [open_predictor(built / run / "best.pt") for run in ("ens-seed3", "narrow")]
    for image in sample_images(4):
        got = predictor.predict(image)
        own = np.stack([m.predict(image).probs for m in members])
        assert np.abs(got.probs - softmax(np.log(own.mean(axis=0)), predictor.temperature)).max() < 1e-5


@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_gradcam_per_member_and_averaged_at_the_image_size(built, method):
    predictor = open_predictor(built / "mixed" / "best.pt")
    prediction = predictor.predict(sample_images(1)[0])
    width, height = prediction.image.size
    maps = predictor.explain_members(prediction, method)
    assert [m.shape for m in maps] == [(height, width)] * 2
    averaged = predictor.explain(prediction, method)
    assert averaged.shape == (height, width) and averaged.min() >= 0 and averaged.max() <= 1
    assert np.allclose(averaged, np.mean(maps, axis=0), atol=1e-6)
    if method == "eigencam":  # activations only: the members' different input sizes give different maps
        assert maps[0].max() > 0 and maps[1].max() > 0 and not np.allclose(maps[0], maps[1])


def test_core_evaluate_treats_an_ensemble_like_a_checkpoint(built, tmp_path, capsys):
    from core.cli import evaluate as evaluate_cli

    out = tmp_path / "report.json"
    args = ["--checkpoint", str(built / "ens" / "best.pt"), "--data", str(SAMPLE), "--out", str(out)]
    # As the run evaluated: one view, from the image files (an ensemble's members read the decoded-image cache
    # when there is one, as a single model does; its resampling moves the probabilities within 1e-3).
    assert evaluate_cli.main([*args, "--bootstrap", "0", "--device", "cpu", "--no-tta", "--decoded-dir", ""]) == 0
    assert "ensemble of 2 (2 × mobilenet_v2)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    recorded = runs.read_evaluation(built / "ens")["test"]
    assert result["split_warning"] is None and result["n_images"] == recorded["n"]
    assert result["metrics"]["accuracy"] == pytest.approx(recorded["accuracy"])
    assert result["metrics"]["ece"] == pytest.approx(recorded["ece"], abs=1e-6)


@pytest.mark.integration
def test_the_predict_command_takes_an_ensemble_in_a_real_process(built, tmp_path):
    """``python -m core.cli.predict`` on an ensemble file, as a real process: one image (``--json``) answered as
    the ensemble answers it, and a folder (``--csv``), with no traceback (it once crashed choosing the class)."""
    ensemble, image = built / "ens" / "best.pt", sample_images(1)[0]
    one = run_cli("core.cli.predict", ensemble, image, "--json", "--no-tta")
    assert one.returncode == 0 and "Traceback" not in one.stderr, one.stderr
    [answer] = json.loads(one.stdout)
    expected = open_predictor(ensemble).predict(image, tta=False)
    assert answer["top_class"] == expected.top_class
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    table = tmp_path / "ensemble.csv"
    many = run_cli("core.cli.predict", ensemble, SAMPLE / "images", "--csv", table)
    assert many.returncode == 0 and "Traceback" not in many.stderr, many.stderr
    assert len(table.read_text().splitlines()) == 1 + 140


def test_the_batch_cli_and_similar_cases_take_an_ensemble(built, tmp_path):
    table = tmp_path / "batch.csv"
    assert predict_cli.main([str(built / "ens" / "best.pt"), str(SAMPLE / "images"), "--csv", str(table)]) == 0
    assert len(table.read_text().splitlines()) == 1 + 140
    model, ckpt = lead_model(built / "ens" / "best.pt")
    member = read_checkpoint(built / "ens-seed3" / "best.pt")
    assert ckpt["config"]["name"] == "ens-seed3"
    assert all(torch.equal(v, member["model_state"][k]) for k, v in model.state_dict().items())


def tampered(built: Path, tmp_path: Path, change) -> Path:
    payload = read_ensemble(built / "ens" / "best.pt")
    change(payload)
    path = tmp_path / "tampered.pt"
    atomic_save(payload, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda p: p["members"][1].update(classes=list(reversed(CLASSES))),
            "(ens-seed4): classes are in the order",
        ),
        (lambda p: p.update(classes=CLASSES[:6]), "not the project's"),
        (lambda p: p.update(temperature=0.0), "temperature must be a finite number from 0.05 to 20"),
        (lambda p: p.update(notes="hi"), "'notes' is not a field of a Lesion Lab ensemble"),
        (lambda p: p.update(mel_threshold=math.nan), "mel_threshold must be a probability from 0 to 1; got nan"),
        (lambda p: p["config"].update(name=5), "config.name must be a run folder's name; got 5"),
        (lambda p: p["config"].update(split_fractions=[1, 1, 0]), "config.split_fractions must be three numbers"),
        (lambda p: p["members"][1].update(mel_threshold=-1.0), "member 2 of 2 (ens-seed4): mel_threshold must be"),
        (lambda p: p["members"][0]["config"].update(deep=[[[1]]]), "member 1 of 2 (ens-seed3): config nests deeper"),
        (lambda p: p.pop("members"), "members is missing"),
        (lambda p: p.update(members=[]), "members must be a list of 1 to 16 checkpoints"),
        (lambda p: p["member_names"].pop(), "member_names must name each of the 2 members"),
        (lambda p: p["members"][0].pop("model_state"), "member 1 of 2 (ens-seed3): model_state is missing"),
        (lambda p: p["members"][1]["preprocessing"].update(source_size=[600, 450]), "images of different sizes"),
        (lambda p: p["members"][1].update(arch="resnet18"), "does not rebuild into a resnet18 model"),
    ],
)
def test_a_broken_ensemble_file_is_refused_with_a_clear_message(built, tmp_path, capsys, change, message):
    path = tampered(built, tmp_path, change)
    with pytest.raises(CheckpointError, match="tampered.pt") as error:
        open_predictor(path)
    assert message in str(error.value)
    assert predict_cli.main([str(path), str(sample_images(1)[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_batch_is_sized_by_the_largest_member(built, tmp_path):
    # The first member takes 64×64 images; the second asks for 1024×1024, so at most 3 images go through at a
    # time (core.inference.forward.MAX_BATCH_PIXELS), not the 32 the first member's size would allow.
    path = tampered(built, tmp_path, lambda p: p["members"][1]["preprocessing"].update(input_size=[1024, 1024]))
    predictor = open_predictor(path)
    assert predictor.largest_input_size == (1024, 1024) and predictor.prep.input_size == (64, 64)
    files = [image_bytes(p.name, p.read_bytes()) for p in sample_images(4)]
    batches: list[int] = []
    rows = list(predict_files(predictor, files, thumbnails=False, progress=lambda done, total: batches.append(done)))
    assert [row.error for row in rows] == [None] * 4
    assert batches == [bounded_batch_size(BATCH_SIZE, (1024, 1024)), 4] == [3, 4]


def test_the_ensemble_cli_refuses_a_name_outside_the_runs_folder(built, tmp_path, capsys):
    members = [str(built / "ens-seed3"), str(built / "ens-seed4")]
    assert ensemble_cli.main([*members, "--name", "../escape", "--out", str(tmp_path / "runs")]) == 2
    assert "'../escape' is not a usable run name" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists()


@pytest.mark.integration
def test_the_ensemble_cli_refuses_a_name_outside_the_runs_folder_in_a_real_process(built, tmp_path):
    done = run_cli("core.cli.ensemble", built / "ens-seed3", built / "ens-seed4", "--name", "../escape", "--out",
                   tmp_path / "runs")  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "'../escape' is not a usable run name" in done.stderr and not (tmp_path / "escape").exists()


def test_an_ensemble_file_that_would_run_code_is_refused(built, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ENSEMBLE_FORMAT, "members": [os.system]}, path)
    with pytest.raises(CheckpointError, match="may be malicious"):
        open_predictor(path)


def test_an_ensemble_is_not_read_as_one_checkpoint(built):
    with pytest.raises(CheckpointError, match="is an ensemble of models, not one checkpoint"):
        read_checkpoint(built / "ens" / "best.pt")


def test_combining_needs_finished_runs_on_one_split(built, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert ensemble_cli.main([str(built / "ens-seed3"), str(unfinished), "--name", "x", "--out", str(tmp_path)]) == 2
    assert "has no best.pt: only a finished run can be a member" in capsys.readouterr().err
    other = tmp_path / "other-split"
    other.mkdir()
    ckpt = read_checkpoint(built / "ens-seed4" / "best.pt")
    ckpt["config"]["split_seed"] = 1
    atomic_save(ckpt, other / "best.pt")
    assert ensemble_cli.main([str(built / "ens-seed3"), str(other), "--name", "y", "--out", str(tmp_path)]) == 2
    assert "not trained on the same split: their split_seed differ" in capsys.readouterr().err
    assert ensemble_dict([ckpt], ["one"], config={})["format"] == ENSEMBLE_FORMAT


def test_an_image_another_member_trained_on_is_not_held_out(built, tmp_path):
    # Members subsampled with max_images draw their images with their own seed, so their splits may differ.
    other = tmp_path / "other"
    other.mkdir()
    (other / "best.pt").write_bytes((built / "ens-seed4" / "best.pt").read_bytes())
    split = runs.read_split(built / "ens-seed4")
    moved = split.loc[split["split"] == "test", "image_id"].iloc[:3].astype(str).tolist()
    split.loc[split["image_id"].isin(moved), "split"] = "train"
    runs.write_split(other, split)
    assert ensemble_cli.main([str(built / "ens-seed3"), str(other), "--name", "z", "--out", str(tmp_path)]) == 0
    held = runs.read_split(tmp_path / "z")
    assert set(held.loc[held["image_id"].astype(str).isin(moved), "split"]) == {"train"}
    assert runs.read_evaluation(tmp_path / "z")["test"]["n"] == runs.read_evaluation(built / "ens")["test"]["n"] - 3


def test_the_train_cli_refuses_an_ensemble_it_cannot_build(built, capsys):
    from core.cli import train

    assert train.main([*MEMBER_FLAGS, "--out", str(built), "--name", "ens", "--ensemble", "2"]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert train.main([*MEMBER_FLAGS, "--out", str(built), "--name", "solo", "--ensemble", "1"]) == 2
    assert "--ensemble takes 2 to 16 members" in capsys.readouterr().err


def test_diagnose_says_how_many_models_agree_and_the_melanoma_spread(built, tmp_path, monkeypatch):
    AppEnv(data=SAMPLE, runs=built, checkpoints=tmp_path / "none").apply(monkeypatch)
    at = app_test("diagnose")
    no_exceptions(at)
    pick_model(at, "diag", "run: ens")  # trained on the 140-image sample: an experimental model
    at.file_uploader(key="diag_upload").set_value(("lesion.jpg", jpeg_bytes(lesion_image()), "image/jpeg")).run()
    no_exceptions(at)
    text = texts(at)
    votes = at.session_state["diag_result"][1].members
    assert f"{votes.agreeing} of 2 models agree on" in text
    assert "P(melanoma) across the 2 models:" in text
    assert "ensemble of 2 (2 × mobilenet_v2)" in text


def test_members_trained_elsewhere_combine_with_the_data_folder_given(built, tmp_path, capsys):
    # A member trained on another machine (a GPU server, say) recorded that machine's dataset folder.
    moved = tmp_path / "moved"
    moved.mkdir()
    ckpt = read_checkpoint(built / "ens-seed4" / "best.pt")
    ckpt["config"]["data"] = "/elsewhere/ham10000"
    atomic_save(ckpt, moved / "best.pt")
    runs.write_split(moved, runs.read_split(built / "ens-seed4"))
    members = [str(built / "ens-seed3"), str(moved)]
    assert ensemble_cli.main([*members, "--name", "a", "--out", str(tmp_path)]) == 2
    assert "their data differ" in capsys.readouterr().err
    assert ensemble_cli.main([*members, "--name", "b", "--out", str(tmp_path), "--data", str(SAMPLE)]) == 0
    assert runs.read_config(tmp_path / "b")["data"] == str(SAMPLE)
    assert runs.read_evaluation(tmp_path / "b")["test"]["n"] == runs.read_evaluation(built / "ens")["test"]["n"]


def test_an_ensemble_records_its_melanoma_operating_point(built):
    payload = torch.load(built / "ens" / "best.pt", weights_only=True)
    evaluation = runs.read_evaluation(built / "ens")
    assert (
        payload["mel_threshold"]
        == evaluation["mel_threshold"]
        == open_predictor(built / "ens" / "best.pt").mel_threshold
    )
    assert evaluation["val"]["melanoma"]["sensitivity"] >= MEL_SENSITIVITY


@pytest.mark.parametrize("model", ["ens-seed3", "ens"])
def test_the_operating_point_cli_records_a_threshold_chosen_on_validation(built, tmp_path, capsys, model):
    path = tmp_path / "model.pt"
    path.write_bytes((built / model / "best.pt").read_bytes())
    before = file_format(path)
    # An unfamiliar-image detector fitted for this file stays linked to it: the weights do not change.
    features = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    images = [dermoscopy_check(Image.open(p)) for p in sorted(SAMPLE.rglob("*.jpg"))[:20]]
    others = [dermoscopy_check(Image.open(p)) for p in sorted((ROOT / "tests/data/unfamiliar/fit").glob("*.jpg"))[:10]]
    detector = fit_detector(
        features, features, images, features[:10] + 3, others, k=3, checkpoint_sha1=file_digest(path)
    )
    detector.save(detector_path(path))
    assert operating_point_cli.main(["--checkpoint", str(path), "--data", str(SAMPLE), "--sensitivity", "1.0"]) == 0
    out = capsys.readouterr().out
    predictor = open_predictor(path)
    assert file_format(path) == before and f"P(melanoma) >= {predictor.mel_threshold:.4f}, recorded" in out
    assert load_detector(path) is not None
    # Every validation melanoma is at or above it, as core.evaluation.evaluate (which now defaults to it) reports.
    val = evaluate_checkpoint(path, SAMPLE, split="val", bootstrap=0)
    assert val["metrics"]["melanoma"]["threshold"] == predictor.mel_threshold
    assert val["metrics"]["melanoma"]["sensitivity"] == 1.0
    mel = [r["probabilities"]["mel"] for r in val["predictions"] if r["true"] == "mel"]
    assert min(mel) == pytest.approx(predictor.mel_threshold, abs=2e-6)
    # The malignant rule too: every validation akiec, bcc and mel at or above its threshold on P(malignant).
    malignant = predictor.referral(MALIGNANT_RULE)
    assert malignant.recorded and f"P(malignant) >= {malignant.threshold:.4f}, recorded" in out
    assert val["metrics"]["malignant"]["sensitivity"] == 1.0
    scores = [sum(r["probabilities"][c] for c in MALIGNANT_RULE.classes) for r in val["predictions"]]
    positives = [s for s, r in zip(scores, val["predictions"], strict=True) if r["true"] in MALIGNANT_RULE.classes]
    assert min(positives) == pytest.approx(malignant.threshold, abs=5e-6)
    # One rule alone leaves the other's threshold as it was.
    assert operating_point_cli.main(["--checkpoint", str(path), "--data", str(SAMPLE), "--rule", "malignant"]) == 0
    again = open_predictor(path)
    assert again.mel_threshold == predictor.mel_threshold and "P(melanoma)" not in capsys.readouterr().out
    assert again.referral(MALIGNANT_RULE).threshold >= malignant.threshold  # 0.90 of them, not all
    assert operating_point_cli.main(["--checkpoint", str(path), "--data", str(SAMPLE), "--sensitivity", "0"]) == 2
    assert "within (0, 1]" in capsys.readouterr().err
