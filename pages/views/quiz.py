"""Quiz: students diagnose held-out images before they see the truth, the model's probabilities and its
heatmap, then compare their per-class results with the model's on the same images.

The whole quiz lives in this browser session's ``st.session_state``: nothing a student answers is written
on the server. The work is done in ``core.app.quiz``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.app import plots, quiz
from core.common import settings
from core.common.labels import CLASSES, CONFIRMATION, DISPLAY_NAMES
from core.data.images import ImageError
from core.data.splits import SplitError, SplitRecord, model_split, split_column, split_counts
from core.inference.forward import PredictionError
from pages.views._shared import (
    cam_overlay,
    dark_theme,
    get_predictor,
    load_dataset,
    metadata_stamp,
    pick_model,
    research_notice,
)

STATE = "quiz"  # the running quiz: settings, model, drawn images, answers and position
MISSING = "quiz_missing"  # set when Reveal was pressed without a diagnosis


@st.cache_data(max_entries=1024, show_spinner=False)
def _model_probs(checkpoint: str, stamp: float, image_path: str) -> np.ndarray:
    """The model's calibrated probabilities for one dataset image, without flip averaging as on Diagnose;
    keyed by checkpoint version and image, so a class taking the same quiz computes each image once."""
    predictor, error = get_predictor(Path(checkpoint))
    if predictor is None:
        raise quiz.QuizError(error)
    return predictor.predict(image_path).probs


@st.cache_data(max_entries=16, show_spinner=False)
def held_out_pool(
    checkpoint: str,
    stamp: float,
    dataset: str,
    dataset_stamp: float,
    runs: tuple[str, ...],
    _checkpoint: dict,
    _frame: pd.DataFrame,
) -> tuple[SplitRecord, pd.Series, pd.DataFrame]:
    """The model's split record, each dataset row's split and the images per class and split: read (or recomputed)
    once per model version, dataset and run folders, not on every rerun of every student's Quiz."""
    record = model_split(checkpoint, _checkpoint, _frame, [Path(r) for r in runs])
    splits = split_column(_frame, record.split_of)
    return record, splits, split_counts(_frame, splits)


def model_probs(q: dict, image_path: str) -> np.ndarray:
    return _model_probs(q["checkpoint"], Path(q["checkpoint"]).stat().st_mtime, image_path)


def context_line(row: dict) -> str:
    """What a clinician would know besides the image: age, sex and site."""
    age = row.get("age")
    who = f"{age:.0f}-year-old" if isinstance(age, float) and not np.isnan(age) else "age unknown,"
    return f"{who} {row.get('sex', 'unknown')}, {row.get('localization', 'unknown')}"


def confirmation(dx_type: str) -> str:
    return CONFIRMATION.get(dx_type, dx_type or "not recorded")


# ---------------------------------------------------------------------------
# Setting up


def setup() -> None:
    index = load_dataset()
    if index is None:
        st.stop()
    st.markdown(
        "Students diagnose each image — with how sure they are — before they see the truth, how it was "
        "confirmed, the model's calibrated probabilities and where it looked. At the end their per-class "
        "results stand beside the model's on the same images."
    )
    picked = pick_model("quiz")
    if picked is None:
        st.stop()
    model_path, _ = picked  # no flip-averaging toggle: the quiz scores one view of each image (_model_probs)
    predictor, error = get_predictor(model_path)
    if predictor is None:
        st.error(f"This model cannot be used: {error}", icon=":material/block:")
        st.stop()
    frame = index.frame
    try:
        record, splits, counts = held_out_pool(
            str(model_path),
            Path(model_path).stat().st_mtime,
            str(index.root),
            metadata_stamp(index.root),
            tuple(str(r) for r in settings.run_folders()),
            predictor.checkpoint,
            frame,
        )
    except SplitError as exc:
        st.error(str(exc), icon=":material/block:")
        st.stop()
    held_out = ", ".join(f"{int(counts[s].sum())} {s}" for s in quiz.QUIZ_SPLITS)
    st.caption(
        f"Held out from this model's training: {held_out} images of {index.root.name}. Training images "
        f"are never shown. Split {record.source}."
    )
    if not record.recorded:
        st.warning(
            "No split record was found for this model, so its split was recomputed over this dataset. If "
            "the model was trained on another dataset, these images may include ones it trained on.",
            icon=":material/warning:",
        )
    if splits.isna().any():
        st.caption(
            f"{int(splits.isna().sum())} images of this dataset are not in the model's split record and are left out."
        )
    with st.expander("Held-out images per class"):
        st.dataframe(counts[list(quiz.QUIZ_SPLITS)].T, key="quiz_pool_counts")

    with st.form("quiz_setup"):
        c1, c2, c3, c4 = st.columns([3, 2, 3, 2])
        n = c1.slider("Images", quiz.MIN_IMAGES, quiz.MAX_IMAGES, quiz.QuizSettings.n, key="quiz_n")
        split = c2.radio(
            "From the split",
            quiz.QUIZ_SPLITS,
            key="quiz_split",
            help="Test by default; validation images were used to pick the model's best epoch.",
        )
        mix = c3.radio(
            "Class mix",
            list(quiz.MIXES),
            format_func=quiz.MIXES.get,
            key="quiz_mix",
            help="Natural prevalence: each class as common as in the pool (in HAM10000 mostly nevi; the "
            "bundled sample has about 20 per class). Balanced: the same number per class, as far as "
            "the pool allows.",
        )
        seed = c4.number_input(
            "Seed",
            0,
            2**31 - 1,
            0,
            key="quiz_seed",
            help="Same seed, settings, dataset and model: the same images in the same order, "
            "so a whole class can take the same quiz.",
        )
        ask_confidence = st.toggle(
            "Ask how sure the student is (1 = guessing, 5 = certain)", value=True, key="quiz_ask_confidence"
        )
        start = st.form_submit_button("Start the quiz", type="primary", icon=":material/quiz:")
    if start:
        chosen = quiz.QuizSettings(n=int(n), split=split, mix=mix, seed=int(seed))
        try:
            rows = quiz.draw_quiz(frame, record.split_of, chosen)
        except quiz.QuizError as exc:
            st.error(str(exc), icon=":material/block:")
            st.stop()
        st.session_state[STATE] = {
            "settings": chosen,
            "checkpoint": str(model_path),
            "model": settings.model_label(model_path),
            "dataset": index.root.name,
            "ask_confidence": ask_confidence,
            "rows": rows.to_dict("records"),
            "answers": [],
            "pos": 0,
        }
        st.rerun()


# ---------------------------------------------------------------------------
# Taking it


def _reveal(pos: int) -> None:
    q = st.session_state[STATE]
    answer = st.session_state.get(f"quiz_answer_{pos}")
    st.session_state[MISSING] = answer is None
    if answer is None or len(q["answers"]) > pos:
        return
    confidence = st.session_state.get(f"quiz_confidence_{pos}") if q["ask_confidence"] else None
    probs = model_probs(q, q["rows"][pos]["path"])
    q["answers"].append({"answer": answer, "confidence": confidence, "probs": probs})


def _next() -> None:
    q = st.session_state[STATE]
    q["pos"] += 1
    if q["pos"] == len(q["rows"]):
        st.rerun()  # the results are drawn outside the question's fragment


def _quit() -> None:
    st.session_state.pop(STATE, None)


def header(q: dict) -> None:
    chosen = q["settings"]
    st.caption(
        f"Quiz: {chosen.describe()} · model {q['model']} · dataset {q['dataset']}. Give the class these "
        "settings to take the same quiz."
    )
    if len(q["rows"]) < chosen.n:
        st.info(
            f"This model has only {len(q['rows'])} {chosen.split} images in this dataset, so the quiz has "
            f"{len(q['rows'])} instead of {chosen.n}.",
            icon=":material/info:",
        )


@st.fragment
def question() -> None:
    """One image: the answer form, then the truth beside the model. Only this part reruns while answering."""
    q = st.session_state[STATE]
    pos = q["pos"]
    while True:
        row = q["rows"][pos]
        try:
            model_probs(q, row["path"])  # before the student answers: an unreadable image is skipped, not scored
            break
        except PredictionError as exc:  # the model's fault, not the image's: every image would fail alike
            st.error(
                f"This model cannot take part in a quiz: {exc}. Abandon the quiz and choose another model.",
                icon=":material/block:",
            )
            return
        except (ImageError, OSError, quiz.QuizError) as exc:
            st.warning(
                f"{row['image_id']} cannot be read and is left out of the quiz ({exc}).", icon=":material/block:"
            )
            q["rows"].pop(pos)
            if pos == len(q["rows"]):
                st.rerun()  # that was the last image: on to the results
    total = len(q["rows"])
    st.progress(pos / total, text=f"Image {pos + 1} of {total}")
    revealed = len(q["answers"]) > pos
    picture, side = st.columns([5, 6], gap="large")
    images, captions = [row["path"]], [f"{row['image_id']}: {context_line(row)}"]
    if revealed:
        top = int(np.argmax(q["answers"][pos]["probs"]))
        overlay = cam_overlay(q["checkpoint"], row["path"], top)
        if overlay is not None:
            images.append(overlay)
            captions.append(f"Grad-CAM: where the model looked for {CLASSES[top]}")
    for col, image, caption in zip(picture.columns(len(images)), images, captions, strict=True):
        col.image(image, caption=caption, width="stretch")

    with side:
        if not revealed:
            with st.form(f"quiz_form_{pos}", border=False):
                st.radio("Your diagnosis", CLASSES, index=None, format_func=plots.class_label, key=f"quiz_answer_{pos}")
                if q["ask_confidence"]:
                    st.slider(
                        "How sure are you? (1 = guessing, 5 = certain)",
                        *quiz.CONFIDENCE_LEVELS,
                        3,
                        key=f"quiz_confidence_{pos}",
                    )
                st.form_submit_button(
                    "Reveal",
                    type="primary",
                    icon=":material/visibility:",
                    on_click=_reveal,
                    args=(pos,),
                    key=f"quiz_reveal_{pos}",
                )
            if st.session_state.get(MISSING):
                st.warning("Choose a diagnosis first.", icon=":material/touch_app:")
            return
        answer = q["answers"][pos]
        truth, probs = row["dx"], np.asarray(answer["probs"])
        top = CLASSES[int(probs.argmax())]
        sure = f", {answer['confidence']}/5 sure" if answer["confidence"] is not None else ""
        mark = {True: ":green[right]", False: ":red[wrong]"}
        st.markdown(f"### {DISPLAY_NAMES[truth]} ({truth})")
        st.markdown(f"Confirmed by **{confirmation(row['dx_type'])}**.")
        st.markdown(
            f"You said **{answer['answer']}**{sure}: {mark[answer['answer'] == truth]}. "
            f"The model said **{top}** ({probs.max():.0%}): {mark[top == truth]}."
        )
        bars = plots.probability_bars(probs, highlight=truth, dark=dark_theme())
        st.plotly_chart(bars, width="stretch", key=f"quiz_probs_{pos}")
        st.caption(f"The model's calibrated probabilities; the true class ({truth}) is outlined.")
        last = pos + 1 == total
        st.button(
            "See the results" if last else "Next image",
            type="primary",
            on_click=_next,
            icon=":material/leaderboard:" if last else ":material/arrow_forward:",
            key=f"quiz_next_{pos}",
        )


# ---------------------------------------------------------------------------
# The results


def results(q: dict) -> None:
    if not q["answers"]:
        st.error("None of the quiz's images could be read.", icon=":material/block:")
        st.button("New quiz", on_click=_quit, icon=":material/restart_alt:", key="quiz_new")
        return
    rows = pd.DataFrame(q["rows"])
    answers = [a["answer"] for a in q["answers"]]
    confidences = [a["confidence"] for a in q["answers"]]
    probs = np.array([a["probs"] for a in q["answers"]])
    result = quiz.score(rows["dx"], answers, probs, confidences)
    you, model = result["student"], result["model"]

    st.subheader("Results")
    cols = st.columns(4)
    cols[0].metric("Your accuracy", f"{you['accuracy']:.3f}", help="Share of images diagnosed correctly.")
    cols[1].metric(
        "Your balanced accuracy",
        f"{you['balanced_accuracy']:.3f}",
        help="Mean recall over the classes in the quiz. " + quiz.interval_text(you, result["n"]),
    )
    cols[2].metric("Model accuracy", f"{model['accuracy']:.3f}")
    cols[3].metric(
        "Model balanced accuracy", f"{model['balanced_accuracy']:.3f}", help=quiz.interval_text(model, result["n"])
    )
    st.markdown("\n".join(f"- {s}" for s in quiz.summary_sentences(result, q["settings"].mix)))

    left, right = st.columns(2)
    left.plotly_chart(
        plots.confusion_figure(you["confusion_matrix"], title="Your answers", height=420),
        width="stretch",
        key="quiz_cm_student",
    )
    right.plotly_chart(
        plots.confusion_figure(model["confusion_matrix"], title="The model", height=420),
        width="stretch",
        key="quiz_cm_model",
    )
    recall = pd.DataFrame(
        [
            {"run": who, "class": code, "recall": side["recall"][code]}
            for who, side in (("you", you), ("model", model))
            for code in CLASSES
        ]
    )
    st.plotly_chart(plots.per_class_comparison(recall, "recall"), width="stretch", key="quiz_recall")
    st.caption(
        "Recall: the share of a class's images diagnosed as that class (sensitivity), written on each bar: a class "
        'nobody recognised reads 0.00, and a class without images in this quiz says "no images" under its name.'
    )

    table = quiz.results_table(rows, answers, confidences, probs)
    with st.expander("Every image"):
        st.dataframe(table, hide_index=True, key="quiz_table")
    chosen = q["settings"]
    st.download_button(
        "Download the results (CSV)",
        table.to_csv(index=False),
        mime="text/csv",
        file_name=f"quiz-{chosen.split}-{chosen.mix}-{len(rows)}-seed{chosen.seed}.csv",
        on_click="ignore",
        icon=":material/download:",
        key="quiz_download",
    )
    st.caption("Nothing of this quiz is stored on the server: download the results before you leave.")
    st.button("New quiz", on_click=_quit, icon=":material/restart_alt:", key="quiz_new")


st.title("Quiz")
research_notice()
current = st.session_state.get(STATE)
if current is None:
    setup()
else:
    header(current)
    if current["pos"] < len(current["rows"]):
        question()
        st.button("Abandon this quiz", on_click=_quit, icon=":material/close:", key="quiz_quit")
    else:
        results(current)
