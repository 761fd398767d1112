"""Background training jobs for the app: start, watch, stop. Pure Python, no Streamlit.

A job is one detached worker process (``python -m core.cli.jobs worker JOB.json``, its
own session so it outlives browser reloads, reruns and even the Streamlit server)
that runs one or more training configs one after another in one trainer process,
``python -m core.cli.train --config A.json --config B.json …`` (the runs share its
start-up, the dataset index and split and the cached features), with the
trainer's output in the ``train.log`` of the run it is on. A single training run
is a job of one config; the imbalance experiment is a job of one run per strategy.

One job at a time: ``RUNS/.job.lock`` names the job and its worker's pid, and the
worker records each trainer it starts in the job's ``trainer.json``. The trainer
stays in the worker's process group (so :func:`kill_job` reaches both) and on Linux
gets SIGTERM when the worker dies, even by SIGKILL. A lock is stale, and released by
the next caller, only when neither the worker nor its trainer lives. A worker runs
only a job that holds the lock, and only one worker runs a job: it claims the job's
``worker.json`` first. Stopping writes ``STOP`` into the current run folder, which
the trainer honours at the next step, and tells the worker to start nothing more.

What a run folder holds, and how to read one, is in :mod:`core.common.runs`.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.common.files import read_json, read_tail, write_json
from core.common.procs import die_with_parent, pid_alive, proc_start_time, process_record, record_alive
from core.common.runs import (
    TrainLogs,
    check_run_name,
    error_from_log,
    mark_unfinished,
    request_stop,
    run_started,
)
from core.common.schema import (
    Check,
    Field,
    JsonFormat,
    SchemaError,
    closed_schema,
    flag,
    list_of,
    number,
    one_of,
    read_json_file,
    text,
    whole,
)
from core.common.settings import PROJECT_ROOT

LOCK_NAME = ".job.lock"


DOWNLOAD_LOCK = ".download.lock"  # downloads have their own lock: they may run beside a training job


JOBS_DIR = ".jobs"


EXPERIMENTS_DIR = ".experiments"


class JobError(RuntimeError):
    """A job could not be started or controlled; the message is meant for the user."""


class JobBusyError(JobError):
    """Another job holds the lock."""

    def __init__(self, job: Job):
        self.job = job
        if job.kind == "download":
            super().__init__(
                f"A dataset download is already running (started {_ago(job.started)}); "
                "wait for it to finish or cancel it first."
            )
            return
        what = "imbalance experiment" if job.kind == "experiment" else "training run"
        current = job.current_run or (job.runs[0] if job.runs else "?")
        super().__init__(
            f"Another {what} is already running ({current}, started {_ago(job.started)}). "
            "Only one training job runs at a time: wait for it to finish or stop it first."
        )


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    if s < 90:
        return f"{s} s ago"
    if s < 5400:
        return f"{s // 60} min ago"
    return f"{s / 3600:.1f} h ago"


@dataclass
class Job:
    id: str
    kind: str  # "train" or "experiment"
    runs: list[str]
    runs_dir: Path
    pid: int | None = None
    pid_start: str | None = None
    started: float = field(default_factory=time.time)
    experiment: str | None = None

    @property
    def file(self) -> Path:
        return self.runs_dir / JOBS_DIR / self.id / "job.json"

    @property
    def stop_file(self) -> Path:
        return self.runs_dir / JOBS_DIR / self.id / "STOP"

    @property
    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    @property
    def trainer_file(self) -> Path:
        """The trainer the worker runs now (pid and start time), written as soon as it is started."""
        return self.file.parent / "trainer.json"

    @property
    def worker_file(self) -> Path:
        """Created by the job's worker when it claims the job; a second worker finds it and refuses."""
        return self.file.parent / "worker.json"

    @property
    def current_run(self) -> str | None:
        """The run the worker is on: the last one whose folder exists."""
        current = None
        for name in self.runs:
            if (self.runs_dir / name).exists():
                current = name
        return current

    @property
    def alive(self) -> bool:
        """Whether any process of the job lives: the worker, or the trainer it started, which outlives a killed
        worker by the moment it takes to handle its SIGTERM (and for good where that signal does not exist)."""
        return pid_alive(self.pid, self.pid_start) or record_alive(read_json(self.trainer_file) or {})

    def config_path(self, run: str) -> Path:
        """The config a queued run will train with (the run folder has none until it starts)."""
        return self.file.parent / f"{run}.json"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "runs": self.runs,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "started": self.started,
            "experiment": self.experiment,
        }

    @classmethod
    def from_dict(cls, d: dict, runs_dir: Path) -> Job:
        return cls(
            id=d["id"],
            kind=d.get("kind", "train"),
            runs=list(d.get("runs", [])),
            runs_dir=runs_dir,
            pid=d.get("pid"),
            pid_start=d.get("pid_start"),
            started=d.get("started", 0.0),
            experiment=d.get("experiment"),
        )


def _lock_path(runs_dir: Path, name: str = LOCK_NAME) -> Path:
    return Path(runs_dir) / name


def active_job(runs_dir: Path, lock_name: str = LOCK_NAME) -> Job | None:
    """The job holding the lock, or None. A stale lock (its process is gone) is removed."""
    runs_dir = Path(runs_dir)
    lock = _lock_path(runs_dir, lock_name)
    data = read_json(lock)
    if data is None:
        if lock.exists():
            # Being written right now (it is created empty, then filled): treat as busy for a moment.
            try:
                if time.time() - lock.stat().st_mtime < 10:
                    return Job(id="?", kind="train", runs=[], runs_dir=runs_dir, pid=os.getpid())
                lock.unlink(missing_ok=True)
            except OSError:
                pass
        return None
    job = Job.from_dict(data, runs_dir)
    if job.alive:
        return job
    _release(lock, job.id)
    return None


def _release(lock: Path, job_id: str) -> None:
    data = read_json(lock)
    if data is not None and data.get("id") == job_id:
        lock.unlink(missing_ok=True)


def _acquire(runs_dir: Path, job: Job, lock_name: str = LOCK_NAME) -> None:
    runs_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(runs_dir, lock_name)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = active_job(runs_dir, lock_name)  # releases a stale lock
            if holder is not None:
                raise JobBusyError(holder) from None
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(job.to_dict(), fh)
        return
    holder = active_job(runs_dir, lock_name)
    raise JobBusyError(holder or job)


def _validate(config: dict) -> dict:
    """The config normalised and checked by the trainer's own TrainConfig, the one place settings are
    validated: a job never starts with settings its trainer would refuse."""
    from core.training.config import TrainConfig  # here: the trainer's imports (torch) cost the pages seconds

    try:
        cfg = TrainConfig.from_dict(dict(config))
    except (TypeError, ValueError, KeyError) as exc:
        raise JobError(f"Invalid training settings: {exc}") from None
    return cfg.to_dict()


def _preflight(configs: list[dict]) -> None:
    """Every config's pretrained weights are on this computer, or no job starts: a run that would
    only fail at its download (or the fifth run of an experiment failing like the first) never begins."""
    from core.models.architectures import weights_available

    for c in configs:
        ok, message = weights_available(c.get("arch", ""), c.get("weights"))
        if not ok:
            raise JobError(message)


def _check_name(runs_dir: Path, name: str) -> None:
    try:
        check_run_name(name)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if (runs_dir / name).exists():
        raise JobError(f"A run named {name!r} already exists in {runs_dir}; choose another name.")


def _start(runs_dir: Path, kind: str, configs: list[dict], experiment: str | None = None, gpus: int = 1) -> Job:
    runs_dir = Path(runs_dir).resolve()
    configs = [_validate({**c, "out": str(runs_dir)}) for c in configs]
    names = [c["name"] for c in configs]
    if len(set(names)) != len(names):
        raise JobError("run names in one job must differ")
    _preflight(configs)
    if any(c["batch_size"] % gpus for c in configs):
        raise JobError(f"The batch size is shared among the {gpus} GPUs: choose a multiple of {gpus}.")
    for name in names:
        _check_name(runs_dir, name)
    job = Job(
        id=_new_id(),
        kind=kind,
        runs=names,
        runs_dir=runs_dir,
        pid=os.getpid(),
        pid_start=proc_start_time(os.getpid()),
        experiment=experiment,
    )
    extra = {"configs": [f"{c['name']}.json" for c in configs], "gpus": gpus}
    return _spawn(job, LOCK_NAME, extra, {f"{c['name']}.json": c for c in configs})


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _spawn(job: Job, lock_name: str, extra: dict, files: dict[str, Any]) -> Job:
    """Take the lock, write the job's files and start its detached worker (``python -m core.cli.jobs worker``)."""
    runs_dir = job.runs_dir
    _acquire(runs_dir, job, lock_name)
    lock = _lock_path(runs_dir, lock_name)
    try:
        job_dir = job.file.parent
        for name, content in files.items():
            write_json(job_dir / name, content)
        write_json(job.file, {**job.to_dict(), **extra, "lock": lock_name})
        log = open(job_dir / "worker.log", "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "core.cli.jobs", "worker", str(job.file)],
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()
        job.pid, job.pid_start = proc.pid, proc_start_time(proc.pid)
        data = read_json(lock)
        if data is not None and data.get("id") == job.id:
            write_json(lock, job.to_dict())
        write_json(job.file, {**job.to_dict(), **extra, "lock": lock_name})
    except BaseException:
        _release(lock, job.id)
        raise
    return job


def start_training(config: dict, runs_dir: Path, gpus: int = 1) -> Job:
    """Start one training run in the background, on ``gpus`` GPUs (torchrun, one process each) when more than
    one; raises :class:`JobBusyError` while another job runs."""
    return _start(Path(runs_dir), "train", [dict(config)], gpus=gpus)


def experiment_configs(base: dict, name: str, strategies: Sequence[str] | None = None) -> list[dict]:
    """One config per imbalance strategy (by default every one in :data:`core.training.imbalance.STRATEGIES`), all in
    cached head-only mode (frozen backbone, features computed once)."""
    if strategies is None:
        from core.training.imbalance import STRATEGIES

        strategies = tuple(STRATEGIES)
    return [
        {**base, "name": f"{name}-{s}", "imbalance": s, "finetune": "head", "feature_cache": True} for s in strategies
    ]


def start_experiment(
    base: dict, runs_dir: Path, name: str | None = None, strategies: Sequence[str] | None = None
) -> Job:
    """Queue one run per imbalance strategy (default: all); they run one after another in one worker."""
    runs_dir = Path(runs_dir)
    name = name or time.strftime("imbalance-%Y%m%d-%H%M%S")
    configs = experiment_configs(base, name, strategies)
    job = _start(runs_dir, "experiment", configs, experiment=name)
    write_json(
        runs_dir.resolve() / EXPERIMENTS_DIR / f"{name}.json",
        {
            "name": name,
            "runs": job.runs,
            "strategies": [c["imbalance"] for c in configs],
            "created": time.time(),
            "base": {k: v for k, v in base.items() if k != "name"},
        },
    )
    return job


def list_experiments(runs_dir: Path) -> list[dict]:
    """Experiment manifests, newest first."""
    found = [read_json(p) for p in (Path(runs_dir) / EXPERIMENTS_DIR).glob("*.json")]
    found = [f for f in found if isinstance(f, dict) and f.get("runs")]
    return sorted(found, key=lambda f: f.get("created", 0), reverse=True)


def stop_job(runs_dir: Path) -> bool:
    """Ask the running job to stop: the current run ends cleanly at its next step, queued runs never start."""
    job = active_job(runs_dir)
    if job is None or job.id == "?":
        return False
    job.stop_file.parent.mkdir(parents=True, exist_ok=True)
    job.stop_file.touch()
    current = job.current_run
    if current:
        request_stop(job.runs_dir / current)
    return True


def kill_job(runs_dir: Path) -> bool:
    """Terminate the job's whole process group (worker and trainer) when a clean stop takes too long."""
    job = active_job(runs_dir)
    if job is None or not job.pid or job.id == "?":
        return False
    try:
        os.killpg(job.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def wait_idle(runs_dir: Path, timeout: float = 60.0, poll: float = 0.2) -> bool:
    """Block until no job runs (for scripts and tests). Returns False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if active_job(runs_dir) is None:
            return True
        time.sleep(poll)
    return False


def _run_trainer(job: Job, cfg_paths: list[Path], gpus: int = 1) -> int:
    """Train the configs in one trainer process (torchrun's, with a process per GPU, for several GPUs); a run
    it could not finish is marked as such."""
    (job.runs_dir / job.runs[0]).mkdir(parents=True, exist_ok=True)
    args = [arg for path in cfg_paths for arg in ("--config", str(path))]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"] if gpus > 1 else []
    # The trainer stays in our process group, so kill_job's killpg reaches it, and dies with us: a trainer
    # left running by a killed worker would train beside the next job and could not be stopped.
    proc = subprocess.Popen(
        [sys.executable, *launcher, "-m", "core.cli.train", *args],
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # lines reach the logs as they are printed
    write_json(job.trainer_file, process_record(proc.pid))
    out, logs = proc.stdout.fileno(), TrainLogs(job.runs_dir, job.runs)
    os.set_blocking(out, False)
    try:
        while True:
            rc = proc.poll()
            select.select([out], [], [], 0.5 if rc is None else 0)
            logs.copy(out)
            if rc is not None:
                break
            # The trainer deletes a stale STOP when a run starts; repeat a stop asked for during its start-up.
            # A STOP in a run that has just finished keeps the trainer from starting the next one.
            run_dir = job.runs_dir / (job.current_run or job.runs[0])
            if job.stop_requested and run_started(run_dir):
                request_stop(run_dir)
    except BaseException:  # SIGTERM of the worker: take the trainer down with us
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for run_dir in _started(job):
            mark_unfinished(run_dir, "stopped", "the job was terminated")
        raise
    finally:
        proc.stdout.close()
    for run_dir in _started(job):
        mark_unfinished(
            run_dir, "failed", f"the trainer exited with code {rc} without finishing:\n{error_from_log(run_dir)}"
        )
    return rc


def _claim(job: Job, lock: Path) -> str | None:
    """Make this process the job's only worker; why it cannot be, when it cannot."""
    held = read_json(lock) or {}
    if held.get("id") != job.id:
        return f"job {job.id} does not hold {lock} (it is {held.get('id') or 'free'}); start jobs from the app"
    holder = held.get("pid")
    # The lock names the app that started us until the app has written our pid into it.
    if holder not in (os.getpid(), os.getppid()) and pid_alive(holder, held.get("pid_start")):
        return f"job {job.id} is run by another worker (pid {holder})"
    try:
        fd = os.open(job.worker_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        other = read_json(job.worker_file) or {}
        return f"job {job.id} already had a worker (pid {other.get('pid', '?')}); a job runs once"
    with os.fdopen(fd, "w") as fh:
        json.dump(process_record(os.getpid()), fh)
    return None


def _started(job: Job) -> list[Path]:
    return [job.runs_dir / name for name in job.runs if (job.runs_dir / name).exists()]


class JobFileError(ValueError):
    """A file that is not a job the app wrote; the message says why."""


def _test(key: str, valid: Callable[[object], bool], allowed: str) -> Check:
    def check(value: object) -> None:
        if not valid(value):
            raise SchemaError(f"{key} is {value!r}; it must be {allowed}")

    return check


# What a job file holds (Job.to_dict, plus the worker's instructions), each with its check: anything else, a
# missing id or a value of another kind is not a job the app wrote, and the worker refuses it.
JOB_FILE_SCHEMA: dict[str, Field] = {
    "id": Field(True, _test("id", lambda v: isinstance(v, str) and v != "" and "/" not in v, "a job id")),
    "kind": Field(True, one_of("kind", ("train", "experiment", "download"))),
    "runs": Field(False, list_of("runs", text("runs[]"))),
    "pid": Field(False, whole("pid", 0, empty=True)),
    "pid_start": Field(False, text("pid_start", empty=True)),
    "started": Field(False, number("started", 0, math.inf)),
    "experiment": Field(False, text("experiment", empty=True)),
    "lock": Field(False, _test("lock", lambda v: isinstance(v, str) and v.startswith(".") and "/" not in v, "a lock")),
    "configs": Field(
        False, list_of("configs", _test("configs[]", lambda v: isinstance(v, str) and "/" not in v, "a file name"))
    ),
    "gpus": Field(False, whole("gpus", 1)),
    "dest": Field(False, text("dest")),
    "server": Field(False, text("server", empty=True)),
    "include_external": Field(False, flag("include_external")),
}
# A job file names a few runs and configs: a few hundred bytes.
JOB_FILE = JsonFormat("a job file", 2**20, 3, 10_000, closed_schema(JOB_FILE_SCHEMA, "a job file"))


def read_job_file(path: Path) -> dict:
    """The job file at ``path``, its fields checked against what the app writes (``JOB_FILE_SCHEMA``);
    :class:`JobFileError` saying why not. Fields the worker reads besides these (the job's lock, configs and
    download settings) are checked where they are used."""
    try:
        return read_json_file(path, JOB_FILE)
    except FileNotFoundError:
        raise JobFileError(f"job file {path} does not exist") from None
    except SchemaError as exc:
        raise JobFileError(str(exc).replace(path.name, str(path), 1)) from None


def worker(job_file: Path) -> int:
    """Run a job file's configs (or its download); exit code 2 when the job is not this worker's to run."""
    job_file = Path(job_file)
    try:
        data = read_job_file(job_file)
    except JobFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job = Job.from_dict(data, job_file.parent.parent.parent)
    lock = _lock_path(job.runs_dir, data.get("lock", LOCK_NAME))
    refusal = _claim(job, lock)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        if job.kind == "download":
            _download(job, data)
        elif not job.stop_requested:
            _run_trainer(job, [job_file.parent / name for name in data["configs"]], data.get("gpus", 1))
    finally:
        _release(lock, job.id)
    return 0


def start_download(dest: Path, runs_dir: Path, *, include_external: bool = False, server: str | None = None) -> Job:
    """Download HAM10000 into ``dest`` in the background (resumable; see ``core.data.download``)."""
    runs_dir = Path(runs_dir).resolve()
    dest = Path(dest).expanduser().resolve()
    job = Job(
        id=_new_id(),
        kind="download",
        runs=[],
        runs_dir=runs_dir,
        pid=os.getpid(),
        pid_start=proc_start_time(os.getpid()),
    )
    extra = {"dest": str(dest), "include_external": include_external, "server": server}
    job = _spawn(job, DOWNLOAD_LOCK, extra, {})
    write_json(runs_dir / JOBS_DIR / "last_download.json", {"id": job.id})
    return job


def active_download(runs_dir: Path) -> Job | None:
    return active_job(runs_dir, DOWNLOAD_LOCK)


def download_status(runs_dir: Path) -> dict | None:
    """The latest download's state: ``state`` (running, finished, failed), ``dest``, and while running
    ``stage``, ``file``, ``done``, ``total``, and ``started`` and ``base`` (when this stage of this file began
    and how much was done then); ``summary`` or ``error`` when it has ended."""
    runs_dir = Path(runs_dir)
    last = read_json(runs_dir / JOBS_DIR / "last_download.json")
    if not last:
        return None
    job_dir = runs_dir / JOBS_DIR / last["id"]
    info = read_json(job_dir / "job.json") or {}
    status = {
        "state": "running",
        "dest": info.get("dest"),
        **(read_json(job_dir / "progress.json") or {}),
        **(read_json(job_dir / "status.json") or {}),
    }
    if status["state"] == "running":
        job = active_download(runs_dir)
        if job is None or job.id != last["id"]:
            status["state"] = "failed"
            status["error"] = status.get("error") or (
                "the download process ended unexpectedly:\n" + read_tail(job_dir / "worker.log", 10)
            )
    return status


def cancel_download(runs_dir: Path) -> bool:
    """Stop the running download; what was verified stays, a partial file resumes next time."""
    job = active_download(runs_dir)
    if job is None or not job.pid or job.id == "?":
        return False
    write_json(job.file.parent / "status.json", {"state": "failed", "error": "cancelled; start it again to resume"})
    try:
        os.killpg(job.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _download(job: Job, data: dict) -> None:
    from core.data.dataset import DatasetError
    from core.data.dataverse import DEFAULT_SERVER, DownloadError
    from core.data.download import download_dataset

    job_dir = job.file.parent
    last = [0.0]
    # When the current stage of the current file began, and how much of it was done then (a resumed file
    # starts part-way): the page computes the rate and the ETA from what this process has done since.
    step = {"key": None, "started": 0.0, "base": 0}

    def progress(p) -> None:
        if step["key"] != (p.stage, p.file):
            step.update(key=(p.stage, p.file), started=time.time(), base=p.done)
        now = time.monotonic()
        if now - last[0] >= 0.5 or (p.total is not None and p.done >= p.total):
            last[0] = now
            write_json(
                job_dir / "progress.json",
                {
                    "stage": p.stage,
                    "file": p.file,
                    "done": p.done,
                    "total": p.total,
                    "started": step["started"],
                    "base": step["base"],
                },
            )

    try:
        summary = download_dataset(
            data["dest"],
            server=data.get("server") or DEFAULT_SERVER,
            include_external=bool(data.get("include_external")),
            progress=progress,
        )
    except (DownloadError, DatasetError, OSError) as exc:
        write_json(job_dir / "status.json", {"state": "failed", "error": str(exc)})
        return
    write_json(
        job_dir / "status.json",
        {"state": "finished", "summary": summary.text(), "ok": summary.report is not None and summary.report.ok},
    )
