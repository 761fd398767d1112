"""Similar cases, the unfamiliar-image warning and the report, with the bundled model on real images."""

from __future__ import annotations

import dataclasses
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.app.referral import referral_views
from core.app.report import model_info, report_html
from core.common.labels import CLASSES, DISPLAY_NAMES
from core.common.schema import SchemaError
from core.data.dataset import index_dataset
from core.data.preprocessing import load_for_model
from core.data.splits import model_split, split_column
from core.inference.opening import open_predictor
from core.inference.predictor import Predictor
from core.inference.similar import (
    REFERENCE_SPLITS,
    build_index,
    disagreement_text,
    knn_vote,
    neighbours_disagree,
    vote,
)
from core.inference.unfamiliar import (
    SIGNALS,
    UnfamiliarDetector,
    dermoscopy_check,
    detector_path,
    file_digest,
    fit_detector,
    load_detector,
)
from tests.app_support import ROOT

SAMPLE = ROOT / "sample_data" / "ham10000-sample"
REFERENCE = ROOT / "checkpoints" / "reference.pt"
UNFAMILIAR = ROOT / "tests" / "data" / "unfamiliar"
PUBLISHED = [ROOT / "docs" / "runs"]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return open_predictor(REFERENCE)


@pytest.fixture(scope="module")
def sample_cases(predictor, tmp_path_factory):
    index = index_dataset(SAMPLE)
    record = model_split(REFERENCE, predictor.checkpoint, index.frame, PUBLISHED)
    split = split_column(index.frame, record.split_of)
    return build_index(REFERENCE, index.frame, split, cache_dir=tmp_path_factory.mktemp("features"))


def test_index_is_built_once_and_rebuilt_for_a_changed_image(predictor, tmp_path):
    data = shutil.copytree(SAMPLE, tmp_path / "sample")
    index = index_dataset(data)
    split = split_column(index.frame, model_split(REFERENCE, predictor.checkpoint, index.frame, PUBLISHED).split_of)
    calls: list[list[tuple[int, int]]] = []
    for _ in range(2):
        calls.append([])
        cases = build_index(
            REFERENCE, index.frame, split, cache_dir=tmp_path / "cache", progress=lambda d, n: calls[-1].append((d, n))
        )
    assert calls[0][-1] == (140, 140) and len(calls[0]) > 1
    assert calls[1] == [(140, 140)]  # everything from the cache
    assert cases.features.shape == (140, 1280)
    # The reference model's split record holds the whole sample out: 126 test and 14 val images.
    assert cases.frame["split"].value_counts().to_dict() == {"test": 126, "val": 14}
    changed = Path(index.frame["path"].iloc[0])
    changed.write_bytes(changed.read_bytes())  # a new modification time: computed again, alone
    calls.append([])
    build_index(
        REFERENCE, index.frame, split, cache_dir=tmp_path / "cache", progress=lambda d, n: calls[-1].append((d, n))
    )
    assert calls[-1] == [(1, 1)]


def test_nearest_cases_leave_test_images_out(predictor, sample_cases):
    test_row = sample_cases.frame.index[sample_cases.frame["split"] == "test"][0]
    image = sample_cases.frame.loc[test_row]
    embedding = predictor.embed(predictor.predict(image["path"], upload=False))
    everything = sample_cases.nearest(embedding, 8, splits=None)
    # Searching all images, a dataset image finds itself first.
    assert everything[0].image_id == image["image_id"] and everything[0].similarity > 0.99
    offered = sample_cases.nearest(embedding, 8)
    assert len(offered) == 8 and all(c.split in REFERENCE_SPLITS for c in offered)
    assert [c.similarity for c in offered] == sorted((c.similarity for c in offered), reverse=True)
    assert all(
        c.confirmed_by in ("histopathology", "expert consensus", "in-vivo confocal microscopy")
        or c.confirmed_by.startswith("follow-up")
        for c in offered
    )
    by_class = sample_cases.nearest_by_class(embedding, splits=None)
    assert list(by_class) == list(CLASSES) and all(case.dx == code for code, case in by_class.items())
    assert abs(vote(offered).sum() - 1) < 1e-9


def test_neighbours_disagree_when_their_most_common_diagnosis_is_another(sample_cases):
    cases = [
        dataclasses.replace(c, dx=dx)
        for c, dx in zip(
            sample_cases.nearest(sample_cases.features[0], 8, splits=None), ["mel"] * 5 + ["nv"] * 3, strict=True
        )
    ]
    mel, nv = CLASSES.index("mel"), CLASSES.index("nv")
    assert neighbours_disagree(vote(cases), nv)[0] and not neighbours_disagree(vote(cases), mel)[0]
    text = disagreement_text("nv", cases)
    assert text.startswith(
        "Its 8 nearest confirmed cases disagree with it: 5 Melanoma (mel), 3 Melanocytic nevus (nv)."
    )
    assert disagreement_text("mel", cases) is None and disagreement_text("nv", []) is None
    # A tie that includes the answer agrees; one row per query for a batch of votes.
    tied = np.zeros((2, len(CLASSES)))
    tied[:, [mel, nv]] = 0.5
    assert not neighbours_disagree(tied, np.array([mel, nv])).any()
    assert neighbours_disagree(tied, CLASSES.index("bcc")).all()


def test_knn_vote_with_itself_as_reference_is_its_own_label(sample_cases):
    labels = sample_cases.frame["dx"].map(CLASSES.index).to_numpy()
    shares = knn_vote(sample_cases.features, labels, sample_cases.features, k=1)
    assert np.allclose(shares.sum(axis=1), 1)
    assert (shares.argmax(axis=1) == labels).all()


@pytest.fixture(scope="module")
def fitted(predictor, sample_cases):
    """A detector fitted as bench/similar.py fits one, on the sample: 70 of its images as the training reference,
    the other 70 as validation dermoscopy, against every third picture of tests/data/unfamiliar/fit."""
    feats = sample_cases.features
    images = [dermoscopy_check(load_for_model(p, predictor.prep)) for p in sample_cases.frame["path"]]
    pictures = sorted((UNFAMILIAR / "fit").glob("*.jpg"))[::3]
    uploads = [predictor.predict(p) for p in pictures]
    other = np.stack([predictor.embed(u) for u in uploads])
    detector = fit_detector(
        feats[:70], feats[70:], images[70:], other, [dermoscopy_check(u.image) for u in uploads], k=5, false_alarm=0.1
    )
    return detector, feats[70:], images[70:]


def test_detector_threshold_is_the_validation_quantile_and_is_saved_per_checkpoint(fitted, tmp_path):
    detector, val, val_images = fitted
    # The threshold is the out-of-fold quantile: the fitted regression scores its own validation images a little
    # lower, so at most about the target share of them is above it.
    assert np.mean(detector.image_scores(val, val_images) > detector.threshold) <= 0.1 + 1 / len(val)
    assert 0 < detector.threshold < 1
    copy = shutil.copy(REFERENCE, tmp_path / "model.pt")
    detector.save(detector_path(copy))
    assert load_detector(copy) is None  # fitted for another file
    detector.checkpoint_sha1 = file_digest(copy)
    detector.save(detector_path(copy))
    loaded = load_detector(copy)
    assert loaded is not None and loaded.k == 5 and loaded.threshold == detector.threshold
    # The reference features are stored as float16.
    assert np.allclose(
        loaded.image_scores(val[:3], val_images[:3]), detector.image_scores(val[:3], val_images[:3]), atol=1e-3
    )


def damaged(fields: dict) -> dict[str, dict]:
    """A saved detector's fields, and ways of damaging them (each a field set to a wrong value, or None to drop it)."""
    n = len(SIGNALS)
    return {
        "weights is missing": {"weights": None},
        "'extra' is not a field of": {"extra": np.zeros(3)},
        "centre holds a value that is not a finite number": {"centre": np.r_[np.nan, fields["centre"][1:]]},
        "weights must hold": {"weights": np.zeros(n)},
        "fitted on other signals": {"signals": np.array(SIGNALS[:-1] + ("sharpness",))},
        "scale must be positive": {"scale": np.r_[0.0, fields["scale"][1:]]},
        "threshold must be a probability": {"threshold": 1.5},
        "k is 100 but reference holds": {"k": 100},
        "reference must be a 2-dimensional array": {"reference": fields["reference"][0]},
        "not a NumPy archive": {"checkpoint_sha1": np.array([{"a": 1}], dtype=object)},
    }


def test_a_damaged_detector_file_is_refused_by_name_and_the_colour_check_takes_over(fitted, tmp_path):
    detector = fitted[0]
    model = Path(shutil.copy(REFERENCE, tmp_path / "model.pt"))
    detector.checkpoint_sha1 = file_digest(model)
    path = detector_path(model)
    detector.save(path)
    assert load_detector(model) is not None
    with np.load(path) as blob:
        fields = {key: blob[key] for key in blob.files}
    for message, change in damaged(fields).items():
        changed = {key: value for key, value in {**fields, **change}.items() if value is not None}
        with open(path, "wb") as fh:  # np.savez with an object array: only a pickle-allowing reader would take it
            np.savez(fh, **changed)
        with pytest.raises(SchemaError, match=re.escape(message)):
            UnfamiliarDetector.load(path)
        assert load_detector(model) is None
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(SchemaError, match="not a NumPy archive"):
        UnfamiliarDetector.load(path)
    # The app then says the check is the colour heuristic alone.
    predictor = open_predictor(model)
    check = predictor.unfamiliar(predictor.predict(UNFAMILIAR / "held-out" / "document-skimage_text-0.jpg"))
    assert predictor.detector is None and not check.measured and check.unfamiliar


# Held-out pictures of the kinds issue 24 found missed (never fitted on): a camera-man and a clock in grey, text,
# cells, the moon, a fundus photograph, a colour wheel, and the temple by a lake that was called a nevus.
MISSED_BEFORE = [
    "grey-camera-0",
    "grey-clock-0",
    "document-skimage_text-0",
    "cells-skimage_cell-0",
    "astronomy-skimage_moon-0",
    "fundus-skimage_retina-0",
    "colour-skimage_color-0",
    "landscape-china-0",
]


def test_bundled_detector_flags_the_kinds_it_missed_and_rarely_real_dermoscopy(predictor, sample_cases):
    assert predictor.detector is not None, "checkpoints/reference.unfamiliar.npz is refused or fitted for another file"
    for name in MISSED_BEFORE:
        check = predictor.unfamiliar(predictor.predict(UNFAMILIAR / "held-out" / f"{name}.jpg"))
        assert check.unfamiliar and check.measured, (name, check.score, check.threshold)
        assert check.reasons[0].startswith(f"its unfamiliar-image score is {check.score:.2f}")
        assert len(check.reasons) >= 2  # the signals that weighed most are named
    # Real dermoscopy: the bundled sample (HAM10000 images the model never trained on) uploaded as a user would.
    false_alarms = [
        Path(p).name for p in sample_cases.frame["path"] if predictor.unfamiliar(predictor.predict(p)).unfamiliar
    ]
    assert len(false_alarms) <= 0.015 * len(sample_cases.frame), false_alarms


def sample_report(predictor, sample_cases, **parts) -> tuple[object, str]:
    """The first sample image's prediction and its report by the reference model (dated 2026-01-02 03:04), with
    ``parts`` (its cases, warnings, …)."""
    prediction = predictor.predict(sample_cases.frame["path"].iloc[0], upload=False)
    model = model_info(REFERENCE, predictor.checkpoint, predictor.arch)
    return prediction, report_html(prediction, model=model, created=datetime(2026, 1, 2, 3, 4, tzinfo=UTC), **parts)


def test_report_holds_the_prediction_cases_and_model(predictor, sample_cases):
    prediction, _ = sample_report(predictor, sample_cases)
    embedding = predictor.embed(prediction)
    views = referral_views(predictor.referrals, prediction, REFERENCE, predictor.checkpoint)
    _, html = sample_report(
        predictor,
        sample_cases,
        warnings=["Low confidence: a test warning"],
        cases=sample_cases.nearest(embedding, 8, splits=None),
        cases_by_class=sample_cases.nearest_by_class(embedding, splits=None),
        referrals=views,
    )
    assert report_probabilities(html) == [(code, f"{prediction.probabilities[code]:.1%}") for code in CLASSES]
    assert "For research and education only" in html and "2026-01-02 03:04" in html
    assert "Low confidence: a test warning" in html
    assert "Measured on its test split" in html and "balanced accuracy" in html
    # Each referral rule's verdict, in the page's words.
    assert [v.label for v in views] == ["P(malignant)", "P(melanoma)"] and all(v.verdict in html for v in views)
    assert html.count("data:image/jpeg;base64,") == 1 + 8 + 7  # the upload, the cases, one per class
    assert 'src="http' not in html and "href=" not in html  # self-contained


def test_a_report_of_an_image_not_assessed_says_why_and_names_no_class(predictor, sample_cases):
    prediction, _ = sample_report(predictor, sample_cases)
    why = "This does not look like a dermoscopic image: it is almost colourless (100% grey pixels)."
    _, html = sample_report(
        predictor,
        sample_cases,
        heatmap=prediction.image,
        heatmap_label=f"Grad-CAM for {prediction.top_class}",
        cases=sample_cases.nearest(predictor.embed(prediction), 8, splits=None),
        referrals=referral_views(predictor.referrals, prediction, REFERENCE, predictor.checkpoint),
        not_assessed=why,
    )
    assert "<h2>Not assessed</h2>" in html and f"This image was not assessed.</b> {why}" in html
    assert "Most likely" not in html and "P(melanoma)" not in html and "Similar confirmed cases" not in html
    assert "Grad-CAM for" not in html and html.count("data:image/jpeg;base64,") == 1  # the upload alone
    assert not [name for name in DISPLAY_NAMES.values() if name in html]
    assert "For research and education only" in html and "Measured on its test split" in html


def test_report_escapes_what_it_quotes(predictor, sample_cases):
    # A file name, a warning, a heatmap label or a case id is text in the report, never markup.
    evil = "<script>alert(1)</script>"
    prediction, _ = sample_report(predictor, sample_cases)
    case = dataclasses.replace(sample_cases.nearest(predictor.embed(prediction), 1, splits=None)[0], image_id=evil)
    _, html = sample_report(
        predictor,
        sample_cases,
        heatmap=prediction.image,
        heatmap_label=f"heatmap {evil}",
        warnings=[f"warning {evil}"],
        cases=[case],
        source_name=f"{evil}.jpg",
    )
    assert "<script" not in html and evil not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for shown in (f"{escaped}.jpg", f"heatmap {escaped}", f"warning {escaped}", f'alt="{escaped}"'):
        assert shown in html, shown
    assert html.count(escaped) == 5  # file name, heatmap label, warning, the case's alt text and caption


def test_report_quotes_only_a_run_records_valid_figures(predictor, sample_cases):
    # The run record is a file: a size that is not a count and figures that are not rates are left out, not quoted
    # (a text accuracy stopped the report with a ValueError) and never markup.
    prediction = predictor.predict(sample_cases.frame["path"].iloc[0], upload=False)
    recorded = model_info(REFERENCE, predictor.checkpoint, predictor.arch)
    hostile = {**recorded.test, "n": "<b>9999</b>", "accuracy": "high", "balanced_accuracy": 7.5}
    html = report_html(
        prediction, model=dataclasses.replace(recorded, test=hostile), created=datetime(2026, 1, 2, tzinfo=UTC)
    )
    assert "9999" not in html  # neither as markup nor as text
    assert "Measured on its test split, " in html and "melanoma ROC AUC" in html
    assert "accuracy high" not in html and "balanced accuracy" not in html and "750" not in html
    valid = report_html(prediction, model=recorded, created=datetime(2026, 1, 2, tzinfo=UTC))
    assert f"({recorded.test['n']} images)" in valid and f"accuracy {recorded.test['accuracy']:.1%}" in valid


def wrong_width(blob: dict) -> dict:
    return {**blob, "features": blob["features"][:, :100]}


def with_nan(blob: dict) -> dict:
    features = blob["features"].clone()
    features[0, 0] = float("nan")
    return {**blob, "features": features}


def as_half(blob: dict) -> dict:
    return {**blob, "features": blob["features"].half()}


def missing_rows(blob: dict) -> dict:
    return {**blob, "features": blob["features"][:-1]}


def other_model(blob: dict) -> dict:
    return {**blob, "key": "0123456789abcdef"}


def with_a_bomb(blob: dict) -> dict:
    return {**blob, "blob": bytearray(16)}


@pytest.mark.parametrize("damage", [wrong_width, with_nan, as_half, missing_rows, other_model, with_a_bomb])
def test_a_feature_cache_that_does_not_match_is_rebuilt_with_progress(predictor, tmp_path, damage):
    # A features file of another width made every Diagnose upload raise, NaN features gave "similarity nan".
    index = index_dataset(SAMPLE)
    frame = index.frame.iloc[:6]
    split = pd.Series(["train"] * len(frame), index=frame.index)
    built = build_index(REFERENCE, frame, split, cache_dir=tmp_path)
    (file,) = tmp_path.glob("*.pt")
    torch.save(damage(torch.load(file, weights_only=True)), file)
    heard: list[tuple[int, int]] = []
    rebuilt = build_index(REFERENCE, frame, split, cache_dir=tmp_path, progress=lambda *p: heard.append(p))
    assert heard and heard[-1] == (len(frame), len(frame))
    assert np.allclose(rebuilt.features, built.features, atol=1e-5)
    rewritten = torch.load(file, weights_only=True)  # computed again and written whole
    assert set(rewritten) == {"key", "keys", "features"} and rewritten["features"].shape == built.features.shape
    embedded = predictor.embed(predictor.predict(frame["path"].iloc[0], upload=False))
    assert all(np.isfinite(case.similarity) for case in rebuilt.nearest(embedded, 3, splits=None))
    heard.clear()
    build_index(REFERENCE, frame, split, cache_dir=tmp_path, progress=lambda *p: heard.append(p))
    assert heard == [(len(frame), len(frame))]  # the rewritten cache is read whole: nothing computed


def report_probabilities(html: str) -> list[tuple[str, str]]:
    """(code, probability) of the report's class table rows, in their order."""
    rows = re.findall(r"<tr><td>(\w+)</td><td>([^<]+)</td><td>\w+</td><td class=\"p\">([\d.]+%)</td></tr>", html)
    assert [name for _, name, _ in rows] == [DISPLAY_NAMES[c] for c in CLASSES]
    return [(code, p) for code, _, p in rows]
