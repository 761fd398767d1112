"""core.app.jobs with real background processes on the tiny dataset: start, one-at-a-time, stop, kill,
failure, stale locks, liveness after kill -9, and the imbalance experiment queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.app import jobs as app_jobs
from core.common.procs import pid_alive, proc_start_time
from core.common.runs import list_runs, read_predictions, read_run, read_status
from core.common.settings import PROJECT_ROOT
from core.training.imbalance import STRATEGIES
from tests.app_support import tiny_config
from tests.core.data.test_download import dataset, server  # noqa: F401 — the fake Dataverse fixtures


def wait_for(predicate, timeout=60.0, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s")


@pytest.fixture
def runs(tmp_path):
    d = tmp_path / "runs"
    yield d
    # Never leave a worker behind, whatever the test did.
    job = app_jobs.active_job(d)
    if job is not None:
        app_jobs.kill_job(d)
        app_jobs.wait_idle(d, timeout=20)


@pytest.mark.integration
def test_failed_job_shows_its_error(runs, tmp_path):
    cfg = tiny_config(tmp_path, "broken")
    cfg["data"] = str(tmp_path / "no-such-folder")
    app_jobs.start_training(cfg, runs)
    assert app_jobs.wait_idle(runs, timeout=60)
    run = read_run(runs / "broken")
    assert run.state == "failed"
    assert "does not exist" in run.error


def test_invalid_settings_are_refused_before_starting(tiny_root, runs):
    with pytest.raises(app_jobs.JobError, match="Invalid training settings"):
        app_jobs.start_training({**tiny_config(tiny_root, "bad"), "arch": "vgg99"}, runs)
    with pytest.raises(app_jobs.JobError, match="not a usable run name"):
        app_jobs.start_training(tiny_config(tiny_root, "../escape"), runs)
    assert app_jobs.active_job(runs) is None


@pytest.mark.integration
def test_stale_lock_is_released(tiny_root, runs):
    runs.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (runs / app_jobs.LOCK_NAME).write_text(json.dumps({"id": "old", "kind": "train", "runs": ["x"], "pid": dead.pid}))
    assert app_jobs.active_job(runs) is None
    assert not (runs / app_jobs.LOCK_NAME).exists()
    # A run left "running" by a dead trainer is reported as interrupted at once, however fresh its files.
    (runs / "x").mkdir()
    (runs / "x" / "status.json").write_text(json.dumps({"state": "running", "error": None, "pid": dead.pid}))
    assert read_run(runs / "x").state == "interrupted"


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc: a worker's trainer, found without the job's records."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def run_worker(job_file: Path) -> subprocess.CompletedProcess:
    """``lesionlab jobs worker JOB`` as someone would type it."""
    return subprocess.run(
        [sys.executable, "-m", "core.cli.jobs", "worker", str(job_file)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_the_trainer_dies_with_a_killed_worker_holds_the_lock_till_then_and_kill_ends_a_job(tiny_root, runs, tmp_path):
    job = app_jobs.start_training(tiny_config(tiny_root, "orphan", epochs=200, cache_dir=str(tmp_path / "cache")), runs)
    wait_for(lambda: read_run(runs / "orphan", app_jobs.active_job(runs)).epochs, timeout=90)
    [trainer] = child_pids(job.pid)
    trainer_start = proc_start_time(trainer)
    try:
        assert os.getpgid(trainer) == job.pid  # in the worker's group: kill_job's killpg reaches it
        # Frozen, the trainer outlives its worker for as long as the test looks; its SIGTERM waits for SIGCONT.
        os.kill(trainer, signal.SIGSTOP)
        os.kill(job.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(job.pid), timeout=30)
        with pytest.raises(app_jobs.JobBusyError):
            app_jobs.start_training(tiny_config(tiny_root, "beside"), runs)
        assert not (runs / "beside").exists()
        again = run_worker(job.file)  # nor may the job run again beside its trainer
        assert again.returncode == 2 and again.stderr.startswith("error:"), again.stderr
        os.kill(trainer, signal.SIGCONT)

        def start_next() -> app_jobs.Job | None:
            try:
                return app_jobs.start_training(
                    tiny_config(tiny_root, "next", epochs=200, cache_dir=str(tmp_path / "cache")), runs
                )
            except app_jobs.JobBusyError:
                return None

        following = wait_for(start_next, timeout=60)
        # The lock came free only once the trainer had died: never two trainers at once.
        assert not pid_alive(trainer, trainer_start)
    finally:
        if pid_alive(trainer, trainer_start):
            os.kill(trainer, signal.SIGKILL)
    orphan = read_run(runs / "orphan")
    assert orphan.state in ("failed", "interrupted") and orphan.epochs

    # The next job, killed outright once it trains: worker and trainer go, and the run reads as over.
    wait_for(lambda: (runs / "next" / "status.json").is_file(), timeout=60)
    assert app_jobs.kill_job(runs)
    assert app_jobs.wait_idle(runs, timeout=30)
    # The worker releases the lock on its way out, so it may still be exiting when the lock is free.
    wait_for(lambda: not pid_alive(following.pid), timeout=30)
    killed = read_run(runs / "next")
    assert killed.state in ("stopped", "failed", "interrupted") and killed.done


@pytest.mark.integration
@pytest.mark.parametrize("moment", ["starting", "training"])
def test_a_killed_terminal_run_reads_as_interrupted_at_once(tiny_root, tmp_path, moment):
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "core.cli.train",
            "--data",
            str(tiny_root),
            "--weights",
            "none",
            "--epochs",
            "200",
            "--input-size",
            "32",
            "32",
            "--out",
            str(tmp_path),
            "--name",
            "term",
            "--cache-dir",
            str(tmp_path / "c"),
            "--device",
            "cpu",
        ],
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "term"
    try:
        if moment == "starting":  # killed while it loads the data: a run folder with little more than its status
            wait_for(lambda: read_status(run_dir))
        else:
            wait_for(lambda: read_run(run_dir).epochs, timeout=90)
        assert read_run(run_dir).state in ("starting", "running")
        os.kill(trainer.pid, signal.SIGKILL)
        wait_for(lambda: read_run(run_dir).state == "interrupted", timeout=5)
    finally:
        trainer.kill()
        trainer.wait()
    assert [(r.name, r.state) for r in list_runs(tmp_path)] == [("term", "interrupted")]


@pytest.mark.integration
def test_lock_of_a_live_foreign_process_blocks(tiny_root, runs):
    runs.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (runs / app_jobs.LOCK_NAME).write_text(
            json.dumps({"id": "other", "kind": "experiment", "runs": ["y"], "pid": sleeper.pid, "started": time.time()})
        )
        with pytest.raises(app_jobs.JobBusyError, match="imbalance experiment"):
            app_jobs.start_training(tiny_config(tiny_root, "z"), runs)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert app_jobs.active_job(runs) is None


@pytest.mark.integration
def test_a_job_trains_its_queue_in_the_background_alone_and_once(tiny_root, runs, tmp_path):
    """The one job trained to the end here: the imbalance experiment's two runs, one after the other in one
    detached trainer, while a second job and a second worker for the same job are refused."""
    base = tiny_config(tiny_root, "", epochs=1, cache_dir=str(tmp_path / "cache"))
    job = app_jobs.start_experiment(base, runs, name="exp", strategies=("none", "focal"))
    assert job.kind == "experiment" and job.runs == ["exp-none", "exp-focal"]
    assert job.pid and job.pid != os.getpid()
    assert os.getpgid(job.pid) == job.pid  # its own session: survives the app's reruns and reloads
    assert app_jobs.active_job(runs).id == job.id
    with pytest.raises(app_jobs.JobBusyError, match="Only one training job runs at a time"):
        app_jobs.start_training(tiny_config(tiny_root, "meanwhile"), runs)
    assert not (runs / "meanwhile").exists()
    second = run_worker(job.file)
    assert second.returncode == 2 and second.stderr.startswith("error:"), second.stderr
    assert "another worker" in second.stderr and "Traceback" not in second.stderr

    assert app_jobs.wait_idle(runs, timeout=180), "the job did not finish"
    assert not (runs / app_jobs.LOCK_NAME).exists()
    states = {r.name: r.state for r in list_runs(runs)}
    assert states == {"exp-none": "finished", "exp-focal": "finished"}
    for name in states:
        run = read_run(runs / name)
        assert run.state == "finished", (run.error, run.log_tail())
        assert [e["epoch"] for e in run.epochs] == [1] and run.fraction_done() == 1.0
        assert run.has_model and run.has_evaluation
        table, labels, probs, logits, evaluation = read_predictions(runs / name)
        assert probs.shape == (len(labels), 7) and logits is not None and "temperature" in evaluation
    cfgs = {n: read_run(runs / n).config for n in states}
    assert cfgs["exp-focal"]["imbalance"] == "focal" and cfgs["exp-none"]["imbalance"] == "none"
    assert all(c["finetune"] == "head" and c["feature_cache"] for c in cfgs.values())
    [manifest] = app_jobs.list_experiments(runs)
    assert manifest["name"] == "exp" and manifest["runs"] == job.runs
    # One trainer process trained both runs; what it printed about each is in that run's own log.
    logs = {n: (runs / n / "train.log").read_text() for n in states}
    for name, other in (("exp-none", "exp-focal"), ("exp-focal", "exp-none")):
        assert f"run: {runs.resolve() / name}\n" in logs[name] and other not in logs[name]
    # Once the job is over its file starts nothing: it no longer holds the lock.
    late = run_worker(job.file)
    assert late.returncode == 2 and "does not hold" in late.stderr
    assert [e["epoch"] for e in read_run(runs / "exp-none").epochs] == [1]


@pytest.mark.integration
def test_stopping_a_job_ends_its_run_and_starts_no_other(tiny_root, runs, tmp_path):
    base = tiny_config(tiny_root, "", epochs=200, cache_dir=str(tmp_path / "cache"))
    app_jobs.start_experiment(base, runs, name="exp", strategies=("none", "focal"))
    # Live progress: epochs appear while it runs.
    wait_for(lambda: len(read_run(runs / "exp-none", app_jobs.active_job(runs)).epochs) >= 1, timeout=90)
    running = read_run(runs / "exp-none", app_jobs.active_job(runs))
    assert running.state == "running" and 0 < running.fraction_done() < 1
    assert "epoch" in running.progress_text()
    assert app_jobs.stop_job(runs)
    assert app_jobs.wait_idle(runs, timeout=60)
    run = read_run(runs / "exp-none")
    assert run.state == "stopped" and 1 <= len(run.epochs) < 200
    assert run.has_evaluation  # the best epoch so far is still evaluated
    assert not (runs / "exp-focal").exists()  # the queued run never started


def test_experiment_configs_cover_every_strategy():
    cfgs = app_jobs.experiment_configs({"arch": "resnet18", "finetune": "full"}, "e")
    assert [c["imbalance"] for c in cfgs] == list(STRATEGIES)
    assert [c["name"] for c in cfgs] == [f"e-{s}" for s in STRATEGIES]
    assert {c["finetune"] for c in cfgs} == {"head"} and all(c["feature_cache"] for c in cfgs)


def test_read_run_tolerates_a_half_written_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"event": "start", "epochs": 3, "steps_per_epoch": 10, "time": "2026-01-01T00:00:00+00:00"})
        + "\n"
        + json.dumps(
            {"event": "epoch", "epoch": 1, "train_loss": 1.0, "seconds": 10.0, "time": "2026-01-01T00:00:00+00:00"}
        )
        + "\n"
        + json.dumps(
            {
                "event": "progress",
                "epoch": 2,
                "step": 5,
                "steps": 10,
                "eta_s": 5.0,
                "images_per_s": 42.0,
                "time": "2026-01-01T00:00:00+00:00",
            }
        )
        + "\n"
        + '{"event": "epo'
    )
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    fake_job = app_jobs.Job(id="j", kind="train", runs=["r"], runs_dir=tmp_path, pid=os.getpid())
    state = read_run(run, fake_job)
    assert state.state == "running" and len(state.epochs) == 1
    assert state.fraction_done() == pytest.approx(1.5 / 3)
    assert state.eta_s() == pytest.approx(5.0 + 10.0)
    text = state.progress_text()
    assert "epoch 2/3" in text and "step 5/10" in text and "42 images/s" in text and "ETA 15 s" in text


@pytest.mark.integration
def test_dataset_download_runs_in_the_background(tmp_path, runs, server):  # noqa: F811
    """``server`` is test_download's fake Dataverse on loopback (a real HTTP server)."""
    dest = tmp_path / "ham"
    job = app_jobs.start_download(dest, runs, server=server.url)
    assert job.kind == "download"
    # A training job may run beside a download; a second download may not.
    assert app_jobs.active_job(runs) is None
    with pytest.raises(app_jobs.JobBusyError, match="download is already running"):
        app_jobs.start_download(dest, runs, server=server.url)
    wait_for(lambda: app_jobs.active_download(runs) is None, timeout=60)
    status = app_jobs.download_status(runs)
    assert status["state"] == "finished", status
    assert "No problems found" in status["summary"] and status["dest"] == str(dest.resolve())
    assert status["stage"] in ("download", "verify", "extract")
    from core.data.dataset import index_dataset

    assert len(index_dataset(dest).frame) == 14


@pytest.mark.integration
def test_failed_download_reports_why(tmp_path, runs):
    app_jobs.start_download(tmp_path / "ham", runs, server="http://127.0.0.1:9")  # nothing listens on port 9
    wait_for(lambda: app_jobs.active_download(runs) is None, timeout=90)
    status = app_jobs.download_status(runs)
    assert status["state"] == "failed" and status["error"]


@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> Path:
    """An empty torchvision cache: the computer of a closed hospital or classroom network."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_training_without_its_imagenet_file_never_starts(tiny_root, runs, no_weights):
    with pytest.raises(app_jobs.JobError, match="ImageNet weights for resnet18 are not on this computer"):
        app_jobs.start_training(tiny_config(tiny_root, "offline", weights="imagenet"), runs)
    # No worker, no run folder, no job files: the refusal came before anything started.
    assert app_jobs.active_job(runs) is None
    assert not runs.exists() or not any(runs.iterdir())


def test_an_experiment_without_its_imagenet_file_starts_no_run(tiny_root, runs, no_weights):
    # ResNet-50: no package this project installs carries its ImageNet file.
    base = {**tiny_config(tiny_root, "", weights="imagenet"), "arch": "resnet50"}
    with pytest.raises(app_jobs.JobError, match=str(no_weights / "hub" / "checkpoints" / "resnet50")):
        app_jobs.start_experiment(base, runs, name="offline")
    assert app_jobs.active_job(runs) is None and app_jobs.list_experiments(runs) == []
    assert not runs.exists() or not any(runs.iterdir())
