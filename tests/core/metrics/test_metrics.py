"""core.metrics.classification: metrics against hand-computed cases and scikit-learn, calibration;
core.inference.forward: model passes."""

from __future__ import annotations

import inspect
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, classification_report, f1_score, roc_auc_score

from core.common.labels import CLASSES, DISPLAY_NAMES, NUM_CLASSES
from core.inference.forward import predict_logits, predict_probs
from core.metrics import bootstrap, classification
from core.metrics import calibration as metrics_calibration
from core.models.architectures import build_model, train_mode

MEL = CLASSES.index("mel")


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(*heads: tuple[float, ...]) -> np.ndarray:
    """Probability rows whose first entries are given; the rest share what is left equally."""
    out = []
    for head in heads:
        rest = (1.0 - sum(head)) / (NUM_CLASSES - len(head))
        out.append([*head, *([rest] * (NUM_CLASSES - len(head)))])
    return np.array(out)


# Three images: akiec (right), bcc (right), bcc (called akiec).
HAND_LABELS = np.array([0, 1, 1])
HAND_PROBS = rows((0.45, 0.35), (0.1, 0.8), (0.5, 0.3))


def test_hand_computed_three_sample_case():
    m = classification.compute_metrics(HAND_LABELS, HAND_PROBS)
    assert m["n"] == 3
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    akiec, bcc = m["per_class"][0], m["per_class"][1]
    assert (akiec["code"], akiec["name"]) == ("akiec", DISPLAY_NAMES["akiec"])
    assert (akiec["precision"], akiec["recall"], akiec["f1"], akiec["support"]) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert (bcc["precision"], bcc["recall"], bcc["f1"], bcc["support"]) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert [r["support"] for r in m["per_class"][2:]] == [0] * 5
    # Macro over the classes that occur (akiec, bcc); weighted by support 1 and 2.
    assert m["macro"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 2 / 3})
    assert m["weighted"] == pytest.approx({"precision": 2.5 / 3, "recall": 2 / 3, "f1": 2 / 3})
    cm = np.array(m["confusion_matrix"])
    assert cm[0, 0] == 1 and cm[1, 1] == 1 and cm[1, 0] == 1 and cm.sum() == 3
    assert m["confusion_matrix_normalized"][1][:2] == [0.5, 0.5]
    assert m["confusion_matrix_normalized"][4] == [0.0] * NUM_CLASSES  # no melanoma: a row of zeros, not NaN
    # akiec scores: positive 0.45 against negatives 0.1 and 0.5 -> one of two pairs ranked right.
    assert m["roc_auc"]["per_class"]["akiec"] == pytest.approx(0.5)
    assert m["roc_auc"]["per_class"]["bcc"] == pytest.approx(0.5)
    assert m["roc_auc"]["per_class"]["mel"] is None
    assert m["roc_auc"]["macro"] == pytest.approx(0.5)
    assert m["melanoma"]["sensitivity"] is None and m["melanoma"]["specificity"] == 1.0
    # One image per confidence bin: |1 - 0.45|, |1 - 0.8|, |0 - 0.5|.
    assert m["ece"] == pytest.approx((0.55 + 0.2 + 0.5) / 3)
    assert m["nll"] == pytest.approx(-(np.log(0.45) + np.log(0.8) + np.log(0.3)) / 3)
    json.dumps(m, allow_nan=False)


def test_per_class_rows_match_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, NUM_CLASSES, 300)
    probs = metrics_calibration.softmax(rng.normal(size=(300, NUM_CLASSES)) + 2 * np.eye(NUM_CLASSES)[labels])
    preds = probs.argmax(1)
    m = classification.compute_metrics(labels, probs)
    report = classification_report(
        labels, preds, labels=list(range(NUM_CLASSES)), target_names=list(CLASSES), output_dict=True, zero_division=0
    )
    for row in m["per_class"]:
        ref = report[row["code"]]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"], ref["support"])
        )
        assert row["auc"] == pytest.approx(
            roc_auc_score(labels == CLASSES.index(row["code"]), probs[:, CLASSES.index(row["code"])])
        )
    assert m["macro"]["f1"] == pytest.approx(report["macro avg"]["f1-score"])
    assert m["weighted"]["recall"] == pytest.approx(report["weighted avg"]["recall"])
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))


def test_fast_bootstrap_metrics_agree_with_sklearn_even_with_absent_classes():
    rng = np.random.default_rng(2)
    for n_classes in (NUM_CLASSES, 3):
        labels = rng.integers(0, n_classes, 50)
        probs = metrics_calibration.softmax(rng.normal(size=(50, NUM_CLASSES)))
        preds = probs.argmax(1)
        assert classification.accuracy(labels, probs) == pytest.approx(np.mean(labels == preds))
        assert classification.macro_f1(labels, probs) == pytest.approx(
            f1_score(labels, preds, average="macro", zero_division=0)
        )
        weighted = f1_score(labels, preds, average="weighted", zero_division=0)
        assert classification.weighted_f1(labels, probs) == pytest.approx(weighted)
        assert classification.macro_auc(labels, probs) == pytest.approx(
            classification.compute_metrics(labels, probs)["roc_auc"]["macro"]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns when a predicted class is absent from the labels
            expected = balanced_accuracy_score(labels, preds)
        assert classification.balanced_accuracy(labels, probs) == pytest.approx(expected)


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, NUM_CLASSES, 200)
    probs = metrics_calibration.softmax(rng.normal(size=(200, NUM_CLASSES)) + 1.5 * np.eye(NUM_CLASSES)[labels])
    low, high = bootstrap.bootstrap_ci(labels, probs, classification.accuracy, n=300, seed=5)
    assert low < classification.accuracy(labels, probs) < high
    assert high - low < 0.2
    assert (low, high) == bootstrap.bootstrap_ci(labels, probs, classification.accuracy, n=300, seed=5)
    perfect = np.eye(NUM_CLASSES)[labels]
    assert bootstrap.bootstrap_ci(labels, perfect, classification.balanced_accuracy, n=50) == (1.0, 1.0)
    intervals = bootstrap.confidence_intervals(labels, probs, n=100)
    assert set(intervals) == {"accuracy", "balanced_accuracy", "macro_f1"}
    json.dumps(intervals)


def test_lesion_bootstrap_draws_whole_lesions_so_copies_of_an_image_do_not_narrow_the_interval():
    """Five images of each of 150 lesions (here identical, the extreme of near-duplicate views): resampling images
    counts them as 750 independent cases, resampling lesions as the 150 they are."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, NUM_CLASSES, 150)
    probs = metrics_calibration.softmax(rng.normal(size=(150, NUM_CLASSES)) + 1.2 * np.eye(NUM_CLASSES)[labels])
    copies = np.repeat(np.arange(150), 5)
    lesions = [f"HAM_{i}" for i in copies]

    def width(interval: tuple[float, float]) -> float:
        return interval[1] - interval[0]

    acc = classification.accuracy
    once = width(bootstrap.bootstrap_ci(labels, probs, acc, n=400))
    by_image = width(bootstrap.bootstrap_ci(labels[copies], probs[copies], acc, n=400))
    by_lesion = width(bootstrap.bootstrap_ci(labels[copies], probs[copies], acc, n=400, groups=lesions))
    assert by_lesion > 1.7 * by_image
    assert by_lesion == pytest.approx(once, rel=0.25)

    sizes = []

    def size_of_resample(y: np.ndarray, p: np.ndarray) -> float:
        sizes.append(len(y))
        return acc(y, p)

    bootstrap.bootstrap_ci(labels[copies], probs[copies], size_of_resample, n=50, groups=lesions)
    assert set(sizes) == {750}  # 150 lesions drawn, each with its five images
    assert set(bootstrap.confidence_intervals(labels[copies], probs[copies], n=50, groups=lesions)) == set(
        bootstrap.BOOTSTRAP_METRICS
    )
    paired = bootstrap.paired_bootstrap_ci(labels[copies], probs[copies], probs[copies], acc, n=50, groups=lesions)
    assert paired == (0.0, 0.0)
    with pytest.raises(ValueError, match="group ids"):
        bootstrap.bootstrap_ci(labels, probs, acc, n=5, groups=lesions)


def test_temperature_is_one_for_calibrated_and_above_one_for_overconfident_logits():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(3000, NUM_CLASSES))
    probs = metrics_calibration.softmax(logits)
    # Labels drawn from the model's own probabilities: calibrated by construction.
    labels = np.array([rng.choice(NUM_CLASSES, p=p) for p in probs])
    assert metrics_calibration.fit_temperature(labels, logits) == pytest.approx(1.0, abs=0.1)

    overconfident = 3.0 * logits
    t = metrics_calibration.fit_temperature(labels, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    assert metrics_calibration.nll(labels, overconfident, t) < metrics_calibration.nll(labels, overconfident) - 0.1
    assert metrics_calibration.expected_calibration_error(
        labels, metrics_calibration.softmax(overconfident, t)
    ) < metrics_calibration.expected_calibration_error(labels, metrics_calibration.softmax(overconfident))
    # Scaling never changes the predicted class.
    assert (metrics_calibration.softmax(overconfident, t).argmax(1) == overconfident.argmax(1)).all()


def test_softmax_rows_sum_to_one_and_temperature_flattens():
    logits = np.array([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0]])
    p1, p2 = metrics_calibration.softmax(logits), metrics_calibration.softmax(logits, 2.0)
    assert p1.sum() == pytest.approx(1.0) and p2.sum() == pytest.approx(1.0)
    assert p2.max() < p1.max()
    assert metrics_calibration.softmax(logits[0]).shape == (NUM_CLASSES,)


def test_ece_is_zero_for_perfect_calibration():
    # 80 images at confidence 0.8 of which 64 are right; 50 at 0.6 of which 30 are right.
    labels = np.array([0] * 64 + [1] * 16 + [2] * 30 + [3] * 20)
    probs = np.vstack([rows((0.8,))] * 80 + [rows((0.1, 0.1, 0.6))] * 50)
    assert metrics_calibration.expected_calibration_error(labels, probs) == pytest.approx(0.0, abs=1e-12)
    curve = metrics_calibration.reliability_curve(labels, probs, n_bins=10)
    assert sum(b["count"] for b in curve) == 130
    filled = [b for b in curve if b["count"]]
    assert [b["confidence"] for b in filled] == pytest.approx([0.6, 0.8])
    assert [b["accuracy"] for b in filled] == pytest.approx([0.6, 0.8])
    assert all(b["confidence"] is None for b in curve if not b["count"])

    rng = np.random.default_rng(6)
    sampled = metrics_calibration.softmax(rng.normal(scale=2.0, size=(20000, NUM_CLASSES)))
    drawn = np.array([rng.choice(NUM_CLASSES, p=p) for p in sampled])
    assert metrics_calibration.expected_calibration_error(drawn, sampled) < 0.02


def test_operating_point_counts_threshold_as_positive():
    labels = np.array([MEL, MEL, CLASSES.index("nv"), CLASSES.index("nv")])
    probs = np.full((4, NUM_CLASSES), 0.0)
    probs[:, MEL] = [0.6, 0.4, 0.5, 0.1]
    probs[:, CLASSES.index("nv")] = 1.0 - probs[:, MEL]
    op = classification.operating_point(labels, probs, threshold=0.5)
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (1, 1, 1, 1)
    assert op["sensitivity"] == 0.5 and op["specificity"] == 0.5
    strict = classification.operating_point(labels, probs, threshold=0.3)
    assert strict["sensitivity"] == 1.0 and strict["specificity"] == 0.5
    assert classification.compute_metrics(labels, probs, mel_threshold=0.3)["melanoma"] == strict


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_the_operating_point_is_the_highest_threshold_reaching_the_sensitivity(target):
    rng = np.random.default_rng(3)
    labels = rng.choice([MEL, CLASSES.index("nv"), CLASSES.index("bkl")], 300)
    probs = metrics_calibration.softmax(rng.normal(size=(300, NUM_CLASSES)) + 2.0 * np.eye(NUM_CLASSES)[labels])
    threshold = classification.threshold_for_sensitivity(labels, probs, target)
    assert classification.operating_point(labels, probs, threshold)["sensitivity"] >= target
    higher = probs[labels == MEL, MEL][probs[labels == MEL, MEL] > threshold]
    if len(higher):  # the next melanoma score up already misses the target
        assert classification.operating_point(labels, probs, higher.min())["sensitivity"] < target
    no_melanoma = labels != MEL
    assert classification.threshold_for_sensitivity(labels[no_melanoma], probs[no_melanoma], target) is None


def test_the_malignant_rule_scores_the_summed_malignant_probability():
    # A basal cell carcinoma the model is sure of, with no melanoma probability at all: the melanoma rule cannot
    # flag it, the malignant rule (akiec + bcc + mel) does; a lesion split between bcc and akiec is flagged too.
    bcc, akiec, nv = CLASSES.index("bcc"), CLASSES.index("akiec"), CLASSES.index("nv")
    labels = np.array([bcc, akiec, nv, nv])
    probs = np.zeros((4, NUM_CLASSES))
    probs[0, bcc] = 1.0
    probs[1, [bcc, akiec, nv]] = [0.35, 0.35, 0.30]
    probs[2, [MEL, nv]] = [0.2, 0.8]
    probs[3, nv] = 1.0
    rule = classification.MALIGNANT_RULE
    assert set(rule.classes) == {"akiec", "bcc", "mel"}
    np.testing.assert_allclose(rule.score(probs), [1.0, 0.7, 0.2, 0.0])
    op = classification.operating_point(labels, probs, 0.5, rule)
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (2, 0, 0, 2)
    assert classification.operating_point(labels, probs, 0.5)["tp"] == 0  # the melanoma rule: no melanoma here
    assert classification.compute_metrics(labels, probs, malignant_threshold=0.5)["malignant"] == op
    # Chosen for a sensitivity, the threshold is the lowest malignant score it must keep.
    assert classification.threshold_for_sensitivity(labels, probs, 1.0, rule) == pytest.approx(0.7)
    assert classification.threshold_for_sensitivity(labels, probs, 0.5, rule) == pytest.approx(1.0)
    fields = classification.operating_point_fields(labels, probs)
    assert fields == {"malignant_threshold": pytest.approx(0.7)}  # no melanoma: no melanoma threshold


def test_roc_curves_per_class():
    rng = np.random.default_rng(7)
    labels = rng.choice([0, 1, 5], 60)
    probs = metrics_calibration.softmax(rng.normal(size=(60, NUM_CLASSES)))
    curves = classification.roc_curves(labels, probs)
    assert list(curves) == list(CLASSES)
    assert curves["mel"] is None
    nv = curves["nv"]
    assert nv["fpr"][0] == 0.0 and nv["fpr"][-1] == 1.0 and nv["tpr"][-1] == 1.0
    assert nv["auc"] == pytest.approx(roc_auc_score(labels == 5, probs[:, 5]))
    json.dumps(curves, allow_nan=False)


@pytest.mark.parametrize("decimals", [None, 1])
def test_every_auc_is_scikit_learns(decimals):
    """The AUCs (per class, macro, melanoma) equal roc_auc_score's, with ties (scores rounded to one decimal)
    and without, on splits of several sizes."""
    rng = np.random.default_rng(11)
    for n in (5, 40, 600):
        labels = np.concatenate([np.arange(NUM_CLASSES), rng.integers(0, NUM_CLASSES, n)])
        probs = metrics_calibration.softmax(rng.normal(size=(len(labels), NUM_CLASSES)))
        if decimals is not None:
            probs = probs.round(decimals)
        report = classification.compute_metrics(labels, probs)
        for k, code in enumerate(CLASSES):
            expected = roc_auc_score(labels == k, probs[:, k])
            assert report["roc_auc"]["per_class"][code] == pytest.approx(expected, abs=1e-12)
        mel = CLASSES.index("mel")
        assert classification.melanoma_auc(labels, probs) == pytest.approx(roc_auc_score(labels == mel, probs[:, mel]))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        classification.compute_metrics(np.array([0]), np.ones((1, 3)) / 3)
    with pytest.raises(ValueError, match="no samples"):
        classification.compute_metrics(np.array([], dtype=int), np.zeros((0, NUM_CLASSES)))
    with pytest.raises(ValueError, match="class indices"):
        classification.compute_metrics(np.array([7]), np.ones((1, NUM_CLASSES)) / NUM_CLASSES)


def test_predict_logits_and_probs_run_in_eval_mode_and_restore_modes():
    torch.manual_seed(0)
    model = build_model("resnet18", weights="none", finetune="head")
    train_mode(model)  # frozen BatchNorm stays in eval mode while the head trains
    modes = {name: m.training for name, m in model.named_modules()}
    x = torch.randn(5, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)

    logits, labels = predict_logits(model, loader, "cpu")
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    assert logits.shape == (5, NUM_CLASSES) and labels.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    probs, _ = predict_probs(model, loader, "cpu", temperature=2.0)
    np.testing.assert_allclose(probs, metrics_calibration.softmax(expected, 2.0), rtol=1e-4, atol=1e-6)

    tta, _ = predict_probs(model, loader, "cpu", tta=True)
    with torch.no_grad():
        views = [model(v).softmax(1) for v in (x, x.flip(-1), x.flip(-2), x.flip((-2, -1)))]
    np.testing.assert_allclose(tta, torch.stack(views).mean(0).numpy(), rtol=1e-4, atol=1e-6)


def test_the_trainers_call_path_yields_json():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(40, NUM_CLASSES))
    labels = rng.integers(0, NUM_CLASSES, 40)
    t = metrics_calibration.fit_temperature(labels, logits)
    report = classification.compute_metrics(labels, metrics_calibration.softmax(logits, t))
    assert isinstance(t, float)
    assert json.loads(json.dumps(report, allow_nan=False))["per_class"][4]["code"] == "mel"


def test_every_public_function_taking_labels_takes_them_first():
    # scikit-learn's order, (y_true, y_pred): one order for all metrics, so no call can quietly swap them.
    first_parameter = {
        name: next(iter(inspect.signature(fn).parameters))
        for module in (classification, metrics_calibration, bootstrap)
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if fn.__module__ == module.__name__
        and not name.startswith("_")
        and "labels" in inspect.signature(fn).parameters
    }
    assert {
        "nll",
        "fit_temperature",
        "reliability_curve",
        "expected_calibration_error",
        "compute_metrics",
        "operating_point",
        "bootstrap_ci",
        "accuracy",
    } <= set(first_parameter)
    assert first_parameter == dict.fromkeys(first_parameter, "labels")
