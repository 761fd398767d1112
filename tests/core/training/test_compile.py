"""``--compile``: a real compiled run on the CPU (inductor, with the machine's C++ compiler) finishes and reports
what compiling cost its first epoch; without a compiler the trainer says so in one line, before any run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.common.runs import read_run
from core.common.runtime import compile_problem
from tests.conftest import ROOT

SAMPLE = ROOT / "sample_data" / "ham10000-sample"


def compiled_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Two head-only epochs on the sample's cached features, the head compiled, through the command line."""
    command = [sys.executable, "-m", "core.cli.train", "--data", str(SAMPLE), "--weights", "none"]
    command += ["--input-size", "32", "32", "--epochs", "2", "--device", "cpu", "--compile"]
    command += ["--out", str(tmp_path / "runs"), "--name", "compiled", "--cache-dir", str(tmp_path / "features")]
    command += ["--decoded-dir", str(tmp_path / "decoded")]
    # A fresh inductor cache: kernels compiled by an earlier test would need no compiler.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), **env}
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


@pytest.mark.integration
def test_a_compiled_run_finishes_and_reports_its_first_epochs_cost(tmp_path):
    problem = compile_problem(torch.device("cpu"))
    if problem:
        pytest.skip(f"torch.compile cannot compile on this machine: {problem}")
    result = compiled_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "compiled"
    assert read_run(run_dir).state == "finished"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    costs = [e for e in events if e["event"] == "compile"]
    assert [sorted(k for k in e if k.endswith("_s")) for e in costs] == [
        ["first_epoch_s"],
        ["compile_cost_s", "first_epoch_s", "second_epoch_s"],
    ]
    first, second = costs[1]["first_epoch_s"], costs[1]["second_epoch_s"]
    assert costs[1]["compile_cost_s"] == pytest.approx(max(0.0, first - second))
    assert first > second  # the first epoch compiled the head's training and evaluation graphs
    assert "torch.compile: the first epoch, compiling included, took" in result.stdout
    assert "so compiling cost about" in result.stdout
    assert "test accuracy" in result.stdout
    # What compiling changed nothing of: the checkpoint's keys are the model's own.
    state = torch.load(run_dir / "best.pt", weights_only=True)["model_state"]
    assert not [k for k in state if "_orig_mod" in k]


@pytest.mark.integration
def test_without_a_compiler_the_run_is_refused_in_one_line(tmp_path):
    result = compiled_run(tmp_path, CXX=str(tmp_path / "no-such-c++"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: torch.compile cannot compile on this machine (" in result.stderr
    assert "train without --compile" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
