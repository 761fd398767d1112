"""Fixtures and helpers for the app tests (AppTest and the browser test).

Import the fixtures into a test module with ``from tests.app_support import *  # noqa: F403``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from core.app import jobs as app_jobs
from core.common.procs import process_record
from core.common.settings import CACHE_ENV, CHECKPOINTS_ENV, DATA_ENV, PUBLISHED_RUNS_ENV, RUNS_ENV
from pages.views import _pages

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "streamlit_app.py"
PAGES = tuple(Path(p.script).stem for p in _pages.PAGES)  # "home", "dataset", …
TITLES = {Path(p.script).stem: "Lesion Lab" if p.default else p.title for p in _pages.PAGES}  # each page's heading
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@dataclass
class AppEnv:
    data: Path | None
    runs: Path
    checkpoints: Path

    def environ(self) -> dict[str, str]:
        # The published run records in docs/runs stay hidden unless a test asks for them.
        return {
            DATA_ENV: str(self.data) if self.data else "",
            RUNS_ENV: str(self.runs),
            CHECKPOINTS_ENV: str(self.checkpoints),
            PUBLISHED_RUNS_ENV: "",
            CACHE_ENV: str(self.runs.parent / "cache"),  # Diagnose's case index, out of the working tree
        }

    def apply(self, monkeypatch) -> None:
        for key, value in self.environ().items():
            monkeypatch.setenv(key, value)


def save_tiny_checkpoint(path: Path, arch: str = "resnet18", input_size=(64, 64)) -> Path:
    """A randomly initialised but complete Lesion Lab checkpoint (no download needed)."""
    import torch

    from core.data.preprocessing import Preprocessing
    from core.models.architectures import build_model
    from core.models.checkpoints import atomic_save, checkpoint_dict

    torch.manual_seed(0)
    model = build_model(arch, weights="none", finetune="head", head="linear").eval()
    atomic_save(
        checkpoint_dict(model, Preprocessing(input_size=tuple(input_size)), head="linear", temperature=1.5, epoch=1),
        path,
    )
    return path


def train_tiny_run(
    data: Path, runs: Path, name: str, cache: Path, should_stop: Callable[[], bool] | None = None, **overrides
) -> Path:
    """A real (in-process) training run on the tiny dataset: seconds, every file the app reads. ``should_stop`` ends
    it as the app's Stop button does."""
    from core.training.config import TrainConfig
    from core.training.loop import train

    cfg = TrainConfig(
        **{
            "data": str(data),
            "out": str(runs),
            "name": name,
            "arch": "resnet18",
            "weights": "none",
            "finetune": "head",
            "epochs": 2,
            "batch_size": 16,
            "input_size": (32, 32),
            "cache_dir": str(cache),
            "imbalance": "none",
            "device": "cpu",
            **overrides,
        }
    )
    return train(cfg, should_stop=should_stop)


def tiny_config(data: Path, name: str, **overrides) -> dict:
    """A TrainConfig dict for a background job that finishes in seconds on the tiny dataset."""
    from core.training.config import config_with

    fields = {
        "data": str(data),
        "name": name,
        "arch": "resnet18",
        "weights": "none",
        "finetune": "head",
        "epochs": 2,
        "batch_size": 16,
        "input_size": (32, 32),
        "imbalance": "none",
        "device": "cpu",
        **overrides,
    }
    return config_with("seed", **fields).to_dict()


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def lesion_image(size=(200, 150), seed: int = 0) -> Image.Image:
    """Skin-coloured background with a brown blob: passes the dermoscopy colour check."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.empty((h, w, 3), np.float32)
    arr[...] = (214, 160, 140)
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 2) ** 2 / (w / 4) ** 2) < 1
    arr[blob] = (120, 70, 50)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def empty_env(tmp_path_factory) -> AppEnv:
    base = tmp_path_factory.mktemp("app_empty")
    return AppEnv(data=None, runs=base / "runs", checkpoints=base / "checkpoints")


@pytest.fixture(scope="session")
def full_env(tmp_path_factory, tiny_root) -> AppEnv:
    """Tiny dataset, one reference checkpoint, and two finished runs (for Evaluate and Compare)."""
    base = tmp_path_factory.mktemp("app_full")
    env = AppEnv(data=tiny_root, runs=base / "runs", checkpoints=base / "checkpoints")
    save_tiny_checkpoint(env.checkpoints / "reference.pt")
    cache = base / "features"
    train_tiny_run(tiny_root, env.runs, "tiny-none", cache)
    train_tiny_run(tiny_root, env.runs, "tiny-weighted", cache, imbalance="weighted_loss")
    return env


# A dataset whose training split holds more images than core.app.model_picker.MIN_TRAIN_IMAGES (about 70 % of it).
PICKER_IMAGES_PER_CLASS = 250


@pytest.fixture(scope="session")
def picker_env(tmp_path_factory) -> AppEnv:
    """The models a picker sorts out, each a real run on a tiny dataset large enough to pass the training-size rule:
    ``clinical`` (finished, learnt the task), ``small`` (a 700-image subsample), ``weak`` (one epoch at a learning rate
    too small to learn: chance), ``stopped`` (stopped after its first epoch, evaluated); the tiny reference checkpoint,
    which records no run, and ``copied.pt``, clinical's model copied into the checkpoints folder without its records."""
    import shutil

    from tests.conftest import write_tiny_dataset

    base = tmp_path_factory.mktemp("picker")
    data = write_tiny_dataset(base / "ham", per_class=PICKER_IMAGES_PER_CLASS)
    env = AppEnv(data=data, runs=base / "runs", checkpoints=base / "checkpoints")
    cache = base / "features"
    for name, overrides in (
        ("weak", {"epochs": 1, "lr": 1e-6}),
        ("small", {"max_images": 700}),
        ("clinical", {"lr": 3e-3}),
    ):
        train_tiny_run(data, env.runs, name, cache, **overrides)
    stopped = env.runs / "stopped"
    train_tiny_run(data, env.runs, "stopped", cache, should_stop=lambda: (stopped / "best.pt").is_file(), epochs=5)
    save_tiny_checkpoint(env.checkpoints / "reference.pt")
    shutil.copy(env.runs / "clinical" / "best.pt", env.checkpoints / "copied.pt")
    return env


def pick_model(at, prefix: str, name: str) -> None:
    """Turn on the page's "Show experimental models" switch and choose the model labelled ``name`` (e.g. "run: ens")."""
    at.toggle(key=f"{prefix}_experimental").set_value(True).run()
    picker = at.selectbox(key=f"{prefix}_model")
    picker.select_index(next(i for i, o in enumerate(picker.options) if o.startswith(f"{name} — "))).run()


def app_test(page: str | None = None, timeout: float = 60):
    """An AppTest of the whole app, run once, then switched to ``page`` (e.g. "diagnose") and run again."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()
    if page and page != "home":
        at.switch_page(f"pages/views/{page}.py")
        at.run()
    return at


# The main column's width in pixels in a 1600-pixel Chromium window with the sidebar open (measured there): a table
# whose columns add up to more runs off to the right.
MAIN_WIDTH_AT_1600 = 1140


def table_fits_1600(table) -> dict:
    """An AppTest dataframe's column settings, after checking that every shown column has a width in pixels, that
    they add up to no more than :data:`MAIN_WIDTH_AT_1600`, and that its rows are tall enough for a long cell to
    wrap (Streamlit wraps only in rows taller than 4rem, 64 px)."""
    columns = json.loads(table.proto.columns)
    order = list(table.proto.column_order) or list(columns)
    widths = {c: columns.get(c, {}).get("width") for c in order if not columns.get(c, {}).get("hidden")}
    assert all(isinstance(w, int) for w in widths.values()), widths
    assert sum(widths.values()) <= MAIN_WIDTH_AT_1600, widths
    assert table.proto.row_height > 64, table.proto.row_height
    return columns


def use_folder(at, folder: str):
    """Type ``folder`` into the sidebar's Dataset folder and press its button, as Enter would; returns the run app."""
    at.sidebar.text_input(key="dataset_folder_input").set_value(folder)
    return at.button(key="FormSubmitter:dataset_form-Use this folder").click().run()


def texts(at) -> str:
    """Everything a user reads on the page, as one string (markdown, alerts, captions, metrics, titles)."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    parts += [str(e.value) for e in at.sidebar.markdown] + [str(e.value) for e in at.sidebar.caption]
    return "\n".join(parts)


def no_exceptions(at) -> None:
    assert not at.exception, "\n".join(str(e.value) + "\n" + "\n".join(e.stack_trace) for e in at.exception)


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in (DATA_ENV, RUNS_ENV, CHECKPOINTS_ENV, PUBLISHED_RUNS_ENV, CACHE_ENV):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(NamedTuple):
    url: str
    pid: int  # the benchmarks read its CPU time and memory


@contextmanager
def streamlit_server(env: dict[str, str], log: Path) -> Iterator[Server]:
    """``streamlit run streamlit_app.py`` on a free loopback port with ``env``; yields it once healthy.
    The server's output goes to ``log``."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                "streamlit_app.py",
                "--server.headless",
                "true",
                "--server.port",
                str(port),
                "--server.address",
                "127.0.0.1",
                "--browser.gatherUsageStats",
                "false",
                "--server.fileWatcherType",
                "none",
            ],
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.read().strip() == b"ok":
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("streamlit did not start:\n" + log.read_text()[-3000:])
                time.sleep(0.3)
            yield Server(url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def fake_job(
    runs: Path, run: str, *, kind: str = "train", stop: bool = False, experiment: str | None = None
) -> subprocess.Popen:
    """A job held by a live process (a sleeper standing in for the worker and its trainer), as the app sees it:
    the lock, the job file and, where asked, its STOP."""
    runs.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    job = app_jobs.Job(
        id=f"job-{run}", kind=kind, runs=[run], runs_dir=runs, **process_record(holder.pid), experiment=experiment
    )
    (runs / app_jobs.LOCK_NAME).write_text(json.dumps(job.to_dict()))
    job.file.parent.mkdir(parents=True, exist_ok=True)
    job.file.write_text(json.dumps(job.to_dict()))
    if stop:
        job.stop_file.touch()
    return holder
