"""core.common.runs: the run folder's writers and readers agree, without a trainer or a job in between."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from core.app.jobs import Job
from core.common.labels import CLASSES
from core.common.runs import (
    RunLog,
    check_run_name,
    has_evaluation,
    locate_images,
    mark_unfinished,
    read_config,
    read_events,
    read_predictions,
    read_run,
    read_split,
    read_status,
    write_config,
    write_evaluation,
    write_split,
)
from core.metrics.calibration import softmax


def test_finalize_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 9
    labels = rng.integers(0, len(CLASSES), n)
    images = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i}" for i in range(n)],
            "lesion_id": [f"L{i}" for i in range(n)],
            "path": [f"/data/ISIC_{i}.jpg" for i in range(n)],
            "label": labels,
            "dx": [CLASSES[i] for i in labels],
            "split": "test",
        },
        index=range(100, 100 + n),
    )  # a slice of a larger frame keeps its index
    logits = rng.normal(size=(n, len(CLASSES)))
    probs = softmax(logits, 1.7)
    evaluation = {"temperature": 1.7, "epoch": 3, "test": {"accuracy": 0.5}}
    assert not has_evaluation(tmp_path)

    write_evaluation(tmp_path, evaluation, images, probs, logits)

    assert has_evaluation(tmp_path)
    table, read_labels, read_probs, read_logits, read_eval = read_predictions(tmp_path)
    np.testing.assert_array_equal(read_labels, labels)
    np.testing.assert_allclose(read_probs, probs, rtol=1e-12)
    np.testing.assert_allclose(read_logits, logits, rtol=1e-12)
    assert read_eval == evaluation
    # Images by id only: a path names the computer that trained the run.
    assert list(table.columns) == (
        ["image_id", "label", "dx"] + [f"prob_{c}" for c in CLASSES] + [f"logit_{c}" for c in CLASSES]
    )
    assert table["image_id"].tolist() == images["image_id"].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json", "test_predictions.csv"]


def test_images_are_found_by_id_in_the_configured_dataset(tmp_path, tiny_root):
    """A record's images are looked up in whatever copy of the dataset is configured; a record written before
    ids (a path per image, from another computer) reads the same way."""
    from core.data.dataset import index_dataset

    frame = index_dataset(tiny_root).frame
    ids = [frame["image_id"].iloc[3], "ISIC_0000000", frame["image_id"].iloc[0]]
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(3, len(CLASSES))))
    table = pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"../elsewhere/{i}.jpg" for i in ids],
            "label": 0,
            "dx": CLASSES[0],
            **{f"prob_{c}": probs[:, i] for i, c in enumerate(CLASSES)},
        }
    )
    table.to_csv(tmp_path / "test_predictions.csv", index=False)
    read, *_ = read_predictions(tmp_path)
    assert "path" not in read.columns
    found = locate_images(read["image_id"], frame)
    assert found.iloc[0] == frame["path"].iloc[3] and found.iloc[2] == frame["path"].iloc[0]
    assert pd.isna(found.iloc[1])  # not in this dataset


def test_published_records_name_their_images_by_id_only():
    from tests.app_support import ROOT

    for path in sorted((ROOT / "docs" / "runs").glob("*/test_predictions.csv")):
        table = pd.read_csv(path)
        assert "path" not in table.columns, path
        assert table["image_id"].str.fullmatch(r"ISIC_\d{7}").all(), path


def test_predictions_without_their_columns_are_refused(tmp_path):
    pd.DataFrame({"label": [0, 1]}).to_csv(tmp_path / "test_predictions.csv", index=False)
    with pytest.raises(ValueError, match="lacks prob_akiec"):
        read_predictions(tmp_path)
    with pytest.raises(ValueError, match="no readable test_predictions.csv"):
        read_predictions(tmp_path / "missing")


def test_config_and_split_round_trip(tmp_path):
    config = {"arch": "resnet18", "input_size": [224, 224], "max_images": None}
    assert read_config(tmp_path) == {}
    write_config(tmp_path, config)
    assert read_config(tmp_path) == config
    frame = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "lesion_id": ["l1", "l1", "l2"],
            "dx": ["nv", "nv", "mel"],
            "split": ["train", "train", "test"],
            "path": ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"],
        }
    )
    write_split(tmp_path, frame)
    pd.testing.assert_frame_equal(read_split(tmp_path), frame[["image_id", "lesion_id", "dx", "split"]])


def test_mark_unfinished_keeps_what_the_trainer_said(tmp_path):
    mark_unfinished(tmp_path, "failed", "no status at all")
    assert read_status(tmp_path)["state"] == "failed"
    RunLog(tmp_path).status("running")
    mark_unfinished(tmp_path, "stopped", "the job was terminated")
    status = read_status(tmp_path)
    assert (status["state"], status["error"]) == ("stopped", "the job was terminated")
    RunLog(tmp_path).status("finished")
    mark_unfinished(tmp_path, "failed", "too late")
    status = read_status(tmp_path)
    assert (status["state"], status["error"]) == ("finished", None)


def test_wall_time_spans_first_start_to_last_end(tmp_path):
    events = [
        {"event": "start", "time": "2025-01-01T10:00:00+00:00"},
        {"event": "end", "status": "stopped", "time": "2025-01-01T10:20:00+00:00"},
        {"event": "start", "time": "2025-01-01T11:00:00+00:00"},
        {"event": "end", "status": "finished", "time": "2025-01-01T11:30:30+00:00"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert read_run(tmp_path).wall_time_s == 90 * 60 + 30
    (tmp_path / "metrics.jsonl").write_text(json.dumps(events[0]) + "\n")
    assert read_run(tmp_path).wall_time_s is None


def test_a_queued_run_of_the_live_job_shows_the_config_it_will_use(tmp_path):
    job = Job(id="j", kind="experiment", runs=["first", "queued"], runs_dir=tmp_path, pid=os.getpid())
    job.config_path("queued").parent.mkdir(parents=True)
    job.config_path("queued").write_text(json.dumps({"arch": "mobilenet_v2", "epochs": 4}))
    run = read_run(tmp_path / "queued", job)
    assert run.state == "queued" and run.config["arch"] == "mobilenet_v2" and run.total_epochs == 4
    # The same folder, once the job's process is gone: nothing was ever written, so nothing is reported running.
    (tmp_path / "queued").mkdir()
    dead = Job(id="j", kind="experiment", runs=["first", "queued"], runs_dir=tmp_path, pid=None)
    assert read_run(tmp_path / "queued", dead).state == "interrupted"
    assert read_run(tmp_path / "queued", job).state == "starting"


def test_truncate_to_epoch_keeps_what_the_checkpoint_holds(tmp_path):
    """The log a trainer killed in epoch 3, after logging epoch 3 but before saving it, then killed again while
    resuming: cut back to epoch 2 it holds each epoch once, the progress up to it, and every start."""
    events = [
        {"event": "start", "first_epoch": 1},
        {"event": "progress", "epoch": 1, "step": 4},
        {"event": "epoch", "epoch": 1},
        {"event": "progress", "epoch": 2, "step": 4},
        {"event": "epoch", "epoch": 2},
        {"event": "progress", "epoch": 3, "step": 4},
        {"event": "epoch", "epoch": 3},
        {"event": "start", "first_epoch": 3},
        {"event": "progress", "epoch": 3, "step": 2},
        {"event": "end", "status": "failed"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "prog')
    log = RunLog(tmp_path)
    log.truncate_to_epoch(2)
    assert read_events(tmp_path / "metrics.jsonl") == events[:5] + [events[7]]
    log.event("epoch", epoch=3)  # the next line starts on a line of its own
    assert [e.get("epoch") for e in read_events(tmp_path / "metrics.jsonl")] == [None, 1, 1, 2, 2, None, 3]
    log.truncate_to_epoch(0)
    assert read_events(tmp_path / "metrics.jsonl") == [events[0], events[7]]
    RunLog(tmp_path / "missing").truncate_to_epoch(1)  # a run that has logged nothing yet: nothing to do
    assert not (tmp_path / "missing").exists()


def test_begin_claims_the_folder_and_clears_what_a_killed_trainer_left(tmp_path):
    (tmp_path / "STOP").touch()
    (tmp_path / ".last.pt.abc123.tmp").touch()
    (tmp_path / "last.pt").write_bytes(b"kept")
    RunLog(tmp_path).begin()
    status = read_status(tmp_path)
    assert (status["state"], status["pid"]) == ("starting", os.getpid())
    assert read_run(tmp_path).state == "starting"  # its process, this one, lives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "status.json"]


@pytest.mark.parametrize("pid", [None, "1", -1, 0])
def test_a_live_state_without_a_usable_pid_reads_as_interrupted(tmp_path, pid):
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "pid": pid}))
    assert read_run(tmp_path).state == "interrupted"


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "x/..", "/abs", "a\\b", ".hidden"])
def test_run_names_stay_inside_the_runs_folder(name):
    with pytest.raises(ValueError, match="not a usable run name"):
        check_run_name(name)
    assert check_run_name("seed-2025.01_b") == "seed-2025.01_b"
