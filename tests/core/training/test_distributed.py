"""Training under torchrun: the sharded sampler on its own, and real DDP (Gloo, two CPU processes) on the
bundled sample, against a single-process run of the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from core.app import jobs as app_jobs
from core.cli.train import main as train_main
from core.common.labels import CLASSES
from core.common.runs import read_run, request_stop
from core.models.architectures import build_model
from core.training import distributed, imbalance
from tests.app_support import tiny_config
from tests.conftest import ROOT

SAMPLE = ROOT / "sample_data" / "ham10000-sample"

# Largest difference allowed between a parameter trained by two processes and by one on the same global
# batch: only the order of the float32 sums differs (Gloo adds the two halves' gradients; one process sums
# all the batch's terms at once). Measured: under 1e-8 here.
TOLERANCE = 1e-6


def shards(make_order, batch_size: int, world: int, drop_last: bool) -> list[list[list[int]]]:
    """Each rank's batches, as a DataLoader draws them from :class:`distributed.ShardedOrder` with the rank's
    own generator seeded like every other rank's (as each torchrun process seeds it)."""
    out = []
    for rank in range(world):
        generator = torch.Generator().manual_seed(7)
        order = distributed.ShardedOrder(make_order(generator), batch_size, rank, world, drop_last)
        loader = DataLoader(range(10_000), batch_size=batch_size // world, sampler=order, generator=generator)
        batches = [b.tolist() for b in loader]
        assert len(order) == sum(len(b) for b in batches)
        out.append(batches)
    return out


def single_process(make_order, batch_size: int, drop_last: bool, sampler: bool) -> list[list[int]]:
    """The batches of the one-process loader the trainer builds (shuffled, or from the strategy's sampler)."""
    generator = torch.Generator().manual_seed(7)
    order = make_order(generator)
    options = {"sampler": order} if sampler else {"shuffle": True}
    loader = DataLoader(range(len(order)), batch_size=batch_size, generator=generator, drop_last=drop_last, **options)
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("world", [2, 3])
def test_shuffled_shards_are_disjoint_slices_of_the_single_process_batches(world):
    rows, batch = 98, 12
    make = lambda g: RandomSampler(range(rows), generator=g)  # noqa: E731 — what the loader shuffles with
    ranks = shards(make, batch, world, drop_last=True)
    expected = single_process(make, batch, drop_last=True, sampler=False)
    assert all(len(r) == len(expected) == rows // batch for r in ranks)  # every rank takes as many steps
    for step, whole in enumerate(expected):
        assert sum((r[step] for r in ranks), []) == whole  # rank by rank, the global batch
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == (rows // batch) * batch


def test_weighted_sampler_keeps_its_class_frequencies_across_ranks():
    labels = np.repeat(np.arange(len(CLASSES)), [20, 30, 60, 10, 60, 1000, 15])
    make = lambda g: imbalance.get("sampler").sampler(labels, g)  # noqa: E731
    ranks = shards(make, 32, 2, drop_last=True)
    expected = single_process(make, 32, drop_last=True, sampler=True)
    for step, whole in enumerate(expected):
        assert ranks[0][step] + ranks[1][step] == whole
    drawn = np.bincount(labels[[i for r in ranks for b in r for i in b]], minlength=len(CLASSES))
    # Each class drawn equally often in expectation: 1184 draws, about 169 per class, far from the 1000 naevi.
    assert drawn.sum() == len(labels) // 32 * 32
    assert np.all(np.abs(drawn - drawn.mean()) < 0.3 * drawn.mean()), drawn
    # The two ranks' shares are positions of one draw, each about half of every class.
    halves = [np.bincount(labels[[i for b in r for i in b]], minlength=len(CLASSES)) for r in ranks]
    assert np.all(np.abs(halves[0] - halves[1]) < 0.35 * drawn), halves


def test_oversampled_rows_are_shared_out_whole():
    frame = pd.DataFrame({"label": np.repeat(np.arange(3), [5, 40, 9])})
    rows = imbalance.get("oversample").resample_rows(frame, 0)
    make = lambda g: RandomSampler(range(len(rows)), generator=g)  # noqa: E731
    ranks = shards(make, 30, 2, drop_last=True)
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == 120  # 4 global batches of the 120 oversampled rows
    assert np.bincount(rows["label"].to_numpy()[seen]).tolist() == [40, 40, 40]


def test_a_single_partial_batch_is_shared_as_evenly_as_it_goes():
    make = lambda g: RandomSampler(range(15), generator=g)  # noqa: E731
    ranks = shards(make, 16, 2, drop_last=False)
    assert [len(b) for r in ranks for b in r] == [8, 7]
    assert sorted(ranks[0][0] + ranks[1][0]) == list(range(15))
    assert ranks[0][0] + ranks[1][0] == single_process(make, 16, drop_last=False, sampler=False)[0]


def test_one_process_is_left_alone():
    sampler = imbalance.get("sampler").sampler(np.array([0, 1, 1]), torch.Generator())
    assert distributed.shard(sampler, 3, 2, torch.Generator(), True) == (sampler, 2)
    assert distributed.shard(None, 3, 2, torch.Generator(), True) == (None, 2)
    criterion = torch.nn.CrossEntropyLoss()
    assert distributed.global_mean(criterion) is criterion
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module, torch.device("cpu")) is module and distributed.unwrap(module) is module
    assert distributed.is_main() and distributed.agree(True) and not distributed.agree(False)


# ---------------------------------------------------------------------------
# Real DDP: two processes with Gloo


def trainer(*args: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "core.cli.train", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result


def head_args(out: Path, cache: Path, *extra: str) -> list[str]:
    """A head-only run on cached features, weighted loss (each rank's share has its own class weights), no
    dropout: nothing random but the batch order, so one process and two must train the same model."""
    return [
        *("--data", str(SAMPLE), "--weights", "none", "--input-size", "32", "32", "--out", str(out)),
        *("--cache-dir", str(cache), "--decoded-dir", str(cache.parent / "decoded")),
        *("--head", "linear", "--dropout", "0", "--imbalance", "weighted_loss"),
        *("--lr", "0.01", "--batch-size", "16", "--device", "cpu", *extra),
    ]


def head_run(out: Path, cache: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    return trainer(*head_args(out, cache, *extra), processes=processes)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, one_thread):
    """A two-process run of two epochs, resumed for a third, and a one-process run of three epochs (the trainer's
    main in this process, on one thread as each torchrun process is)."""
    tmp = tmp_path_factory.mktemp("ddp")
    first = head_run(tmp / "runs", tmp / "cache", "--epochs", "2", processes=2)
    (run_dir,) = (tmp / "runs").iterdir()  # no --name: the ranks agree on rank 0's
    resumed = head_run(tmp / "runs", tmp / "cache", "--resume", str(run_dir), "--epochs", "3", processes=2)
    assert train_main(head_args(tmp / "single", tmp / "cache", "--epochs", "3", "--name", "single")) == 0
    return {"dir": run_dir, "outputs": (first, resumed), "single": tmp / "single" / "single", "cache": tmp / "cache"}


@pytest.mark.integration
def test_rank_zero_alone_writes_the_run(ddp_runs):
    run_dir = ddp_runs["dir"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best.pt",
        "config.json",
        "dataset_report.json",
        "evaluation.json",
        "last.pt",
        "metrics.jsonl",
        "split.csv",
        "status.json",
        "test_predictions.csv",
    ]
    log = events(run_dir)
    # Each event once: rank 1 trains but writes nothing.
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1, 2, 3]
    assert [e["first_epoch"] for e in log if e["event"] == "start"] == [1, 3]
    assert [e["status"] for e in log if e["event"] == "end"] == ["finished"]  # the resume cut the first
    assert read_run(run_dir).state == "finished"
    first, resumed = ddp_runs["outputs"]
    assert first.stdout.count("=== run ") == 1 and first.stdout.count("test accuracy") == 1
    assert resumed.stdout.count("test accuracy") == 1
    assert len(list(ddp_runs["cache"].iterdir())) == 1  # rank 0 alone computed and stored the features
    # Every step of an epoch covers a whole global batch (98 training images, batches of 16): 6 steps.
    assert {e["steps_per_epoch"] for e in log if e["event"] == "start"} == {6}


@pytest.mark.integration
def test_two_processes_train_the_model_one_process_trains(ddp_runs):
    ddp = torch.load(ddp_runs["dir"] / "last.pt", weights_only=True)
    one = torch.load(ddp_runs["single"] / "last.pt", weights_only=True)
    assert ddp["epoch"] == one["epoch"] == 3
    torch.manual_seed(0)  # the trainer's seed: the model both runs started from
    start = build_model("resnet18", "none", "head", "linear", dropout=0).state_dict()
    moved, apart = 0.0, 0.0
    for key, value in one["model_state"].items():
        apart = max(apart, (ddp["model_state"][key] - value).abs().max().item())
        moved = max(moved, (value - start[key]).abs().max().item())
    assert apart <= TOLERANCE, apart
    assert moved > 1000 * TOLERANCE, moved  # training changed the head far more than the runs differ
    # Same numbers epoch by epoch, the resumed epoch 3 included (the training loss is both ranks' mean).
    ddp_epochs = [e for e in events(ddp_runs["dir"]) if e["event"] == "epoch"]
    one_epochs = [e for e in events(ddp_runs["single"]) if e["event"] == "epoch"]
    for a, b in zip(ddp_epochs, one_epochs, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


@pytest.mark.integration
def test_a_batch_the_processes_cannot_share_is_refused_before_any_writing(tmp_path):
    result = trainer(
        *("--data", str(SAMPLE), "--weights", "none", "--out", str(tmp_path / "runs"), "--batch-size", "15"),
        processes=2,
        check=False,
    )
    assert result.returncode != 0
    assert "error: batch_size 15 is the global batch and must divide evenly among the 2 processes" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_a_job_on_two_processes_trains_the_network_on_images_under_torchrun(tiny_root, tmp_path):
    """The path without cached features, started as the app starts it: DataLoader workers' shares, DDP over
    the trainable layers only."""
    runs = tmp_path / "runs"
    cfg = tiny_config(tiny_root, "two", finetune="last", imbalance="oversample", epochs=1)
    with pytest.raises(app_jobs.JobError, match="multiple of 3"):
        app_jobs.start_training(cfg, runs, gpus=3)
    app_jobs.start_training(cfg, runs, gpus=2)
    try:
        assert app_jobs.wait_idle(runs, timeout=300), "the job did not finish"
    finally:
        if app_jobs.active_job(runs) is not None:
            app_jobs.kill_job(runs)
    run = read_run(runs / "two")
    assert run.state == "finished" and len(run.epochs) == 1, (run.error, run.log_tail())
    assert run.log_tail().count("test accuracy") == 1
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["two"]


@pytest.mark.integration
def test_a_stop_during_rank_zeros_feature_extraction_ends_every_process(tmp_path):
    """Rank 0 alone computes the features while rank 1 waits for them: a stop between two of rank 0's batches
    must reach rank 1 too, and end the run on both, keeping the features computed so far."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "core.cli.train",
    ]
    # 320×320 inputs: each batch of 64 takes seconds, time enough to ask for the stop during the second.
    command += ["--data", str(SAMPLE), "--weights", "none", "--input-size", "320", "320", "--epochs", "1"]
    command += ["--out", str(runs), "--name", "stop", "--cache-dir", str(cache), "--device", "cpu"]
    command += ["--decoded-dir", str(tmp_path / "decoded")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_dir = runs / "stop"

    def features_progress() -> list[dict]:
        try:
            text = (run_dir / "metrics.jsonl").read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # what follows the last newline may be a line still being written
        return [e for e in map(json.loads, lines) if e.get("phase") == "features"]

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not any(e["done"] < e["total"] for e in features_progress()):  # the first batch is done
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no feature batch finished in 5 minutes"
            time.sleep(0.05)
        request_stop(run_dir)
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("a process was left waiting after the stop (measured: rank 1, in the features' broadcast)")
    finally:
        if proc.poll() is None:
            proc.terminate()  # torchrun ends its workers (each in a session of its own), killing them after 30 s
            proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert read_run(run_dir).state == "stopped"
    log = events(run_dir)
    assert not [e for e in log if e["event"] == "epoch"]
    assert [e["status"] for e in log if e["event"] == "end"] == ["stopped"]
    done = max(e["done"] for e in features_progress())
    assert done < 140
    assert "stopped before the first epoch finished" in out
    (features,) = cache.iterdir()  # what rank 0 computed before the stop is kept for the next run
    assert len(torch.load(features, weights_only=True)["keys"]) == done
