"""The app's pure-Python helpers: dataset-folder settings, plot builders and the image checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.app import plots
from core.common import settings
from core.common.labels import CLASSES
from core.data.dataset import index_dataset
from core.data.splits import split_by_lesion, split_counts
from core.inference.explain import feature_map_grid, top_channels
from core.inference.unfamiliar import dermoscopy_check
from core.metrics.calibration import reliability_curve, softmax
from core.metrics.classification import roc_curves
from tests.app_support import lesion_image

# ---------------------------------------------------------------------------
# Settings


def test_dataset_choice_order(tmp_path):
    toml = tmp_path / "lesionlab.toml"
    sample = tmp_path / "sample"
    sample.mkdir()
    kw = {"settings_file": toml, "default": sample}
    assert settings.dataset_choice(env={}, **kw) == settings.DatasetChoice(sample, "default sample")
    toml.write_text('[data]\nfolder = "/data/from-file"\n')
    assert settings.dataset_choice(env={}, **kw).source == "settings file"
    env = {settings.DATA_ENV: "/data/from-env"}
    assert settings.dataset_choice(env=env, **kw).folder.as_posix() == "/data/from-env"
    assert settings.dataset_choice("/data/sidebar", env=env, **kw).source == "sidebar"
    # Set but empty: explicitly no dataset, even with a settings file and a sample present.
    none = settings.dataset_choice(env={settings.DATA_ENV: ""}, **kw)
    assert not none.configured and none.describe() == "no dataset configured"
    # Relative paths are relative to the project root, not the working directory.
    assert settings.dataset_choice("data/x", env={}, **kw).folder == settings.PROJECT_ROOT / "data" / "x"


def test_resolve_path_takes_relative_paths_from_the_project_root():
    assert settings.resolve_path("data/x") == settings.PROJECT_ROOT / "data" / "x"
    assert settings.resolve_path("/abs/x") == Path("/abs/x")
    assert settings.resolve_path("~/x") == Path.home() / "x"


def test_broken_settings_file_is_ignored(tmp_path):
    toml = tmp_path / "lesionlab.toml"
    toml.write_text("[data\nfolder = ")
    choice = settings.dataset_choice(env={}, settings_file=toml, default=tmp_path / "absent")
    assert not choice.configured


def test_repository_default_is_the_bundled_sample():
    choice = settings.dataset_choice(env={}, settings_file=settings.PROJECT_ROOT / "no-such.toml")
    assert choice.folder == settings.DEFAULT_DATASET
    index = index_dataset(choice.folder)
    assert index.report.ok
    assert index.frame["dx"].value_counts().to_dict() == dict.fromkeys(CLASSES, 20)  # 140 images, 20 per class


def test_model_files_lists_checkpoints_then_runs(tmp_path):
    env = {settings.RUNS_ENV: str(tmp_path / "runs"), settings.CHECKPOINTS_ENV: str(tmp_path / "ckpt")}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "reference.pt").write_bytes(b"x")
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / "a" / "best.pt").write_bytes(b"x")
    files = settings.model_files(env)
    assert [f.name for f in files] == ["reference.pt", "best.pt"]
    assert settings.model_label(files[0], env) == "checkpoint: reference"
    assert settings.model_label(files[1], env) == "run: a"


# ---------------------------------------------------------------------------
# Plots


@pytest.fixture(scope="module")
def tiny_frame(tiny_root):
    return index_dataset(tiny_root).frame


def test_dataset_figures(tiny_frame):
    counts = pd.Series({"nv": 6705, "mel": 1113, "df": 115}).reindex(CLASSES, fill_value=0)
    assert plots.imbalance_ratio(counts) == pytest.approx(6705 / 115)
    fig = plots.class_distribution(counts, log=True)
    assert fig.layout.yaxis.type == "log" and "58.3 : 1" in fig.layout.title.text
    assert list(fig.data[0].x) == list(CLASSES)
    assert plots.class_distribution(counts).layout.yaxis.type == "linear"
    assert len(plots.age_by_class(tiny_frame).data) == len(CLASSES)
    loc = plots.category_by_class(tiny_frame, "localization", "Localization", top=1)
    assert all(len(t.x) == 1 for t in loc.data)
    split = split_by_lesion(tiny_frame, seed=0)
    fig = plots.split_counts_figure(split_counts(tiny_frame, split))
    assert [t.name for t in fig.data] == ["train", "val", "test"]


def test_training_curves_handle_empty_and_partial_tables():
    empty = plots.training_curves(pd.DataFrame())
    assert empty.data == () and [a.text for a in empty.layout.annotations] == ["Loss", "Accuracy"]
    epochs = pd.DataFrame(
        {
            "epoch": [1, 2],
            "train_loss": [1.0, 0.8],
            "val_loss": [1.1, 0.9],
            "train_acc": [0.5, 0.6],
            "val_acc": [0.4, 0.5],
            "val_balanced_acc": [0.3, 0.4],
        }
    )
    fig = plots.training_curves(epochs)
    assert len(fig.data) == 5
    running = pd.DataFrame({"epoch": [0.25, 0.5, 1.25], "loss": [2.0, 1.5, 1.0]})
    fig = plots.training_curves(epochs, running)
    assert len(fig.data) == 6 and list(fig.data[-1].x) == [0.25, 0.5, 1.25]


def test_evaluation_figures():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 10)
    logits = rng.normal(size=(70, 7)) + 3 * np.eye(7)[labels]
    probs = softmax(logits, 2.0)
    cm = np.zeros((7, 7), int)
    np.add.at(cm, (labels, probs.argmax(1)), 1)
    counts = plots.confusion_figure(cm)
    normed = plots.confusion_figure(cm, normalize=True)
    assert np.array(counts.data[0].z).sum() == 70
    assert np.allclose(np.array(normed.data[0].z).sum(axis=1), 1)
    assert "row-normalised" in normed.layout.title.text
    roc = plots.roc_figure(roc_curves(labels, probs))
    assert len(roc.data) == 8  # chance line + 7 classes
    rel = plots.reliability_figure(reliability_curve(labels, softmax(logits)), reliability_curve(labels, probs), 2.0)
    assert len(rel.data) == 3 and "ECE" in rel.data[1].name
    thr = plots.threshold_curve(probs[:, 4], labels == 4, 0.3)
    assert len(thr.data) == 2


def test_probability_bars_put_the_top_class_on_top():
    probs = np.array([0.05, 0.05, 0.1, 0.05, 0.6, 0.1, 0.05])
    fig = plots.probability_bars(probs, highlight="mel")
    assert fig.data[0].y[-1].startswith("mel")
    assert fig.data[0].text[-1] == "60.0%"
    # The long bar's label sits inside it, the short ones' beside them (outside, "99.9%" ran off a phone's screen).
    assert fig.data[0].textposition[-1] == "inside" and set(fig.data[0].textposition[:-1]) == {"outside"}


def luminance(colour: str) -> float:
    """Relative luminance (0 black – 1 white) of a #rrggbb colour."""
    return sum(w * int(colour[i : i + 2], 16) / 255 for w, i in zip((0.2126, 0.7152, 0.0722), (1, 3, 5), strict=True))


def test_lines_over_a_chart_follow_the_theme():
    """Dark mode's error bars and 0.03 line were a dark grey on a dark background: they take the theme's ink."""
    import json

    report = json.loads((Path(__file__).parents[2] / "docs/runs/reference-mnv2/robustness.json").read_text())
    for dark, readable in ((True, lambda lum: lum > 0.8), (False, lambda lum: lum < 0.3)):
        fig = plots.robustness_figure(report, dark=dark)
        assert readable(luminance(fig.data[0].error_y.color)), dark
        [line] = fig.layout.shapes
        assert readable(luminance(line.line.color)), dark
        curve = plots.threshold_curve(np.array([0.2, 0.8]), np.array([False, True]), 0.5, dark=dark)
        assert readable(luminance(curve.layout.shapes[0].line.color)), dark
        bars = plots.probability_bars(np.full(len(CLASSES), 1 / len(CLASSES)), highlight="mel", dark=dark).data[0]
        [mel] = [i for i, label in enumerate(bars.y) if label.startswith("mel")]
        assert readable(luminance(bars.marker.line.color[mel])), dark


def test_per_class_comparison():
    table = pd.DataFrame([{"run": r, "class": c, "recall": 0.5} for r in ("a", "b") for c in CLASSES])
    fig = plots.per_class_comparison(table, "recall")
    assert [t.name for t in fig.data] == ["a", "b"]
    # A class recalled by no one (0) is seen as a 0; a class with no images says so under its name.
    quiz = pd.DataFrame(
        [
            {"run": who, "class": c, "recall": None if c == "vasc" else 0.0 if c == "df" else 0.5}
            for who in ("you", "model")
            for c in CLASSES
        ]
    )
    fig = plots.per_class_comparison(quiz, "recall")
    df, vasc = CLASSES.index("df"), CLASSES.index("vasc")
    assert [t.text[df] for t in fig.data] == ["0.00", "0.00"] and [t.text[vasc] for t in fig.data] == ["", ""]
    ticks = dict(zip(fig.layout.xaxis.tickvals, fig.layout.xaxis.ticktext, strict=True))
    assert ticks["vasc"] == "vasc<br>(no images)" and ticks["df"] == "df"


# ---------------------------------------------------------------------------
# Image checks


def test_dermoscopy_check_accepts_lesions_and_flags_other_images(tiny_root):
    assert dermoscopy_check(lesion_image()).looks_dermoscopic
    assert not dermoscopy_check(Image.new("RGB", (100, 80), "white")).looks_dermoscopic
    grey = dermoscopy_check(Image.new("L", (100, 80), 128))
    assert not grey.looks_dermoscopic and "colourless" in grey.reasons[0]
    sky = dermoscopy_check(Image.new("RGB", (100, 80), (40, 90, 220)))
    assert not sky.looks_dermoscopic and "skin-like" in sky.reasons[0]


def test_dermoscopy_check_on_real_images(ham_root):
    import pandas as pd

    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").sample(200, random_state=0)
    paths = [next(ham_root.rglob(f"{i}.jpg")) for i in meta["image_id"][:200]]
    passed = sum(dermoscopy_check(Image.open(p)).looks_dermoscopic for p in paths)
    assert passed >= 194  # calibrated to flag about 1 % of real dermoscopy


def test_feature_map_grid():
    maps = np.zeros((32, 7, 7), np.float32)
    maps[5] = 3.0
    maps[9, 3, 3] = 100.0
    assert list(top_channels(maps, 2)) == [5, 9]
    grid = feature_map_grid(maps, n=16, cols=4, cell=20, gap=2)
    assert grid.size == (4 * 22 - 2, 4 * 22 - 2)
    with pytest.raises(ValueError):
        feature_map_grid(np.zeros((7, 7)))
