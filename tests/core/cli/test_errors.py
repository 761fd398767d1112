"""Every command line answers a wrong value or file with one ``error:`` line and exit status 2: no traceback, no
silent default, no number that does not mean anything. Each command's refusal is seen once in a real process (what a
user's terminal shows: the exit status, nothing more on stderr); its other wrong values go through the same ``main`` in
this process, where a traceback would fail the test, and so would a warning that a real process would print."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from core.cli import evaluate as evaluate_cli
from core.cli import predict as predict_cli
from core.common.runs import MAX_SPLIT_SEED
from core.metrics.classification import BALANCED_ACCURACY_UNDEFINED
from core.models.metadata import MAX_AGE
from tests.conftest import ROOT, no_printed_warnings, run_cli

REFERENCE = ROOT / "checkpoints" / "reference.pt"
SAMPLE = ROOT / "sample_data" / "ham10000-sample"
EVALUATE = ["--checkpoint", str(REFERENCE), "--data", str(SAMPLE)]


def one_error_line(done: subprocess.CompletedProcess, says: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert says in done.stderr, done.stderr


def refused_here(main, argv: list[str], capsys, says: str) -> None:
    """``main(argv)`` in this process, its status and output read as :func:`one_error_line` reads a process's."""
    with no_printed_warnings():
        code = main(argv)
    one_error_line(subprocess.CompletedProcess(argv, code, *capsys.readouterr()), says)


@pytest.mark.integration
def test_evaluate_refuses_a_flag_out_of_bounds_in_a_real_process():
    says = f"--split-seed must be a whole number from 0 to {MAX_SPLIT_SEED}, got -1"
    one_error_line(run_cli("core.cli.evaluate", *EVALUATE, "--split-seed", "-1"), says)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--split-seed", "-1"], f"--split-seed must be a whole number from 0 to {MAX_SPLIT_SEED}, got -1"),
        (["--split-seed", str(2**40)], f"--split-seed must be a whole number from 0 to {MAX_SPLIT_SEED}"),
        (["--fractions", "nan", "0.5", "0.5"], "--fractions: split fractions must be three non-negative numbers"),
        (["--workers", "-1"], "--workers must be a whole number from 0, got -1"),
        (["--device", "foo"], "--device: 'foo' is not a device name"),
        (["--bootstrap", "-1"], "--bootstrap must be a whole number from 0, got -1"),
        (["--batch-size", "0"], "--batch-size must be a whole number from 1, got 0"),
        (["--mel-threshold", "nan"], "--mel-threshold must be within [0, 1], got nan"),
    ],
)
def test_evaluate_refuses_a_flag_out_of_bounds(flags, says, capsys):
    refused_here(evaluate_cli.main, [*EVALUATE, *flags], capsys, says)


@pytest.mark.integration
def test_evaluate_says_balanced_accuracy_is_undefined_on_one_class(tmp_path):
    # One folder per class, with one class: mean recall over one class is the accuracy again.
    (tmp_path / "nv").mkdir()
    for image in sorted((SAMPLE / "images").glob("*.jpg"))[:6]:
        shutil.copy(image, tmp_path / "nv" / image.name)
    done = run_cli(
        "core.cli.evaluate", "--checkpoint", REFERENCE, "--data", tmp_path, "--split", "all", "--no-tta",
        "--bootstrap", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("balanced accuracy"))
    assert line.split(None, 2)[2] == BALANCED_ACCURACY_UNDEFINED
    assert any(line.startswith("accuracy ") for line in done.stdout.splitlines())


@pytest.mark.integration
def test_the_job_worker_refuses_what_is_not_a_job(tmp_path):
    one_error_line(run_cli("core.cli.jobs", "worker", tmp_path / "missing.json"), "does not exist")
    for name, content, says in (
        ("notes.txt", "not json at all", "is not a job file (not JSON)"),
        ("list.json", "[1, 2]", "is not a job file: it holds a list, not an object of fields"),
        ("kind.json", json.dumps({"id": "x", "kind": "mine bitcoin"}), "kind must be one of train, experiment"),
        ("runs.json", json.dumps({"id": "x", "kind": "train", "runs": "all"}), "runs must be a list; got str 'all'"),
        ("deep.json", "[" * 30_000 + "]" * 30_000, "is not a job file: it nests deeper than 3 levels"),
    ):
        (tmp_path / name).write_text(content)
        one_error_line(run_cli("core.cli.jobs", "worker", tmp_path / name), says)


@pytest.mark.integration
def test_predict_refuses_an_age_that_is_no_age_in_a_real_process():
    image = sorted((SAMPLE / "images").glob("*.jpg"))[0]
    done = run_cli("core.cli.predict", REFERENCE, image, "--age", "nan")
    one_error_line(done, f"--age must be a number of years from 0 to {MAX_AGE}; got nan")


@pytest.mark.parametrize("age", ["nan", "-3", "400"])
def test_predict_refuses_an_age_that_is_no_age(age, capsys):
    image = sorted((SAMPLE / "images").glob("*.jpg"))[0]
    says = f"--age must be a number of years from 0 to {MAX_AGE}; got {float(age)}"
    refused_here(predict_cli.main, [str(REFERENCE), str(image), "--age", age], capsys, says)
