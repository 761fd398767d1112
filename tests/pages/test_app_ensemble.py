"""An ensemble run in the app, end to end with real models on the bundled sample: Evaluate shows its recorded
numbers and says it is an ensemble, Compare lists its row with its own melanoma threshold, Diagnose shows each
model's heatmap beside the averaged one, and the downloadable report says how many of its models agree."""

from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np
import pytest

from core.common import runs
from core.common.labels import CLASSES
from core.inference.explain import CAM_METHOD_NAMES
from core.inference.opening import open_predictor
from tests.app_support import *  # noqa: F403
from tests.app_support import AppEnv, app_test, jpeg_bytes, lesion_image, no_exceptions, pick_model, texts
from tests.conftest import ROOT

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
MEMBERS = ["ens-seed3", "ens-seed4"]


@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory, torch_home, one_thread) -> Path:
    """A runs folder holding the ensemble run ``ens`` and its two members, trained through ``lesionlab train
    --ensemble 2`` (which combines them with core.inference.ensemble) from the real MobileNetV2 ImageNet weights."""
    from core.cli import train

    base = tmp_path_factory.mktemp("app_ensemble")
    out = base / "runs"
    flags = [
        "--data", str(SAMPLE), "--arch", "mobilenet_v2", "--weights", "imagenet", "--finetune", "head",
        "--head", "linear", "--imbalance", "none", "--epochs", "2", "--batch-size", "16", "--input-size", "64", "64",
        "--source-size", "200", "150", "--device", "cpu", "--out", str(out), "--cache-dir", str(base / "features"),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        assert train.main([*flags, "--name", "ens", "--seed", "3", "--ensemble", "2"]) == 0
    assert [m["run"] for m in runs.read_evaluation(out / "ens")["members"]] == MEMBERS
    return out


@pytest.fixture
def app_env(ensemble_runs, tmp_path, monkeypatch) -> AppEnv:
    env = AppEnv(data=SAMPLE, runs=ensemble_runs, checkpoints=tmp_path / "no-checkpoints")
    env.apply(monkeypatch)
    return env


def open_view(at, view: str, key: str = "eval_view") -> None:
    """Click the tab ``view`` of the lazily computed tabs ``key``."""
    at.session_state[key] = view
    at.run()
    no_exceptions(at)


# ---------------------------------------------------------------------------
# Evaluate


def test_evaluate_shows_the_ensemble_runs_recorded_numbers(app_env, ensemble_runs):
    at = app_test("evaluate", timeout=300)
    no_exceptions(at)
    at.selectbox(key="eval_run").set_value("ens").run()
    no_exceptions(at)
    evaluation = runs.read_evaluation(ensemble_runs / "ens")
    test = evaluation["test"]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Accuracy"] == f"{test['accuracy']:.3f}"
    assert shown["Balanced accuracy"] == f"{test['balanced_accuracy']:.3f}"
    assert shown["Macro F1"] == f"{test['macro']['f1']:.3f}"
    assert shown["ECE (calibrated)"] == f"{test['ece']:.3f}"
    assert shown["Temperature"] == f"{evaluation['temperature']:.2f}"
    text = texts(at)
    assert f"Test split of `ens`: {test['n']} images; ensemble of 2 models;" in text
    assert "best epoch" not in text  # an ensemble has no epoch of its own: no "best epoch ?"

    # Its melanoma operating point (chosen on validation when it was combined) is where the threshold view starts.
    open_view(at, "Referral thresholds")
    assert at.select_slider(key="eval_melanoma_t").value == evaluation["mel_threshold"]
    assert f"P(melanoma) ≥ {evaluation['mel_threshold']:.3f}" in texts(at)

    # The misclassified gallery draws the ensemble's averaged Grad-CAM over the sample's images.
    open_view(at, "Misclassified images")
    assert not at.error
    wrong = int(np.array(test["confusion_matrix"]).sum() - np.trace(test["confusion_matrix"]))
    assert f"{wrong} misclassified images, most confident mistakes first." in texts(at)
    assert len(at.get("image")) == min(8, wrong)

    # A member run, a single model, still says its best epoch.
    at.selectbox(key="eval_run").set_value(MEMBERS[0]).run()
    no_exceptions(at)
    epoch = runs.read_evaluation(ensemble_runs / MEMBERS[0])["epoch"]
    assert f"best epoch {epoch};" in texts(at) and "ensemble of" not in texts(at)


# ---------------------------------------------------------------------------
# Compare


def test_compare_lists_the_ensemble_with_each_runs_own_melanoma_threshold(app_env, ensemble_runs):
    at = app_test("compare", timeout=300)
    no_exceptions(at)
    chosen = ["ens", MEMBERS[0]]
    at.multiselect(key="cmp_runs").set_value(chosen).run()
    no_exceptions(at)
    table = at.dataframe[0].value  # the headline table: a row per run
    assert sorted(table.index) == sorted(chosen)
    thresholds = {}
    for name in chosen:
        test = runs.read_evaluation(ensemble_runs / name)["test"]
        row = table.loc[name]
        assert row["accuracy"] == f"{test['accuracy']:.3f}"
        assert row["balanced accuracy"] == f"{test['balanced_accuracy']:.3f}"
        assert row["melanoma sensitivity"] == f"{test['melanoma']['sensitivity']:.3f}"
        assert row["melanoma specificity"] == f"{test['melanoma']['specificity']:.3f}"
        assert row["melanoma threshold"] == f"{test['melanoma']['threshold']:.3f}"
        assert row["test images"] == str(test["n"])
        thresholds[name] = test["melanoma"]["threshold"]
    assert table.loc["ens", "model"].split(" · ")[0] == "ensemble"
    # The ensemble was measured at its own operating point, not at 0.5; the caption no longer claims 0.5 for all.
    assert thresholds["ens"] == runs.read_evaluation(ensemble_runs / "ens")["mel_threshold"] != 0.5
    heading = next(m.value for m in at.markdown if m.value.startswith("**Headline metrics**"))
    assert "P(mel) ≥ 0.5)" not in heading
    if f"{thresholds['ens']:.3f}" != f"{thresholds[MEMBERS[0]]:.3f}":
        assert "each run's own operating threshold, P(mel) ≥ mel thr." in heading
    else:
        assert f"P(mel) ≥ {thresholds['ens']:.3f} for all" in heading


# ---------------------------------------------------------------------------
# Diagnose and its report


def member_captions(at) -> dict[str, str]:
    """Caption -> media URL of the per-model heatmaps (captioned "<member run>: P(<class>) …")."""
    return {
        caption: url
        for img in at.get("image")
        for caption, url in zip(img.captions, img.value, strict=True)
        if any(caption.startswith(f"{name}: P(") for name in MEMBERS)
    }


def diagnose_upload(model: str):
    at = app_test("diagnose", timeout=300)
    no_exceptions(at)
    pick_model(at, "diag", f"run: {model}")  # trained on the 140-image sample: an experimental model
    at.file_uploader(key="diag_upload").set_value(("lesion.jpg", jpeg_bytes(lesion_image()), "image/jpeg")).run()
    no_exceptions(at)
    return at


def test_diagnose_shows_each_models_heatmap_and_the_report_says_how_many_agree(app_env, ensemble_runs, downloads):
    at = diagnose_upload("ens")
    prediction = at.session_state["diag_result"][1]
    votes, top = prediction.members, prediction.top_class
    assert votes is not None and list(votes.names) == MEMBERS
    # Off by default: no per-model map is computed or shown until asked for.
    assert at.toggle(key="diag_each_cam").value is False
    assert not member_captions(at) and "diag_member_cams" not in at.session_state
    averaged = at.session_state["diag_cam"][1]

    at.toggle(key="diag_each_cam").set_value(True).run()
    no_exceptions(at)
    shown = member_captions(at)
    assert len(shown) == 2  # one image per member, in the members' order, each named with its P(top class)
    for caption, name, probs in zip(shown, MEMBERS, votes.probs, strict=True):
        assert caption.startswith(f"{name}: P({top}) {probs[CLASSES.index(top)]:.1%}")
    assert len(set(shown.values())) == 2  # two different maps, two different images
    assert f"{CAM_METHOD_NAMES['gradcam']} for {top} by each of the 2 models" in texts(at)
    # The maps are each member's own Grad-CAM, and the averaged one shown above is their mean.
    maps = at.session_state["diag_member_cams"][1]
    own = open_predictor(ensemble_runs / "ens" / "best.pt").explain_members(prediction, "gradcam", top)
    assert len(maps) == 2 and all(np.allclose(m, o, atol=1e-5) for m, o in zip(maps, own, strict=True))
    assert np.allclose(averaged, np.mean(maps, axis=0).clip(0, 1), atol=1e-5)

    # The report says what the page says beside the result: the agreement, the spread and each model's answer.
    html = [data.decode() for data, mime in downloads if mime.startswith("text/html")][-1]
    assert escape(votes.agreement_text()) in html and escape(votes.spread_text()) in html
    assert f"{votes.agreeing} of 2 models agree on" in html
    # When they do not all agree, a warning beside the answer (and in the report) says so.
    split = [w.value for w in at.warning if w.value.startswith("The models disagree")]
    assert len(split) == int(votes.agreeing < votes.count) and all(escape(w) in html for w in split)
    for name, probs in zip(MEMBERS, votes.probs, strict=True):
        assert f"<tr><td>{name}</td>" in html and f'<td class="p">{probs[CLASSES.index("mel")]:.1%}</td>' in html


def test_a_single_model_gets_no_per_model_heatmaps_nor_agreement(app_env, downloads):
    at = diagnose_upload(MEMBERS[0])
    assert at.session_state["diag_result"][1].members is None
    assert "diag_each_cam" not in [t.key for t in at.toggle]
    assert not member_captions(at)
    html = [data.decode() for data, mime in downloads if mime.startswith("text/html")][-1]
    assert "Lesion Lab report" in html and "models agree on" not in html and "models disagree" not in html
