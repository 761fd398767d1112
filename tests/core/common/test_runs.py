"""core.common.runs: the run folder's writers and readers agree, without a trainer or a job in between."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.app.jobs import Job
from core.common.labels import CLASSES
from core.common.runs import (
    DAMAGED,
    EVALUATE_FILE,
    MAX_EVENTS_BYTES,
    RunLog,
    check_run_name,
    has_evaluation,
    list_runs,
    locate_images,
    mark_unfinished,
    read_config,
    read_dataset_report,
    read_evaluate_report,
    read_evaluation,
    read_events,
    read_predictions,
    read_run,
    read_split,
    read_status,
    write_config,
    write_dataset_report,
    write_evaluation,
    write_split,
    write_status,
)
from core.common.schema import SchemaError
from core.metrics.calibration import softmax
from core.metrics.classification import compute_metrics


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
    evaluation = {"temperature": 1.7, "epoch": 3, "test": compute_metrics(labels, probs)}
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
    events = [{**e, "time": "2026-01-01T00:00:00+00:00"} for e in events]
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


def test_a_live_state_without_a_pid_reads_as_interrupted(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "pid": None}))
    assert read_run(tmp_path).state == "interrupted"


@pytest.mark.parametrize("pid", ["1", -1, 0, 2.5, True])
def test_a_live_state_naming_no_process_reads_as_damaged_never_as_live(tmp_path, pid):
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "pid": pid}))
    run = read_run(tmp_path)
    assert (run.state, run.done) == (DAMAGED, True)
    assert run.error.startswith("status.json is not a run's status: pid must be empty or a whole number from 1")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "x/..", "/abs", "a\\b", ".hidden"])
def test_run_names_stay_inside_the_runs_folder(name):
    with pytest.raises(ValueError, match="not a usable run name"):
        check_run_name(name)
    assert check_run_name("seed-2025.01_b") == "seed-2025.01_b"


# ---------------------------------------------------------------------------
# The malformed-input corpus of the run folder's JSON files: each is refused by its declared schema with one message
# naming the file and the field, and the run is listed as damaged with that reason. Before the schemas, each of these
# either raised out of read_run or read_evaluation (a traceback on Home, Train, Evaluate or Compare) or was shown as it
# was (an accuracy of 5.0, a run "running" for a process of pid "1").


def _metrics(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.arange(40) % len(CLASSES)
    return compute_metrics(labels, softmax(rng.normal(size=(40, len(CLASSES)))), mel_threshold=0.3)


def _sound_run(run_dir) -> dict:
    """A run folder as a finished trainer leaves its JSON records; the valid records, to be damaged one at a time."""
    records = {
        "config.json": {"name": run_dir.name, "data": "/data/ham", "arch": "resnet18", "epochs": 3, "split_seed": 0},
        "evaluation.json": {
            "temperature": 1.3,
            "mel_threshold": 0.3,
            "epoch": 2,
            "test": _metrics(0),
            "val": _metrics(1),
            "members": [{"run": "a", "val": _metrics(2), "test": _metrics(3)}],
        },
        EVALUATE_FILE: {"split": "test", "tta": True, "metrics": _metrics(4), "predictions": [{"image_id": "x"}]},
    }
    for name, content in records.items():
        (run_dir / name).write_text(json.dumps(content))
    write_status(run_dir, "finished")
    records["status.json"] = json.loads((run_dir / "status.json").read_text())
    return records


def _with(path: str, value):
    """A record with ``value`` at the dotted ``path`` (list indices as numbers)."""

    def damage(record):
        record = json.loads(json.dumps(record))
        *parents, last = path.split(".")
        target = record
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value
        return record

    return damage


def _text(content: str | bytes):
    return lambda record: content


DEEP = "[" * 30_000 + "]" * 30_000  # 60 KB that json.loads cannot parse (RecursionError, which read_json let through)
RUN_FILE_CORPUS = {
    # config.json
    "config not JSON": ("config.json", _text("{"), "config.json is not a run's config (not JSON)"),
    "config not UTF-8": ("config.json", _text(b"\xff\xfe{}"), "(not JSON)"),
    "config a list": ("config.json", _text("[1, 2]"), "config must be a dict; got list"),
    "config nested past the parser": ("config.json", _text(DEEP), "nests deeper than 3 levels"),
    "config nested 4 deep": ("config.json", _with("extra", {"a": {"b": [1]}}), "it nests deeper than 3 levels"),
    "config of 5,000 values": ("config.json", _with("extra", list(range(5000))), "holds more than 2,000 values"),
    "config over 64 KiB": ("config.json", _with("extra", "a" * 70_000), "larger than a run's config can be (64.0 KiB"),
    "epochs as text": (
        "config.json",
        _with("epochs", "many"),
        "config.epochs must be a whole number from 1; got 'many'",
    ),
    "no epochs": ("config.json", _with("epochs", 0), "config.epochs must be a whole number from 1; got 0"),
    "name a number": ("config.json", _with("name", 5), "config.name must be a run folder's name; got 5"),
    "name a path": ("config.json", _with("name", "../escape"), "config.name must be a run folder's name"),
    "data a number": ("config.json", _with("data", 5), "config.data must be text; got int"),
    "split seed past scikit-learn": ("config.json", _with("split_seed", 2**40), "config.split_seed must be a whole"),
    "fractions not summing to 1": ("config.json", _with("split_fractions", [1, 1, 0]), "config.split_fractions must"),
    "NaN fractions": ("config.json", _text('{"split_fractions": [NaN, 0.5, 0.5]}'), "config.split_fractions must"),
    "negative max_images": ("config.json", _with("max_images", -5), "config.max_images must be empty or a whole"),
    # status.json
    "state a list": ("status.json", _with("state", ["finished"]), "state must be one of starting, running, finished"),
    "state unknown": ("status.json", _with("state", "exploded"), "state must be one of"),
    "no state": ("status.json", _text("{}"), "status.json is not a run's status: state is missing"),
    "error a number": ("status.json", _with("error", 5), "error must be empty or text; got int"),
    "status field unknown": ("status.json", _with("extra", 1), "'extra' is not a field of a run's status"),
    "status nested": ("status.json", _with("error", [["deep"]]), "it nests deeper than 2 levels"),
    "status over 256 KiB": ("status.json", _with("error", "x" * 300_000), "(256.0 KiB at most)"),
    # evaluation.json
    "accuracy as text": ("evaluation.json", _with("test.accuracy", "high"), "test.accuracy must be a probability"),
    "accuracy of 5": (
        "evaluation.json",
        _with("test.accuracy", 5.0),
        "test.accuracy must be a probability from 0 to 1",
    ),
    "NaN balanced accuracy": ("evaluation.json", _with("test.balanced_accuracy", float("nan")), "got nan"),
    "ECE below 0": ("evaluation.json", _with("val.ece", -0.1), "val.ece must be a probability"),
    "recall of 2": ("evaluation.json", _with("test.per_class.4.recall", 2), "test.per_class[].recall must be"),
    "classes reordered": (
        "evaluation.json",
        _with("test.classes", ["mel", "nv"]),
        "test.classes are in the order",
    ),
    "rows reordered": ("evaluation.json", _with("test.per_class.0.code", "nv"), "test.per_class must follow"),
    "one-cell matrix": (
        "evaluation.json",
        _with("test.confusion_matrix", [[1]]),
        "confusion_matrix must be a list of 7",
    ),
    "matrix and n disagree": ("evaluation.json", _with("test.n", 400), "confusion matrix holds 40 images"),
    "negative count": ("evaluation.json", _with("test.melanoma.tp", -3), "test.melanoma.tp must be a whole number"),
    "no test": ("evaluation.json", _with("test", None), "test must be a dict; got NoneType"),
    "test a list": ("evaluation.json", _with("test", [1]), "test must be a dict; got list"),
    "evaluation a list": ("evaluation.json", _text("[1]"), "it holds a list, not an object of fields"),
    "temperature 1e-30": ("evaluation.json", _with("temperature", 1e-30), "temperature must be a finite number from"),
    "NaN temperature": ("evaluation.json", _with("temperature", float("nan")), "temperature must be a finite number"),
    "threshold below 0": ("evaluation.json", _with("mel_threshold", -1), "mel_threshold must be a probability"),
    "bad member": ("evaluation.json", _with("members.0.test.accuracy", 9), "members[].test.accuracy must be"),
    "evaluation field unknown": ("evaluation.json", _with("blob", 1), "'blob' is not a field of a run's evaluation"),
    "evaluation nested past the parser": ("evaluation.json", _text(DEEP), "nests deeper than 8 levels"),
    "evaluation over 4 MiB": ("evaluation.json", _with("blob", "x" * (4 * 2**20)), "(4.0 MiB at most)"),
}


@pytest.mark.parametrize("case", RUN_FILE_CORPUS)
def test_a_damaged_run_file_is_refused_and_the_run_listed_as_damaged_with_the_reason(tmp_path, case):
    name, damage, says = RUN_FILE_CORPUS[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = _sound_run(run_dir)
    assert read_run(run_dir).state == "finished"
    content = damage(records[name])
    if isinstance(content, dict):
        content = json.dumps(content)
    (run_dir / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    reader = {"config.json": read_config, "status.json": read_status, "evaluation.json": read_evaluation}[name]
    with pytest.raises(SchemaError) as refused:
        reader(run_dir)
    assert str(refused.value).startswith(f"{name} ") and says in str(refused.value)
    run = read_run(run_dir)
    assert (run.state, run.error, run.done) == (DAMAGED, str(refused.value), True)
    assert list_runs(tmp_path) == [run]


EVALUATE_REPORT_CORPUS = {
    "accuracy of 2": (_with("metrics.accuracy", 2), "metrics.accuracy must be a probability from 0 to 1; got 2"),
    "threshold as text": (_with("metrics.melanoma.threshold", "0.3"), "metrics.melanoma.threshold must be a"),
    "tta as text": (_with("tta", "yes"), "tta must be true or false; got 'yes'"),
    "split unknown": (_with("split", "holdout"), "split must be one of train, val, test, all"),
    "predictions not a list": (_with("predictions", {"a": 1}), "predictions must be a list; got dict"),
    "field unknown": (_with("blob", [1]), "'blob' is not a field of an evaluate report"),
    "no metrics": (_text('{"split": "test"}'), "metrics is missing"),
    "nested past the parser": (_text(DEEP), "nests deeper than 8 levels"),
}


@pytest.mark.parametrize("case", EVALUATE_REPORT_CORPUS)
def test_a_damaged_evaluate_report_is_refused(tmp_path, case):
    damage, says = EVALUATE_REPORT_CORPUS[case]
    records = _sound_run(tmp_path)
    assert read_evaluate_report(tmp_path)["metrics"] == records[EVALUATE_FILE]["metrics"]
    content = damage(records[EVALUATE_FILE])
    (tmp_path / EVALUATE_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SchemaError, match=f"^{EVALUATE_FILE} is not a lesionlab evaluate report") as refused:
        read_evaluate_report(tmp_path)
    assert says in str(refused.value)


DATASET_REPORT_CORPUS = {
    "damaged images a string": (_with("damaged_images", "a.jpg"), "damaged_images must be a list; got str"),
    "damaged image a number": (_with("damaged_images", [5]), "damaged_images[] must be text; got int"),
    "no validation": (_text('{"damaged_images": []}'), "validation is missing"),
    "field unknown": (_with("blob", 1), "'blob' is not a field of a run's dataset report"),
    "nested past the parser": (_text(DEEP), "nests deeper than 4 levels"),
    "over 8 MiB": (_with("damaged_images", ["x" * 2**20] * 9), "(8.0 MiB at most)"),
}


@pytest.mark.parametrize("case", DATASET_REPORT_CORPUS)
def test_a_damaged_dataset_report_is_refused(tmp_path, case):
    damage, says = DATASET_REPORT_CORPUS[case]
    write_dataset_report(tmp_path, {"ok": True, "summary": "No problems found."}, ["ISIC_1.jpg"])
    sound = read_dataset_report(tmp_path)
    assert sound["damaged_images"] == ["ISIC_1.jpg"]
    content = damage(sound)
    (tmp_path / "dataset_report.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(
        SchemaError, match="^dataset_report.json is (not|larger than) a run.s dataset report"
    ) as refused:
        read_dataset_report(tmp_path)
    assert says in str(refused.value)


# metrics.jsonl, line by line: each of these lines reached the pages before its event had a schema (an epoch as text
# broke the ETA's int(), a loss as a list the curve, a time that is not a time the wall-clock duration).
EVENT_CORPUS = {
    "epoch as text": '{"event": "epoch", "time": "2026-01-01T00:00:00+00:00", "epoch": "two", "train_loss": 1.0}',
    "epoch 0": '{"event": "epoch", "time": "2026-01-01T00:00:00+00:00", "epoch": 0}',
    "loss a list": '{"event": "epoch", "time": "2026-01-01T00:00:00+00:00", "epoch": 2, "train_loss": [1]}',
    "accuracy of 3": '{"event": "epoch", "time": "2026-01-01T00:00:00+00:00", "epoch": 2, "val_acc": 3}',
    "no time": '{"event": "epoch", "epoch": 2}',
    "time not a time": '{"event": "end", "time": "yesterday", "status": "finished"}',
    "end state unknown": '{"event": "end", "time": "2026-01-01T00:00:00+00:00", "status": "exploded"}',
    "steps negative": '{"event": "progress", "time": "2026-01-01T00:00:00+00:00", "step": 1, "steps": -4}',
    "speed NaN": '{"event": "progress", "time": "2026-01-01T00:00:00+00:00", "images_per_s": NaN}',
    "nested": '{"event": "start", "time": "2026-01-01T00:00:00+00:00", "dataset": {"a": {"b": [1]}}}',
    "a list": "[1, 2]",
    "over 64 KiB": '{"event": "progress", "time": "2026-01-01T00:00:00+00:00", "phase": "' + "x" * 70_000 + '"}',
}


@pytest.mark.parametrize("case", EVENT_CORPUS)
def test_an_event_its_schema_refuses_is_skipped_and_the_others_read(tmp_path, case):
    log = RunLog(tmp_path)
    log.event("epoch", epoch=1, lr=1e-3, train_loss=1.5, val_loss=float("nan"), val_acc=0.5, seconds=3.0)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write(EVENT_CORPUS[case] + "\n")
    log.event("end", status="finished")
    events = read_events(tmp_path / "metrics.jsonl")
    # The diverged validation loss (NaN) is a loss as logged, kept for the curve.
    assert [e["event"] for e in events] == ["epoch", "end"]
    run = read_run(tmp_path)
    assert (run.state, [e["epoch"] for e in run.epochs]) == ("finished", [1])


def test_a_log_past_its_bound_is_refused_unread_and_the_run_listed_as_damaged(tmp_path):
    _sound_run(tmp_path)
    RunLog(tmp_path).event("end", status="finished")
    with open(tmp_path / "metrics.jsonl", "r+b") as fh:  # sparse: the bound is read from the size alone
        fh.truncate(MAX_EVENTS_BYTES + 1)
    with pytest.raises(SchemaError, match="^metrics.jsonl is larger than a run's log can be"):
        read_events(tmp_path / "metrics.jsonl")
    run = read_run(tmp_path)
    assert run.state == DAMAGED and "metrics.jsonl is larger" in run.error


def test_the_published_records_pass_their_schemas():
    published = sorted(p for p in (Path(__file__).parents[3] / "docs" / "runs").iterdir() if p.is_dir())
    assert len(published) >= 10
    for run_dir in published:
        run = read_run(run_dir)
        assert (run.state, run.error) == ("finished", None), run_dir.name
        assert read_evaluation(run_dir)["test"]["n"] > 0
        read_dataset_report(run_dir)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        # Every event the trainer wrote passes its schema, except an ensemble's start of an earlier format that
        # named no training split (still accepted) — so all of them.
        assert len(read_events(run_dir / "metrics.jsonl")) == len(lines), run_dir.name
    assert read_evaluate_report(published[0].parent / "reference-mnv2")["split"] == "test"


def test_a_killed_trainers_damaged_status_is_replaced_by_how_the_run_ended(tmp_path):
    (tmp_path / "status.json").write_text('{"state": ["running"]}')
    mark_unfinished(tmp_path, "failed", "the trainer exited with code -9")
    assert (read_status(tmp_path)["state"], read_run(tmp_path).state) == ("failed", "failed")
