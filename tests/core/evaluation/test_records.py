"""core.evaluation.records: what a model's run records measured, and nothing from a damaged record."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from core.common.labels import CLASSES
from core.common.runs import EVALUATE_FILE, write_evaluation
from core.evaluation.records import recorded_operating_point, recorded_test_results
from core.metrics.calibration import softmax
from core.metrics.classification import compute_metrics


def test_a_damaged_evaluate_report_is_not_quoted_and_the_runs_evaluation_still_is(tmp_path):
    labels = np.arange(21) % len(CLASSES)
    probs = softmax(np.random.default_rng(0).normal(size=(21, 7)))
    metrics = compute_metrics(labels, probs, mel_threshold=0.3)
    images = pd.DataFrame(
        {"image_id": [f"i{k}" for k in range(21)], "label": labels, "dx": [CLASSES[k] for k in labels]}
    )
    write_evaluation(tmp_path, {"temperature": 1.0, "test": metrics}, images, probs, np.log(probs))
    inflated = {**metrics, "melanoma": {**metrics["melanoma"], "sensitivity": 3.0}}  # "300 %" on Diagnose
    (tmp_path / EVALUATE_FILE).write_text(json.dumps({"split": "test", "tta": True, "metrics": inflated}))
    model = tmp_path / "best.pt"

    assert recorded_test_results(model, {}, tta=True) == []
    assert recorded_test_results(model, {}, tta=False) == [json.loads(json.dumps(metrics))]
    point = recorded_operating_point(model, {}, 0.3, tta=True)
    assert (point["sensitivity"], point["tta"]) == (metrics["melanoma"]["sensitivity"], False)
