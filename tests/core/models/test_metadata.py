"""Metadata fusion: the encoding of age, sex and body site, withholding in training, a real run on the bundled
sample through the CLI, the predictor and evaluation with and without metadata, old checkpoints, and Diagnose's
inputs."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from core.cli import predict as predict_cli
from core.cli import train as train_cli
from core.cli.evaluate import main as evaluate_main
from core.common.labels import CLASSES
from core.common.runs import read_evaluation, read_split
from core.data import decoded
from core.data.augment import DeviceBatches, batch_transform
from core.data.dataset import index_dataset, read_metadata
from core.data.decoded import open_decoded
from core.data.preprocessing import Preprocessing
from core.evaluation.evaluate import evaluate_checkpoint
from core.inference.features import FeatureBatches
from core.inference.opening import open_predictor
from core.metrics.classification import compute_metrics
from core.models.architectures import LesionNet
from core.models.checkpoints import CheckpointError, atomic_save, read_checkpoint
from core.models.metadata import SITES, MetadataEncoding, MetadataError
from core.training.config import TrainConfig, config_with
from core.training.loop import train
from tests.app_support import AppEnv, app_test, jpeg_bytes, lesion_image, no_exceptions, texts
from tests.conftest import ROOT

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"
ENC = MetadataEncoding()


def sample_config(tmp_path: Path, preset: str, **overrides) -> TrainConfig:
    """A run on the bundled sample from ``preset``, with random weights on the CPU, writing below ``tmp_path``."""
    return config_with(preset, data=str(SAMPLE), out=str(tmp_path / "runs"), weights="none", device="cpu", **overrides)


def sample_image() -> str:
    return index_dataset(SAMPLE).frame["path"].iloc[0]


# ---------------------------------------------------------------------------
# The encoding


def test_each_field_encodes_with_its_own_unknown():
    assert ENC.width == 2 + 3 + len(SITES) + 1
    unknown = ENC.encode()
    for blank in (None, "", "unknown", " Unknown ", float("nan")):
        assert np.array_equal(ENC.encode(age=blank, sex=blank, site=blank), unknown), blank
    parts = ENC.slices()
    row = ENC.encode(45, "male", "back")
    assert row[parts["age"]].tolist() == pytest.approx([0.45, 0.0])
    assert row[parts["sex"]].tolist() == [0.0, 1.0, 0.0]
    assert row[parts["site"]].tolist() == [float(s == "back") for s in SITES] + [0.0]
    assert unknown[parts["age"]].tolist() == [0.0, 1.0]
    assert unknown[parts["sex"]].tolist() == [0.0, 0.0, 1.0]
    assert unknown[parts["site"]].sum() == 1.0 and unknown[parts["site"].stop - 1] == 1.0
    # Spellings a form or another table may use.
    assert np.array_equal(ENC.encode("80.0", "FEMALE", "Lower_Extremity"), ENC.encode(80, "female", "lower extremity"))
    assert np.array_equal(ENC.encode_mapping({"age": 30}), ENC.encode(30, None, None))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"age": 150}, "age must be from 0 to 120 years; got 150"),
        ({"age": -1}, "age must be from 0 to 120 years; got -1"),
        ({"age": "old"}, "age must be a number of years; got 'old'"),
        ({"sex": "m"}, "sex must be one of female, male or unknown; got 'm'"),
        ({"site": "elbow"}, "site must be one of abdomen, acral, back, .* or unknown; got 'elbow'"),
        ({"weight": 80}, "unknown metadata field weight; the fields are age, sex, site"),
    ],
)
def test_values_outside_the_encoding_are_clear_errors(fields, message):
    with pytest.raises(MetadataError, match=message):
        ENC.encode_mapping(fields)


def test_dataset_rows_outside_the_encoding_become_unknown():
    frame = pd.DataFrame(
        {
            "age": [45, np.nan, 150, -5],
            "sex": ["male", "unknown", "", "female"],
            "localization": ["back", "anterior torso", "unknown", "FACE"],
        }
    )
    rows = ENC.encode_frame(frame)
    assert np.array_equal(rows[0], ENC.encode(45, "male", "back"))
    assert np.array_equal(rows[1], ENC.encode())
    assert np.array_equal(rows[2], ENC.encode())
    assert np.array_equal(rows[3], ENC.encode(None, "female", "face"))
    assert ENC.known(rows) == {"age": 1, "sex": 2, "site": 2}
    # A table without the columns (an external test set) is all unknown.
    assert np.array_equal(ENC.encode_frame(pd.DataFrame({"image_id": ["a", "b"]})), ENC.unknown(2))


def test_the_site_list_covers_the_bundled_sample():
    sites = set(read_metadata(SAMPLE / "HAM10000_metadata.csv")["localization"]) - {"unknown"}
    assert sites and sites <= set(SITES)


def test_the_site_list_is_ham10000s(ham_root):
    assert set(read_metadata(ham_root / "HAM10000_metadata.csv")["localization"]) - {"unknown"} == set(SITES)


def test_withholding_sets_each_field_unknown_independently():
    rows = torch.from_numpy(np.tile(ENC.encode(50, "male", "back"), (20000, 1)))
    out = ENC.withhold(rows, 0.3, torch.Generator().manual_seed(0))
    unknown_row = torch.from_numpy(ENC.unknown_row())
    withheld = {}
    for field, part in ENC.slices().items():
        gone = out[:, part.stop - 1] == 1
        withheld[field] = gone
        assert abs(gone.float().mean().item() - 0.3) < 0.02, field
        assert torch.equal(out[gone][:, part], unknown_row[part].expand(int(gone.sum()), -1))
        assert torch.equal(out[~gone][:, part], rows[~gone][:, part])
    both = (withheld["age"] & withheld["site"]).float().mean().item()
    assert abs(both - 0.09) < 0.015  # independent: 0.3 × 0.3
    assert ENC.withhold(rows, 0.0) is rows


# ---------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def metadata_run(tmp_path_factory, torch_home) -> Path:
    """A real run with metadata through the train command's own ``main`` on the bundled sample (ImageNet
    MobileNetV2, head-only on cached features), in this process: the command as a real process is
    tests/core/training/test_training.py's."""
    out = tmp_path_factory.mktemp("metadata_runs")
    args = ["--data", str(SAMPLE), "--arch", "mobilenet_v2", "--input-size", "64", "64", "--epochs", "3"]
    args += ["--metadata", "--metadata-dropout", "0.3", "--split-fractions", "0.6", "0.2", "0.2", "--device", "cpu"]
    args += ["--out", str(out), "--name", "meta", "--cache-dir", str(out / "cache")]
    sigterm = signal.getsignal(signal.SIGTERM)  # the command sets its own, for a killed job
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(torch_home))
        try:
            assert train_cli.main(args) == 0
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return out / "meta"


@pytest.mark.integration
def test_the_checkpoint_records_the_metadata_and_its_predictions_follow_it(metadata_run):
    best = read_checkpoint(metadata_run / "best.pt")
    assert best["config"]["metadata"] is True
    assert best["metadata"]["encoding"]["sites"] == list(SITES) and best["metadata"]["withhold"] == 0.3
    predictor = open_predictor(metadata_run / "best.pt")
    assert predictor.uses_metadata
    image = sample_image()
    none = predictor.predict(image, upload=False)
    young = predictor.predict(image, upload=False, metadata={"age": 30, "sex": "female", "site": "face"})
    old = predictor.predict(image, upload=False, metadata={"age": 80, "sex": "male", "site": "back"})
    assert not none.metadata_used and "all unknown" in none.metadata_note
    assert young.metadata_used and "age 30, female, face" in young.metadata_note
    assert np.abs(young.probs - old.probs).max() > 1e-4 and np.abs(young.probs - none.probs).max() > 1e-4
    # A field left out is unknown, as None is.
    partial = predictor.predict(image, upload=False, metadata={"age": 30})
    spelled = predictor.predict(image, upload=False, metadata={"age": 30, "sex": None, "site": "unknown"})
    assert np.array_equal(partial.probs, spelled.probs)
    # One pass for a batch gives each image its own metadata; with flips each view gets its image's.
    inputs = [predictor.preprocess(image, upload=False)] * 2
    both = predictor.predict_batch(inputs, metadata=[{"age": 30, "sex": "female", "site": "face"}, None])
    assert np.allclose(both[0].probs, young.probs, atol=1e-6) and np.allclose(both[1].probs, none.probs, atol=1e-6)
    flipped = predictor.predict_batch(inputs, tta=True, metadata=[{"age": 30, "sex": "female", "site": "face"}, None])
    alone = predictor.predict(image, tta=True, upload=False, metadata={"age": 30, "sex": "female", "site": "face"})
    assert np.allclose(flipped[0].probs, alone.probs, atol=1e-6)
    assert not np.allclose(flipped[0].probs, flipped[1].probs, atol=1e-4)
    with pytest.raises(MetadataError, match="site must be one of"):
        predictor.predict(image, upload=False, metadata={"site": "elbow"})


def test_predict_cli_takes_age_sex_and_site(metadata_run, capsys):
    image = sample_image()
    assert (
        predict_cli.main([str(metadata_run / "best.pt"), image, "--age", "45", "--sex", "male", "--site", "back"]) == 0
    )
    assert "Metadata used: age 45, male, back" in capsys.readouterr().out
    assert predict_cli.main([str(metadata_run / "best.pt"), image, "--site", "elbow"]) == 2
    assert "error: site must be one of" in capsys.readouterr().err


def test_evaluate_reports_with_and_without_metadata(metadata_run, capsys):
    result = evaluate_checkpoint(metadata_run / "best.pt", SAMPLE, bootstrap=0)
    split = read_split(metadata_run)
    test = index_dataset(SAMPLE).frame
    test = test[test["image_id"].isin(split.loc[split["split"] == "test", "image_id"])]
    assert result["n_images"] == len(test) and result["split_warning"] is None
    assert result["metadata"]["known"] == ENC.known(ENC.encode_frame(test))
    assert result["metadata"]["known"]["site"] == int((test["localization"] != "unknown").sum())
    # With metadata it is the model the trainer evaluated: the same test accuracy (to one image's worth).
    trained = read_evaluation(metadata_run)["test"]
    assert abs(result["metrics"]["accuracy"] - trained["accuracy"]) <= 1 / len(test) + 1e-9
    withheld = result["metadata"]["withheld"]["metrics"]
    assert withheld["n"] == len(test) and withheld["ece"] != result["metrics"]["ece"]
    # Each image's probabilities without its metadata, beside those with it: what a paired comparison needs.
    without = np.array([[row["probabilities_withheld"][c] for c in CLASSES] for row in result["predictions"]])
    with_them = np.array([[row["probabilities"][c] for c in CLASSES] for row in result["predictions"]])
    labels = np.array([CLASSES.index(row["true"]) for row in result["predictions"]])
    assert np.allclose(without.sum(1), 1, atol=1e-5) and not np.allclose(without, with_them)
    assert compute_metrics(labels, without)["ece"] == pytest.approx(withheld["ece"], abs=1e-4)
    assert (
        evaluate_main(["--checkpoint", str(metadata_run / "best.pt"), "--data", str(SAMPLE), "--bootstrap", "0"]) == 0
    )
    out = capsys.readouterr().out
    assert "Metadata (age, sex, body site) known for age" in out and "withheld" in out


def test_the_robustness_report_gives_a_metadata_model_its_metadata(metadata_run):
    # Shifts change the image, not the patient: every condition is scored with the images' age, sex and site.
    from core.data.images import FIT_RULE
    from core.evaluation.evaluate import split_images
    from core.evaluation.robustness import evaluate_shifts, shifted_batches
    from core.metrics.calibration import expected_calibration_error

    path = metadata_run / "best.pt"
    report = evaluate_shifts(path, SAMPLE, shifts=["rotate_90"], bootstrap=0, tta=False)
    clean = next(c for c in report["conditions"] if c["name"] == "clean")
    predictor = open_predictor(path)
    _, frame, _ = split_images(path, predictor.checkpoint, SAMPLE, "test", None, None)
    batches = shifted_batches(
        frame["path"].tolist(), frame["label"].tolist(), None, FIT_RULE, batch_size=64, num_workers=0, tta=False
    )
    known = torch.from_numpy(predictor.metadata_encoding.encode_frame(frame))
    with_them, labels = predictor.split_probabilities(batches, metadata=known)
    without, _ = predictor.split_probabilities(batches)
    assert clean["ece"] == pytest.approx(expected_calibration_error(labels, with_them), abs=1e-9)
    assert clean["ece"] != pytest.approx(expected_calibration_error(labels, without), abs=1e-6)


def test_training_batches_withhold_metadata_and_evaluation_does_not(tmp_path):
    width = ENC.width
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def record(module: nn.Module, args: tuple) -> None:
        # The metadata embedding's input: the rows after withholding.
        if isinstance(module, nn.Linear) and module.in_features == width:
            seen[module.training].append(args[0].detach().clone())

    cfg = sample_config(
        tmp_path,
        "seed",
        name="withheld",
        input_size=(32, 32),
        epochs=3,
        batch_size=16,
        imbalance="none",
        metadata=True,
        metadata_dropout=0.5,
        split_fractions=(0.6, 0.2, 0.2),
        cache_dir=str(tmp_path / "cache"),
    )
    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg)
    finally:
        handle.remove()
    site_unknown = ENC.slices()["site"].stop - 1
    trained, evaluated = torch.cat(seen[True]), torch.cat(seen[False])
    # The sample knows the site of 138 of its 140 images; training withholds about half of them.
    assert len(trained) >= 150 and abs(trained[:, site_unknown].mean().item() - 0.5) < 0.12
    assert evaluated[:, site_unknown].mean().item() < 0.15  # only the images' own unknowns (2 of 140)
    # Fields are withheld one by one, not whole rows.
    unknown = trained[:, [part.stop - 1 for part in ENC.slices().values()]]
    assert ((unknown.sum(1) > 0) & (unknown.sum(1) < 3)).float().mean().item() > 0.3


def test_fine_tuning_with_metadata_trains_the_network_on_images_and_their_rows(tmp_path):
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        if isinstance(module, LesionNet) and module.training:
            seen.append(args[1].detach().clone())  # the encoded rows beside the batch's images

    cfg = sample_config(
        tmp_path,
        "reference",
        name="fine-tuned",
        input_size=(75, 100),
        epochs=2,
        batch_size=16,
        metadata=True,
        decoded_dir=str(tmp_path / "decoded"),
        split_fractions=(0.5, 0.25, 0.25),
    )
    assert cfg.finetune == "full" and cfg.input_pipeline == "decoded"
    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run_dir = train(cfg)
    finally:
        handle.remove()
    split = read_split(run_dir)
    frame = read_metadata(SAMPLE / "HAM10000_metadata.csv")
    train_rows = ENC.encode_frame(frame[frame["image_id"].isin(split.loc[split["split"] == "train", "image_id"])])
    trained = torch.cat(seen).numpy()
    # Every training step got one encoded row per image, each a training image's (4 steps of 16 an epoch).
    assert trained.shape == (2 * 64, ENC.width)
    known = {tuple(row) for row in train_rows}
    assert all(tuple(row) in known for row in trained)
    assert len({tuple(row) for row in trained}) > 10  # the images' own rows, not one row over and over

    predictor = open_predictor(run_dir / "best.pt")
    assert predictor.uses_metadata and predictor.checkpoint["config"]["finetune"] == "full"
    image = sample_image()
    plain = predictor.predict(image, upload=False)
    given = predictor.predict(image, upload=False, metadata={"age": 80, "sex": "male", "site": "face"})
    assert given.metadata_used and not np.allclose(plain.probs, given.probs)


def test_the_cache_hands_each_image_its_own_metadata_row(tmp_path):
    paths = sorted(str(p) for p in (SAMPLE / "images").glob("*.jpg"))
    prep = Preprocessing(input_size=(150, 200), source_size=(200, 150))
    cache = open_decoded(paths, prep, root=SAMPLE, cache_dir=tmp_path / "decoded")
    rows = torch.from_numpy(cache.rows(paths))
    labels = torch.arange(len(paths)) % 7
    # One column holding each image's position: a row that travels with another image is caught.
    position = torch.arange(len(paths), dtype=torch.float32)[:, None]
    batches = FeatureBatches(
        rows, labels, 32, shuffle=True, generator=torch.Generator().manual_seed(1), metadata=position
    )
    transform = batch_transform(prep, "none", cache.size)
    got = list(DeviceBatches(cache, batches, transform, torch.device("cpu"), channels_last=False))
    assert [len(b) for b in got] == [3] * 5 and sum(len(b[0]) for b in got) == len(paths)
    for images, batch_labels, meta in got:
        index = meta[:, 0].long()
        pixels = torch.from_numpy(cache.images[rows[index].numpy()]).permute(0, 3, 1, 2)
        assert torch.equal(batch_labels, labels[index])
        assert torch.equal(images, transform(pixels))


def test_metadata_with_the_jpeg_pipeline_is_refused_before_a_run_folder(tmp_path):
    with pytest.raises(ValueError, match="only through the decoded-image cache"):
        sample_config(tmp_path, "reference", metadata=True, input_pipeline="jpeg")
    assert not (tmp_path / "runs").exists()


def test_metadata_fine_tuning_without_room_for_the_cache_stops_with_the_reason(tmp_path, monkeypatch):
    # More than the disk holds: no room, whatever other tests free meanwhile.
    monkeypatch.setattr(decoded, "KEEP_FREE_BYTES", shutil.disk_usage(tmp_path).total)
    cfg = sample_config(
        tmp_path,
        "reference",
        input_size=(32, 32),
        epochs=1,
        metadata=True,
        decoded_dir=str(tmp_path / "decoded"),
    )
    with pytest.raises(ValueError, match="needs room on the disk"):
        train(cfg)
    assert not list((tmp_path / "runs").glob("*/best.pt"))


# ---------------------------------------------------------------------------
# Old checkpoints and broken ones


def test_an_old_checkpoint_loads_unchanged_and_ignores_metadata():
    predictor = open_predictor(REFERENCE)
    assert "metadata" not in predictor.checkpoint and not predictor.uses_metadata
    image = sample_image()
    plain = predictor.predict(image, upload=False)
    given = predictor.predict(image, upload=False, metadata={"age": 60, "sex": "male", "site": "back"})
    assert np.array_equal(plain.probs, given.probs)
    assert plain.metadata_note == "" and not given.metadata_used
    assert "takes the image only; the metadata given (age 60, male, back) were ignored" in given.metadata_note
    with pytest.raises(MetadataError, match="sex must be one of"):  # a typo is an error for every model
        predictor.predict(image, upload=False, metadata={"sex": "m"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: "yes", "metadata must be a dict"),
        (lambda m: {**m, "encoding": {**m["encoding"], "sites": []}}, "metadata.encoding.sites must be a list"),
        (lambda m: {**m, "embed_dim": 0}, "metadata.embed_dim must be a whole number from 1"),
        (lambda m: {**m, "withhold": 2.0}, "metadata.withhold must be a probability"),
    ],
)
def test_a_broken_metadata_entry_is_refused(metadata_run, tmp_path, edit, message):
    ckpt = torch.load(metadata_run / "best.pt", weights_only=True)
    ckpt["metadata"] = edit(ckpt["metadata"])
    atomic_save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path / "broken.pt")


# ---------------------------------------------------------------------------
# Diagnose


@pytest.fixture
def two_models(metadata_run, tmp_path, monkeypatch) -> Path:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(REFERENCE, checkpoints / "reference.pt")
    shutil.copy(metadata_run / "best.pt", checkpoints / "with-metadata.pt")
    AppEnv(data=None, runs=tmp_path / "runs", checkpoints=checkpoints).apply(monkeypatch)
    return checkpoints


def widget_keys(at) -> set[str]:
    return {w.key for kind in ("number_input", "selectbox") for w in getattr(at, kind)}


def test_diagnose_asks_for_metadata_only_for_a_model_that_takes_it(two_models):
    at = app_test("diagnose")
    no_exceptions(at)
    assert at.selectbox(key="diag_model").value.name == "reference.pt"
    assert not {"diag_age", "diag_sex", "diag_site"} & widget_keys(at)
    assert "This model reads the image alone" in texts(at)  # it says why nothing is asked
    at.file_uploader(key="diag_upload").set_value(("lesion.jpg", jpeg_bytes(lesion_image()), "image/jpeg")).run()
    no_exceptions(at)
    assert "Metadata used" not in texts(at) and "No age, sex or body site" not in texts(at)

    at.selectbox(key="diag_model").set_value(two_models / "with-metadata.pt").run()
    no_exceptions(at)
    assert {"diag_age", "diag_sex", "diag_site"} <= widget_keys(at)
    assert "This model reads the image alone" not in texts(at)
    assert at.number_input(key="diag_age").value is None and at.selectbox(key="diag_sex").value is None
    assert "No age, sex or body site given" in texts(at)
    assert not at.session_state["diag_result"][1].metadata_used
    at.number_input(key="diag_age").set_value(45)
    at.selectbox(key="diag_sex").set_value("male")
    at.selectbox(key="diag_site").set_value("back").run()
    no_exceptions(at)
    assert "Metadata used: age 45, male, back" in texts(at)
    assert at.session_state["diag_result"][1].metadata_used
