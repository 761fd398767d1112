"""core.inference.predictor and core.evaluation.evaluate with real checkpoints and real image files: label order end to
end, decoding of awkward uploads, calibration, TTA, and both command lines."""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.cli import evaluate as evaluate_cli
from core.cli.predict import main
from core.common.labels import CLASSES, DISPLAY_NAMES, MALIGNANT
from core.data.dataset import index_dataset
from core.data.images import ImageError
from core.data.preprocessing import Preprocessing, eval_transform, load_for_model
from core.data.splits import SplitError, split_by_lesion
from core.evaluation import evaluate as evaluation_evaluate
from core.inference import forward as inference
from core.inference.opening import open_predictor
from core.inference.predictor import USE_TTA_BY_DEFAULT, Predictor
from core.metrics.calibration import softmax
from core.models.architectures import build_model
from core.models.checkpoints import CheckpointError, atomic_save, checkpoint_dict
from tests.conftest import ROOT, make_image, run_cli, write_png

PREP = Preprocessing(input_size=(48, 48))


pytestmark = pytest.mark.usefixtures("one_thread")


def save_checkpoint(path: Path, model=None, *, prep: Preprocessing = PREP, temperature: float = 1.0, **extra) -> Path:
    if model is None:
        torch.manual_seed(0)
        model = build_model("resnet18", weights="none", finetune="head", head="linear")
    atomic_save(checkpoint_dict(model.eval(), prep, head="linear", temperature=temperature, **extra), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def predictor(ckpt) -> Predictor:
    return open_predictor(ckpt)


def lesion(path: Path, label: int = 4, size=(48, 36), seed: int = 0) -> Path:
    make_image(label, np.random.default_rng(seed), size=size).save(path)
    return path


# ---------------------------------------------------------------------------
# Label order, end to end


HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization"


@pytest.fixture(scope="module")
def known_diagnoses(tmp_path_factory):
    """Two images with known diagnoses and a model built to call the bkl one "mel" and the nv one "nv"."""
    root = tmp_path_factory.mktemp("known")
    cases = {"ISIC_0000001": ("bkl", "mel"), "ISIC_0000002": ("nv", "nv")}
    lines = [HAM_HEADER]
    for i, (image_id, (true, _)) in enumerate(cases.items()):
        lesion(root / f"{image_id}.jpg", label=CLASSES.index(true), seed=i)
        lines.append(f"HAM_{i},{image_id},{true},histo,50,male,back")
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")

    torch.manual_seed(0)
    model = build_model("resnet18", weights="none", finetune="head", head="linear").eval()
    with torch.no_grad():
        x = torch.stack([eval_transform(PREP)(load_for_model(root / f"{i}.jpg", PREP)) for i in cases])
        features = model.backbone(x).double()
    # Solve the head's weights so each image's logits are 10 for the intended class, 0 elsewhere.
    wanted = torch.zeros(len(cases), len(CLASSES), dtype=torch.float64)
    for row, (_, predicted) in enumerate(cases.values()):
        wanted[row, CLASSES.index(predicted)] = 10.0
    linear = model.head[-1]
    with torch.no_grad():
        linear.weight.copy_((torch.linalg.pinv(features) @ wanted).T.float())
        linear.bias.zero_()
    # The trainer's config: every image in the test split.
    path = save_checkpoint(root / "known.pt", model, config={"split_seed": 0, "split_fractions": [0.0, 0.0, 1.0]})
    return root, path, cases


@pytest.mark.integration
def test_a_known_diagnosis_appears_under_its_own_name_everywhere(known_diagnoses, tmp_path):
    root, path, cases = known_diagnoses
    bkl, mel, nv = (CLASSES.index(c) for c in ("bkl", "mel", "nv"))

    predictor = open_predictor(path)
    first = predictor.predict(root / "ISIC_0000001.jpg")
    assert (first.top_class, first.top_name) == ("mel", "Melanoma") and first.probabilities["mel"] > 0.99
    assert first.probs[mel] == first.probabilities["mel"]
    assert predictor.predict(root / "ISIC_0000002.jpg").top_name == "Melanocytic nevus"

    out = tmp_path / "report.json"
    done = run_cli("core.cli.evaluate", "--checkpoint", path, "--data", root, "--out", out, "--bootstrap", "50")
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["metrics"]["per_class"]}
    assert rows["Benign keratosis-like lesion"]["support"] == 1 and rows["Benign keratosis-like lesion"]["recall"] == 0
    assert rows["Melanocytic nevus"]["support"] == 1 and rows["Melanocytic nevus"]["recall"] == 1
    assert rows["Melanoma"]["support"] == 0 and rows["Melanoma"]["precision"] == 0
    assert [row["code"] for row in report["metrics"]["per_class"]] == list(CLASSES)
    cm = np.array(report["metrics"]["confusion_matrix"])
    assert cm[bkl, mel] == 1 and cm[nv, nv] == 1 and cm.sum() == 2
    by_id = {p["image_id"]: p for p in report["predictions"]}
    assert (by_id["ISIC_0000001"]["true"], by_id["ISIC_0000001"]["predicted"]) == ("bkl", "mel")
    assert report["split_source"] == "checkpoint" and report["n_images"] == 2

    # The terminal table says the same thing by name.
    table = done.stdout.splitlines()
    bkl_line = next(line for line in table if line.startswith("bkl "))
    assert "Benign keratosis-like lesion" in bkl_line and bkl_line.split()[-1] == "1"
    matrix = table[table.index(next(line for line in table if line.startswith("true/pred"))) :]
    assert matrix[0].split()[1:] == list(CLASSES)
    assert matrix[1 + bkl].split()[1:] == ["0", "0", "0", "0", "1", "0", "0"]


# ---------------------------------------------------------------------------
# Predictor


def test_prediction_fields(predictor, tmp_path):
    pred = predictor.predict(lesion(tmp_path / "a.jpg"))
    assert pred.probs.shape == (len(CLASSES),) and pred.probs.sum() == pytest.approx(1.0)
    assert list(pred.probabilities) == list(CLASSES)
    assert pred.top_class == CLASSES[int(pred.probs.argmax())] and pred.top_name == DISPLAY_NAMES[pred.top_class]
    assert pred.confidence == pred.probs.max()
    assert pred.malignant_probability == pytest.approx(sum(pred.probabilities[c] for c in MALIGNANT))
    assert tuple(pred.input_tensor.shape) == (1, 3, 48, 48)
    assert pred.image.mode == "RGB" and pred.image.size == (48, 36)
    assert [code for code, _, _ in pred.ranked()][0] == pred.top_class
    assert json.loads(json.dumps(pred.to_dict()))["probabilities"] == pred.probabilities


@pytest.mark.parametrize("tta", [False, True])
def test_a_prediction_carries_its_images_embedding_from_the_same_pass(predictor, tmp_path, tta):
    # Similar cases and the unfamiliar-image score read the embedding; it must be the image's own pooled features
    # (not a flipped view's), and taking it must not cost a second backbone pass.
    pred = predictor.predict(lesion(tmp_path / "a.png", size=(64, 48)), tta=tta)
    assert pred.embedding is not None
    with torch.no_grad():
        expected = predictor.model.backbone(pred.input_tensor)[0].numpy()
        flipped = predictor.model.backbone(pred.input_tensor.flip(-1))[0].numpy()
    np.testing.assert_allclose(pred.embedding, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(pred.embedding, flipped, rtol=1e-4, atol=1e-5)
    assert predictor.embed(pred) is pred.embedding


def test_path_bytes_and_file_objects_agree(predictor, tmp_path):
    path = lesion(tmp_path / "a.png")
    data = path.read_bytes()
    expected = predictor.predict(path).probs
    for source in (str(path), data, io.BytesIO(data)):
        np.testing.assert_allclose(predictor.predict(source).probs, expected, rtol=1e-6)


def test_temperature_comes_from_the_checkpoint(tmp_path):
    hot = open_predictor(save_checkpoint(tmp_path / "t.pt", temperature=2.5))
    assert hot.temperature == 2.5
    image, x = hot.preprocess(lesion(tmp_path / "a.png"))
    with torch.no_grad():
        logits = hot.model(x).numpy()[0]
    np.testing.assert_allclose(hot.predict(tmp_path / "a.png").probs, softmax(logits, 2.5), rtol=1e-5)


def test_tta_averages_the_four_flips(predictor, tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "TTA_SCALES", (1.0,))
    path = lesion(tmp_path / "a.png")
    plain, tta = predictor.predict(path), predictor.predict(path, tta=True)
    assert tta.tta and not plain.tta
    x = plain.input_tensor
    with torch.no_grad():
        views = [torch.softmax(predictor.model(v), 1) for v in (x, x.flip(-1), x.flip(-2), x.flip((-2, -1)))]
    np.testing.assert_allclose(tta.probs, torch.stack(views).mean(0)[0].numpy(), rtol=1e-5)
    Image.new("RGB", (48, 36), (150, 90, 60)).save(tmp_path / "flat.png")  # flip-invariant
    np.testing.assert_allclose(
        predictor.predict(tmp_path / "flat.png", tta=True).probs,
        predictor.predict(tmp_path / "flat.png").probs,
        rtol=1e-5,
    )


def test_tta_views_are_flips_of_centred_zooms_at_the_input_size():
    prep = Preprocessing(input_size=(150, 200), source_size=(200, 150))
    sample = sorted((ROOT / "sample_data" / "ham10000-sample" / "images").glob("*.jpg"))[:2]
    x = torch.stack([eval_transform(prep)(load_for_model(p, prep)) for p in sample])
    views = inference.tta_views(x, (1.0, 1.15))
    assert views.shape == (16, 3, 150, 200)  # 2 zooms × 4 flips of 2 images, each at the input size
    assert torch.equal(views[:2], x) and torch.equal(views[2:4], x.flip(-1))
    # A flipped image has the same views, in another order: its flip views are the original's.
    mirrored = inference.tta_views(x.flip(-1), (1.0, 1.15)).view(2, 4, 2, 3, 150, 200)
    torch.testing.assert_close(mirrored[:, [1, 0, 3, 2]], views.view(2, 4, 2, 3, 150, 200), atol=1e-5, rtol=0)
    # The zoom is about the centre: a centred square half the image's size fills a 2× zoom but for its rim.
    square = torch.zeros(1, 3, 40, 60)
    square[..., 10:30, 15:45] = 1
    zoomed = inference.zoom(square, 2.0)
    assert zoomed.shape == square.shape and zoomed[..., 1:-1, 1:-1].min() > 0.99
    # Zooming out uncovers a border of the colour asked for, and keeps the middle.
    out = inference.zoom(square, 0.5, fill=(-1.0, -2.0, -3.0))
    assert out[0, :, 0, 0].tolist() == [-1.0, -2.0, -3.0] and out[0, :, 20, 30].tolist() == [1.0, 1.0, 1.0]


def test_tta_probabilities_are_distributions_that_no_flip_changes(predictor, tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "TTA_SCALES", (1.0, 1.15))
    assert inference.view_count(True) == 8 and inference.view_count(False) == 1
    assert inference.tta_description(True) == "4 flips at zoom 1, 1.15" and inference.tta_description(False) == "none"
    x = predictor.preprocess(lesion(tmp_path / "a.png", size=(64, 48)))[1]
    with torch.no_grad():
        probs = inference.class_probabilities(predictor.model, x, 2.0, tta=True)
        flipped = inference.class_probabilities(predictor.model, x.flip(-2), 2.0, tta=True)
        expected = torch.softmax(predictor.model(inference.tta_views(x, (1.0, 1.15))) / 2.0, 1).mean(0)
    torch.testing.assert_close(probs.sum(1), torch.ones(1))
    torch.testing.assert_close(probs[0], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(flipped, probs, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(probs, inference.class_probabilities(predictor.model, x, 2.0, tta=False), atol=1e-4)


def test_exif_rotation_is_applied_before_the_model(predictor, tmp_path):
    rng = np.random.default_rng(1)
    stored = Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8), "RGB")  # 64 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "phone.jpg") as raw:  # decoded pixels, orientation not applied
        raw.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
        raw.save(tmp_path / "sideways.png")

    rotated = predictor.predict(tmp_path / "phone.jpg")
    upright = predictor.predict(tmp_path / "upright.png")
    assert rotated.image.size == (40, 64)
    assert np.array_equal(np.asarray(rotated.image), np.asarray(upright.image))
    np.testing.assert_allclose(rotated.probs, upright.probs, rtol=1e-6)
    assert predictor.predict(tmp_path / "sideways.png").image.size == (64, 40)


def test_awkward_image_modes_become_rgb(predictor, tmp_path):
    base = make_image(2, np.random.default_rng(2), size=(48, 36))
    rgba = base.convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent
    rgba.save(tmp_path / "rgba.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "palette.png")
    base.convert("L").save(tmp_path / "grey.png")
    base.convert("CMYK").save(tmp_path / "cmyk.jpg")
    deep = (np.linspace(1000, 60000, 48 * 36).reshape(36, 48)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep16.png")
    assert Image.open(tmp_path / "deep16.png").mode.startswith("I")

    results = {
        name: predictor.predict(tmp_path / name)
        for name in ("rgba.png", "palette.png", "grey.png", "cmyk.jpg", "deep16.png")
    }
    for name, pred in results.items():
        assert pred.image.mode == "RGB" and pred.image.size == (48, 36), name
        assert pred.probs.sum() == pytest.approx(1.0) and np.isfinite(pred.probs).all(), name
    assert results["rgba.png"].image.getpixel((0, 0)) == (255, 255, 255)
    grey = np.asarray(results["grey.png"].image)
    assert (grey[..., 0] == grey[..., 1]).all()
    deep_rgb = np.asarray(results["deep16.png"].image)[..., 0]
    assert deep_rgb.min() == 0 and deep_rgb.max() == 255  # the 16-bit range is rescaled, not clipped


def test_unusable_files_raise_clear_image_errors(predictor, tmp_path):
    (tmp_path / "notes.jpg").write_text("these are my notes, not a photo\n")
    with pytest.raises(ImageError, match="not an image"):
        predictor.predict(tmp_path / "notes.jpg")

    noise = np.random.default_rng(3).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        predictor.predict(tmp_path / "cut.jpg")

    bomb = write_png(tmp_path / "bomb.png", 15000, 15000, bit_depth=1)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageError, match="too large"):
        predictor.predict(bomb)
    with pytest.raises(ImageError, match="too large"):
        predictor.predict(bomb.read_bytes())

    with pytest.raises(ImageError, match="does not exist"):
        predictor.predict(tmp_path / "missing.jpg")


def test_unusable_checkpoints_raise_checkpoint_errors(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        open_predictor(tmp_path / "notes.pt")
    torch.manual_seed(0)
    payload = checkpoint_dict(build_model("resnet18", weights="none", head="linear"), PREP, head="linear")
    payload["arch"] = "mobilenet_v2"  # weights that do not fit the architecture named
    atomic_save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="does not rebuild"):
        open_predictor(tmp_path / "mismatch.pt")


def test_explain_maps_the_requested_class(predictor, tmp_path):
    pred = predictor.predict(lesion(tmp_path / "a.png"))
    heat = predictor.explain(pred)
    assert heat.shape == (48, 48) and 0.0 <= heat.min() <= heat.max() <= 1.0
    np.testing.assert_array_equal(heat, predictor.explain(pred, target=pred.top_index))
    np.testing.assert_array_equal(predictor.explain(pred, target="mel"), predictor.explain(pred, target=4))
    assert predictor.explain(pred, method="gradcampp").shape == (48, 48)


def test_feature_maps_of_every_layer(predictor, tmp_path):
    pred = predictor.predict(lesion(tmp_path / "a.png"))
    layers = predictor.layer_names()
    assert layers == ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]
    shapes = [predictor.feature_maps(pred, layer).shape for layer in layers]
    assert shapes == [(64, 12, 12), (128, 6, 6), (256, 3, 3), (512, 2, 2)]  # a 48×48 input
    with pytest.raises(ValueError, match="backbone.layer1"):
        predictor.feature_maps(pred, "backbone.nope")


def test_one_predictor_serves_concurrent_sessions(predictor, tmp_path):
    # Streamlit's cache_resource hands one Predictor to every browser session, each on its own thread.
    images = [lesion(tmp_path / f"{i}.png", label=i, seed=i) for i in range(3)]
    layers = predictor.layer_names()

    def run(i: int, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pred = predictor.predict(images[i])
        return pred.probs, predictor.explain(pred), predictor.feature_maps(pred, layer)

    expected = {(i, layer): run(i, layer) for i in range(len(images)) for layer in layers}
    results, errors = [], []
    start = threading.Barrier(3)

    def session(k: int) -> None:
        try:
            start.wait()
            for j in range(15):
                i, layer = (k + j) % len(images), layers[j % len(layers)]
                results.append(((i, layer), run(i, layer)))
        except Exception as exc:  # collected: an exception in a thread would otherwise pass unnoticed
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 3 * 15
    for key, outputs in results:
        for got, want in zip(outputs, expected[key], strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_model_trained_with_colour_constancy_gets_it_at_prediction_and_an_old_one_does_not(tmp_path):
    """Every prediction path starts at Predictor.preprocess (Diagnose, Batch) or its transform (Evaluate, Quiz, the
    robustness report): a checkpoint recording Shades of Gray sees an image and its colour-cast copy alike."""
    image = make_image(2, np.random.default_rng(1), size=(64, 48))
    cast = Image.fromarray((np.asarray(image, dtype=float) * [1.0, 0.85, 0.7]).round().astype(np.uint8))
    mean, std = torch.tensor(PREP.mean)[:, None, None], torch.tensor(PREP.std)[:, None, None]

    def colours(predictor: Predictor, source: Image.Image) -> torch.Tensor:
        png = io.BytesIO()
        source.save(png, "PNG")
        pixels = predictor.preprocess(png.getvalue(), upload=False)[1][0] * std + mean
        return pixels / pixels.sum(dim=0, keepdim=True)

    gaps = {}
    for cc in ("none", "shades_of_gray"):
        prep = Preprocessing(input_size=(48, 48), colour_constancy=cc)
        predictor = open_predictor(save_checkpoint(tmp_path / f"{cc}.pt", prep=prep))
        assert predictor.prep.colour_constancy == cc
        gaps[cc] = float((colours(predictor, image) - colours(predictor, cast)).abs().mean())
        transformed = predictor.transform(image)
        assert torch.equal(transformed, eval_transform(prep)(image))  # what the dataset-wide paths use
    assert gaps["shades_of_gray"] < 0.01 < gaps["none"]


def test_source_size_is_applied_to_uploads(tmp_path):
    # Trained on 200×150 downscales: a large upload is brought to that size before the model sees it.
    small = open_predictor(
        save_checkpoint(tmp_path / "s.pt", prep=Preprocessing(input_size=(48, 64), source_size=(64, 48)))
    )
    pred = small.predict(lesion(tmp_path / "big.jpg", size=(640, 400)))
    assert pred.image.size == (64, 48) and tuple(pred.input_tensor.shape) == (1, 3, 48, 64)


# ---------------------------------------------------------------------------
# core.inference.predictor command line


def test_predict_cli_help(capsys):
    # In this process: tests/core/cli/test_main.py shows the same help from a real process.
    with pytest.raises(SystemExit) as helped:
        main(["--help"])
    out = capsys.readouterr().out
    assert helped.value.code == 0 and "--tta" in out and "--gradcam" in out


def test_predict_cli_defaults_to_the_measured_tta(ckpt, tmp_path, capsys):
    image = lesion(tmp_path / "one.jpg")
    for flags, tta in (([], USE_TTA_BY_DEFAULT), (["--tta"], True), (["--no-tta"], False)):
        assert main([str(ckpt), str(image), "--json", *flags]) == 0
        assert json.loads(capsys.readouterr().out)[0]["tta"] is tta


@pytest.mark.integration
def test_predict_cli_json_with_gradcam(ckpt, tmp_path):
    images = [lesion(tmp_path / "one.jpg"), lesion(tmp_path / "two.png", label=3, size=(36, 36))]
    done = run_cli("core.cli.predict", ckpt, *images, "--tta", "--gradcam", tmp_path / "cam.png", "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result, image in zip(results, images, strict=True):
        assert list(result["probabilities"]) == list(CLASSES) and result["tta"] is True
        assert Image.open(result["gradcam"]).size == Image.open(image).size


def test_predict_cli_text_lists_all_seven_names(ckpt, tmp_path, capsys):
    assert main([str(ckpt), str(lesion(tmp_path / "one.jpg"))]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DISPLAY_NAMES.values())
    assert "malignant" in out


@pytest.mark.integration
def test_predict_cli_bad_file_is_one_line_exit_2(ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    done = run_cli("core.cli.predict", ckpt, tmp_path / "notes.txt")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error:") and "notes.txt" in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((8, 8), "only 8×8 pixels"),
        ((1, 1), "only 1×1 pixels"),
        ((10000, 10), "only 10000×10 pixels"),
        ((400, 80), "400×80 pixels, 5.0:1"),
    ],
)
def test_predict_cli_refuses_images_too_small_or_elongated_to_diagnose(ckpt, tmp_path, capsys, size, expected):
    path = lesion(tmp_path / "small.png", size=size)
    assert main([str(ckpt), str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(f"error: {path} is") and expected in captured.err, captured.err


def test_dataset_images_are_not_held_to_the_upload_limits(predictor, tmp_path):
    # The Evaluate page explains dataset images that its evaluation already scored, whatever their size.
    path = lesion(tmp_path / "thumb.png", size=(8, 8))
    with pytest.raises(ImageError, match="at least 32 pixels"):
        predictor.predict(path)
    assert predictor.predict(path, upload=False).image.size == (8, 8)


def test_predict_cli_keeps_going_after_a_bad_file_and_refuses_bad_checkpoints(ckpt, tmp_path, capsys):
    (tmp_path / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    assert main([str(ckpt), str(tmp_path / "truncated.jpg"), str(lesion(tmp_path / "ok.jpg"))]) == 2
    captured = capsys.readouterr()
    assert "truncated.jpg" in captured.err and "Melanoma" in captured.out
    assert main([str(tmp_path / "absent.pt"), str(tmp_path / "ok.jpg")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'absent.pt'} does not exist"


# ---------------------------------------------------------------------------
# core.evaluation.evaluate


def test_evaluate_recomputes_the_checkpoints_split(tiny_root, tmp_path):
    config = {"split_seed": 3, "split_fractions": [0.5, 0.25, 0.25]}
    path = save_checkpoint(tmp_path / "m.pt", config=config)
    result = evaluation_evaluate.evaluate_checkpoint(path, tiny_root, bootstrap=20)
    frame = index_dataset(tiny_root).frame
    expected = frame[split_by_lesion(frame, (0.5, 0.25, 0.25), 3) == "test"]
    assert sorted(p["image_id"] for p in result["predictions"]) == sorted(expected["image_id"])
    assert (result["split_seed"], result["split_source"], result["split_note"]) == (3, "checkpoint", None)
    assert result["metrics"]["n"] == len(expected)
    # The same images with the true labels the dataset gives them.
    truth = dict(zip(expected["image_id"], expected["dx"], strict=True))
    assert all(p["true"] == truth[p["image_id"]] for p in result["predictions"])

    override = evaluation_evaluate.evaluate_checkpoint(path, tiny_root, split="val", split_seed=4, bootstrap=0)
    assert override["split_source"] == "command line" and "not the split" in override["split_note"]
    assert override["confidence_intervals"] is None
    reported = []
    everything = evaluation_evaluate.evaluate_checkpoint(
        path, tiny_root, split="all", bootstrap=0, batch_size=4, tta=False, progress=lambda *p: reported.append(p)
    )
    assert everything["n_images"] == len(frame)
    # After every batch of 4, the images done so far out of all of them.
    assert reported == [(min(i, len(frame)), len(frame)) for i in range(4, len(frame) + 4, 4)]


def test_evaluate_says_each_step_before_it_starts(tiny_root, tmp_path):
    """External evaluation on Evaluate showed nothing for 8–60 s: the model's loading, the folder's indexing and the
    bootstrap are said as they start, the images' count before the first batch is done."""
    path = save_checkpoint(tmp_path / "m.pt")
    heard = []
    evaluation_evaluate.evaluate_checkpoint(
        path,
        tiny_root,
        split="all",
        bootstrap=20,
        batch_size=4,
        tta=True,
        progress=lambda done, total: heard.append(("progress", done)),
        stage=lambda text: heard.append(("stage", text)),
    )
    n = len(index_dataset(tiny_root).frame)
    said = [text for kind, text in heard if kind == "stage"]
    assert said == [
        "loading the model m.pt",
        f"finding the images in {tiny_root.name} and checking its metadata",
        f"reading, decoding and predicting {n:,} images (4 flips)",
        "95% intervals: 20 bootstrap resamples of the lesions",
    ]
    first_progress = heard.index(next(h for h in heard if h[0] == "progress"))
    assert heard.index(("stage", said[2])) < first_progress  # said before any image was done


def test_evaluate_honours_tta_and_records_its_views(ckpt, predictor, tiny_root, tmp_path, capsys):
    runs = {}
    for flag in ("--tta", "--no-tta", None):
        out = tmp_path / f"{flag}.json"
        args = ["--checkpoint", str(ckpt), "--data", str(tiny_root), "--split", "all", "--bootstrap", "0"]
        assert evaluate_cli.main([*args, "--out", str(out), *([flag] if flag else [])]) == 0
        runs[flag] = json.loads(out.read_text())
    assert (runs["--tta"]["tta"], runs["--no-tta"]["tta"], runs[None]["tta"]) == (True, False, USE_TTA_BY_DEFAULT)
    assert runs["--tta"]["tta_views"] == inference.tta_description(True) and runs["--no-tta"]["tta_views"] == "none"
    assert f"TTA: {inference.tta_description(True)}" in capsys.readouterr().out
    for flag, tta in (("--tta", True), ("--no-tta", False)):
        for row in runs[flag]["predictions"][:3]:
            expected = predictor.predict(row["path"], tta=tta, upload=False).probabilities
            assert row["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_evaluate_refuses_what_it_cannot_do_faithfully(tiny_root, tmp_path, capsys):
    sub = save_checkpoint(
        tmp_path / "sub.pt", config={"split_seed": 0, "split_fractions": [0.7, 0.15, 0.15], "max_images": 40}
    )
    with pytest.raises(evaluation_evaluate.EvaluationError, match="subsample"):
        evaluation_evaluate.evaluate_checkpoint(sub, tiny_root)
    with pytest.raises(SplitError, match="summing to 1"):
        evaluation_evaluate.evaluate_checkpoint(sub, tiny_root, fractions=(0.5, 0.5, 0.5))
    assert evaluate_cli.main(["--checkpoint", str(sub), "--data", str(tmp_path / "nowhere"), "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--help"])
    assert exit_info.value.code == 0 and "--split-seed" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory) -> Path:
    """A real training run on the tiny dataset: best.pt beside the split.csv it was trained with."""
    from tests.app_support import train_tiny_run

    base = tmp_path_factory.mktemp("tiny_run")
    return train_tiny_run(tiny_root, base / "runs", "tiny", base / "features")


def test_a_test_split_recomputed_on_other_images_is_flagged(tiny_run, tiny_root, tmp_path, capsys):
    best = tiny_run / "best.pt"
    own = evaluation_evaluate.evaluate_checkpoint(best, tiny_root, bootstrap=0)
    run_test = set(pd.read_csv(tiny_run / "split.csv").query("split == 'test'")["image_id"])
    assert {p["image_id"] for p in own["predictions"]} == run_test and own["split_warning"] is None

    # Another dataset: its "test" split is 15% of images the run never split at all.
    for i, code in enumerate(CLASSES * 6):
        (tmp_path / "other" / code).mkdir(parents=True, exist_ok=True)
        lesion(tmp_path / "other" / code / f"other_{i:02d}.jpg", label=CLASSES.index(code), seed=i)
    assert (
        evaluate_cli.main(
            [
                "--checkpoint",
                str(best),
                "--data",
                str(tmp_path / "other"),
                "--bootstrap",
                "0",
                "--out",
                str(tmp_path / "other.json"),
            ]
        )
        == 0
    )
    warning = json.loads((tmp_path / "other.json").read_text())["split_warning"]
    assert "is not the folder this model was trained on" in warning
    assert "only 0% of these" in warning and "in the test split of run tiny" in warning
    assert "--split all" in warning
    assert capsys.readouterr().err == f"warning: {warning}.\n"
    assert (
        evaluation_evaluate.evaluate_checkpoint(best, tmp_path / "other", split="all", bootstrap=0)["split_warning"]
        is None
    )

    # The same images under another seed: the folder is right, the split is not the run's.
    reseeded = evaluation_evaluate.evaluate_checkpoint(best, tiny_root, split_seed=7, bootstrap=0)
    assert "in the test split of run tiny" in reseeded["split_warning"]
    assert "training images" in reseeded["split_warning"]
    assert "not the folder" not in reseeded["split_warning"] and "--split all" not in reseeded["split_warning"]

    # A copy of the training images elsewhere: the split matches, but the folder is not the one trained on.
    shutil.copytree(tiny_root, tmp_path / "copy")
    copied = evaluation_evaluate.evaluate_checkpoint(best, tmp_path / "copy", bootstrap=0)
    assert "is not the folder this model was trained on" in copied["split_warning"]
    assert "only" not in copied["split_warning"] and "unless" in copied["split_warning"]


def test_evaluate_reads_external_class_folder_sets(ckpt, tmp_path):
    for i, code in enumerate(("mel", "NV", "Basal cell carcinoma")):
        (tmp_path / "ext" / code).mkdir(parents=True)
        lesion(tmp_path / "ext" / code / f"img{i}.jpg", seed=i)
    (tmp_path / "ext" / "scar").mkdir()
    lesion(tmp_path / "ext" / "scar" / "odd.jpg", seed=9)
    result = evaluation_evaluate.evaluate_checkpoint(ckpt, tmp_path / "ext", split="all", bootstrap=0)
    assert sorted(p["true"] for p in result["predictions"]) == ["bcc", "mel", "nv"]
    assert [row["support"] for row in result["metrics"]["per_class"]] == [0, 1, 0, 0, 1, 1, 0]
    # The image in a folder that is no class is set aside, named in the result and in the printed report.
    assert not result["validation"]["ok"]
    assert [where for _, where in result["validation"]["problems"]][0].startswith(str(tmp_path / "ext" / "scar"))
    assert "odd.jpg" in evaluation_evaluate.format_report(result)


PUBLISHED_REFERENCE = ROOT / "docs" / "runs" / "reference-mnv2"


def test_the_operating_point_quoted_is_that_of_the_views_used():
    # The published reference run holds the trainer's one-view predictions and core.evaluation.evaluate's flip-TTA
    # report: Diagnose, its report and Evaluate quote the figures of the setting they show, computed on the
    # predictions, so they are the ones each record printed.
    from core.common.runs import read_evaluate_report, read_evaluation
    from core.evaluation.records import recorded_operating_point
    from core.metrics.classification import MALIGNANT_RULE

    path = ROOT / "checkpoints" / "reference.pt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    threshold = checkpoint["mel_threshold"]
    with_flips = recorded_operating_point(path, checkpoint, threshold, tta=True)
    one_view = recorded_operating_point(path, checkpoint, threshold, tta=False)
    report = read_evaluate_report(PUBLISHED_REFERENCE)
    assert report["tta"] and report["checkpoint"].endswith("reference.pt")
    n = report["metrics"]["n"]
    assert with_flips == {**report["metrics"]["melanoma"], "tta": True, "n": n}
    assert one_view == {**read_evaluation(PUBLISHED_REFERENCE)["test"]["melanoma"], "tta": False, "n": n}
    assert with_flips["sensitivity"] != one_view["sensitivity"]
    # Any threshold and rule: the records' predictions answer for those the records never printed.
    higher = recorded_operating_point(path, checkpoint, threshold + 0.1, tta=True)
    assert higher["threshold"] == threshold + 0.1 and higher["tp"] < with_flips["tp"]
    malignant = recorded_operating_point(path, checkpoint, 0.5, tta=True, rule=MALIGNANT_RULE)
    positives = sum(r["true"] in MALIGNANT_RULE.classes for r in report["predictions"])
    assert malignant["tp"] + malignant["fn"] == positives > with_flips["tp"] + with_flips["fn"]


def test_without_a_report_of_its_views_the_other_record_is_quoted(tmp_path):
    from core.evaluation.records import recorded_operating_point

    for name in ("evaluation.json", "test_predictions.csv"):
        shutil.copy(PUBLISHED_REFERENCE / name, tmp_path / name)
    checkpoint = {"config": {"name": "not-published"}}
    threshold = json.loads((tmp_path / "evaluation.json").read_text())["test"]["melanoma"]["threshold"]
    record = recorded_operating_point(tmp_path / "best.pt", checkpoint, threshold, tta=True)
    assert record is not None and record["tta"] is False
    (tmp_path / "test_predictions.csv").unlink()
    assert recorded_operating_point(tmp_path / "best.pt", checkpoint, threshold, tta=True) is None


def test_the_model_card_reads_the_report_as_core_evaluate_computed_it():
    # bench/model_card.py recomputes the flip-TTA metrics from the report's per-image probabilities: they must
    # be the ones core.evaluation.evaluate printed, or the card's targets would be read on other numbers.
    from bench.model_card import load_evaluate_report
    from core.metrics.classification import compute_metrics

    labels, probs, report = load_evaluate_report(PUBLISHED_REFERENCE)
    recomputed = compute_metrics(labels, probs, mel_threshold=report["metrics"]["melanoma"]["threshold"])
    for key in ("accuracy", "balanced_accuracy", "ece"):
        assert recomputed[key] == pytest.approx(report["metrics"][key], abs=1e-4)
    assert recomputed["melanoma"]["sensitivity"] == report["metrics"]["melanoma"]["sensitivity"]
    assert recomputed["roc_auc"]["per_class"]["mel"] == pytest.approx(report["metrics"]["roc_auc"]["per_class"]["mel"])
