"""The run folder: what the trainer writes while it trains and how readers parse it.

Layout of a run folder (``<out>/<name>/``):

- ``config.json``        the :class:`TrainConfig` used
- ``metrics.jsonl``      one JSON object per line: ``start``, ``progress`` (within an epoch),
                         ``epoch`` (losses, accuracy, balanced accuracy, lr, images/s) and ``end``
- ``status.json``        ``{"state": "starting" | "running" | "finished" | "stopped" | "failed", "error": ...}``;
                         while starting or running it also names the trainer's process (``pid``,
                         ``pid_start``), and readers believe the state only while that process lives
- ``last.pt``/``best.pt`` checkpoints, written atomically; ``last.pt`` also carries the
                         optimiser and scheduler so a run resumes where it stopped
- ``split.csv``          which split every image went to
- ``dataset_report.json`` what the run set aside: ``validation``, the dataset's validation report from
                         indexing (with its ``ok`` and ``summary``), and ``damaged_images``, the files that
                         passed indexing but could not be decoded during the run
- ``test_predictions.csv`` and ``evaluation.json``: the best model on the test split,
                         after temperature scaling fitted on the validation split
- ``robustness.json``    the robustness report of the run's model on the test split (:mod:`core.evaluation.robustness`),
                          when one was made; ``robustness-val.json`` the same on the validation split
- ``train.log``          the trainer's output, when a job started it
- ``STOP``               created by anyone who wants the run to end cleanly

The trainer appends to ``metrics.jsonl`` and rewrites the other files atomically, so a
dashboard can read them at any moment; this module holds the only writer and the only parser.
A resumed run first cuts ``metrics.jsonl`` back to its checkpoint's epoch, so no epoch is logged twice.
:func:`read_run` turns a folder into a :class:`RunState` the pages can draw.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.common.files import atomic_write, read_tail, write_json
from core.common.formatting import format_bytes, format_duration, progress_fraction, progress_text
from core.common.labels import CLASSES
from core.common.procs import process_record, record_alive
from core.common.schema import (
    TEMPERATURE_RANGE,
    Field,
    JsonFormat,
    SchemaError,
    a_dict,
    are_fractions,
    check_schema,
    check_structure,
    class_list,
    closed_schema,
    flag,
    list_of,
    number,
    one_of,
    probability,
    read_json_file,
    record,
    text,
    whole,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

PROGRESS_INTERVAL_S = 1.0
FINAL_STATES = ("finished", "stopped", "failed", "interrupted")
LIVE_STATES = ("starting", "running")  # written only by the trainer, with its pid
# A run whose config.json, status.json or evaluation.json its schema refuses: listed with the reason, never drawn.
DAMAGED = "damaged"
LOG_TAIL_LINES = 30
STOP_FILE = "STOP"
ROBUSTNESS_FILE = "robustness.json"  # the test split's report: what Evaluate shows and the model card quotes


def robustness_file(split: str) -> str:
    """The robustness report of ``split``'s file name: one per split, so that the validation report the choice rule
    reads and the test report Evaluate shows do not replace each other."""
    return ROBUSTNESS_FILE if split == "test" else f"robustness-{split}.json"


# The test split as `lesionlab evaluate` reports it at its defaults (flip TTA, the model's operating point),
# saved beside the run's records with --out: what Diagnose and the model card quote for the views Diagnose uses.
EVALUATE_FILE = "evaluate-test.json"
# What the progress bar says during a long step before the epochs; a phase not named here shows its name.
PHASE_LABELS = {
    "features": "computing backbone features once",
    "decoding": "decoding the images once into the cache",
    "evaluate": "evaluating the best model on the validation and test splits",
}


class StopRequested(Exception):
    """A long step (e.g. computing features) saw the run's stop signal between two batches and ended early."""


def check_run_name(name: str) -> str:
    """``name`` when it names a folder directly inside the runs folder; ValueError otherwise.

    A separator, ``..`` or an absolute path would put the run outside the runs folder, and a leading dot
    would hide it from the run lists.
    """
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(
            f"{name!r} is not a usable run name: use letters, digits, '-', '_' and '.', and do not start it with '.'"
        )
    return name


# ---------------------------------------------------------------------------
# What the run folder's JSON files may hold: one declared schema each (core.common.schema), checked as they are read.

# The split draws with random_state seed and seed + 1, which scikit-learn takes below 2**32.
MAX_SPLIT_SEED = 2**32 - 2
# A config is the trainer's flat settings (an ensemble's adds a list of its members): a few dozen values.
MAX_CONFIG_DEPTH = 3
MAX_CONFIG_VALUES = 2_000


def _check_config_name(name: object) -> None:
    if name == "":  # the trainer chose the folder's name
        return
    try:
        check_run_name(name if isinstance(name, str) else "")
    except ValueError:
        raise SchemaError(f"config.name must be a run folder's name; got {name!r}") from None


def _check_fractions(value: object) -> None:
    if not are_fractions(value):
        raise SchemaError(
            f"config.split_fractions must be three numbers from 0 summing to 1 (train, val, test); got {value!r}"
        )


# The entries of a training config that something reads back (a path is made of the name, the split is recomputed from
# the seed and fractions, the pages count epochs): an open schema, since TrainConfig gains fields and older records
# lack them; what it does not list is bounded by MAX_CONFIG_DEPTH and MAX_CONFIG_VALUES.
CONFIG_SCHEMA: dict[str, Field] = {
    "name": Field(False, _check_config_name),
    "data": Field(False, text("config.data")),
    "split_seed": Field(False, whole("config.split_seed", 0, MAX_SPLIT_SEED)),
    "split_fractions": Field(False, _check_fractions),
    "max_images": Field(False, whole("config.max_images", 0, empty=True)),  # 0, like None, means every image
    "epochs": Field(False, whole("config.epochs", 1)),
    "holdout_source": Field(False, text("config.holdout_source", empty=True)),
    "arch": Field(False, text("config.arch")),
    "finetune": Field(False, text("config.finetune")),
    "imbalance": Field(False, text("config.imbalance")),
    "members": Field(False, list_of("config.members", a_dict("config.members[]"))),  # an ensemble's: run, arch, seed
}


def check_config(config: object) -> None:
    """The trainer's config as a run's ``config.json`` or a model file records it: a dict of plain values at most
    ``MAX_CONFIG_DEPTH`` deep with at most ``MAX_CONFIG_VALUES`` values (the pages print it whole), the entries
    read back from it within ``CONFIG_SCHEMA``; a ValueError naming the entry otherwise."""
    if not isinstance(config, dict):
        raise SchemaError(f"config must be a dict; got {type(config).__name__}")
    check_structure(config, "config", max_depth=MAX_CONFIG_DEPTH, max_values=MAX_CONFIG_VALUES)
    check_schema(config, CONFIG_SCHEMA, "a training config", closed=False)


STATUS_SCHEMA: dict[str, Field] = {
    "state": Field(True, one_of("state", (*LIVE_STATES, *FINAL_STATES))),
    "error": Field(False, text("error", empty=True)),
    "updated": Field(False, text("updated")),
    # The trainer's process, while the state is live (core.common.procs.process_record).
    "pid": Field(False, whole("pid", 1, empty=True)),
    "pid_start": Field(False, text("pid_start", empty=True)),
}


def _matrix(key: str, cell: Callable[[object], None]) -> Callable[[object], None]:
    """One row per class of one cell per class."""
    return list_of(key, list_of(f"{key} row", cell, length=len(CLASSES)), length=len(CLASSES))


_AUC_PER_CLASS = {code: Field(True, probability(code, empty=True)) for code in CLASSES}
_AVERAGES = {name: Field(True, probability(name)) for name in ("precision", "recall", "f1")}
_PER_CLASS = {
    "code": Field(True, one_of("code", CLASSES)),
    "name": Field(True, text("name")),
    **_AVERAGES,
    "support": Field(True, whole("support", 0)),
    "auc": Field(True, probability("auc", empty=True)),  # None: the class is absent from the split
}
_OPERATING_POINT = {  # a referral rule's (core.metrics.classification.operating_point)
    "threshold": Field(True, probability("threshold")),
    **{rate: Field(True, probability(rate, empty=True)) for rate in ("sensitivity", "specificity", "ppv", "npv")},
    **{count: Field(True, whole(count, 0)) for count in ("tp", "fn", "tn", "fp")},
}
# core.metrics.classification.compute_metrics' dict, every number a page, the report or the model card shows.
METRICS_SCHEMA: dict[str, Field] = {
    "n": Field(True, whole("n", 0)),
    "classes": Field(True, class_list("classes")),
    "accuracy": Field(True, probability("accuracy")),
    "balanced_accuracy": Field(True, probability("balanced_accuracy")),
    "macro": Field(True, record("macro", _AVERAGES)),
    "weighted": Field(True, record("weighted", _AVERAGES)),
    "per_class": Field(True, list_of("per_class", record("per_class[]", _PER_CLASS), length=len(CLASSES))),
    "confusion_matrix": Field(True, _matrix("confusion_matrix", whole("confusion_matrix cell", 0))),
    "confusion_matrix_normalized": Field(
        True, _matrix("confusion_matrix_normalized", probability("confusion_matrix_normalized cell"))
    ),
    "roc_auc": Field(
        True,
        record(
            "roc_auc",
            {
                "per_class": Field(True, record("per_class", _AUC_PER_CLASS)),
                "macro": Field(True, probability("macro", empty=True)),
            },
        ),
    ),
    "melanoma": Field(True, record("melanoma", _OPERATING_POINT)),
    "malignant": Field(False, record("malignant", _OPERATING_POINT)),  # recorded since the malignant rule
    "ece": Field(True, probability("ece")),
    "nll": Field(True, number("nll", 0, math.inf)),
}


def check_metrics(key: str) -> Callable[[object], None]:
    """``METRICS_SCHEMA``, and the counts agreeing with one another: the confusion matrix holds ``n`` images, each
    class's row its support (a record whose numbers disagree would show one of them wrongly)."""
    within = record(key, METRICS_SCHEMA)

    def check(value: object) -> None:
        within(value)
        rows = [sum(row) for row in value["confusion_matrix"]]
        supports = [row["support"] for row in value["per_class"]]
        if sum(rows) != value["n"] or rows != supports:
            raise SchemaError(
                f"{key}'s confusion matrix holds {sum(rows)} images in rows of {rows}, but n is {value['n']} and the "
                f"supports are {supports}"
            )
        if [row["code"] for row in value["per_class"]] != list(CLASSES):
            raise SchemaError(f"{key}.per_class must follow the classes {list(CLASSES)}")

    return check


_MEMBER = {
    "run": Field(True, text("run")),
    "val": Field(True, check_metrics("val")),
    "test": Field(True, check_metrics("test")),
}
# evaluation.json: the trainer's (core.training.loop) or an ensemble's (core.training.ensembles) test evaluation.
EVALUATION_SCHEMA: dict[str, Field] = {
    "temperature": Field(True, number("temperature", *TEMPERATURE_RANGE)),
    "mel_threshold": Field(False, probability("mel_threshold")),
    "malignant_threshold": Field(False, probability("malignant_threshold")),
    "epoch": Field(False, whole("epoch", 0)),
    "test": Field(True, check_metrics("test")),
    "test_uncalibrated": Field(False, check_metrics("test_uncalibrated")),
    "val": Field(False, check_metrics("val")),
    "members": Field(False, list_of("members", record("members[]", _MEMBER))),
}
# A lesionlab evaluate report (core.evaluation.evaluate.evaluate_checkpoint) saved as EVALUATE_FILE.
EVALUATE_REPORT_SCHEMA: dict[str, Field] = {
    "checkpoint": Field(False, text("checkpoint")),
    "arch": Field(False, text("arch")),
    "data": Field(False, text("data")),
    "split": Field(True, one_of("split", ("train", "val", "test", "all"))),
    "split_seed": Field(False, whole("split_seed", 0, MAX_SPLIT_SEED, empty=True)),
    "split_fractions": Field(
        False, list_of("split_fractions", number("split_fractions[]", 0, 1), length=3, empty=True)
    ),
    "split_source": Field(False, text("split_source", empty=True)),
    "holdout_source": Field(False, text("holdout_source", empty=True)),
    "split_note": Field(False, text("split_note", empty=True)),
    "split_warning": Field(False, text("split_warning", empty=True)),
    "n_images": Field(False, whole("n_images", 0)),
    "validation": Field(False, a_dict("validation")),
    "temperature": Field(False, number("temperature", *TEMPERATURE_RANGE)),
    "tta": Field(False, flag("tta")),
    "tta_views": Field(False, text("tta_views")),
    "input_pipeline": Field(False, text("input_pipeline")),
    "input_pipeline_note": Field(False, text("input_pipeline_note", empty=True)),
    "metrics": Field(True, check_metrics("metrics")),
    "confidence_intervals": Field(False, a_dict("confidence_intervals", empty=True)),
    "bootstrap_unit": Field(False, text("bootstrap_unit")),
    "by_source": Field(False, a_dict("by_source", empty=True)),
    "metadata": Field(False, a_dict("metadata", empty=True)),
    "predictions": Field(False, list_of("predictions", a_dict("predictions[]"))),
}

# The bounds of each file, before it is parsed (bytes) and before its fields are looked at (depth, values).
# A config is about 2 KB; a status a state, a time, a process and an error of a log's last lines (20 KB at most);
# an evaluation 15 KB, an ensemble of 16 members' about 500 KB; an evaluate report about 250 bytes per image with its
# per-image predictions (370 KB for HAM10000's test split of 1,498).
CONFIG_FILE = JsonFormat("a run's config", 64 * 1024, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES, check_config)
STATUS_FILE = JsonFormat("a run's status", 256 * 1024, 2, 100, closed_schema(STATUS_SCHEMA, "a run's status"))
EVALUATION_FILE = JsonFormat(
    "a run's evaluation", 4 * 2**20, 8, 200_000, closed_schema(EVALUATION_SCHEMA, "a run's evaluation")
)
EVALUATE_REPORT_FILE = JsonFormat(
    "a lesionlab evaluate report", 16 * 2**20, 8, 1_000_000, closed_schema(EVALUATE_REPORT_SCHEMA, "an evaluate report")
)
# dataset_report.json: the dataset's validation report (core.data.validation, read as plain values) and the images the
# run could not decode. Both name images, at most the dataset's 10,015 twice over: about 1 MB.
DATASET_REPORT_SCHEMA: dict[str, Field] = {
    "validation": Field(True, a_dict("validation")),
    "damaged_images": Field(True, list_of("damaged_images", text("damaged_images[]"))),
}
DATASET_REPORT_FILE = JsonFormat(
    "a run's dataset report", 8 * 2**20, 4, 100_000, closed_schema(DATASET_REPORT_SCHEMA, "a run's dataset report")
)


def _timestamp(value: object) -> None:
    try:
        datetime.fromisoformat(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SchemaError(f"time must be an ISO 8601 time; got {value!r}") from None


def _loss(key: str) -> Callable[[object], None]:
    """A loss as the trainer logged it: any number, NaN and infinity included, because a diverging run logs them and
    its curve should show where; never text, a bool or a container."""

    def check(value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SchemaError(f"{key} must be a number; got {value!r}")

    return check


def _at_least_zero(key: str) -> Callable[[object], None]:
    return number(key, 0, math.inf)


# metrics.jsonl, line by line: every event has its name and time; the events the pages read have their fields checked.
# Open schemas: a field a reader does not use passes, bounded by EVENT_DEPTH and EVENT_VALUES. A line its schema refuses
# is skipped like a half-written one, so one bad line costs its own event, never the run's record.
EVENT_COMMON: dict[str, Field] = {"event": Field(True, text("event")), "time": Field(True, _timestamp)}
EVENT_SCHEMAS: dict[str, dict[str, Field]] = {
    "start": {
        **{key: Field(False, whole(key, 0)) for key in ("epochs", "first_epoch", "steps_per_epoch", "train_images")},
        "cached_features": Field(False, flag("cached_features")),
        "device": Field(False, text("device")),
        "split_sizes": Field(
            False, record("split_sizes", {s: Field(False, whole(s, 0)) for s in ("train", "val", "test")})
        ),
        "members": Field(False, list_of("members", text("members[]"))),
    },
    "epoch": {
        "epoch": Field(True, whole("epoch", 1)),
        **{key: Field(False, _at_least_zero(key)) for key in ("lr", "seconds", "images_per_s")},
        **{key: Field(False, _loss(key)) for key in ("train_loss", "val_loss")},
        **{key: Field(False, probability(key)) for key in ("train_acc", "val_acc", "val_balanced_acc")},
    },
    "progress": {
        **{key: Field(False, whole(key, 0)) for key in ("epoch", "step", "steps", "done", "total")},
        **{key: Field(False, _at_least_zero(key)) for key in ("images_per_s", "eta_s", "started")},
        "loss": Field(False, _loss("loss")),
        "phase": Field(False, text("phase")),
    },
    "end": {"status": Field(True, one_of("status", FINAL_STATES)), "error": Field(False, text("error", empty=True))},
}
# A line is an event of a few fields (a start event with an ensemble's 16 member names is about 1 KB); the log of a run
# grows by a progress line a second, about 200 bytes: 64 MiB holds some 90 hours of one.
MAX_EVENT_BYTES = 64 * 1024
EVENT_DEPTH = 3
EVENT_VALUES = 1_000
MAX_EVENTS_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------
# Writing


class RunLog:
    """Appends JSON lines to metrics.jsonl and keeps status.json current."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self._last_progress = 0.0

    def begin(self) -> None:
        """Claim the folder for this process before anything else: status "starting" with our pid first, so
        a kill from here on leaves a run that reads as interrupted; then clear what an earlier trainer left
        (a STOP meant for it, temporary files of atomic writes it was killed in)."""
        self.status("starting")
        (self.dir / STOP_FILE).unlink(missing_ok=True)
        for tmp in self.dir.glob(".*.tmp"):  # core.common.files.atomic_write names them .<target>.<random>.tmp
            tmp.unlink(missing_ok=True)

    def truncate_to_epoch(self, epoch: int) -> None:
        """Forget what the log says happened after ``epoch``, the last epoch the checkpoint holds: later epoch
        events and the progress and end events after epoch ``epoch``'s, which a resumed run writes again.
        A line half-written by a killed trainer goes too: the next event would be appended to it."""
        path = self.dir / "metrics.jsonl"
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return
        events = [_parse_event(line) for line in lines]
        held = [i for i, e in enumerate(events) if e and e.get("event") == "epoch" and e.get("epoch", 0) <= epoch]
        cut = held[-1] if held else -1

        def keep(i: int, e: dict | None) -> bool:
            if e is None:
                return False
            if e.get("event") == "epoch":
                return e.get("epoch", 0) <= epoch
            return e.get("event") not in ("progress", "end") or i < cut

        kept = "".join(line + "\n" for i, (line, e) in enumerate(zip(lines, events, strict=True)) if keep(i, e))
        atomic_write(path, lambda fh: fh.write(kept.encode("utf-8")))

    def event(self, event: str, **data) -> None:
        line = {"event": event, "time": datetime.now(UTC).isoformat(timespec="seconds"), **data}
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def progress_due(self) -> bool:
        """Whether :meth:`progress` would write now: the trainer reads its running loss from the device only then."""
        return time.monotonic() - self._last_progress >= PROGRESS_INTERVAL_S

    def progress(self, force: bool = False, **data) -> None:
        if force or self.progress_due():
            self._last_progress = time.monotonic()
            self.event("progress", **data)

    def phase(self, phase: str, done: int, total: int, started: float) -> None:
        """Progress through a long step outside the epochs (``phase``, e.g. "features"): ``done`` of ``total``
        images since ``started`` (a Unix time), from which readers compute the rate and the ETA."""
        self.progress(force=done >= total, phase=phase, done=done, total=total, started=started)

    def status(self, state: str, error: str | None = None) -> None:
        write_status(self.dir, state, error)


def run_header(name: str) -> str:
    """The line the trainer prints as it starts the run ``name``: what it prints after it is that run's, which
    lets a job file one process's output under several runs."""
    return f"=== run {name} ==="


class TrainLogs:
    """Files one trainer process's output under the runs it trains: each line goes to the ``train.log`` of the
    run whose header (:func:`run_header`) came last, what comes before the first header to the first run's."""

    def __init__(self, runs_dir: Path, runs: list[str]):
        self.runs_dir, self.run, self.partial = Path(runs_dir), runs[0], b""
        self.headers = {run_header(name).encode(): name for name in runs}

    def copy(self, fd: int) -> None:
        """Everything the trainer has written to ``fd`` (non-blocking) so far."""
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:  # the trainer has exited: its last line may lack a newline
                self._append(self.partial)
                self.partial = b""
                return
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            block = b""
            for line in lines:
                if line in self.headers:
                    self._append(block)
                    self.run, block = self.headers[line], b""
                block += line + b"\n"
            self._append(block)

    def _append(self, data: bytes) -> None:
        if data:
            with open(self.runs_dir / self.run / "train.log", "ab") as log:
                log.write(data)


def write_status(run_dir: Path, state: str, error: str | None = None) -> None:
    """A live state names the calling process, which must be the trainer: readers believe it while that lives."""
    status = {"state": state, "error": error, "updated": datetime.now(UTC).isoformat(timespec="seconds")}
    if state in LIVE_STATES:
        status.update(process_record(os.getpid()))
    write_json(Path(run_dir) / "status.json", status)


def mark_unfinished(run_dir: Path, state: str, error: str) -> None:
    """Record how a run ended when its trainer could not say so (killed, crashed); a final state the
    trainer wrote itself is kept."""
    try:
        recorded = read_status(run_dir).get("state")
    except SchemaError:  # a damaged status records nothing worth keeping
        recorded = None
    if recorded in (None, *LIVE_STATES):
        write_status(run_dir, state, error)


def request_stop(run_dir: Path) -> None:
    """Ask the trainer to end the run cleanly after its current step."""
    (Path(run_dir) / STOP_FILE).touch()


def write_config(run_dir: Path, config: dict) -> None:
    write_json(Path(run_dir) / "config.json", config)


def write_split(run_dir: Path, frame: pd.DataFrame) -> None:
    """Which split every image of ``frame`` (an indexed dataset with a ``split`` column) went to."""
    table = frame[["image_id", "lesion_id", "dx", "split"]]
    atomic_write(Path(run_dir) / "split.csv", lambda fh: table.to_csv(fh, index=False))


def write_dataset_report(run_dir: Path, validation: dict, damaged_images: Sequence[str]) -> None:
    """``dataset_report.json``. The trainer writes it before the first epoch and again after every epoch and
    the test evaluation, so it names every damaged image met so far."""
    write_json(
        Path(run_dir) / "dataset_report.json", {"validation": validation, "damaged_images": list(damaged_images)}
    )


def write_evaluation(
    run_dir: Path, evaluation: dict, images: pd.DataFrame, probs: np.ndarray, logits: np.ndarray
) -> None:
    """``evaluation.json`` and ``test_predictions.csv``: one row per test image (``images`` holds its
    image_id, label and dx) with its calibrated probabilities and raw logits, in ``CLASSES`` order.

    Images are named by their id in the dataset, never by their path: a record read on another computer
    finds them in whatever copy of the dataset is configured there (:func:`locate_images`)."""
    table = (
        images[["image_id", "label", "dx"]]
        .reset_index(drop=True)
        .assign(
            **{f"prob_{c}": probs[:, i] for i, c in enumerate(CLASSES)},
            **{f"logit_{c}": logits[:, i] for i, c in enumerate(CLASSES)},
        )
    )
    write_json(Path(run_dir) / "evaluation.json", evaluation)
    # Written last: its presence tells readers the evaluation is complete.
    atomic_write(Path(run_dir) / "test_predictions.csv", lambda fh: table.to_csv(fh, index=False))


# ---------------------------------------------------------------------------
# Reading


def _parse_event(line: str) -> dict | None:
    """One line of ``metrics.jsonl`` checked against its event's schema (:data:`EVENT_SCHEMAS`); None for a blank,
    garbled, half-written or refused one."""
    if len(line) > MAX_EVENT_BYTES:
        return None
    try:
        obj = json.loads(line)
        check_structure(obj, "an event", max_depth=EVENT_DEPTH, max_values=EVENT_VALUES)
        if not isinstance(obj, dict):
            return None
        check_schema(obj, EVENT_COMMON, "an event", closed=False)
        check_schema(obj, EVENT_SCHEMAS.get(obj["event"], {}), f"a {obj['event']} event", closed=False)
    except (ValueError, RecursionError):
        return None
    return obj


def read_events(path: Path) -> list[dict]:
    """The events of ``metrics.jsonl`` that their schema accepts; a line being written (incomplete), garbled or
    refused is skipped. :class:`SchemaError` when the file is larger than :data:`MAX_EVENTS_BYTES`, unread."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_EVENTS_BYTES:
            raise SchemaError(
                f"{path.name} is larger than a run's log can be ({format_bytes(MAX_EVENTS_BYTES)} at most)"
            )
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [e for line in text.splitlines() if (e := _parse_event(line)) is not None]


def _read(path: Path, fmt: JsonFormat) -> dict:
    """The file at ``path`` checked against ``fmt``; empty when there is none (yet). :class:`SchemaError` naming the
    file and what is wrong when its schema refuses it."""
    try:
        return read_json_file(path, fmt)
    except FileNotFoundError:
        return {}


def read_start(run_dir: Path) -> dict | None:
    """The run's "start" event (its split sizes and dataset), read from the top of ``metrics.jsonl`` without parsing
    the epochs and progress lines after it; None before the trainer has written it."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8", errors="replace") as lines:
            return next((e for line in lines if (e := _parse_event(line)) and e.get("event") == "start"), None)
    except OSError:
        return None


def read_status(run_dir: Path) -> dict:
    """``status.json`` (see ``STATUS_SCHEMA``); empty before the trainer has written it, :class:`SchemaError` when
    damaged."""
    return _read(Path(run_dir) / "status.json", STATUS_FILE)


def has_finished(run_dir: Path) -> bool:
    """Whether the run's trainer recorded that it finished (a damaged status says nothing)."""
    try:
        return read_status(run_dir).get("state") == "finished"
    except SchemaError:
        return False


def run_started(run_dir: Path) -> bool:
    """Whether a trainer has started the run (it has written its status)."""
    return (Path(run_dir) / "status.json").is_file()


def read_config(run_dir: Path) -> dict:
    """The run's :class:`TrainConfig` as a dict (see ``CONFIG_SCHEMA``); empty before the trainer has written it,
    :class:`SchemaError` when damaged."""
    return _read(Path(run_dir) / "config.json", CONFIG_FILE)


def read_split(run_dir: Path) -> pd.DataFrame:
    """image_id, lesion_id, dx and split of every image the run used."""
    import pandas as pd  # lazily: pandas is heavy, and the job worker reads runs without it

    return pd.read_csv(Path(run_dir) / "split.csv")


def lesions_of(run_dir: Path, image_ids: Sequence[str]) -> list[str]:
    """The lesion of each of ``image_ids`` by the run's ``split.csv`` (an image it does not list is its own lesion):
    what a bootstrap over a run's test predictions resamples."""
    lesion_of = dict(zip(*(read_split(run_dir)[c].astype(str) for c in ("image_id", "lesion_id")), strict=True))
    return [lesion_of.get(str(i), f"image:{i}") for i in image_ids]


def read_dataset_report(run_dir: Path) -> dict:
    """What the run set aside (see :func:`write_dataset_report` and ``DATASET_REPORT_SCHEMA``); empty before the trainer
    has written it, :class:`SchemaError` when damaged."""
    return _read(Path(run_dir) / "dataset_report.json", DATASET_REPORT_FILE)


def read_evaluation(run_dir: Path) -> dict:
    """The test evaluation of the run's best model (see ``EVALUATION_SCHEMA``); empty before the run has one,
    :class:`SchemaError` when damaged."""
    return _read(Path(run_dir) / "evaluation.json", EVALUATION_FILE)


def read_evaluate_report(run_dir: Path) -> dict | None:
    """The saved ``lesionlab evaluate`` report of the run's model on its test split (see ``EVALUATE_REPORT_SCHEMA``);
    None without one, :class:`SchemaError` when damaged. Shared between callers (do not change it): Diagnose looks its
    operating point up on every rerun, and the report's per-image predictions make it a few hundred kilobytes of JSON,
    parsed once per version of the file."""
    path = Path(run_dir) / EVALUATE_FILE
    try:
        stat = path.stat()
    except OSError:
        return None
    return _evaluate_report(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _evaluate_report(path: str, _mtime_ns: int, _size: int) -> dict | None:
    report = _read(Path(path), EVALUATE_REPORT_FILE)
    return report if report.get("split") == "test" else None


def matching_runs(checkpoint_path: str | Path, config: dict, run_folders: Sequence[Path]) -> list[Path]:
    """The run folders that recorded the training of the checkpoint whose stored config is ``config``: its own
    folder, then ``config["name"]`` under each of ``run_folders``, where ``config.json`` equals ``config``."""
    config = json.loads(json.dumps(config))  # as config.json holds it: tuples become lists
    candidates = [Path(checkpoint_path).parent]
    if config.get("name"):
        candidates += [Path(folder) / str(config["name"]) for folder in run_folders]
    return [run_dir for run_dir in candidates if config and _config_or_none(run_dir) == config]


def _config_or_none(run_dir: Path) -> dict | None:
    try:
        return read_config(run_dir)
    except SchemaError:  # a damaged record is no record of this model's training
        return None


def has_evaluation(run_dir: Path) -> bool:
    return all((Path(run_dir) / name).is_file() for name in ("evaluation.json", "test_predictions.csv"))


def read_predictions(run_dir: Path):
    """A run's test predictions: (table, labels, calibrated probs, raw logits or None, evaluation dict).

    Columns follow ``CLASSES`` (``prob_<code>``, ``logit_<code>``); raises ``ValueError`` with a readable
    message when the files are missing or do not fit.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    try:
        table = pd.read_csv(run_dir / "test_predictions.csv", dtype={"image_id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{run_dir.name} has no readable test_predictions.csv ({exc})") from None
    # Records written before image ids also held each image's path on the computer that trained the run;
    # nothing may rely on it (see locate_images).
    table = table.drop(columns="path", errors="ignore")
    prob_cols = [f"prob_{c}" for c in CLASSES]
    missing = [c for c in ["label", *prob_cols] if c not in table.columns]
    if missing or table.empty:
        raise ValueError(f"{run_dir.name}/test_predictions.csv lacks {', '.join(missing) or 'rows'}")
    logit_cols = [f"logit_{c}" for c in CLASSES]
    logits = table[logit_cols].to_numpy(dtype=float) if all(c in table for c in logit_cols) else None
    return (
        table,
        table["label"].to_numpy(dtype=int),
        table[prob_cols].to_numpy(dtype=float),
        logits,
        read_evaluation(run_dir),
    )


def locate_images(image_ids: pd.Series, frame: pd.DataFrame) -> pd.Series:
    """The file of each of a record's ``image_ids`` in a dataset index's ``frame`` (image_id, path): the
    configured copy of the dataset, wherever it lives; NaN for an id that dataset does not hold."""
    import pandas as pd

    files = pd.Series(frame["path"].to_numpy(), index=frame["image_id"].astype(str))
    return image_ids.astype(str).map(files[~files.index.duplicated()])


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    return read_tail(Path(run_dir) / "train.log", lines)


def error_from_log(run_dir: Path) -> str:
    """What a run that died without saying why printed last."""
    tail = log_tail(run_dir, 12).strip()
    return tail or "the training process ended without writing a status (killed or crashed before starting)"


class LiveJob(Protocol):
    """The job running now, as far as reading its runs needs it (``core.app.jobs.Job`` is one)."""

    runs_dir: Path
    runs: list[str]

    @property
    def alive(self) -> bool: ...

    def config_path(self, run: str) -> Path: ...


@dataclass
class RunState:
    name: str
    path: Path
    state: str  # queued, starting, running, finished, stopped, failed, interrupted, damaged (error says why)
    config: dict = field(default_factory=dict)
    start: dict | None = None
    epochs: list[dict] = field(default_factory=list)
    progress: dict | None = None
    steps: list[dict] = field(default_factory=list)  # training progress events, for the live curve
    end: dict | None = None
    error: str | None = None
    modified: float = 0.0

    @property
    def done(self) -> bool:
        return self.state in (*FINAL_STATES, DAMAGED)

    @property
    def has_model(self) -> bool:
        return (self.path / "best.pt").is_file()

    @property
    def has_evaluation(self) -> bool:
        return has_evaluation(self.path)

    @property
    def total_epochs(self) -> int | None:
        for src in (self.start or {}, self.config):
            if src.get("epochs"):
                return int(src["epochs"])
        return None

    @property
    def wall_time_s(self) -> float | None:
        """Seconds from the first start to the last end, resumptions and the pauses between them included;
        None until the run has ended."""
        if self.start is None or self.end is None:
            return None
        started, ended = (datetime.fromisoformat(e["time"]) for e in (self.start, self.end))
        return (ended - started).total_seconds()

    @property
    def dataset(self) -> str:
        """Which dataset the run used, "name, N images": as its start event records it; for a run from before
        that record, its config's folder and the images its splits held (the whole dataset unless it took a
        subsample); "unknown" where neither says."""
        recorded = (self.start or {}).get("dataset")
        if recorded:
            used = recorded.get("used", recorded["images"])
            text = f"{recorded['name']}, {recorded['images']:,} images"
            return text + (f" ({used:,} used)" if used < recorded["images"] else "")
        folder = self.config.get("data")
        if not folder:
            return "unknown"
        sizes = (self.start or {}).get("split_sizes")
        if sizes and not self.config.get("max_images"):
            return f"{Path(folder).name}, {sum(sizes.values()):,} images"
        return f"{Path(folder).name}, image count unknown"

    @property
    def phase(self) -> str | None:
        """The long step outside the epochs the live run is in (see :meth:`RunLog.phase`), if any."""
        p = self.progress or {}
        return None if self.done or "phase" not in p else str(p["phase"])

    def fraction_done(self) -> float:
        """Progress through the whole run, 0..1, from epochs finished and the current step; in a phase
        outside the epochs, through that phase. A run that has ended counts its finished epochs only."""
        if self.state == "finished":
            return 1.0
        p = self.progress
        if self.phase is not None:
            return progress_fraction(p.get("done", 0), p.get("total"))
        total = self.total_epochs
        if not total:
            return 0.0
        done = len(self.epochs)
        if not self.done and p and p.get("steps") and int(p.get("epoch", 0)) > done:
            done_in_epoch = min(1.0, float(p.get("step", 0)) / float(p["steps"]))
            return min(1.0, (done + done_in_epoch) / total)
        return min(1.0, done / total)

    def eta_s(self) -> float | None:
        """Seconds left for the whole run: the current epoch's remainder plus the remaining epochs at the
        average epoch time so far (validation time included when two epochs are known)."""
        total, p = self.total_epochs, self.progress
        if self.done or not total or not p or self.phase is not None:
            return None
        epoch = int(p.get("epoch", 0))
        if epoch <= len(self.epochs):  # between epochs: validating / checkpointing
            epoch = len(self.epochs) + 1
            in_epoch = None
        else:
            in_epoch = float(p.get("eta_s") or 0.0)
        per_epoch = [float(e["seconds"]) for e in self.epochs if e.get("seconds")]
        if per_epoch:
            avg = sum(per_epoch) / len(per_epoch)
        elif p.get("step") and p.get("steps") and p.get("eta_s") is not None:
            elapsed_per_step = (
                float(p["eta_s"]) / max(1, int(p["steps"]) - int(p["step"]))
                if int(p["steps"]) > int(p["step"])
                else 0.0
            )
            avg = elapsed_per_step * int(p["steps"])
        else:
            return None
        remaining_epochs = max(0, total - epoch)
        return (in_epoch if in_epoch is not None else avg) + remaining_epochs * avg

    def progress_text(self) -> str:
        """One line for the progress bar: phase, epoch and step, images/s and ETA."""
        p = self.progress or {}
        if self.state == "queued":
            return "queued"
        if self.state == "starting" and not p:
            return "starting: loading the dataset and the model…"
        if self.phase is not None:
            label = PHASE_LABELS.get(self.phase, self.phase.replace("_", " "))
            return progress_text(label, p.get("done", 0), p.get("total"), started=p.get("started") or time.time())
        if self.done:
            return f"{self.state}: {len(self.epochs)}/{self.total_epochs or '?'} epochs"
        parts = [f"epoch {p.get('epoch', len(self.epochs) + 1)}/{self.total_epochs or '?'}"]
        if p.get("steps"):
            parts.append(f"step {p.get('step', 0)}/{p['steps']}")
        if p.get("images_per_s"):
            parts.append(f"{float(p['images_per_s']):.0f} images/s")
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return " · ".join(parts)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.path, lines)


def read_run(run_dir: Path, job: LiveJob | None = None) -> RunState:
    """Everything the pages show about one run. A starting or running run is believed while the trainer
    its status names lives, wherever it was started; before the trainer has said so, ``job`` (the active
    job, if any) tells a run that is being worked on from one whose process died without reporting."""
    run_dir = Path(run_dir)
    in_job = job is not None and run_dir.name in job.runs and Path(job.runs_dir) == run_dir.parent
    config, status, damage = _checked_records(run_dir, job if in_job else None)
    try:
        events = read_events(run_dir / "metrics.jsonl")
    except SchemaError as exc:
        events, damage = [], damage or str(exc)
    start = next((e for e in events if e.get("event") == "start"), None)
    epochs = [e for e in events if e.get("event") == "epoch"]
    progress = next((e for e in reversed(events) if e.get("event") == "progress"), None)
    steps = [e for e in events if e.get("event") == "progress" and "phase" not in e and e.get("steps")]
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)

    state = status.get("state")
    error = status.get("error")
    if state is None and end is not None:
        state, error = end.get("status", "finished"), end.get("error")
    if state in (None, *LIVE_STATES):
        alive = record_alive(status) if "pid" in status else in_job and job.alive
        if alive:
            state = state or ("starting" if run_dir.exists() else "queued")
        elif state is not None or run_dir.exists():
            state = "interrupted"
            error = error or error_from_log(run_dir)
    if state == "failed" and not error:
        error = error_from_log(run_dir)
    if damage is not None:
        state, error = DAMAGED, damage
    try:
        modified = max((p.stat().st_mtime for p in run_dir.iterdir()), default=run_dir.stat().st_mtime)
    except OSError:
        modified = 0.0
    return RunState(
        name=run_dir.name,
        path=run_dir,
        state=state,
        config=config,
        start=start,
        epochs=epochs,
        progress=progress,
        steps=steps,
        end=end,
        error=error,
        modified=modified,
    )


def _checked_records(run_dir: Path, job: LiveJob | None) -> tuple[dict, dict, str | None]:
    """The run's config (the job's, before the trainer has written the run's) and status, and why the run is damaged:
    the first of its config.json, status.json and evaluation.json that its schema refuses; None when none is."""
    records, damage = [], None
    config_path = run_dir / "config.json"
    if job is not None and not config_path.exists():
        config_path = job.config_path(run_dir.name)
    for path, fmt in ((config_path, CONFIG_FILE), (run_dir / "status.json", STATUS_FILE)):
        try:
            records.append(_read(path, fmt))
        except SchemaError as exc:
            records.append({})
            damage = damage or str(exc)
    if damage is None:
        try:
            read_evaluation(run_dir)
        except SchemaError as exc:
            damage = str(exc)
    return records[0], records[1], damage


def list_runs(runs_dir: Path, job: LiveJob | None = None) -> list[RunState]:
    """All run folders below ``runs_dir``, newest first; ``job`` as for :func:`read_run`."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    marker = ("config.json", "status.json", "metrics.jsonl", "train.log", "best.pt")
    runs = [
        read_run(d, job)
        for d in runs_dir.iterdir()
        if d.is_dir() and not d.name.startswith(".") and any((d / m).exists() for m in marker)
    ]
    return sorted(runs, key=lambda r: r.modified, reverse=True)


def epochs_table(run: RunState) -> pd.DataFrame:
    """The per-epoch metrics as a pandas DataFrame (imported lazily; pandas is heavy)."""
    import pandas as pd

    cols = [
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "val_balanced_acc",
        "lr",
        "images_per_s",
        "seconds",
    ]
    frame = pd.DataFrame(run.epochs)
    for c in cols:
        if c not in frame.columns:
            frame[c] = pd.NA
    return frame[cols + [c for c in frame.columns if c not in cols and c != "event"]]


def running_loss_table(run: RunState) -> pd.DataFrame:
    """The running training loss reported within epochs, at fractional epochs (epoch 2, half done: 1.5)."""
    import pandas as pd

    rows = [
        (int(e["epoch"]) - 1 + float(e["step"]) / float(e["steps"]), float(e["loss"]))
        for e in run.steps
        if e.get("loss") is not None
    ]
    return pd.DataFrame(rows, columns=["epoch", "loss"])


def default_run_name(config: dict, runs_dir: Path) -> str:
    """The name of a run that was given none, the one rule for the trainer and the app: date and time,
    architecture, fine-tuning policy and imbalance strategy, with ``-2``, ``-3``… when ``runs_dir`` has a folder of
    that name. Call it with the final config: a name taken from a preset misnames the run once a field changes."""
    fields = (config.get("arch", "model"), config.get("finetune", "head"), config.get("imbalance", "none"))
    base = time.strftime("%Y%m%d-%H%M%S") + "".join(f"-{f}" for f in fields)
    name, i = base, 2
    while (Path(runs_dir) / name).exists():
        name, i = f"{base}-{i}", i + 1
    return name
