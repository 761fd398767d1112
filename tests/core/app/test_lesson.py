"""core.app.lesson and core.app.estimate: the imbalance lesson's experiments, table, curves and sentences, and the
experiment's time estimate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.app import estimate, lesson
from core.common.labels import CLASSES
from core.common.runs import DAMAGED, MAX_EVENTS_BYTES, list_runs, read_evaluation
from core.metrics.classification import operating_point
from core.training.config import config_with
from core.training.imbalance import STRATEGIES
from core.training.loaders import split_dataset
from tests.app_support import ROOT

PUBLISHED = ROOT / "docs" / "runs"


def published_table():
    [experiment] = lesson.published_experiments(list_runs(PUBLISHED))
    return experiment, lesson.strategy_table({s: read_evaluation(p) for s, p in experiment.evaluated().items()})


def evaluation(
    recall: dict[str, float],
    precision: dict[str, float] | None = None,
    accuracy: float = 0.7,
    balanced: float = 0.5,
    support: dict[str, int] | None = None,
) -> dict:
    """An evaluation.json's test part with the given rates (0.5 for the classes left out)."""
    precision, support = precision or {}, support or {}
    return {
        "test": {
            "accuracy": accuracy,
            "balanced_accuracy": balanced,
            "per_class": [
                {
                    "code": c,
                    "recall": recall.get(c, 0.5),
                    "precision": precision.get(c, 0.5),
                    "support": support.get(c, 10),
                }
                for c in CLASSES
            ],
        }
    }


# ---------------------------------------------------------------------------
# Experiments


def test_published_runs_form_one_experiment_in_registry_order():
    experiment, table = published_table()
    published = [s for s in STRATEGIES if (PUBLISHED / f"compare-mobilenet_v2-{s}").is_dir()]
    assert len(published) >= 2 and list(experiment.runs) == published
    assert "reference-mnv2" not in {p.name for p in experiment.runs.values()}  # another recipe, not a strategy
    assert list(table.index) == published and list(table["label"]) == [STRATEGIES[s].label for s in published]
    assert experiment.title.startswith("published with the model card (mobilenet_v2, 10 epochs, all images")


def test_local_experiments_follow_the_registry_order(tmp_path):
    manifest = {
        "name": "exp",
        "runs": ["exp-focal", "exp-none"],
        "strategies": ["focal", "none"],
        "base": {"arch": "resnet18", "epochs": 3, "max_images": 500},
    }
    [experiment] = lesson.local_experiments([manifest], tmp_path)
    assert experiment.key == "exp" and experiment.title == "exp (resnet18, 3 epochs, at most 500 images)"
    assert experiment.runs == {"none": tmp_path / "exp-none", "focal": tmp_path / "exp-focal"}
    assert list(experiment.runs) == ["none", "focal"]
    assert experiment.evaluated() == {}  # nothing has finished


# ---------------------------------------------------------------------------
# Numbers


def test_table_and_shown_numbers_come_from_the_evaluations():
    experiment, table = published_table()
    shown = lesson.shown_table(table)
    assert list(shown.columns) == list(table["label"])  # strategies across: narrow for any number of classes
    assert list(shown.index) == [
        "accuracy",
        "balanced accuracy",
        *[f"recall · {c}" for c in CLASSES],
        *[f"precision · {c}" for c in CLASSES],
    ]
    for strategy, path in experiment.runs.items():
        test = read_evaluation(path)["test"]
        column = shown[STRATEGIES[strategy].label]
        assert column["balanced accuracy"] == f"{test['balanced_accuracy']:.2f}"
        for row in test["per_class"]:
            assert column[f"recall · {row['code']}"] == f"{row['recall']:.2f}"
            assert column[f"precision · {row['code']}"] == f"{row['precision']:.2f}"


def test_melanoma_curve_is_the_operating_point_at_each_threshold():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), 300)
    probs = rng.dirichlet(np.ones(len(CLASSES)), 300)
    curve = lesson.melanoma_curve(labels, probs)
    assert list(curve["threshold"]) == list(lesson.THRESHOLDS)
    for _, point in curve.iloc[::12].iterrows():
        expected = operating_point(labels, probs, point["threshold"])
        assert point["recall"] == pytest.approx(expected["sensitivity"])
        ppv = np.nan if expected["ppv"] is None else expected["ppv"]  # nothing flagged: no precision
        assert point["precision"] == pytest.approx(ppv, nan_ok=True)
    assert curve["recall"].is_monotonic_decreasing  # a higher threshold flags fewer images
    assert np.isnan(curve["precision"].iloc[-1]) and (probs[:, CLASSES.index("mel")] < 0.98).all()


# ---------------------------------------------------------------------------
# Words


def test_sentences_on_the_published_runs():
    _, table = published_table()
    assert lesson.sentences(table) == [
        "Compared with none (plain cross-entropy), weighted loss raised melanoma recall from 0.29 to 0.49 and cut "
        "its precision from 0.54 to 0.31; nevus recall fell from 0.92 to 0.70.",
        "Balanced accuracy, the mean of the seven recalls, rose from 0.46 to 0.59 with weighted loss, while accuracy "
        "fell from 0.77 to 0.64: 68% of the test images are nevi, and accuracy counts every image the same.",
        "The largest gain in a single class is dermatofibroma (df): its recall rose from 0.00 to 0.62 with weighted "
        "sampler.",
    ]
    # Those are the published runs' own numbers.
    test = {
        s: {c["code"]: c for c in read_evaluation(PUBLISHED / f"compare-mobilenet_v2-{s}")["test"]["per_class"]}
        for s in ("none", "weighted_loss")
    }
    assert [f"{test[s]['mel']['recall']:.2f}" for s in test] == ["0.29", "0.49"]
    assert [f"{test[s]['mel']['precision']:.2f}" for s in test] == ["0.54", "0.31"]
    assert [f"{test[s]['nv']['recall']:.2f}" for s in test] == ["0.92", "0.70"]


def test_sentences_follow_the_direction_of_each_change():
    table = lesson.strategy_table(
        {
            "none": evaluation({"mel": 0.40, "nv": 0.80}, {"mel": 0.30}, accuracy=0.6, balanced=0.5),
            "focal": evaluation({"mel": 0.30, "nv": 0.90, "df": 0.9}, {"mel": 0.60}, accuracy=0.7, balanced=0.52),
        }
    )
    mel, balanced, gain = lesson.sentences(table)
    assert mel == (
        "Compared with none (plain cross-entropy), focal loss lowered melanoma recall from 0.40 to 0.30 "
        "and raised its precision from 0.30 to 0.60; nevus recall rose from 0.80 to 0.90."
    )
    # Nevi are a seventh of these test images: no word on accuracy counting mostly nevi.
    assert balanced == (
        "Balanced accuracy, the mean of the seven recalls, rose from 0.50 to 0.52 with focal loss, "
        "while accuracy rose from 0.60 to 0.70."
    )
    assert (
        gain == "The largest gain in a single class is dermatofibroma (df): its recall rose from 0.50 to 0.90 "
        "with focal loss."
    )


def test_sentences_when_nothing_changes_or_there_is_no_baseline():
    same = evaluation({"mel": 0.3, "nv": 0.9})
    mel, balanced = lesson.sentences(lesson.strategy_table({"none": same, "sampler": same}))
    assert (
        "weighted sampler left melanoma recall at 0.30 and left its precision at 0.50; nevus recall stayed "
        "at 0.90." in mel
    )
    assert "stayed at 0.50 with weighted sampler, while accuracy stayed at 0.70." in balanced
    # Without `none`, the first strategy in the registry's order is the baseline.
    said = lesson.sentences(lesson.strategy_table({"focal": evaluation({"mel": 0.6}), "oversample": same}))
    assert said[0].startswith("Compared with oversample (duplicate minority-class training images")
    assert "focal loss raised melanoma recall from 0.30 to 0.60" in said[0]
    assert lesson.sentences(lesson.strategy_table({"none": same})) == []


# ---------------------------------------------------------------------------
# The time estimate


def test_experiment_images_per_strategy(tiny_root):
    cfg = config_with("seed", data=str(tiny_root), weights="none")
    total, images = estimate.experiment_images(cfg, list(STRATEGIES))
    frame = split_dataset(cfg)
    train = frame[frame["split"] == "train"]
    assert total == len(frame) == 84
    assert images["oversample"] == len(CLASSES) * train["label"].value_counts().max() > len(train)
    assert {s: n for s, n in images.items() if s != "oversample"} == dict.fromkeys(
        [s for s in STRATEGIES if s != "oversample"], len(train)
    )


def test_estimate_adds_start_up_epochs_and_extraction():
    rates = {
        k: estimate.Rate(v, "test")
        for k, v in {
            "startup_s": 10,
            "features_images_per_s": 50,
            "head_images_per_s": 1000,
            "epoch_overhead_s": 0.5,
        }.items()
    }
    guess = estimate.estimate({"none": 1000, "oversample": 3000}, 500, 2, rates)
    assert guess.cached_s == pytest.approx(10 + 2 * (1000 / 1000 + 0.5 + 3000 / 1000 + 0.5))
    assert guess.features_s == pytest.approx(10)
    assert "feature extraction 50 images/s (test)" in guess.basis()
    assert estimate.estimate({"none": 1000}, 500, 2, {k: v for k, v in rates.items() if k != "startup_s"}) is None


def write_run(folder: Path, arch: str, epochs: list[tuple[float, float]], wall_s: int, feature_steps=()) -> None:
    """A finished cached head-only run's files: ``epochs`` as (images/s, seconds), ``feature_steps`` as
    (seconds after the start, images done) progress lines of its feature phase."""
    folder.mkdir(parents=True)
    cfg = config_with("seed", arch=arch, name=folder.name).to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "status.json").write_text(json.dumps({"state": "finished"}))
    at = lambda s: f"2026-01-01T00:{s // 60:02d}:{s % 60:02d}+00:00"  # noqa: E731
    lines = [
        {"event": "progress", "time": at(s), "epoch": 0, "done": n, "total": 1000, "phase": "features"}
        for s, n in feature_steps
    ]
    lines.append({"event": "start", "time": at(100), "epochs": len(epochs)})
    lines += [
        {"event": "epoch", "time": at(100), "epoch": i + 1, "images_per_s": r, "seconds": s}
        for i, (r, s) in enumerate(epochs)
    ]
    lines.append({"event": "end", "time": at(100 + wall_s), "status": "finished"})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_a_run_whose_log_is_past_its_bound_is_skipped_not_read(tmp_path):
    write_run(tmp_path / "a", "mobilenet_v2", [(1000.0, 2.0)], wall_s=10, feature_steps=[(0, 0), (20, 1000)])
    write_run(tmp_path / "b", "mobilenet_v2", [(1000.0, 2.0)], wall_s=10, feature_steps=[(0, 0), (20, 500)])
    with open(tmp_path / "b" / "metrics.jsonl", "r+b") as fh:  # sparse: read_events refuses it from its size
        fh.truncate(MAX_EVENTS_BYTES + 1)
    runs = list_runs(tmp_path)
    assert {r.name: r.state for r in runs}["b"] == DAMAGED
    rates = estimate.recorded_rates(runs, config_with("seed", arch="mobilenet_v2"))
    assert rates["features_images_per_s"].value == pytest.approx(1000 / 20)


def test_recorded_rates_come_from_matching_runs_and_fall_back_on_the_benchmark(tmp_path):
    write_run(
        tmp_path / "a", "mobilenet_v2", [(1000.0, 2.0), (3000.0, 2.0)], wall_s=10, feature_steps=[(0, 0), (20, 1000)]
    )
    write_run(tmp_path / "b", "resnet18", [(10.0, 100.0)], wall_s=200)  # another backbone: not counted
    cfg = config_with("seed", arch="mobilenet_v2")
    rates = estimate.recorded_rates(list_runs(tmp_path), cfg)
    assert rates["head_images_per_s"].value == pytest.approx((2000 + 6000) / 4)
    assert rates["epoch_overhead_s"].value == pytest.approx((10 - 4) / 2)
    assert rates["features_images_per_s"].value == pytest.approx(1000 / 20)
    assert "1 earlier cached head-only mobilenet_v2 run here" == rates["head_images_per_s"].basis
    assert "startup_s" not in rates

    bench = tmp_path / "BENCHMARKS.json"
    bench.write_text(
        json.dumps(
            {
                "experiment": {
                    "date": "2026-01-02",
                    "arch": "mobilenet_v2",
                    "input_size": [224, 224],
                    "startup_s": 9.0,
                    "head_images_per_s": 5.0,
                }
            }
        )
    )
    fallback = estimate.benchmark_rates(bench)
    assert {k: r.value for k, r in fallback.items()} == {"startup_s": 9.0, "head_images_per_s": 5.0}
    assert fallback["startup_s"].basis == "bench/experiment.py on 2026-01-02, mobilenet_v2 at 224×224"
    merged = {**fallback, **rates}  # as the Compare page merges them: this machine's own records win
    assert merged["head_images_per_s"].value == 2000 and merged["startup_s"].value == 9.0
    assert estimate.benchmark_rates(tmp_path / "missing.json") == {}


def test_time_left_follows_the_speed_measured_here_not_the_benchmark(tmp_path):
    """Compare said 3 min 39 s from an idle benchmark and the experiment took 27 min on a busy machine: once it runs,
    the time left comes from the speed its own runs measure here, from the first seconds on."""
    from core.common.runs import RunState

    cfg = config_with("seed", arch="mobilenet_v2", epochs=2)
    fast = {
        k: estimate.Rate(v, "bench/experiment.py")
        for k, v in {"features_images_per_s": 100, "head_images_per_s": 1000, "epoch_overhead_s": 1.0}.items()
    }
    images = {"none": 800, "oversample": 2400}
    now = 1_000_000.0
    # The first run's features, 10 s in: 50 of 1000 images (5 images/s here, where the benchmark said 100).
    extracting = RunState(
        "exp-none",
        tmp_path / "exp-none",
        "running",
        config=cfg.to_dict(),
        progress={"phase": "features", "done": 50, "total": 1000, "started": now - 10},
    )
    runs = [("none", extracting), ("oversample", None)]
    left = estimate.time_left(runs, images, 1000, cfg, fast, now=now)
    head = 2 * (800 / 1000 + 1.0) + 2 * (2400 / 1000 + 1.0)  # the head's epochs, at the benchmark's rates so far
    assert left.seconds == pytest.approx(950 / 5 + head)
    assert "feature extraction 5 images/s (this experiment's features so far)" in left.basis()
    # Then its first epoch, running at 100 images/s where the benchmark said 1000: the queued run follows it.
    training = RunState(
        "exp-none",
        tmp_path / "exp-none",
        "running",
        config=cfg.to_dict(),
        progress={"epoch": 1, "step": 10, "steps": 50, "images_per_s": 100.0, "eta_s": 6.4},
    )
    left = estimate.time_left([("none", training), ("oversample", None)], images, 1000, cfg, fast, now=now)
    own = training.eta_s()
    assert left.seconds == pytest.approx(own + 2 * (2400 / 100 + 1.0))
    assert "head training 100 images/s (exp-none's epoch so far)" in left.basis()
    finished = RunState("exp-none", tmp_path / "exp-none", "finished", config=cfg.to_dict())
    assert estimate.time_left([("none", finished)], images, 1000, cfg, fast, now=now).seconds == 0


def test_the_estimate_before_the_click_says_when_the_machine_is_busy(monkeypatch):
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (6.5, 6.0, 5.0))
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 2)
    assert estimate.load_note().startswith("This computer is busy now (load 6.5 on 2 cores)")
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert "busy" not in estimate.load_note() and "estimated again from the speed measured here" in estimate.load_note()
