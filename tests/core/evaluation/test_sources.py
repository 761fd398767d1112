"""Results by image source (``lesionlab evaluate --by-source``) and the leave-one-source-out report
(``lesionlab train --leave-one-source-out``), on tiny synthetic datasets whose images name their source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.cli import evaluate as evaluate_cli
from core.cli import train as train_cli
from core.common.labels import CLASSES
from core.common.runs import read_config, read_evaluation, write_config
from core.data.preprocessing import Preprocessing
from core.evaluation.evaluate import EvaluationError, evaluate_checkpoint, format_report
from core.evaluation.sources import holdout_report, holdout_row, metrics_by_source
from core.metrics.classification import balanced_accuracy, compute_metrics
from core.models.architectures import build_model
from core.models.checkpoints import atomic_save, checkpoint_dict
from tests.conftest import no_printed_warnings, run_cli, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", weights="none", finetune="head", head="linear")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    atomic_save(checkpoint_dict(model.eval(), Preprocessing(input_size=(32, 32)), head="linear"), path)
    return path


@pytest.fixture(scope="module")
def by_source(ckpt, sourced_root) -> dict:
    return evaluate_checkpoint(ckpt, sourced_root, split="all", tta=False, bootstrap=200, by_source=True)


def test_each_source_gets_every_metric_of_its_own_images_with_intervals(by_source, sourced_root):
    sources = pd.read_csv(sourced_root / "HAM10000_sources.csv").set_index("image_id")["dataset"]
    rows = {r["source"]: r for r in by_source["by_source"]}
    assert set(rows) == {"home", "far"} and [r["source"] for r in by_source["by_source"]] == ["home", "far"]
    predictions = pd.DataFrame(by_source["predictions"])
    for source, row in rows.items():
        mine = predictions[predictions["image_id"].map(sources) == source]
        labels = mine["true"].map(CLASSES.index).to_numpy()
        probs = np.array([[p[c] for c in CLASSES] for p in mine["probabilities"]])
        assert row["n_images"] == len(mine) and sum(row["classes"].values()) == len(mine)
        assert row["metrics"]["balanced_accuracy"] == pytest.approx(balanced_accuracy(labels, probs), abs=1e-4)
        expected = compute_metrics(labels, probs, mel_threshold=0.5)
        assert row["metrics"]["ece"] == pytest.approx(expected["ece"], abs=1e-4)
        low, high = row["confidence_intervals"]["accuracy"]
        assert 0 <= low <= high <= 1
    assert rows["far"]["n_lesions"] == 15  # two lesions per class, and one image of a lesion "home" also shows
    text = format_report(by_source)
    assert "By image source (95% intervals over lesions)" in text and "\nfar " in text
    json.dumps(by_source, allow_nan=False)


def test_the_lesion_bootstrap_is_the_evaluation_reports_unit(by_source):
    assert by_source["bootstrap_unit"] == "lesion" and set(by_source["confidence_intervals"]) == {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
    }


def test_by_source_without_known_sources_is_refused_before_the_model_runs(ckpt, tiny_root, capsys):
    with pytest.raises(EvaluationError, match="HAM10000_sources.csv"):
        evaluate_checkpoint(ckpt, tiny_root, split="all", by_source=True)
    assert (
        evaluate_cli.main(["--checkpoint", str(ckpt), "--data", str(tiny_root), "--split", "all", "--by-source"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: no image source is known") and len(err.strip().splitlines()) == 1


def test_metrics_by_source_leaves_undefined_metrics_empty():
    """A source without melanomas has no melanoma AUC or sensitivity, and no interval for them."""
    frame = pd.DataFrame({"source": ["a"] * 4 + ["b"] * 4, "lesion_id": [f"L{i // 2}" for i in range(8)]})
    labels = np.array([5, 5, 1, 1, 4, 4, 5, 5])
    probs = np.eye(len(CLASSES))[labels] * 0.6 + 0.4 / len(CLASSES)
    rows = {r["source"]: r for r in metrics_by_source(frame, labels, probs, mel_threshold=0.3, bootstrap=50)}
    assert rows["a"]["metrics"]["mel_auc"] is None and rows["a"]["confidence_intervals"]["mel_sensitivity"] is None
    assert rows["b"]["metrics"]["mel_sensitivity"] == 1.0 and rows["b"]["n_lesions"] == 2


def test_cli_by_source_prints_the_table(ckpt, sourced_root, tmp_path, capsys):
    # Through the command's main in this process: evaluate's real processes are tests/core/cli/test_errors.py's and
    # test_predictor's.
    out = tmp_path / "report.json"
    args = ["--checkpoint", str(ckpt), "--data", str(sourced_root), "--split", "all", "--no-tta", "--bootstrap", "50"]
    assert evaluate_cli.main([*args, "--by-source", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "By image source" in printed and "\nhome " in printed
    assert {r["source"] for r in json.loads(out.read_text())["by_source"]} == {"home", "far"}


# ---------------------------------------------------------------------------
# Leave-one-source-out


def write_three_sources(root: Path) -> Path:
    """64 images of each class in lesions of two: lesions 0–14 from "a", 15–29 from "b" (30 images of every class
    each, so both can be held out), 30–31 from "c" (4 a class: too few)."""
    write_tiny_dataset(root, per_class=64)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    lesion = meta["lesion_id"].str[-5:].astype(int)
    meta["dataset"] = np.select([lesion < 15, lesion < 30], ["a", "b"], "c")
    meta[["image_id", "dataset"]].to_csv(root / "HAM10000_sources.csv", index=False)
    return root


@pytest.mark.integration
def test_leave_one_source_out_trains_a_run_per_eligible_source_and_reports_them(tmp_path, capsys):
    data = write_three_sources(tmp_path / "ham")
    out = tmp_path / "runs"
    args = ["--data", data, "--weights", "none", "--epochs", "1", "--input-size", "32", "32", "--out", out]
    done = run_cli("core.cli.train", *args, "--cache-dir", tmp_path / "c", "--name", "loso", "--leave-one-source-out")
    assert done.returncode == 0, done.stderr
    assert "not held out: c (0 classes with at least 30 images" in done.stdout
    report = json.loads((out / "loso-loso.json").read_text())
    rows = {r["source"]: r for r in report["rows"]}
    assert set(rows) == {"a", "b"} and set(report["left_out"]) == {"c"}
    for source, row in rows.items():
        run = out / f"loso-holdout-{source}"
        assert row["run"] == run.name and row["n_images"] == 7 * 30
        assert row["val_balanced_accuracy"] == read_evaluation(run)["val"]["balanced_accuracy"]
        assert row["metrics"]["accuracy"] == pytest.approx(read_evaluation(run)["test"]["accuracy"])
    assert "Leave-one-source-out" in done.stdout and "not held out: c" in done.stdout
    assert (
        holdout_report([out / "loso-holdout-a"], {}, bootstrap=0)["rows"][0]["confidence_intervals"]["accuracy"] is None
    )

    # A held-out source of its own is refused: through the trainer's main in this process (the real one is above).
    with no_printed_warnings():
        assert train_cli.main([*map(str, args), "--leave-one-source-out", "--holdout-source", "a"]) == 2
    assert capsys.readouterr().err.startswith("error: --leave-one-source-out chooses")


@pytest.fixture(scope="module")
def runs(sourced_root, tmp_path_factory) -> Path:
    """Two real tiny runs on the sourced dataset: "plain" (the usual split) and "far" (holding out the far source)."""
    from tests.app_support import train_tiny_run

    base = tmp_path_factory.mktemp("source_runs")
    for name, holdout in (("plain", ""), ("far", "far")):
        train_tiny_run(sourced_root, base / "runs", name, base / "features", holdout_source=holdout)
    return base / "runs"


def test_a_run_that_held_out_no_source_has_no_holdout_row(runs):
    with pytest.raises(ValueError, match="did not hold out an image source"):
        holdout_row(runs / "plain")


def test_the_model_card_shows_results_by_source_and_the_held_out_runs(runs, sourced_root):
    from bench.model_card import source_lines

    lines = source_lines(runs / "plain", runs, str(sourced_root))
    text = "\n".join(lines)
    assert "## Results by image source" in text and "### Leave one source out" in text
    table = [line for line in lines if line.startswith("| ") and "---" not in line]
    sources = pd.read_csv(sourced_root / "HAM10000_sources.csv").set_index("image_id")["dataset"]
    tested = pd.read_csv(runs / "plain" / "test_predictions.csv")["image_id"].map(sources).value_counts()
    by_source = {cells[1].strip(): int(cells[2]) for cells in (line.split("|") for line in table[1:3])}
    assert by_source == tested.to_dict()
    # The held-out run's row: its test split is the far source's images.
    far = read_evaluation(runs / "far")["test"]
    assert any(line.startswith(f"| far | {far['n']} |") for line in table[3:])
    assert f"{far['balanced_accuracy']:.3f} on far" in text
    # "far" is "plain"'s recipe with a source held out, so the card may say these runs speak for the bundled model.
    assert "These runs are of the bundled model's recipe." in text
    assert source_lines(runs / "plain", runs, None)[-1].startswith("Not computed")


def test_held_out_runs_of_two_recipes_are_named_by_run(runs, sourced_root, tmp_path):
    """A candidate's recipe held the same source out too: each row says which run it is, and the card which runs are
    the bundled model's recipe."""
    from bench.model_card import source_lines

    both = tmp_path / "runs"
    shutil.copytree(runs, both)
    shutil.copytree(both / "far", both / "other-far")
    config = read_config(both / "other-far")
    write_config(both / "other-far", {**config, "name": "other-far", "label_smoothing": 0.05})
    text = "\n".join(source_lines(both / "plain", both, str(sourced_root)))
    said = "Of the bundled model's recipe: `far`; of candidates' recipes (each judged in the choice table below): "
    assert said + "`other-far`." in text
    assert "| run | images |" in text and "| other-far |" in text and "| far |" in text
