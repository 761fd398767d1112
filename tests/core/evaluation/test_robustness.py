"""The acquisition shifts, the upload-fitting rules and the robustness report (``core.evaluation.evaluate --shifts``),
on the bundled sample's real images with the real reference checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import evaluate as evaluate_cli
from core.common.runs import write_config
from core.common.settings import PUBLISHED_RUNS_ENV, RUNS_ENV
from core.data import shifts
from core.data.images import FIT_RULE, FIT_RULES, fit_to_source, open_image
from core.evaluation import evaluate as evaluation_evaluate
from core.evaluation import robustness
from core.evaluation.evaluate import evaluate_checkpoint
from core.evaluation.robustness import CLEAN
from core.inference.forward import tta_description
from core.inference.predictor import USE_TTA_BY_DEFAULT
from core.models.checkpoints import atomic_save, read_checkpoint
from core.models.ensemble_file import ensemble_dict
from tests.app_support import save_tiny_checkpoint
from tests.conftest import ROOT

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"
PUBLISHED = ROOT / "docs" / "runs"
SOURCE = (200, 150)


@pytest.fixture(scope="module")
def photo() -> Path:
    return sorted((SAMPLE / "images").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def image(photo) -> Image.Image:
    img = open_image(photo)
    assert img.size == SOURCE
    return img


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())


def test_geometric_shifts_change_the_size_as_they_say(image):
    assert shifts.square_crop(image).size == (150, 150)
    assert np.array_equal(np.asarray(shifts.square_crop(image)), np.asarray(image)[:, 25:175])
    assert shifts.scale_up(image).size == (400, 300)
    assert shifts.scale_down(image).size == (100, 75)
    rotated = shifts.rotate_90(image)
    assert rotated.size == (150, 200)
    assert np.array_equal(np.asarray(rotated), np.rot90(np.asarray(image)))  # counter-clockwise


def test_jpeg_shift_lowers_the_quality_and_the_file_size(image, photo):
    with Image.open(photo) as original:
        original_tables = sum(sum(t) for t in original.quantization.values())
    shifted = shifts.jpeg(image)
    assert shifted.format == "JPEG" and shifted.size == image.size
    assert sum(sum(t) for t in shifted.quantization.values()) > original_tables  # coarser quantisation
    kept = io.BytesIO()
    shifted.save(kept, "JPEG", quality="keep")  # its own tables: the size it was sent at
    assert len(kept.getvalue()) < photo.stat().st_size
    assert 0 < _diff(shifted.convert("RGB"), image) < 10  # the same picture, with compression loss


def test_warm_cast_raises_red_and_lowers_blue(image):
    before = np.asarray(image, dtype=float).mean(axis=(0, 1))
    after = np.asarray(shifts.colour_cast(image), dtype=float).mean(axis=(0, 1))
    assert after[0] > before[0] + 5  # red ×1.15, clipped at 255
    assert after[1] == pytest.approx(before[1], abs=0.5)
    assert after[2] < before[2] - 5  # blue ×0.85
    assert "red ×1.15" in shifts.DESCRIPTIONS["warm_cast"] and "blue ×0.85" in shifts.DESCRIPTIONS["warm_cast"]


@pytest.mark.parametrize("rule", FIT_RULES)
def test_every_rule_fits_a_rescaled_field_to_the_same_input(image, rule):
    """2× and ½ keep the 4:3 field, so no rule crops or pads it: they cannot tell the rules apart."""
    assert fit_to_source(image, SOURCE, rule) is image
    assert _diff(fit_to_source(shifts.scale_up(image), SOURCE, rule), image) < 1
    assert _diff(fit_to_source(shifts.scale_down(image), SOURCE, rule), image) < 3  # half the detail is gone
    assert fit_to_source(Image.new("RGB", (37, 301)), SOURCE, rule).size == SOURCE


def test_the_predictors_rule_keeps_the_lesion_at_its_scale(image):
    """Under the predictor's rule a square crop of the field and a portrait turn reach the model with the lesion at
    the size it learnt, where "crop" would enlarge it by a third; only the margins differ."""
    original = np.asarray(image)
    square = np.asarray(fit_to_source(shifts.square_crop(image), SOURCE))  # the predictor's rule, FIT_RULE
    assert np.array_equal(square[:, 25:175], original[:, 25:175])
    upscaled = fit_to_source(shifts.scale_up(shifts.square_crop(image)), SOURCE)
    assert _diff(upscaled, Image.fromarray(square)) < 2
    portrait = np.asarray(fit_to_source(shifts.rotate_90(image), SOURCE))
    assert np.array_equal(portrait[:, 25:175], np.rot90(original)[25:175])
    cropped = np.asarray(fit_to_source(shifts.square_crop(image), SOURCE, "crop"))
    assert _diff(Image.fromarray(cropped[:, 25:175]), Image.fromarray(original[:, 25:175])) > 10
    enlarged = image.crop((25, 19, 175, 131)).resize(SOURCE, Image.Resampling.LANCZOS)  # the middle 150×112
    assert _diff(Image.fromarray(cropped), enlarged) < 2


def test_an_unknown_rule_is_refused(image):
    with pytest.raises(ValueError, match="unknown fitting rule 'stretch'"):
        fit_to_source(image, (100, 100), "stretch")


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory) -> tuple[dict, str]:
    """The command's report on every shift, one view per image: the four flips are the ensembles' tests' below and
    test_app_robustness's, and would make this one four times as long."""
    out = tmp_path_factory.mktemp("robustness") / "robustness.json"
    printed = io.StringIO()
    args = ["--checkpoint", str(REFERENCE), "--data", str(SAMPLE), "--shifts", "--bootstrap", "300", "--no-tta"]
    with contextlib.redirect_stdout(printed):
        code = evaluate_cli.main([*args, "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_shifts_cli_prints_and_saves_every_shift(cli_report):
    report, printed = cli_report
    names = [c["name"] for c in report["conditions"]]
    assert names == [CLEAN, *shifts.SHIFTS]
    assert report["n_images"] > 10 and report["split"] == "test" and report["fit_rule"] == FIT_RULE
    assert report["tta"] is False
    for row in robustness.table_rows(report):
        assert row["condition"] in printed and row["balanced accuracy"] in printed
    assert "robustness report written to" in printed
    clean = report["conditions"][0]
    assert clean["balanced_accuracy"] == pytest.approx(clean["metrics"]["balanced_accuracy"])
    assert clean["mel_auc"] == pytest.approx(clean["metrics"]["roc_auc"]["per_class"]["mel"])
    # The shifts change what the model sees: not every condition scores alike.
    assert len({json.dumps(c["metrics"]["confusion_matrix"]) for c in report["conditions"]}) > 1


def test_each_drop_lies_within_its_paired_interval(cli_report):
    report, _ = cli_report
    clean = report["conditions"][0]
    for c in report["conditions"][1:]:
        drop = c["drop"]["balanced_accuracy"]
        assert drop["value"] == pytest.approx(clean["balanced_accuracy"] - c["balanced_accuracy"])
        for metric, d in c["drop"].items():
            if d["ci"] is not None:
                assert d["ci"][0] <= d["value"] <= d["ci"][1], (c["name"], metric, d)


def test_the_report_lives_in_the_checkpoints_run_record(tmp_path, capsys):
    assert robustness.report_path(REFERENCE, [PUBLISHED]) == PUBLISHED / "reference-mnv2" / "robustness.json"
    val = robustness.report_path(REFERENCE, [PUBLISHED], "val")
    assert val == PUBLISHED / "reference-mnv2" / "robustness-val.json"
    assert robustness.checkpoint_for_run(PUBLISHED / "reference-mnv2", [REFERENCE]) == REFERENCE
    assert robustness.checkpoint_for_run(PUBLISHED / "compare-mobilenet_v2-none", [REFERENCE]) is None
    # A checkpoint no run folder records: one clear error before any image is read, nothing written.
    orphan = save_tiny_checkpoint(tmp_path / "orphan.pt")
    assert evaluate_cli.main(["--checkpoint", str(orphan), "--data", str(SAMPLE), "--shifts"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run folder records how") and "--out" in err
    assert not list(tmp_path.glob("*.json"))


def test_an_unknown_shift_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(evaluation_evaluate.EvaluationError, match="unknown shift blur"):
        robustness.evaluate_shifts(tmp_path / "missing.pt", SAMPLE, shifts=["blur"])


# ---------------------------------------------------------------------------
# Ensembles: the report is the ensemble's own predictions, and lives in its run folder


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory) -> dict[str, Path]:
    """Ensemble files of the real reference checkpoint. ``twins``: two copies of it with ensemble temperature 1,
    which is the reference model itself (the mean of two equal calibrated distributions, unscaled), saved as an
    ensemble run (its folder's config.json is the ensemble's config, as core.training.ensembles writes it). ``mixed``:
    the reference beside a copy of it with another input size and twice its temperature, ensemble temperature 1.3, so
    that every member's own preprocessing and temperature and the ensemble's temperature count."""
    base = tmp_path_factory.mktemp("robust_ensembles")
    ref = read_checkpoint(REFERENCE)
    twins_run = base / "runs" / "twins"
    twins_run.mkdir(parents=True)
    twins_config = {**ref["config"], "name": "twins", "arch": "ensemble"}
    atomic_save(ensemble_dict([ref, ref], ["a", "b"], temperature=1.0, config=twins_config), twins_run / "best.pt")
    write_config(twins_run, twins_config)
    other = read_checkpoint(REFERENCE)
    other["temperature"] = 2 * ref["temperature"]
    other["preprocessing"]["input_size"] = [120, 160]
    mixed = base / "mixed.pt"
    atomic_save(ensemble_dict([ref, other], ["ref", "other"], temperature=1.3, config={**ref["config"]}), mixed)
    return {"twins": twins_run / "best.pt", "mixed": mixed}


@pytest.mark.parametrize("tta", [False, True])
def test_an_ensemble_of_twins_reports_what_the_single_model_does(ensembles, tta):
    # The same 11 of the test split's images for both (an equality needs no more).
    options = {"shifts": ["rotate_90"], "tta": tta, "bootstrap": 0, "max_images": 11}
    single = robustness.evaluate_shifts(REFERENCE, SAMPLE, **options)
    twins = robustness.evaluate_shifts(ensembles["twins"], SAMPLE, **options)
    assert twins["arch"] == "ensemble of 2 (2 × mobilenet_v2)" and twins["n_images"] == single["n_images"] == 11
    assert twins["tta"] is tta and twins["tta_views"] == tta_description(tta)
    for mine, theirs in zip(twins["conditions"], single["conditions"], strict=True):
        assert mine["name"] == theirs["name"]
        assert mine["balanced_accuracy"] == theirs["balanced_accuracy"]
        assert mine["ece"] == pytest.approx(theirs["ece"], abs=1e-6)
        assert mine["mel_auc"] == pytest.approx(theirs["mel_auc"], abs=1e-6)
        assert mine["metrics"]["confusion_matrix"] == theirs["metrics"]["confusion_matrix"]


def test_an_ensembles_clean_row_is_its_core_evaluate_result(ensembles):
    """With members that differ in preprocessing and temperature, by default (the predictor's TTA): the clean row
    is the ensemble's evaluation by core.evaluation.evaluate, and not its first member's alone."""
    report = robustness.evaluate_shifts(ensembles["mixed"], SAMPLE, shifts=[], bootstrap=0)
    assert report["tta"] is USE_TTA_BY_DEFAULT and report["tta_views"] == tta_description(USE_TTA_BY_DEFAULT)
    (clean,) = report["conditions"]
    evaluated = evaluate_checkpoint(ensembles["mixed"], SAMPLE, bootstrap=0)
    assert evaluated["tta"] is report["tta"] and evaluated["n_images"] == report["n_images"]
    assert clean["metrics"]["confusion_matrix"] == evaluated["metrics"]["confusion_matrix"]
    assert clean["balanced_accuracy"] == pytest.approx(evaluated["metrics"]["balanced_accuracy"], abs=1e-12)
    assert clean["ece"] == pytest.approx(evaluated["metrics"]["ece"], abs=1e-6)
    assert clean["mel_auc"] == pytest.approx(evaluated["metrics"]["roc_auc"]["per_class"]["mel"], abs=1e-6)
    lead_alone = evaluate_checkpoint(REFERENCE, SAMPLE, bootstrap=0)
    assert abs(lead_alone["metrics"]["ece"] - clean["ece"]) > 0.01


def test_shifts_on_an_ensemble_without_out_saves_in_its_run_folder(ensembles, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "no-runs"))
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, "")
    twins = ensembles["twins"]
    saved = twins.parent / "robustness.json"
    assert robustness.report_path(twins, []) == saved
    args = ["--checkpoint", str(twins), "--data", str(SAMPLE), "--shifts", "--bootstrap", "0", "--max-images", "6"]
    assert evaluate_cli.main([*args, "--no-tta"]) == 0
    assert f"robustness report written to {saved}" in capsys.readouterr().out
    report = json.loads(saved.read_text())
    assert report["checkpoint"] == str(twins) and report["arch"] == "ensemble of 2 (2 × mobilenet_v2)"
    assert [c["name"] for c in report["conditions"]] == [CLEAN, *shifts.SHIFTS] and report["n_images"] == 6
    assert report["tta"] is False and "one view (no TTA)" in robustness.describe(report)
    # A run folder without best.pt finds its checkpoint among model files that include an ensemble.
    assert robustness.checkpoint_for_run(PUBLISHED / "reference-mnv2", [twins, REFERENCE]) == REFERENCE


# The malformed-input corpus of robustness.json: each damage, on the published reference report, is refused by the
# schema with one message naming the field. Before it, each of these reached the Evaluate page's table or the model
# choice as it was (a drop of "a lot", a shift the app never made, a report with no clean row to drop from).
ROBUSTNESS_CORPUS = {
    "not JSON": (lambda r: "{", "(not JSON)"),
    "conditions missing": (lambda r: {k: v for k, v in r.items() if k != "conditions"}, "conditions is missing"),
    "no clean row first": (lambda r: {**r, "conditions": r["conditions"][1:]}, "its first condition is not clean"),
    "unknown shift": (
        lambda r: {**r, "conditions": [*r["conditions"][:1], {**r["conditions"][1], "name": "fisheye"}]},
        "conditions[].name must be one of clean, square_crop",
    ),
    "drop as text": (
        lambda r: {**r, "conditions": [*r["conditions"][:1], {**r["conditions"][1], "drop": "a lot"}]},
        "conditions[].drop must be a dict; got str",
    ),
    "balanced accuracy of 2": (
        lambda r: {**r, "conditions": [{**r["conditions"][0], "balanced_accuracy": 2}]},
        "conditions[].balanced_accuracy must be a probability from 0 to 1; got 2",
    ),
    "metrics disagreeing": (
        lambda r: {**r, "conditions": [{**r["conditions"][0], "metrics": {**r["conditions"][0]["metrics"], "n": 3}}]},
        "metrics's confusion matrix holds",
    ),
    "tta as text": (lambda r: {**r, "tta": "yes"}, "tta must be true or false; got 'yes'"),
    "field unknown": (lambda r: {**r, "blob": [1]}, "'blob' is not a field of a robustness report"),
    "over 1 MiB": (lambda r: {**r, "checkpoint": "x" * 2**20}, "(1.0 MiB at most)"),
}


@pytest.mark.parametrize("case", ROBUSTNESS_CORPUS)
def test_a_damaged_robustness_report_is_refused(tmp_path, case):
    damage, says = ROBUSTNESS_CORPUS[case]
    sound = robustness.read_robustness(PUBLISHED / "reference-mnv2")
    assert [c["name"] for c in sound["conditions"]] == [CLEAN, *shifts.SHIFTS]
    content = damage(sound)
    (tmp_path / "robustness.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(robustness.SchemaError, match="^robustness.json is") as refused:
        robustness.read_robustness(tmp_path)
    assert says in str(refused.value)
    assert robustness.read_robustness(tmp_path / "elsewhere") is None


def test_each_split_keeps_its_own_report(tmp_path):
    """The validation report the model choice reads and the test report Evaluate shows, side by side: writing one
    leaves the other as it was, and a file holding another split's report speaks for neither."""
    tested = robustness.read_robustness(PUBLISHED / "reference-mnv2")
    validated = {**tested, "split": "val", "n_images": tested["n_images"] + 1}
    robustness.write_robustness(tmp_path, tested)
    robustness.write_robustness(tmp_path, validated)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["robustness-val.json", "robustness.json"]
    assert robustness.read_robustness(tmp_path) == tested
    assert robustness.read_robustness(tmp_path, "val") == validated
    (tmp_path / "robustness.json").replace(tmp_path / "robustness-val.json")
    with pytest.raises(robustness.SchemaError, match="robustness-val.json holds the test split's report"):
        robustness.read_robustness(tmp_path, "val")
