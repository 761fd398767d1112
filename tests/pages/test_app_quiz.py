"""Quiz (AppTest): a 10-image quiz on the bundled sample with the shipped reference model, taken to its summary;
the summary's numbers are core.app.quiz.score's on the same answers and the model's own predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.app import quiz
from core.common.labels import CLASSES, CONFIRMATION, DISPLAY_NAMES
from core.common.settings import PUBLISHED_RUNS_ENV
from core.data.dataset import index_dataset
from core.data.splits import model_split
from core.inference.opening import open_predictor
from tests.app_support import *  # noqa: F403
from tests.app_support import ROOT, AppEnv, app_test, no_exceptions, pick_model, texts

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"


@pytest.fixture
def quiz_page(tmp_path, monkeypatch):
    """The bundled sample and checkpoints, as on a fresh clone (published runs included)."""
    AppEnv(data=SAMPLE, runs=tmp_path / "runs", checkpoints=REFERENCE.parent).apply(monkeypatch)
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, str(ROOT / "docs" / "runs"))
    at = app_test("quiz", timeout=120)
    no_exceptions(at)
    return at


def answer_for(pos: int, truth: str) -> str:
    # Right on even images, "nv" on odd ones: a student with a non-trivial confusion matrix.
    return truth if pos % 2 == 0 else "nv"


def test_a_ten_image_quiz_to_its_summary(quiz_page):
    at = quiz_page
    assert "Held out from this model's training: 126 test, 14 val images of ham10000-sample" in texts(
        at
    ) and "Split recorded in docs/runs/reference-mnv2/split.csv." in texts(at)
    at.slider(key="quiz_n").set_value(10)
    at.number_input(key="quiz_seed").set_value(7)
    at.button(key="FormSubmitter:quiz_setup-Start the quiz").click().run()
    no_exceptions(at)

    # The page draws exactly what core.app.quiz draws for these settings, dataset and model.
    frame = index_dataset(SAMPLE).frame
    split_of = model_split(REFERENCE, open_predictor(REFERENCE).checkpoint, frame, [ROOT / "docs" / "runs"]).split_of
    expected = quiz.draw_quiz(frame, split_of, quiz.QuizSettings(n=10, seed=7))
    rows = pd.DataFrame(at.session_state["quiz"]["rows"])
    assert rows["image_id"].tolist() == expected["image_id"].tolist()
    assert "Quiz: 10 test images, natural prevalence, seed 7" in texts(at)

    at.button(key="quiz_reveal_0").click().run()  # no diagnosis chosen yet
    assert "Choose a diagnosis first." in [w.value for w in at.warning]
    assert not [m for m in at.markdown if m.value.startswith("### ") and "(" in m.value]  # truth still hidden

    answers, confidences = [], []
    for pos, row in rows.iterrows():
        truth = row["dx"]
        answers.append(answer_for(pos, truth))
        confidences.append(1 + pos % 5)
        at.radio(key=f"quiz_answer_{pos}").set_value(answers[-1])
        at.slider(key=f"quiz_confidence_{pos}").set_value(confidences[-1])
        at.button(key=f"quiz_reveal_{pos}").click().run()
        no_exceptions(at)
        shown = [m.value for m in at.markdown]
        assert f"### {DISPLAY_NAMES[truth]} ({truth})" in shown
        assert f"Confirmed by **{CONFIRMATION[row['dx_type']]}**." in shown
        captions = [c for image in at.get("image") for c in image.captions]
        assert captions[0].startswith(row["image_id"]) and captions[1].startswith("Grad-CAM")
        assert len(at.get("plotly_chart")) == 1  # the model's probabilities
        at.button(key=f"quiz_next_{pos}").click().run()
        no_exceptions(at)

    # The model's probabilities, computed here without the app (no flip averaging, as on Diagnose).
    predictor = open_predictor(REFERENCE)
    probs = np.array([predictor.predict(p).probs for p in rows["path"]])
    result = quiz.score(rows["dx"], answers, probs, confidences)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {
        "Your accuracy": f"{result['student']['accuracy']:.3f}",
        "Your balanced accuracy": f"{result['student']['balanced_accuracy']:.3f}",
        "Model accuracy": f"{result['model']['accuracy']:.3f}",
        "Model balanced accuracy": f"{result['model']['balanced_accuracy']:.3f}",
    }
    # Even images answered right and odd nv right: accuracy follows from the truths alone.
    right = sum(a == t for a, t in zip(answers, rows["dx"], strict=True))
    assert metrics["Your accuracy"] == f"{right / 10:.3f}"
    summary = "\n".join(f"- {s}" for s in quiz.summary_sentences(result, "natural"))
    assert summary in [m.value for m in at.markdown]
    # Ten images measure roughly: each balanced accuracy has its interval, and a winner is named only beyond it.
    helps = {m.label: m.proto.help for m in at.metric}
    low, high = result["model"]["balanced_accuracy_ci"]
    assert f"95% bootstrap interval {low:.2f}–{high:.2f} over these 10 images" in helps["Model balanced accuracy"]
    low, high = result["difference"]["ci"]
    assert ("beat" in summary) == (low > 0 or high < 0) and "95% interval" in summary
    assert len(at.get("plotly_chart")) == 3  # two confusion matrices and the per-class recall
    # The recall chart tells a class nobody recognised (0.00 on its bar) from one without images ("no images").
    recall_chart = json.loads(at.get("plotly_chart")[2].proto.spec)
    absent = [c for c, k in result["support"].items() if not k]
    assert recall_chart["layout"]["xaxis"]["ticktext"] == [f"{c}<br>(no images)" if c in absent else c for c in CLASSES]
    texts_on_bars = {t["name"]: dict(zip(CLASSES, t["text"], strict=True)) for t in recall_chart["data"]}
    for code, value in result["student"]["recall"].items():
        assert texts_on_bars["you"][code] == ("" if value is None else f"{value:.2f}")

    table = at.dataframe[0].value  # the "Every image" table, the same as the CSV
    assert table["image_id"].tolist() == rows["image_id"].tolist()
    assert table["student_answer"].tolist() == answers
    assert table["student_confidence"].tolist() == confidences
    assert table["model_top_class"].tolist() == [CLASSES[i] for i in probs.argmax(axis=1)]
    assert table[[f"prob_{c}" for c in CLASSES]].to_numpy() == pytest.approx(probs, abs=1e-5)
    assert at.get("download_button")[0].proto.label == "Download the results (CSV)"

    at.button(key="quiz_new").click().run()
    no_exceptions(at)
    assert "quiz" not in at.session_state and at.button(key="FormSubmitter:quiz_setup-Start the quiz")


def test_a_pool_smaller_than_asked_is_said_and_used(quiz_page):
    at = quiz_page
    at.slider(key="quiz_n").set_value(30)
    at.radio(key="quiz_split").set_value("val")
    at.radio(key="quiz_mix").set_value("balanced")
    at.button(key="FormSubmitter:quiz_setup-Start the quiz").click().run()
    no_exceptions(at)
    rows = at.session_state["quiz"]["rows"]
    # The reference split puts 14 of the sample's images in val (9 df, 5 vasc); never a training image.
    assert len(rows) == 14 and {r["dx"] for r in rows} == {"df", "vasc"}
    assert "has only 14 val images in this dataset, so the quiz has 14 instead of 30" in texts(at)
    at.button(key="quiz_quit").click().run()
    assert "quiz" not in at.session_state


def test_the_split_comes_from_the_run_or_is_recomputed_with_a_warning(full_env, monkeypatch):
    full_env.apply(monkeypatch)
    at = app_test("quiz")
    no_exceptions(at)
    # The tiny reference checkpoint records no run: its split is recomputed, and the page says what that means.
    assert "Split recomputed over this dataset from split seed 0" in texts(at)
    assert any("No split record was found for this model" in w.value for w in at.warning)
    run = full_env.runs / "tiny-none" / "best.pt"
    pick_model(at, "quiz", "run: tiny-none")  # trained on the tiny dataset: experimental
    no_exceptions(at)
    assert f"Split recorded in {run.parent / 'split.csv'}." in texts(at)
    assert not any("No split record" in w.value for w in at.warning)


def test_a_model_that_outputs_nan_stops_the_quiz_with_an_error(tmp_path, monkeypatch):
    """The reference model with NaN in its head: it loads, and every probability it gives is NaN."""
    import torch

    from core.models.checkpoints import atomic_save

    broken = torch.load(REFERENCE, map_location="cpu", weights_only=True)
    for name, tensor in broken["model_state"].items():
        if name.startswith("head."):
            tensor.fill_(float("nan"))
    atomic_save(broken, tmp_path / "checkpoints" / REFERENCE.name)  # same config: the published split applies
    AppEnv(data=SAMPLE, runs=tmp_path / "runs", checkpoints=tmp_path / "checkpoints").apply(monkeypatch)
    monkeypatch.setenv(PUBLISHED_RUNS_ENV, str(ROOT / "docs" / "runs"))
    at = app_test("quiz", timeout=120)
    at.button(key="FormSubmitter:quiz_setup-Start the quiz").click().run()
    no_exceptions(at)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "cannot take part in a quiz" in errors[0] and "no valid probabilities" in errors[0]
    assert not at.radio and not at.get("plotly_chart")  # no question asked, no probabilities drawn
    assert at.button(key="quiz_quit")
